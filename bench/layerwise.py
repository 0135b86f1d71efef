"""``pdx-bench layerwise``: P/D over a slow link, layer-wise streaming against whole-prompt transfer.

Two "hosts" (network namespaces joined by veth pairs and a bridge, ``bench.netns``), each link
shaped with ``tc qdisc ... tbf`` to ``--link`` (default 1gbit): host 0 runs the prefill engine
(vLLM CPU under its pdx-agent, core 0), host 1 the decode engine (core 1); the agents talk tcp.
Each request is a P/D pair sent the way pdx-proxy sends it: the prompt to prefill with
``max_tokens=1`` and ``do_remote_decode``, then to decode with the params prefill answered.

Rows (each beside its baseline, measured in the same run on the same link and engines):

* ``ttft_pd_layerwise_ms``: the prefill request also names the decode agent (``pdx.push``, what the
  proxy adds with ``pd_layerwise: true``), so the prefill's connector hands each layer's KV to its
  agent as vLLM's ``save_kv_layer`` reports it and the agent streams it to the decode agent while
  the next layers compute; decode's fetch then commits the staged chunks (re-hashed). Baseline
  ``ttft_pd_whole_ms``: no push target, decode fetches the whole prompt after prefill answered.
  TTFT = prefill call + decode call (max_tokens=1), from the client's side, one request at a time.
* ``transfer_share_layerwise``: the decode side's load (fetch, verification, unpack: the connector's
  "loaded N tokens ... in X ms" line) as a fraction of TTFT, beside ``transfer_share_whole``.
  Lower is better; layer-wise should leave about one layer's transfer.
* ``first_fetch_ms``: the decode side's load for the pair's very first P/D request (whole-prompt, the
  agents' links warmed when they started: ``transport.peers``), beside ``steady_fetch_ms``, the
  median of the later whole-prompt loads on the same link.

Distinct ``--prompt-tokens`` prompts (no reuse hit anywhere); the modes alternate in blocks, each
with its own warm-up. Needs root (``ip netns``); every process is stopped by PID and the
namespaces deleted at the end. Takes a few minutes on two cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.e2e import ttft
from bench.report import Report, Result, median, progress

PEER_PORT = 7411


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = __doc__.split("\n", 2)[2] if __doc__ else None
    p.add_argument("--model", default="small", help="embedded model preset (default small)")
    p.add_argument("--prompt-tokens", type=int, default=4096, help="tokens per prompt (default 4096)")
    p.add_argument("--repeats", type=int, default=4, help="timed P/D requests per mode (default 4)")
    p.add_argument("--chunk-tokens", type=int, default=256, help="pdx chunk size (default 256)")
    p.add_argument("--link", default="1gbit", help="tc tbf rate of each host's link (default 1gbit)")
    p.add_argument("--workdir", default="", help="folder for logs and run files (default: a temp folder)")
    p.add_argument("--data-dir", default="", help="pdx data folder holding the built models")


def run(args: argparse.Namespace) -> Report:
    from bench.e2e import _describe, _loads, _prompts
    from bench.netns import NetnsHosts, netns_unavailable
    from pdx.model import ensure_model, paragraph

    why = netns_unavailable()
    if why:
        raise SystemExit(f"pdx-bench layerwise: network namespaces are needed: {why}")
    report = Report("layerwise")
    model = ensure_model(args.model, args.data_dir)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pdx-bench-layerwise-"))
    workdir.mkdir(parents=True, exist_ok=True)
    n = args.prompt_tokens
    prompts = _prompts(model.path, n, 2 * (args.repeats + 1), paragraph)
    secret = workdir / "secret"
    if not secret.exists():
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(os.urandom(32).hex())
    with NetnsHosts(2, "blw", rate=args.link) as hosts:
        pair = _Pair(hosts, model, workdir, args, secret)
        try:
            pair.start()
            results: dict[str, dict[str, list[float]]] = {}
            first_fetch = float("nan")
            # whole-prompt first: its warm-up is the pair's first P/D fetch (links warmed at start)
            for mode, block in (("whole", prompts[: args.repeats + 1]), ("layerwise", prompts[args.repeats + 1:])):
                warm, timed = block[0], block[1:]
                pair.pd(warm, layerwise=mode == "layerwise")
                before = len(_loads(pair.decode_log(), local=False))
                if mode == "whole" and before:
                    first_fetch = _loads(pair.decode_log(), local=False)[0][1] * 1e3
                got: dict[str, list[float]] = {"ttft": [], "prefill": [], "decode": []}
                for ids in progress(timed, f"P/D {mode}"):
                    p_ms, d_ms = pair.pd(ids, layerwise=mode == "layerwise")
                    got["ttft"].append(p_ms + d_ms)
                    got["prefill"].append(p_ms)
                    got["decode"].append(d_ms)
                loads = _loads(pair.decode_log(), local=False)[before:]
                got["load"] = [s * 1e3 for _t, s in loads]
                results[mode] = got
            pushed = pair.push_status()
        finally:
            pair.stop()
    lw, wh = results["layerwise"], results["whole"]
    report.add(Result("ttft_pd_layerwise_ms", median(lw["ttft"]), "ms", "ttft_pd_whole_ms", median(wh["ttft"]),
                      lower_is_better=True,
                      extra={"samples": lw["ttft"], "baseline_samples": wh["ttft"], "prefill_ms": lw["prefill"],
                             "decode_ms": lw["decode"], "baseline_prefill_ms": wh["prefill"],
                             "baseline_decode_ms": wh["decode"]}))
    share_lw = median(lw["load"]) / median(lw["ttft"]) if lw["load"] else float("nan")
    share_wh = median(wh["load"]) / median(wh["ttft"]) if wh["load"] else float("nan")
    report.add(Result("transfer_share_layerwise", share_lw, "of TTFT", "transfer_share_whole", share_wh,
                      lower_is_better=True,
                      extra={"load_ms": lw["load"], "baseline_load_ms": wh["load"]}))
    report.add(Result("first_fetch_ms", first_fetch, "ms", "steady_fetch_ms", median(wh["load"]) if wh["load"]
                      else float("nan"), lower_is_better=True,
                      extra={"baseline_samples": wh["load"], "note": "the decode side's load of the pair's first "
                             "P/D request (whole-prompt) against the later whole-prompt loads, same link"}))
    token_bytes = int(model.spec.kv_bytes_per_token(4)) if model.spec is not None else 0
    layers = model.spec.num_layers if model.spec is not None else 0
    report.notes.extend([
        f"model {args.model}: {_describe(model.spec)}; {n}-token distinct prompts, {args.repeats} timed P/D "
        f"requests per mode after one warm-up, one at a time; chunks of {args.chunk_tokens} tokens",
        f"2 hosts = network namespaces joined by a bridge, each link shaped to {args.link} with tc tbf; "
        "prefill on host 0 (core 0), decode on host 1 (core 1); vLLM CPU, float32; agents over tcp",
        f"KV per prompt: {(n - 1) * token_bytes / 2**20:.0f} MiB ({layers} layers, "
        f"{(n - 1) * token_bytes / max(layers, 1) / 2**20:.1f} MiB per layer)",
        f"prefill agent pushes: {pushed}",
        "TTFT = prefill call + decode call (max_tokens=1), client side; load = the decode connector's "
        "'loaded ... in X ms' (fetch or staged commit, checksum verification, unpack)",
        f"logs: {workdir}",
    ])
    return report


def _log(msg: str) -> None:
    sys.stderr.write(f"layerwise: {msg}\n")


class _Pair:
    """The prefill engine on host 0 and the decode engine on host 1, each under its agent."""

    def __init__(self, hosts: Any, model: Any, workdir: Path, args: argparse.Namespace, secret: Path) -> None:
        self.hosts = hosts
        self.model = model
        self.root = workdir
        self.args = args
        self.secret = secret
        self.engines: dict[str, Any] = {}

    def peer(self, host: int) -> str:
        return f"tcp://{self.hosts[host].address}:{PEER_PORT}"

    def start(self) -> None:
        from pdx.deploy.agent_engine import AgentEngine

        n = self.args.prompt_tokens
        vopts = {"max_model_len": max(8192, n + 64), "kv_cache_gib": 2, "prefix_caching": False}
        for name, role, host, core in (("prefill", "prefill", 0, "0"), ("decode", "decode", 1, "1")):
            addr = self.hosts[host].address

            def start(name: str = name, role: str = role, host: int = host, core: str = core,
                      addr: str = addr) -> Any:
                engine = AgentEngine(
                    name, self.model.path, role, self.root, cpu_bind=core, served_model_name=self.args.model,
                    host=addr, store={"chunk_tokens": self.args.chunk_tokens, "l1": {"capacity": "1GiB"}},
                    transport={"backend": "tcp", "host": addr, "secret_file": str(self.secret),
                               "transfer_timeout_s": 60, "peers": [self.peer(1 - host)]},
                    vllm=vopts, agent={"http": {"host": addr}, "control": {"peer_port": PEER_PORT}})
                engine.agent.start(60.0)
                return engine

            _log(f"starting {name} on host {host}")
            self.engines[name] = self.hosts.call(host, start)
        for name, host in (("prefill", 0), ("decode", 1)):
            self.hosts.call(host, self.engines[name].wait_ready, 400.0, timeout_s=420.0)

    def pd(self, ids: list[int], layerwise: bool) -> tuple[float, float]:
        """One P/D request as the proxy sends it; (prefill ms, decode ms)."""
        params: dict[str, Any] = {"do_remote_decode": True}
        if layerwise:
            params["pdx"] = {"v": 2, "push": {"agent": self.peer(1)}}
        p_ms, out = self.hosts.call(0, ttft, self.engines["prefill"].url, ids, self.args.model,
                                    kv_transfer_params=params)
        d_ms, _ = self.hosts.call(0, ttft, self.engines["decode"].url, ids, self.args.model,
                                  kv_transfer_params=out["kv_transfer_params"])
        return p_ms, d_ms

    def decode_log(self) -> str:
        text: str = self.engines["decode"].engine_log_text()
        return text

    def push_status(self) -> dict[str, Any]:
        doc: dict[str, Any] = self.hosts.call(0, lambda: self.engines["prefill"].status()["push"])
        return doc

    def stop(self) -> None:
        for e in self.engines.values():
            e.stop()

