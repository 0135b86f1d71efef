"""Run real ``pdx-agent`` processes: for ``pdx up``, the benches and the tests.

``AgentProcess`` starts ``python -m pdx.agent.cli`` with a config written to its
own folder, waits for the ``pdx-agent ready`` line (which carries the pid and
addresses), and stops the process by PID: SIGTERM, then SIGKILL after a
timeout. ``kill()`` is the crash (SIGKILL). The agent's stdout/stderr go to
``<workdir>/agent.out``; its own log is in ``<data dir>/logs``.

Blocking calls, one owner per object (not thread-safe). The agent itself does not
use this module.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from pdx.agent.cli import READY_PREFIX
from pdx.agent.client import AgentClient
from pdx.errors import AgentError
from pdx.transport import ucx_env


def short_dir(base: Path, name: str) -> Path:
    """A folder for an agent whose ipc:// socket path stays under the kernel's limit."""
    path = Path(base) / name
    if len(str(path)) > 60:
        import tempfile

        path = Path(tempfile.mkdtemp(prefix=f"pdx-{name}-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


class AgentProcess:
    """One ``pdx-agent`` child process. ``config`` is the YAML mapping (merged over defaults)."""

    def __init__(self, workdir: Path, config: Mapping[str, Any], engine: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, name: str = "agent", log_level: str = "INFO") -> None:
        self.workdir = short_dir(workdir, name)
        self.name = name
        cfg = dict(config)
        cfg.setdefault("name", name)
        cfg.setdefault("data_dir", str(self.workdir / "data"))
        self.config = cfg
        self.config_path = self.workdir / "agent.yaml"
        # Owner-only: the config may hold keys (registration.admin_key, transport.secret).
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(fd, 0o600)
            f.write(yaml.safe_dump(cfg))
        self.engine = list(engine)
        self.log_level = log_level
        self.env = dict(os.environ if env is None else env)
        ucx_env.prepare(self.env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}
        self.out_path = self.workdir / "agent.out"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def control_address(self) -> str:
        return str(self.info["control_address"])

    @property
    def peer_address(self) -> str:
        return str(self.info["peer_address"])

    @property
    def http_url(self) -> str:
        return str(self.info["http_url"])

    @property
    def data_dir(self) -> Path:
        return Path(self.config["data_dir"])

    def start(self, timeout_s: float = 30.0) -> AgentProcess:
        """Launch and wait for the ready line. Raises ``AgentError`` with the output's tail."""
        argv = [sys.executable, "-m", "pdx.agent.cli", "--config", str(self.config_path),
                "--log-level", self.log_level]
        if self.engine:
            argv += ["--", *self.engine]
        out = self.out_path.open("ab")
        # Its own session: a Ctrl-C in the terminal reaches only the owner, which stops the agent
        # (and so its engine) in order, instead of racing the agent's engine supervision.
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=out,
                                     env=self.env, start_new_session=True)
        out.close()
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        deadline = time.monotonic() + timeout_s
        buf = b""
        while time.monotonic() < deadline:
            chunk = self.proc.stdout.read()
            if chunk:
                buf += chunk
                for line in buf.decode(errors="replace").splitlines():
                    if line.startswith(READY_PREFIX):
                        self.info = json.loads(line[len(READY_PREFIX):])
                        return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        rc = self.proc.poll()
        self.stop()
        raise AgentError(f"pdx-agent {self.name} not ready (exit code {rc}); output:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        text = ""
        try:
            text = self.out_path.read_text(errors="replace")
        except OSError:
            pass
        return "\n".join(text.splitlines()[-n:])

    def client(self, timeout_s: float = 5.0) -> AgentClient:
        return AgentClient(self.control_address, timeout_s)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL (a crash): nothing is drained or cleaned up."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM and wait; returns the exit code (None if it had to be killed)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        return self.proc.returncode

    def stop(self) -> None:
        """Stop by PID (SIGTERM, then SIGKILL). Idempotent."""
        self.terminate(15.0)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> AgentProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
