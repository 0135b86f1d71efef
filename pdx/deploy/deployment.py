"""A local pdx deployment: vLLM workers, each under its ``pdx-agent``, behind ``pdx-proxy``.

``pdx up`` runs one from ``configs/local-1p1d.yaml``: it builds (or finds) the
embedded model, starts the proxy, then every worker's agent with its engine; the
agents announce themselves to the proxy, which routes by cache and load. Start-up
order matters only for the announcements: the proxy first, so the first heartbeat
lands. ``stop`` goes the other way, by PID: each agent stops its engine, then the
proxy stops.

A running deployment leaves ``<workdir>/deployment.json`` (its pid and URLs), which
is how ``pdx down`` finds it. ``<workdir>`` also holds the deployment's credentials
(``pdx.deploy.credentials``): the agents' secret file and the proxy's API key, owner-only;
the proxy always checks an API key and a separate admin key. One owner per object;
blocking calls.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pdx.config import ENV_PREFIX, ProxyConfig, StoreConfig, TransportConfig, data_dir, doc_field, from_dict
from pdx.deploy import credentials
from pdx.errors import ConfigError, PdxError
from pdx.transport import ucx_env

log = logging.getLogger("pdx.deploy")

STATE_FILE = "deployment.json"
PROXY_READY_PREFIX = "pdx-proxy: serving on "


@dataclass(frozen=True)
class WorkerSpec:
    """One vLLM worker and its agent."""

    name: str = doc_field("", "name in logs and metrics; also the agent's name")
    role: Literal["prefill", "decode", "both"] = doc_field("both", "prefill, decode or both")
    cpu_bind: str = doc_field(
        "auto", "cores of vLLM's OpenMP threads: 'auto', 'nobind' or core ids like '0' or '0-3'")
    store: dict[str, Any] = doc_field({}, "agent store settings, merged over the deployment's chunk size")
    transport: dict[str, Any] = doc_field(
        {}, "agent transport settings (backend: tcp, shm, nixl, ucx); secret_file defaults to the "
        "deployment's generated secret")


@dataclass(frozen=True)
class DeployConfig:
    """Everything ``pdx up`` needs (``configs/local-1p1d.yaml``)."""

    model: str = doc_field("tiny", "embedded preset (tiny, small) or the folder of a Hugging Face model")
    served_model_name: str = doc_field("", "model name clients use; empty = the preset's name, else 'model'")
    chunk_tokens: int = doc_field(128, "tokens per KV chunk, for every agent and the proxy's routing")
    workdir: str = doc_field("", "logs and run files; empty = <data dir>/deploy/<config file name>")
    start_timeout_s: float = doc_field(300.0, "limit on the whole start-up (model build excluded)")
    vllm: dict[str, Any] = doc_field(
        {"max_model_len": 4096, "kv_cache_gib": 1},
        "vLLM options for every worker (see pdx.engine.vllm.VllmOptions); vLLM's own prefix cache "
        "stays on (the first tier, pdx the second) unless prefix_caching: false")
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    workers: list[WorkerSpec] = doc_field([], "the workers; at least one that can prefill and one that can decode")

    def validate(self) -> None:
        if self.chunk_tokens <= 0:
            raise ConfigError("chunk_tokens: must be positive")
        if self.start_timeout_s <= 0:
            raise ConfigError("start_timeout_s: must be a positive number of seconds")
        roles = {w.role for w in self.workers}
        if not roles & {"prefill", "both"} or not roles & {"decode", "both"}:
            raise ConfigError("workers: need at least one prefill (or both) and one decode (or both) worker")
        names = [w.name for w in self.workers]
        if "" in names or len(set(names)) != len(names):
            raise ConfigError(f"workers[].name: every worker needs a unique name, got {names}")
        self.proxy.validate()
        for i, w in enumerate(self.workers):  # the agents' sections, checked now rather than at their start
            _check_section(StoreConfig, {"chunk_tokens": self.chunk_tokens, **w.store}, f"workers[{i}].store")
            _check_section(TransportConfig, w.transport, f"workers[{i}].transport")


def _check_section(cls: type, raw: dict[str, Any], key: str) -> None:
    """Raise ``ConfigError`` naming ``key`` (the caller adds the file) when ``raw`` is no valid ``cls``."""
    try:
        from_dict(cls, raw, "\0", f"{key}.")
    except ConfigError as exc:
        raise ConfigError(str(exc).removeprefix("\0: ")) from None


class Deployment:
    """See the module docstring."""

    def __init__(self, cfg: DeployConfig, name: str = "local",
                 progress: Callable[[str], None] = lambda _msg: None) -> None:
        self.cfg = cfg
        self.name = name
        self.progress = progress
        self.workdir = Path(cfg.workdir) if cfg.workdir else data_dir() / "deploy" / name
        self.workers: dict[str, Any] = {}  # name -> pdx.deploy.agent_engine.AgentEngine
        self.proxy_proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.model_path = ""
        self.served_model_name = cfg.served_model_name
        self.run_root: Path | None = None
        self.creds: credentials.Credentials | None = None
        self._retry_at: dict[str, float] = {}  # worker -> when supervise() may restart its agent again
        self._backoff: dict[str, float] = {}
        #: worker -> (its agent's children: pid -> start time, the shared memory they mapped, scanned when)
        self._engines: dict[str, tuple[dict[int, int], Any]] = {}
        self._scanned: dict[str, tuple[float, float]] = {}  # worker -> (engine first seen, last scan)
        # PDX__ overrides were applied to this deployment's config, which is written out in full
        # for every child; passed on, they would be read again as keys of the children's configs.
        self.child_env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        ucx_env.prepare(self.child_env)

    @property
    def api_key(self) -> str:
        """The proxy's API key: ``proxy.api_key``, else the one generated by ``start``."""
        return self.creds.api_key if self.creds else self.cfg.proxy.api_key

    @property
    def api_headers(self) -> dict[str, str]:
        """What a client of the proxy's OpenAI endpoints sends."""
        key = self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    @property
    def admin_key(self) -> str:
        """The key of the proxy's admin endpoints (agents announce themselves with it):
        ``proxy.admin_key``, else the one generated by ``start`` (never the API key)."""
        return self.creds.admin_key if self.creds else self.cfg.proxy.admin_key

    # --- start ---------------------------------------------------------------------------------

    def start(self) -> Deployment:
        """Build the model if needed, start the proxy, then the workers; wait until the proxy
        routes to all of them. Anything started is stopped again when this fails."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        other = read_state(self.workdir)
        if other is not None:
            raise PdxError(f"a deployment (pid {other['pid']}) already runs from {self.workdir}; "
                           f"stop it with 'pdx down' or Ctrl-C")
        self._resolve_model()
        deadline = time.monotonic() + self.cfg.start_timeout_s
        try:
            self._prepare_credentials()
            self._start_proxy(deadline)
            self._start_workers(deadline)
            self._wait_routable(deadline)
        except BaseException:
            self.stop()
            raise
        (self.workdir / STATE_FILE).write_text(json.dumps({
            "pid": os.getpid(), "url": self.url, "model": self.served_model_name,
            "workers": {n: {"url": w.url, "agent": w.agent.http_url} for n, w in self.workers.items()}}))
        return self

    def _resolve_model(self) -> None:
        from pdx.errors import ModelError
        from pdx.model import ensure_model
        from pdx.model.spec import preset

        if Path(self.cfg.model).is_dir():
            self.model_path = str(Path(self.cfg.model).resolve())
            self.served_model_name = self.served_model_name or "model"
            return
        try:
            spec = preset(self.cfg.model)
        except ModelError as exc:
            raise ConfigError(f"model: {self.cfg.model!r} is not a model folder, and {exc}") from None
        self.progress(f"model: embedded '{spec.name}' (built on first use, cached afterwards)")
        self.model_path = str(ensure_model(spec).path)
        self.served_model_name = self.served_model_name or f"pdx-{spec.name}"

    def _prepare_credentials(self) -> None:
        self.creds = credentials.prepare(self.workdir, self.cfg.proxy.api_key, self.cfg.proxy.admin_key)

    def _start_proxy(self, deadline: float) -> None:
        cfg = self.cfg.proxy
        assert self.creds is not None, "_prepare_credentials first"
        doc = {"host": cfg.host, "port": cfg.port, "policy": cfg.policy, "models": [self.served_model_name],
               "log_requests": cfg.log_requests, "pd_layerwise": cfg.pd_layerwise,
               "api_key": self.creds.api_key, "admin_key": self.creds.admin_key,
               "cache_aware": {"tokenizer": self.model_path, "chunk_tokens": self.cfg.chunk_tokens}}
        path = self.workdir / "proxy.yaml"
        credentials.write_private(path, yaml.safe_dump(doc))
        log = (self.workdir / "proxy.log").open("ab")
        self.progress(f"proxy: starting on {cfg.host}:{cfg.port} (log {self.workdir / 'proxy.log'})")
        self.proxy_proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--config", str(path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, env=self.child_env,
            start_new_session=True)  # Ctrl-C reaches only `pdx up`, which stops everything in order
        log.close()
        assert self.proxy_proc.stdout is not None
        os.set_blocking(self.proxy_proc.stdout.fileno(), False)
        buf = b""
        until = min(deadline, time.monotonic() + 60)
        while time.monotonic() < until:
            buf += self.proxy_proc.stdout.read() or b""
            for line in buf.decode(errors="replace").splitlines():
                if line.startswith(PROXY_READY_PREFIX):
                    self.url = line[len(PROXY_READY_PREFIX):].strip()
                    return
            if self.proxy_proc.poll() is not None:
                break
            time.sleep(0.05)
        raise PdxError(f"pdx-proxy did not start; see {self.workdir / 'proxy.log'}:\n{_tail(self.workdir / 'proxy.log')}")

    def _start_workers(self, deadline: float) -> None:
        from pdx.deploy.agent_engine import AgentEngine

        # ipc:// socket paths must stay short: agents' run folders live under a short temp dir.
        run_root = self.run_root = Path(tempfile.mkdtemp(prefix=f"pdx-{self.name}-"))
        assert self.creds is not None, "_prepare_credentials first"
        for w in self.cfg.workers:
            transport = dict(w.transport)
            if not transport.get("secret") and not transport.get("secret_file"):
                transport["secret_file"] = str(self.creds.secret_file)
            engine = AgentEngine(
                w.name, self.model_path, w.role, run_root, cpu_bind=w.cpu_bind,
                served_model_name=self.served_model_name,
                store={"chunk_tokens": self.cfg.chunk_tokens, **w.store}, transport=transport,
                vllm=dict(self.cfg.vllm),
                agent={"registration": {"proxy_url": self.url, "heartbeat_s": 1, "admin_key": self.admin_key}},
                env=self.child_env)
            self.progress(f"{w.name}: starting vLLM ({w.role}) under pdx-agent on {engine.url}")
            engine.agent.start()
            self.workers[w.name] = engine
        for name, engine in self.workers.items():
            engine.wait_ready(max(1.0, deadline - time.monotonic()))
            self.progress(f"{name}: ready")

    def _wait_routable(self, deadline: float) -> None:
        """Until the proxy lists every worker as healthy (announced and answering /health)."""
        import httpx

        want = {w.url.rstrip("/") for w in self.workers.values()}
        healthy: set[str] = set()
        while time.monotonic() < deadline:
            try:
                headers = {"Authorization": f"Bearer {self.admin_key}"} if self.admin_key else {}
                doc = httpx.get(f"{self.url}/admin/workers", headers=headers, timeout=2.0).json()
                healthy = {str(w.get("url", "")).rstrip("/") for w in doc.get("workers", [])
                           if w.get("state") == "healthy"}
                if want <= healthy:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.2)
        raise PdxError(f"the proxy routes to {sorted(healthy)} but not yet to {sorted(want - healthy)}")

    # --- supervision ---------------------------------------------------------------------------

    #: first and longest wait between two restarts of a worker's agent that keeps exiting
    RESTART_BACKOFF_S = (1.0, 60.0)

    def supervise(self) -> list[str]:
        """Restart the agent of every worker whose agent exited (a crash, a SIGKILL): the agent
        launches its engine again and announces itself to the proxy. ``pdx up`` calls this about
        once a second; each attempt blocks until the agent is ready (bounded by its start timeout),
        and a worker whose agent keeps failing is retried with a doubling back-off. Returns the
        names of the workers restarted now."""
        from pdx.errors import AgentError

        restarted = []
        for name, worker in self.workers.items():
            agent = worker.agent
            if agent.alive():
                if agent.proc is not None:  # its engine, should the agent die
                    self._watch_engine(name, agent.pid)
                continue
            if time.monotonic() < self._retry_at.get(name, 0.0):
                continue
            code = agent.proc.returncode if agent.proc is not None else None
            self.progress(f"{name}: pdx-agent exited (code {code}); restarting it")
            agent.stop()  # reaps the old process, closes its pipe
            engines, shm = self._engines.pop(name, ({}, None))
            left = stop_left_engine(engines, shm)
            if left:
                self.progress(f"{name}: stopped the engine the dead agent left running (pid {', '.join(map(str, left))})")
            try:
                agent.start()
            except AgentError as exc:
                first, longest = self.RESTART_BACKOFF_S
                wait = min(longest, self._backoff.get(name, first / 2) * 2)
                self._backoff[name] = wait
                self._retry_at[name] = time.monotonic() + wait
                self.progress(f"{name}: pdx-agent did not start again ({exc}); next try in {wait:.0f} s")
                continue
            self._backoff.pop(name, None)
            self._retry_at.pop(name, None)
            restarted.append(name)
            self.progress(f"{name}: pdx-agent restarted (pid {agent.pid}); it starts its engine again")
        return restarted

    def _watch_engine(self, name: str, agent_pid: int) -> None:
        """Remember the agent's children (its engine) and the shared memory their process trees map:
        should the agent die, nobody else knows which segments were its engine's. Scans every call
        during an engine's first two minutes (vLLM makes its queues at start-up), then every 10 s."""
        from pdx.agent.shm_reaper import EngineShm

        children = {pid: started for pid in _children(agent_pid) if (started := _start_time(pid)) is not None}
        known, shm = self._engines.get(name, ({}, None))
        now = time.monotonic()
        if children != known or shm is None:  # a new engine (or the agent restarted it): start over
            shm = EngineShm(prefix=("psm_", "sem.mp-"), before=set())
            self._scanned[name] = (now, 0.0)
        self._engines[name] = (children, shm)
        first, last = self._scanned[name]
        if now - last >= (0.0 if now - first < 120.0 else 10.0):
            for pid in children:
                shm.scan(pid)
            self._scanned[name] = (first, now)

    # --- stop ----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every worker (agent first stops its engine), then the proxy; by PID. Idempotent."""
        for name in reversed(list(self.workers)):
            self.progress(f"{name}: stopping")
            self.workers.pop(name).stop()
        if self.proxy_proc is not None:
            if self.proxy_proc.poll() is None:
                self.progress("proxy: stopping")
                self.proxy_proc.send_signal(signal.SIGTERM)
                try:
                    self.proxy_proc.wait(15)
                except subprocess.TimeoutExpired:
                    self.proxy_proc.kill()
                    self.proxy_proc.wait(5)
            if self.proxy_proc.stdout is not None:
                self.proxy_proc.stdout.close()
            self.proxy_proc = None
        if self.run_root is not None:
            # Keep the agents' and engines' logs next to the proxy's; drop sockets and temp files.
            for log in self.run_root.glob("*/data/logs/*.log"):
                shutil.copy2(log, self.workdir / log.name)
            shutil.rmtree(self.run_root, ignore_errors=True)
            self.run_root = None
        if self.creds is not None:
            credentials.remove(self.creds)
            self.creds = None
        state = read_state(self.workdir)
        if state is not None and state["pid"] == os.getpid():
            (self.workdir / STATE_FILE).unlink(missing_ok=True)

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def read_state(workdir: Path) -> dict[str, Any] | None:
    """The state file of a deployment whose process still runs; a stale one is removed."""
    path = workdir / STATE_FILE
    try:
        state: dict[str, Any] = json.loads(path.read_text())
        os.kill(int(state["pid"]), 0)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        path.unlink(missing_ok=True)
        return None
    return state


