"""``pdx-proxy``: the command line of the OpenAI-compatible P/D router.

``pdx-proxy serve --config proxy.yaml`` runs until SIGINT/SIGTERM, then closes
its listeners and worker connections. Once it listens it prints one line
``pdx-proxy: serving on http://HOST:PORT`` to stdout, so a parent process can
wait for it. ``pdx-proxy config`` lists every config key with its default.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import signal
import sys
from typing import Any

from pdx.config import ProxyConfig, ProxyWorkerConfig, describe, load_config
from pdx.errors import PdxError
from pdx.scheduler.policies import POLICIES

_EPILOG = """\
config (YAML; every key is optional; PDX__KEY=value environment variables override it):
  host: 127.0.0.1
  port: 8000
  policy: prefix_affinity        # round_robin | least_loaded | cache_aware | prefix_affinity
  models: [my-model]             # empty: learned from the workers' /v1/models
  workers:                       # static workers; agents may also register at runtime
    - {role: prefill, url: "http://127.0.0.1:8100", agent_url: "http://127.0.0.1:8101"}
    - {role: decode,  url: "http://127.0.0.1:8200"}
  cache_aware: {tokenizer: /path/to/model}

'pdx-proxy config' lists every key with its default and meaning.

endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET /metrics; admin (admin key, or admin_port): POST /admin/register, GET /admin/workers.
"""


def _parse_worker(spec: str) -> ProxyWorkerConfig:
    role, sep, url = spec.partition("=")
    if not sep or role not in ("prefill", "decode", "both"):
        raise argparse.ArgumentTypeError(f"expected ROLE=URL with ROLE prefill, decode or both, got {spec!r}")
    return ProxyWorkerConfig(url=url, role=role)  # type: ignore[arg-type]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdx-proxy",
        description="OpenAI-compatible endpoint that splits each request into a prefill call and a "
        "decode call on vLLM workers (P/D disaggregation), with cache-aware routing.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = sub.add_parser(
        "serve", help="run the proxy until SIGINT/SIGTERM",
        description="Run the proxy. Command-line options override the config file.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG)
    serve.add_argument("--config", metavar="PATH", help="YAML config (default: built-in defaults)")
    serve.add_argument("--host", help="listen address (config: host; default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port, 0 = any free port (config: port)")
    serve.add_argument("--policy", metavar="NAME",
                       help=f"routing policy: {', '.join(POLICIES.names())} (config: policy; "
                            "default prefix_affinity)")
    serve.add_argument("--model", action="append", dest="models", metavar="NAME",
                       help="served model name; repeat for more (config: models)")
    serve.add_argument("--worker", action="append", type=_parse_worker, default=[], metavar="ROLE=URL",
                       help="add a static worker, e.g. prefill=http://127.0.0.1:8100; repeat for more")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                       help="log level (default INFO)")
    sub.add_parser("config", help="list every config key with its default and meaning",
                   description="List every key of the proxy config with its default and meaning.")
    return parser


def _config(args: argparse.Namespace) -> ProxyConfig:
    cfg = load_config(ProxyConfig, args.config)
    changes: dict[str, Any] = {}
    for name in ("host", "port", "policy", "models"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    if args.worker:
        changes["workers"] = [*cfg.workers, *args.worker]
    if changes:
        cfg = dataclasses.replace(cfg, **changes)
        cfg.validate()
    return cfg


async def _serve(cfg: ProxyConfig) -> None:
    from proxy.app import ProxyServer

    server = ProxyServer(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    # Everything allocated so far (libraries, tokenizer, config) lives as long as the process:
    # keep it out of the cyclic GC's scans, so full collections stay short on the request path.
    gc.collect()
    gc.freeze()
    print(f"pdx-proxy: serving on {server.url}", flush=True)
    if server.admin_url != server.url:
        print(f"pdx-proxy: admin on {server.admin_url}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop()
        print("pdx-proxy: stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "config":
        print("\n".join(describe(ProxyConfig)))
        print("\n".join(describe(ProxyWorkerConfig, "workers[].")))
        return 0
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = _config(args)
        try:
            import uvloop

            runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        except ImportError:
            runner = asyncio.Runner()
        with runner:
            runner.run(_serve(cfg))
    except PdxError as exc:
        print(f"pdx-proxy: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"pdx-proxy: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
