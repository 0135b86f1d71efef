"""Launch and supervise the engine (vLLM, or any command) beside the agent.

``engine_command`` turns the user's command into the one to run: for a vLLM
OpenAI server it adds ``--kv-transfer-config`` loading ``PdxConnector`` by module
path and pointing it at this agent (unless the command has one), and the
environment vLLM needs on this CPU build (``pdx.engine.vllm``). Every engine
also gets ``PDX_AGENT_ADDRESS`` (the control socket) in its environment.

``EngineSupervisor`` runs the engine in its own process group, output appended to
``<data dir>/logs/engine-<agent>.log``, and restarts it with exponential backoff
when it exits unexpectedly; the agent's pool, and so every committed chunk,
outlives the engine. After ``max_restarts`` failed starts in a row (an engine up
``stable_after_s`` resets the count) it gives up: state ``FAILED``, and ``/readyz``
says so. ``stop()`` sends SIGTERM, then SIGKILL to the group after
``stop_timeout_s``. After an engine exit (a crash, or a stop that needed SIGKILL) the
``psm_*`` shared-memory segments the engine created are removed (``pdx.agent.shm_reaper``).

Threading: one supervisor thread per engine; ``status()``, ``stop()`` are
thread-safe. The engine receives SIGTERM if the agent dies (``PR_SET_PDEATHSIG``),
so a killed agent leaves no orphan behind.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from pdx.agent.shm_reaper import EngineShm
from pdx.config import EngineConfig
from pdx.errors import EngineError

log = logging.getLogger("pdx.agent.engine")

AGENT_ADDRESS_ENV = "PDX_AGENT_ADDRESS"
CONNECTOR_CLASS = "PdxConnector"
CONNECTOR_MODULE = "pdx.connector.vllm"
OMP_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
KV_ROLES = {"prefill": "kv_producer", "decode": "kv_consumer", "both": "kv_both"}


class EngineState(str, Enum):
    NONE = "none"  # no engine configured
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"  # exited; waiting before the next restart
    STOPPING = "stopping"
    STOPPED = "stopped"  # stopped on purpose
    FAILED = "failed"  # gave up restarting (or restarts are off)


@dataclass(frozen=True)
class EngineStatus:
    state: EngineState
    pid: int = 0
    restarts: int = 0
    last_exit_code: int | None = None
    uptime_s: float = 0.0
    log_path: str = ""
    command: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state.value, "pid": self.pid, "restarts": self.restarts,
                "last_exit_code": self.last_exit_code, "uptime_s": round(self.uptime_s, 3),
                "log": self.log_path, "command": list(self.command)}


def is_vllm_command(argv: Sequence[str]) -> bool:
    """True for ``python -m vllm.entrypoints.openai.api_server ...`` and ``vllm serve ...``."""
    if not argv:
        return False
    if os.path.basename(argv[0]) == "vllm" and len(argv) > 1 and argv[1] == "serve":
        return True
    return any(a.startswith("vllm.entrypoints") for a in argv[1:3])


def kv_transfer_config(role: str, control_address: str, timeout_s: float) -> dict[str, Any]:
    """The ``--kv-transfer-config`` that makes vLLM load ``PdxConnector`` talking to this agent."""
    return {
        "kv_connector": CONNECTOR_CLASS,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": KV_ROLES[role],
        # A chunk that fails to load (missing, late, corrupt) is recomputed; vLLM's default fails the request.
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"agent_address": control_address, "agent_timeout_s": timeout_s},
    }


def engine_command(command: Sequence[str], *, role: str, control_address: str, request_timeout_s: float,
                   config: EngineConfig, run_dir: Path,
                   base_env: Mapping[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """argv and environment of the engine. ``run_dir`` (created) holds vLLM's per-run temp folders."""
    argv = list(command)
    env = dict(os.environ if base_env is None else base_env)
    if is_vllm_command(argv):
        from pdx.engine.vllm import VllmOptions, vllm_command

        run_dir.mkdir(parents=True, exist_ok=True)
        # Only the environment is taken: vLLM's CPU fixes live in one place (pdx.engine.vllm).
        # Core binding is the user's choice when their environment makes one (engine.env still wins).
        bind = env.get(OMP_BIND_ENV)
        _, env = vllm_command(VllmOptions(model="-"), run_dir, 0, env)
        if bind:
            env[OMP_BIND_ENV] = bind
        if config.inject_kv_config and "--kv-transfer-config" not in argv:
            argv += ["--kv-transfer-config",
                     json.dumps(kv_transfer_config(role, control_address, request_timeout_s), sort_keys=True)]
    env.update(config.env)
    env[AGENT_ADDRESS_ENV] = control_address
    return argv, env


def _pdeathsig() -> Callable[[], None] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def set_pdeathsig() -> None:
        prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG

    return set_pdeathsig