def stop_running(workdir: Path, timeout_s: float = 60.0) -> dict[str, Any] | None:
    """``pdx down``: SIGTERM the process of the deployment in ``workdir`` and wait for it."""
    state = read_state(workdir)
    if state is None:
        return None
    pid = int(state["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return state
        time.sleep(0.2)
    raise PdxError(f"deployment process {pid} did not stop within {timeout_s:.0f} s")


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
                out.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue
    return out


def _start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot): with the pid, the process's identity."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def stop_left_engine(engines: dict[int, int], shm: Any = None, timeout_s: float = 10.0) -> list[int]:
    """Kill what a dead agent left running: its engine (``pid -> start time``, each leading its own
    process group, as the agent launches it) and everything in that group, then remove the shared
    memory those processes mapped (vLLM's ``psm_*`` queues, multiprocessing's ``sem.mp-*``; ``shm``,
    a ``pdx.agent.shm_reaper.EngineShm`` that watched them while the agent lived, plus what they
    map now) that no live process maps any more. The engine got SIGTERM when its agent died; a vLLM
    server that still serves a request waits for it forever, its engine core gone, so it gets
    SIGKILL here. Returns the pids killed. Bounded by ``timeout_s``."""
    from pdx.agent.shm_reaper import EngineShm

    if shm is None:
        shm = EngineShm(prefix=("psm_", "sem.mp-"), before=set())
    alive = [pid for pid, started in engines.items() if _start_time(pid) == started]
    for pid in alive:
        shm.scan(pid)
    for pid in alive:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_start_time(p) == engines[p] and _running(p) for p in alive):
        time.sleep(0.1)
    reaped = shm.reap()
    if reaped:
        log.info("removed the shared memory of the engine a dead agent left: %s", ", ".join(sorted(reaped)))
    return alive


def _running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"
