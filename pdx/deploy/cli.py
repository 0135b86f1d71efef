"""``pdx``: the umbrella command.

  pdx up [--demo]     start the local deployment (configs/local-1p1d.yaml) and serve until Ctrl-C
  pdx demo            start it, send the demo requests, print what happened, stop
  pdx down            stop a deployment that ``pdx up`` started in another terminal
  pdx model build     build the embedded model (``python -m pdx.model`` has more)

The daemons have their own commands: ``pdx-agent``, ``pdx-proxy``, ``pdx-bench``.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pdx.config import describe, load_config
from pdx.deploy.deployment import DeployConfig, Deployment, WorkerSpec, stop_running
from pdx.errors import PdxError
from pdx.sse import data_lines

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "local-1p1d.yaml"

#: words of generated text in the demo's long context (~1,700 tokens with the embedded tokenizer)
DEMO_CONTEXT_WORDS = 1200
DEMO_MAX_TOKENS = 24


def _say(msg: str) -> None:
    print(f"[pdx] {msg}", flush=True)


def _load(args: argparse.Namespace) -> tuple[DeployConfig, str]:
    path = Path(args.config)
    cfg = load_config(DeployConfig, path)
    if getattr(args, "model", None):
        import dataclasses

        cfg = dataclasses.replace(cfg, model=args.model)
    return cfg, path.stem


# --- demo ------------------------------------------------------------------------------------


#: the two tiers a prompt token can come from instead of being computed, as vLLM counts them
LOCAL_HITS = "vllm:prefix_cache_hits_total"  # the engine's own prefix cache (first tier)
PDX_HITS = "vllm:external_prefix_cache_hits_total"  # loaded by PdxConnector from pdx (second tier)


def _worker_counts(dep: Deployment) -> dict[str, tuple[float, float, float]]:
    """Per worker: (prompt tokens seen, tokens found in vLLM's own prefix cache, tokens pdx loaded)."""
    from pdx.deploy.agent_engine import Metrics

    out = {}
    for name, w in dep.workers.items():
        m = Metrics.fetch(f"{w.url}/metrics")
        out[name] = (m.value("vllm:prompt_tokens_total"), m.value(LOCAL_HITS), m.value(PDX_HITS))
    return out


def _stream(url: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[float, str, dict[str, Any]]:
    """One streaming completion through the proxy: (TTFT s, text, usage)."""
    import httpx

    t0 = time.perf_counter()
    ttft = 0.0
    text: list[str] = []
    usage: dict[str, Any] = {}
    with httpx.stream("POST", f"{url}/v1/completions", timeout=300.0, headers=headers,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as resp:
        if resp.status_code != 200:
            raise PdxError(f"demo request failed: {resp.status_code} {resp.read().decode(errors='replace')[:500]}")
        for data in data_lines(resp.iter_bytes()):
            if data == "[DONE]":
                continue
            event = json.loads(data)
            if event.get("choices"):
                if not ttft:
                    ttft = time.perf_counter() - t0
                text.append(event["choices"][0].get("text", ""))
            if event.get("usage"):
                usage = event["usage"]
    return ttft, "".join(text), usage


def run_demo(dep: Deployment) -> list[dict[str, Any]]:
    """A short request, then the same long context twice with different questions. Prints, per
    request, TTFT through the proxy and where the prompt's KV came from."""
    from pdx.model.text import paragraph

    context = paragraph(seed=7, num_words=DEMO_CONTEXT_WORDS)
    requests = [
        ("short prompt", "The quick brown fox"),
        ("long context, first time", f"{context}\n\nQuestion: what happened first?\nAnswer:"),
        ("same context, new question", f"{context}\n\nQuestion: what happened last?\nAnswer:"),
    ]
    rows = []
    _say(f"demo: {len(requests)} streaming requests to {dep.url}/v1/completions (greedy, "
         f"{DEMO_MAX_TOKENS} tokens each)")
    for label, prompt in requests:
        before = _worker_counts(dep)
        ttft, text, usage = _stream(dep.url, {"model": dep.served_model_name, "prompt": prompt,
                                              "max_tokens": DEMO_MAX_TOKENS, "temperature": 0.0},
                                     dep.api_headers)
        time.sleep(0.3)  # let vLLM publish the step's metrics
        after = _worker_counts(dep)
        per_worker = {n: tuple(a - b for a, b in zip(after[n], before[n], strict=True)) for n in after}
        row: dict[str, Any] = {
            "request": label, "prompt_tokens": usage.get("prompt_tokens"), "ttft_ms": round(ttft * 1e3, 1),
            "workers": {n: {"prompt_tokens": int(p), "vllm_prefix_cache": int(local), "loaded_by_pdx": int(h),
                            "computed": int(p - local - h)}
                        for n, (p, local, h) in per_worker.items() if p}}
        rows.append(row)
        _say(f"  {label}: {row['prompt_tokens']} prompt tokens, TTFT {row['ttft_ms']:.0f} ms, "
             f"text {text[:32]!r}... (random weights: noise, but the same noise as without pdx)")
        for name, c in row["workers"].items():
            _say(f"      {name:>10}: {c['vllm_prefix_cache']:>5} tokens from vLLM's prefix cache, "
                 f"{c['loaded_by_pdx']:>5} loaded by pdx, {c['computed']:>5} computed")
    first, repeat = rows[1], rows[2]
    if first["ttft_ms"] and repeat["ttft_ms"]:
        _say(f"  repeated context: TTFT {first['ttft_ms']:.0f} ms -> {repeat['ttft_ms']:.0f} ms "
             f"({first['ttft_ms'] / repeat['ttft_ms']:.1f}x)")
    return rows


# --- commands --------------------------------------------------------------------------------


def _print_endpoint(dep: Deployment) -> None:
    _say(f"ready: OpenAI endpoint {dep.url}/v1 serving model '{dep.served_model_name}'")
    _say("try:")
    key_file = dep.creds.api_key_file if dep.creds else None
    auth = f" -H \"Authorization: Bearer $(cat {key_file})\"" if key_file else ""
    print(f"  curl -s {dep.url}/v1/completions -H 'Content-Type: application/json'{auth} \\\n"
          f"       -d '{{\"model\": \"{dep.served_model_name}\", \"prompt\": \"Once upon a time\", "
          f"\"max_tokens\": 16, \"temperature\": 0}}'", flush=True)
    _say(f"metrics: {dep.url}/metrics   workers: {dep.url}/admin/workers (admin key in {dep.workdir / 'proxy.yaml'})")
    _say(f"logs: {dep.run_root} while running (agents, engines), {dep.workdir} (proxy; the rest on stop)")


def cmd_up(args: argparse.Namespace, demo_only: bool = False) -> int:
    cfg, name = _load(args)
    stop = threading.Event()
    # SIGTERM (pdx down) and SIGINT (Ctrl-C) both end the wait below; start-up is interrupted by
    # KeyboardInterrupt, and Deployment.start stops whatever it had started.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with Deployment(cfg, name, progress=_say) as dep:
        t0 = time.monotonic()
        dep.start()
        _say(f"started {len(dep.workers)} workers and the proxy in {time.monotonic() - t0:.0f} s")
        _print_endpoint(dep)
        rows = run_demo(dep) if (getattr(args, "demo", False) or demo_only) else []
        if args.json and rows:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        if demo_only:
            return 0
        _say("serving; Ctrl-C (or 'pdx down') stops everything")
        try:
            while not stop.wait(1.0):
                dep.supervise()  # an agent that died is started again (it restarts its engine)
        except KeyboardInterrupt:
            pass
        _say("stopping")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    cfg, name = _load(args)
    dep = Deployment(cfg, name)
    state = stop_running(dep.workdir)
    if state is None:
        _say(f"no deployment is running from {dep.workdir}")
        return 1
    _say(f"stopped the deployment at {state['url']} (pid {state['pid']})")
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    from pdx.model import ensure_model

    model = ensure_model(args.preset)
    _say(f"{args.preset}: {model.path} ({model.num_params / 1e6:.1f}M parameters)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    config_help = "deployment config (default: configs/local-1p1d.yaml)"
    parser = argparse.ArgumentParser(prog="pdx", description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in (("up", "start the local deployment and serve until Ctrl-C"),
                            ("demo", "start the local deployment, run the demo requests, stop")):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", default=str(DEFAULT_CONFIG), help=config_help)
        p.add_argument("--model", help="override the config's model: a preset (tiny, small) or a folder")
        p.add_argument("--json", metavar="PATH", help="write the demo's figures as JSON")
        p.add_argument("--help-config", action="store_true", help="list every config key and exit")
        if name == "up":
            p.add_argument("--demo", action="store_true", help="send the demo requests once ready")
    p = sub.add_parser("down", help="stop a deployment started by 'pdx up'")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help=config_help)
    p = sub.add_parser("model", help="build the embedded model (no download)")
    p.add_argument("action", choices=["build"])
    p.add_argument("preset", nargs="?", default="tiny", help="tiny (tests, default) or small (benchmarks)")
    return parser


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv)[:1] == ["sim"]:  # pdx sim: its own parser
        from pdx.sim.cli import main as sim_main

        return sim_main((sys.argv[1:] if argv is None else argv)[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if getattr(args, "help_config", False):
        print("\n".join(describe(DeployConfig)))
        print("\n".join(describe(WorkerSpec, "workers[].")))
        return 0
    try:
        if args.command == "up":
            return cmd_up(args)
        if args.command == "demo":
            return cmd_up(args, demo_only=True)
        if args.command == "down":
            return cmd_down(args)
        return cmd_model(args)
    except PdxError as exc:
        print(f"pdx: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pdx: interrupted; everything started was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