class EngineSupervisor:
    """Runs one engine command and keeps it running; see the module docstring.

    ``on_exit(returncode)`` runs on the supervisor thread after each unexpected
    exit, before the backoff (the agent drops the engine's uncommitted writes
    there); ``on_start(pid)`` after each launch. Both must be quick.
    """

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], config: EngineConfig, log_path: Path,
                 on_start: Callable[[int], None] | None = None,
                 on_exit: Callable[[int], None] | None = None) -> None:
        if not argv:
            raise EngineError("empty engine command")
        self.argv = list(argv)
        self.env = dict(env)
        self.config = config
        self.log_path = log_path
        self.on_start = on_start
        self.on_exit = on_exit
        self._proc: subprocess.Popen[bytes] | None = None
        self._state = EngineState.STARTING
        self._restarts = 0
        self._failures_in_row = 0
        self._last_exit: int | None = None
        self._started_at = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._shm = EngineShm()

    # --- public ------------------------------------------------------------------------------

    def start(self) -> None:
        """Launch the engine and the supervisor thread; returns once the first launch was tried.
        Raises ``EngineError`` if the command cannot be run at all."""
        self._launch()
        self._thread = threading.Thread(target=self._supervise, name="pdx-agent-engine", daemon=True)
        self._thread.start()

    def status(self) -> EngineStatus:
        with self._lock:
            proc = self._proc
            running = self._state is EngineState.RUNNING
            return EngineStatus(self._state, proc.pid if proc is not None and running else 0,
                                self._restarts, self._last_exit,
                                time.monotonic() - self._started_at if running else 0.0,
                                str(self.log_path), tuple(self.argv))

    @property
    def running(self) -> bool:
        with self._lock:
            return self._state is EngineState.RUNNING

    def stop(self, timeout_s: float | None = None) -> int | None:
        """Stop supervising, SIGTERM the engine, SIGKILL its group after the timeout. Idempotent;
        returns the engine's exit code (None if it never ran)."""
        limit = self.config.stop_timeout_s if timeout_s is None else timeout_s
        self._stop.set()
        with self._lock:
            proc = self._proc
            if self._state not in (EngineState.STOPPED, EngineState.FAILED):
                self._state = EngineState.STOPPING
        rc = None
        if proc is not None:
            rc = _terminate(proc, limit)
            log.info("engine pid %d stopped (exit code %s)", proc.pid, rc)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(limit + 5.0)
        if self._thread is None or not self._thread.is_alive():
            self._shm.reap()
        with self._lock:
            self._state = EngineState.STOPPED
        return rc

    # --- supervisor thread ---------------------------------------------------------------------

    def _launch(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._shm = EngineShm()  # /dev/shm before the launch: what exists now is not the engine's
        with self.log_path.open("ab") as out:
            out.write(f"\n=== pdx-agent: starting engine (restart {self._restarts}) at "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(self.argv)}\n".encode())
            out.flush()
            try:
                proc = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=_pdeathsig())
            except OSError as exc:
                with self._lock:
                    self._state = EngineState.FAILED
                raise EngineError(f"cannot run the engine command {self.argv[0]!r}: {exc.strerror}") from exc
        with self._lock:
            self._proc = proc
            self._state = EngineState.RUNNING
            self._started_at = time.monotonic()
        log.info("engine started: pid %d, log %s", proc.pid, self.log_path)
        if self.on_start is not None:
            self.on_start(proc.pid)

    def _supervise(self) -> None:
        next_scan = 0.0
        while not self._stop.is_set():
            with self._lock:
                proc = self._proc
            if proc is None:
                return
            try:
                rc = proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                now = time.monotonic()
                if now >= next_scan:  # which psm_* segments the engine maps (made at start-up)
                    self._shm.scan(proc.pid)
                    next_scan = now + (1.0 if now - self._started_at < 60.0 else 10.0)
                continue
            if self._stop.is_set():
                return
            ran = time.monotonic() - self._started_at
            _reap_group(proc.pid)
            self._shm.reap()
            with self._lock:
                self._last_exit = rc
                if ran >= self.config.stable_after_s:
                    self._failures_in_row = 0
                self._failures_in_row += 1
                give_up = not self.config.restart or self._failures_in_row > self.config.max_restarts
                self._state = EngineState.FAILED if give_up else EngineState.BACKOFF
            log.warning("engine pid %d exited with code %s after %.1fs", proc.pid, rc, ran)
            if self.on_exit is not None:
                try:
                    self.on_exit(rc)
                except Exception:
                    log.exception("engine exit hook failed")
            if give_up:
                log.error("engine not restarted: %s; see %s",
                          "restarts are off" if not self.config.restart else
                          f"{self.config.max_restarts} restarts in a row without a stable run",
                          self.log_path)
                return
            delay = min(self.config.restart_backoff_max_s,
                        self.config.restart_backoff_s * 2 ** (self._failures_in_row - 1))
            log.info("restarting the engine in %.1fs (restart %d)", delay, self._restarts + 1)
            if self._stop.wait(delay):
                return
            with self._lock:
                self._restarts += 1
            try:
                self._launch()
            except EngineError as exc:
                log.error("%s", exc)
                return


def _terminate(proc: subprocess.Popen[bytes], timeout_s: float) -> int | None:
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("engine pid %d ignored SIGTERM for %.0fs: SIGKILL", proc.pid, timeout_s)
            _kill_group(proc.pid)
            proc.wait(timeout=10)
    _reap_group(proc.pid)
    return proc.returncode


def _reap_group(pgid: int, grace_s: float = 3.0) -> None:
    """The engine led its own process group: make sure its children (vLLM's engine core) are gone."""
    deadline = time.monotonic() + grace_s
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _group_alive(pgid):
        _kill_group(pgid)


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
