"""``pdx-agent``: run the agent daemon, and optionally the engine it supervises.

    pdx-agent --config configs/prefill.yaml [options] [-- ENGINE COMMAND ...]

Start-up order: logging (``<data dir>/logs/agent-<name>.log`` and stderr), the
control plane, the HTTP endpoint, the engine (the command after ``--``, or
``engine.command``), the proxy announcements. Once serving, the agent writes
``<data dir>/run/agent-<name>.json`` (pid, instance, addresses) and prints the
same JSON on one stdout line starting with ``pdx-agent ready``.

SIGTERM or SIGINT: refuse new transfers, let in-flight ones finish (up to
``control.drain_timeout_s``), stop the engine (SIGTERM, then SIGKILL after
``engine.stop_timeout_s``), say goodbye to the proxy, close the pool, exit 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pdx.config import AgentConfig, describe, load_config
from pdx.errors import PdxError

log = logging.getLogger("pdx.agent")

READY_PREFIX = "pdx-agent ready "


def build_parser() -> argparse.ArgumentParser:
    keys = "\n".join("  " + line for line in describe(AgentConfig))
    p = argparse.ArgumentParser(
        prog="pdx-agent",
        usage="pdx-agent [--config PATH] [options] [-- ENGINE COMMAND ...]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "The pdx agent: owns the KV chunk store (shared-memory pool, disk and Redis tiers) and the "
            "transports of one engine worker, serves the engine's connector over a ZMQ control socket, "
            "and launches and supervises the engine so that cached KV survives an engine crash.\n\n"
            "Everything after '--' is the engine command. A vLLM server command (python -m "
            "vllm.entrypoints.openai.api_server ... or vllm serve ...) gets --kv-transfer-config "
            "loading PdxConnector pointed at this agent, and the environment vLLM needs on CPU; every "
            "engine gets PDX_AGENT_ADDRESS (the control socket) in its environment."),
        epilog=(
            "config keys (YAML; override any as environment variable PDX__SECTION__KEY=value, e.g. "
            "PDX__STORE__L1__CAPACITY=2GiB):\n" + keys + "\n\n"
            "files: <data dir>/logs/agent-<name>.log and engine-<name>.log; "
            "<data dir>/run/agent-<name>.json (addresses, written once serving).\n"
            "signals: SIGTERM/SIGINT drain in-flight transfers, stop the engine, exit 0."),
    )
    p.add_argument("--config", metavar="PATH",
                   help="YAML config (see configs/prefill.yaml, decode.yaml, both.yaml); "
                        "omitted = every key at its default")
    p.add_argument("--name", help="agent id, overrides 'name' (used in logs, socket and file names)")
    p.add_argument("--role", choices=["prefill", "decode", "both"], help="overrides 'role'")
    p.add_argument("--data-dir", metavar="DIR", help="overrides 'data_dir' (logs, sockets, disk tier)")
    p.add_argument("--control-address", metavar="ADDR",
                   help="overrides 'control.address' (ipc://PATH or tcp://127.0.0.1:PORT)")
    p.add_argument("--http-port", type=int, metavar="PORT", help="overrides 'http.port' (0 = any free port)")
    p.add_argument("--transport", metavar="NAME", help="overrides 'transport.backend' (tcp, shm, nixl, ucx)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="agent log level (default INFO)")
    p.add_argument("--print-config", action="store_true",
                   help="print the effective config (after file, environment and options) as JSON and exit")
    return p


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Agent options before ``--``, engine command after it."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def effective_config(args: argparse.Namespace) -> AgentConfig:
    cfg = load_config(AgentConfig, args.config)
    top: dict[str, Any] = {}
    if args.name:
        top["name"] = args.name
    if args.role:
        top["role"] = args.role
    if args.data_dir:
        top["data_dir"] = args.data_dir
    if args.control_address:
        top["control"] = dataclasses.replace(cfg.control, address=args.control_address)
    if args.http_port is not None:
        top["http"] = dataclasses.replace(cfg.http, port=args.http_port)
    if args.transport:
        top["transport"] = dataclasses.replace(cfg.transport, backend=args.transport)
    cfg = dataclasses.replace(cfg, **top)
    cfg.validate()
    return cfg


def _setup_logging(level: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(level)
    for h in (logging.FileHandler(path), logging.StreamHandler(sys.stderr)):
        h.setFormatter(fmt)
        root.addHandler(h)


def main(argv: Sequence[str] | None = None) -> int:
    opts, engine_cmd = split_argv(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(opts)
    try:
        cfg = effective_config(args)
    except PdxError as exc:
        print(f"pdx-agent: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(dataclasses.asdict(cfg), indent=1, default=str))
        return 0
    try:
        return run(cfg, engine_cmd or list(cfg.engine.command), args.log_level)
    except PdxError as exc:
        log.error("%s", exc)
        print(f"pdx-agent: {exc}", file=sys.stderr)
        return 1


def run(cfg: AgentConfig, engine_cmd: list[str], log_level: str = "INFO") -> int:
    """Run until SIGTERM/SIGINT. Blocking; call from the main thread (it installs signal handlers)."""
    from pdx.agent.http import HttpEndpoint
    from pdx.agent.launcher import EngineSupervisor, engine_command
    from pdx.agent.registration import Announcer, build_announcement, proxy_urls
    from pdx.agent.server import AgentServer
    from pdx.scheduler.messages import AgentAnnouncement

    server = AgentServer(cfg)
    name = server.agent_id
    logs = server.data_dir / "logs"
    _setup_logging(log_level, logs / f"agent-{name}.log")
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    http: HttpEndpoint | None = None
    announcer: Announcer | None = None
    server.start()
    try:
        if cfg.http.enabled:
            http = HttpEndpoint(cfg.http.host, cfg.http.port, server.metrics.registry,
                                health=lambda: not stop.is_set(), ready=server.ready, status=server.status)
            server.http_url = http.url
        if engine_cmd:
            argv, env = engine_command(engine_cmd, role=cfg.role, control_address=server.control_address,
                                       request_timeout_s=cfg.control.request_timeout_s, config=cfg.engine,
                                       run_dir=server.data_dir / "run" / f"engine-{name}")
            starts: list[int] = []

            def on_start(pid: int) -> None:
                if starts:
                    server.metrics.engine_restarts.inc()
                starts.append(pid)
                server.metrics.engine_up.set(1)

            engine = EngineSupervisor(argv, env, cfg.engine, logs / f"engine-{name}.log",
                                      on_start=on_start, on_exit=lambda _rc: server.metrics.engine_up.set(0))
            server.engine = engine
            engine.start()
        if proxy_urls(cfg.registration):
            seq = iter(range(1, 1 << 62))
            warned: list[bool] = []

            def snapshot(leaving: bool) -> AgentAnnouncement | None:
                if not server.engine_url:
                    if not warned:
                        warned.append(True)
                        log.warning("not announcing to the proxy: set engine.url (the engine's HTTP address)")
                    return None
                store = server.store
                return build_announcement(server.ctx, next(seq), leaving, engine_url=server.engine_url,
                                          agent_url=server.http_url, control_address=server.control_address,
                                          keys=store.keys if store is not None else None)

            announcer = Announcer(cfg.registration, snapshot, server.metrics, on_peers=server.peers.listed)
            server.peers.refresh_known = lambda: announcer.announce(leaving=False)
            announcer.start()
        info = {"agent_id": name, "pid": os.getpid(), "instance": server.instance, "role": cfg.role,
                "control_address": server.control_address, "peer_address": server.peer_address,
                "http_url": server.http_url, "log": str(logs / f"agent-{name}.log"),
                "engine_log": str(logs / f"engine-{name}.log") if engine_cmd else ""}
        run_file = server.data_dir / "run" / f"agent-{name}.json"
        run_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = run_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(info) + "\n")
        tmp.replace(run_file)
        # Everything built so far lives as long as the agent: keep it out of the collector's
        # full passes, which would otherwise stall the control loop now and then (p99 latency).
        gc.collect()
        gc.freeze()
        print(READY_PREFIX + json.dumps(info), flush=True)
        log.info("serving: %s", json.dumps(info))
        while not stop.wait(0.5):
            pass
    finally:
        _shutdown(server, http, announcer)
    return 0


def _shutdown(server: Any, http: Any, announcer: Any) -> None:
    t0 = time.monotonic()
    if not server.drain(server.config.control.drain_timeout_s):
        log.warning("transfers still running after %.0fs: cancelling them", server.config.control.drain_timeout_s)
    if server.engine is not None:
        server.engine.stop()
        server.metrics.engine_up.set(0)
    if announcer is not None:
        announcer.stop()
    server.stop(drain_timeout_s=1.0)
    if http is not None:
        http.close()
    log.info("shut down in %.2fs", time.monotonic() - t0)


if __name__ == "__main__":
    sys.exit(main())
