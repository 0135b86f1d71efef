"""``pdx-bench replay TRACE``: send a trace to a running deployment at the trace's arrival times.

The trace (``pdx.trace`` format) is turned into real prompts: each hash id becomes a fixed block
of token ids (``pdx.trace.TokenMap``), so requests that share ``hash_ids`` share a token prefix
and pdx can reuse its KV. ``--scale`` shrinks lengths to the model's context (a 512-token block
becomes ``512 * scale`` tokens), ``--time-scale`` stretches arrival gaps so a small machine is
loaded but not drowned, ``output_length`` becomes ``max_tokens`` (capped by ``--max-tokens``).
Requests are streamed (``/v1/completions`` with token-id prompts, greedy).

Rows:

* ``replay_ttft_p50_ms`` / ``_p90`` / ``_p99``: TTFT through ``--url`` (the pdx deployment);
  baseline: the same requests, same times, against plain vLLM workers (``--baseline-workers N``
  started here after the pdx run, or ``--baseline-url``), spread over them least-outstanding first;
* ``replay_hit_ratio``: prompt tokens not computed by any worker (loaded by pdx or found in the
  engines' own prefix caches) over all prompt tokens, from the workers' metrics; baseline
  ``oracle_hit_ratio``: an infinite cache shared by every worker, on the scaled trace;
* ``replay_failures``: requests that failed or broke (must be 0);
* per worker and per tier (extra): prompt tokens, loaded by pdx, hit in vLLM's own cache,
  computed; chunks' tokens served by each agent tier (L1, disk, Redis, ...).

Progress goes to stderr every few seconds; ``--plot PNG`` draws TTFT over time and the
cumulative hit ratio over time (measured and oracle). Which workers to read metrics from is
asked of the proxy's ``/admin/workers``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.report import Report, Result, percentile
from pdx.sse import adata_lines


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", help="trace file (JSON lines; write one with 'pdx sim generate')")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running deployment's OpenAI endpoint (pdx-proxy), e.g. "
                       "http://127.0.0.1:8000")
    where.add_argument("--up", metavar="CONFIG", help="start this 'pdx up' deployment config, replay on it, "
                       "stop it (before any baseline starts)")
    p.add_argument("--model", default="tiny", help="embedded preset or model folder: served name and vocabulary")
    p.add_argument("--served-model-name", default="", help="model name in requests (default: --model)")
    p.add_argument("--api-key", default="", help="bearer key of the proxy (also used for /admin/workers)")
    p.add_argument("--scale", type=float, default=0.25, help="length scale: tokens = trace tokens x S")
    p.add_argument("--time-scale", type=float, default=1.0, help="arrival gaps x T (T > 1 slows the trace)")
    p.add_argument("--limit", type=int, default=200, help="first N requests of the trace (default 200)")
    p.add_argument("--max-context", type=int, default=4096, help="the model's context: prompts are cut to fit")
    p.add_argument("--max-tokens", type=int, default=16, help="cap on max_tokens (from output_length)")
    p.add_argument("--block-tokens", type=int, default=512, help="tokens per hash id in the trace")
    p.add_argument("--concurrency", type=int, default=64, help="most requests in flight at once")
    p.add_argument("--timeout-s", type=float, default=600.0, help="limit on one request")
    p.add_argument("--baseline-workers", type=int, default=0,
                   help="start N plain vLLM servers (one core each) after the pdx run and replay on them")
    p.add_argument("--baseline-url", default="", help="comma-separated plain vLLM URLs for the baseline")
    p.add_argument("--plot", metavar="PNG", help="draw TTFT and hit ratio over time")
    p.add_argument("--workdir", default="", help="folder for the baseline servers' logs")


@dataclass
class Sent:
    index: int
    at_s: float  # scheduled send time, from the start of the run
    prompt_tokens: int
    max_tokens: int
    ttft_s: float | None = None
    error: str = ""
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, when returned


@dataclass
class RunResult:
    label: str
    sent: list[Sent]
    wall_s: float
    workers: dict[str, dict[str, float]] = field(default_factory=dict)
    tiers: dict[str, float] = field(default_factory=dict)
    samples: list[tuple[float, float]] = field(default_factory=list)  # (s, cumulative hit ratio)

    @property
    def ttfts_ms(self) -> list[float]:
        return [s.ttft_s * 1e3 for s in self.sent if s.ttft_s is not None and not s.error]

    @property
    def failures(self) -> int:
        return sum(1 for s in self.sent if s.error or s.ttft_s is None)

    @property
    def prompt_tokens(self) -> int:
        return sum(s.prompt_tokens for s in self.sent)

    def hit_ratio(self) -> float | None:
        if not any("prompt" in w for w in self.workers.values()):
            return None  # no worker's metrics could be read
        computed = sum(w["computed"] for w in self.workers.values())
        total = self.prompt_tokens
        return max(0.0, 1.0 - computed / total) if total else None


# --- prompts -----------------------------------------------------------------------------------


def build_requests(args: argparse.Namespace, vocab: int) -> tuple[list[Any], list[list[int]], float]:
    """(scaled trace requests, their prompts, oracle hit ratio of the scaled trace)."""
    from pdx.trace import Oracle, TokenMap, TraceRequest, read_trace

    trace = read_trace(args.trace, args.limit)
    block = max(1, round(args.block_tokens * args.scale))
    tmap = TokenMap(block, vocab)
    cap = args.max_context - args.max_tokens - 1
    scaled, prompts = [], []
    oracle = Oracle(block)
    for i, r in enumerate(trace):
        n = max(1, min(cap, round(r.input_length * args.scale)))
        ids = r.hash_ids[: -(-n // block)]
        s = TraceRequest(r.timestamp, n, max(1, min(args.max_tokens, r.output_length)), ids)
        oracle.see(s)
        scaled.append(s)
        prompts.append(tmap.prompt(ids, n, salt=i))
    return scaled, prompts, oracle.hit_ratio


# --- metrics of the workers ----------------------------------------------------------------------


def _admin_workers(url: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    import httpx

    resp = httpx.get(f"{url}/admin/workers", headers=headers, timeout=10.0)
    resp.raise_for_status()
    data = resp.json()
    return list(data["workers"] if isinstance(data, dict) and "workers" in data else data)


def _snapshot(workers: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per worker: prompt tokens, tokens loaded through the connector, vLLM prefix-cache hits,
    and per agent tier the tokens of chunks it served (``tier:<name>``)."""
    from pdx.deploy.agent_engine import Metrics

    out: dict[str, dict[str, float]] = {}
    for w in workers:
        row: dict[str, float] = {"role_prefill": float(w.get("role") in ("prefill", "both"))}
        try:
            m = Metrics.fetch(f"{w['url']}/metrics")
            row["prompt"] = m.value("vllm:prompt_tokens_total")
            row["pdx"] = m.value("vllm:external_prefix_cache_hits_total")
            row["engine"] = m.value("vllm:prefix_cache_hits_total")
        except Exception as exc:  # a worker gone mid-run is reported, not fatal
            row["error"] = 1.0
            print(f"replay: metrics of {w.get('id')}: {exc}", file=sys.stderr)
        if w.get("agent_url"):
            try:
                a = Metrics.fetch(f"{w['agent_url']}/metrics")
                for name, labels, value in a.samples:
                    if name == "pdx_store_hit_tokens_total" and labels.get("op") == "get":
                        key = f"tier:{labels.get('tier')}"
                        row[key] = row.get(key, 0.0) + value
            except Exception as exc:
                print(f"replay: agent metrics of {w.get('id')}: {exc}", file=sys.stderr)
        out[str(w.get("id"))] = row
    return out


def _delta(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    out = {}
    for wid, row in after.items():
        b = before.get(wid, {})
        d = {k: v - b.get(k, 0.0) for k, v in row.items() if not k.startswith("role")}
        d["role_prefill"] = row.get("role_prefill", 0.0)
        d["computed"] = max(0.0, d.get("prompt", 0.0) - d.get("pdx", 0.0) - d.get("engine", 0.0))
        out[wid] = d
    return out


def _computed(before: dict[str, dict[str, float]], now: dict[str, dict[str, float]]) -> float:
    return sum(d["computed"] for d in _delta(before, now).values())


# --- sending -------------------------------------------------------------------------------------


async def _replay(label: str, urls: list[str], model: str, headers: dict[str, str], scaled: list[Any],
                  prompts: list[list[int]], args: argparse.Namespace,
                  sampler: Any = None) -> tuple[list[Sent], float]:
    import httpx

    t_first = scaled[0].timestamp
    sent = [Sent(i, (r.timestamp - t_first) / 1000.0 * args.time_scale, r.input_length, r.output_length)
            for i, r in enumerate(scaled)]
    outstanding = {u: 0 for u in urls}
    sem = asyncio.Semaphore(args.concurrency)
    done = 0
    limits = httpx.Limits(max_connections=args.concurrency + 8, max_keepalive_connections=args.concurrency)
    timeout = httpx.Timeout(args.timeout_s, connect=10.0)
    start = time.perf_counter()

    async def one(s: Sent, client: httpx.AsyncClient) -> None:
        nonlocal done
        delay = s.at_s - (time.perf_counter() - start)
        if delay > 0:
            await asyncio.sleep(delay)
        async with sem:
            url = min(urls, key=lambda u: outstanding[u])
            outstanding[url] += 1
            body = {"model": model, "prompt": prompts[s.index], "max_tokens": s.max_tokens, "temperature": 0.0,
                    "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
            t0 = time.perf_counter()
            try:
                async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as resp:
                    if resp.status_code != 200:
                        s.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
                        return
                    async for data in adata_lines(resp.aiter_bytes()):
                        if data == "[DONE]":
                            continue
                        event = json.loads(data)
                        if "error" in event:
                            s.error = str(event["error"])[:200]
                        if event.get("choices") and s.ttft_s is None:
                            s.ttft_s = time.perf_counter() - t0
                        usage = event.get("usage") or {}
                        details = usage.get("prompt_tokens_details") or {}
                        if details.get("cached_tokens") is not None:
                            s.cached_tokens = int(details["cached_tokens"])
            except (httpx.HTTPError, json.JSONDecodeError) as exc:
                s.error = f"{type(exc).__name__}: {exc}"[:200]
            finally:
                outstanding[url] -= 1
                done += 1

    async def progress() -> None:
        while True:
            await asyncio.sleep(5.0)
            ok = [x.ttft_s for x in sent if x.ttft_s is not None and not x.error]
            failed = sum(1 for x in sent if x.error)
            p50 = percentile(ok, 50) * 1e3 if ok else float("nan")
            extra = ""
            if sampler is not None:
                ratio = await asyncio.to_thread(sampler, time.perf_counter() - start)
                extra = f", hit ratio so far {ratio:.3f}" if ratio is not None else ""
            print(f"replay {label}: {time.perf_counter() - start:.0f} s, {done}/{len(sent)} done, "
                  f"{failed} failed, TTFT p50 {p50:.0f} ms{extra}", file=sys.stderr, flush=True)

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        ticker = asyncio.create_task(progress())
        try:
            await asyncio.gather(*(one(s, client) for s in sent))
        finally:
            ticker.cancel()
    return sent, time.perf_counter() - start


def run_target(label: str, urls: list[str], model: str, headers: dict[str, str], scaled: list[Any],
               prompts: list[list[int]], args: argparse.Namespace, admin_url: str = "",
               admin_headers: dict[str, str] | None = None) -> RunResult:
    """Replay on ``urls``; with ``admin_url`` (a pdx-proxy), read the workers' metrics around it."""
    workers = _admin_workers(admin_url, admin_headers or headers) if admin_url else []
    before = _snapshot(workers) if workers else {}
    samples: list[tuple[float, float]] = []
    prompt_at = [0]

    def sampler(elapsed: float) -> float | None:
        now = _snapshot(workers)
        total = sum(d.get("prompt", 0.0) for d in _delta(before, now).values() if d.get("role_prefill"))
        if total <= 0:
            return None
        prefill_computed = sum(d["computed"] for d in _delta(before, now).values() if d.get("role_prefill"))
        ratio = max(0.0, 1.0 - prefill_computed / total)
        samples.append((elapsed, ratio))
        prompt_at[0] = int(total)
        return ratio

    sent, wall = asyncio.run(_replay(label, urls, model, headers, scaled, prompts, args,
                                     sampler if workers else None))
    res = RunResult(label, sent, wall, samples=samples)
    if workers:
        time.sleep(1.0)  # vLLM publishes its counters once per step
        res.workers = _delta(before, _snapshot(workers))
        for d in res.workers.values():
            for k, v in d.items():
                if k.startswith("tier:"):
                    res.tiers[k[5:]] = res.tiers.get(k[5:], 0.0) + v
    return res


def _run_up(args: argparse.Namespace, model: str, scaled: list[Any],
            prompts: list[list[int]]) -> tuple[RunResult, str]:
    """Start the deployment of ``args.up`` (as ``pdx up`` does), replay on it, stop it."""
    from pdx.config import load_config
    from pdx.deploy import DeployConfig, Deployment

    path = Path(args.up)
    cfg = load_config(DeployConfig, path)
    with Deployment(cfg, path.stem, progress=lambda m: print(f"replay: {m}", file=sys.stderr, flush=True)) as dep:
        dep.start()
        headers = dep.api_headers
        admin = {"Authorization": f"Bearer {dep.admin_key}"} if dep.admin_key else headers
        workers = _admin_workers(dep.url, admin)
        print(f"replay: deployment up at {dep.url} with {len(workers)} workers", file=sys.stderr, flush=True)
        res = run_target("pdx", [dep.url], dep.served_model_name or model, headers, scaled, prompts, args,
                         admin_url=dep.url, admin_headers=admin)
        return res, dep.url


def _plain_run(urls: list[str], model: str, scaled: list[Any], prompts: list[list[int]],
               args: argparse.Namespace) -> RunResult:
    res = run_target("plain vLLM", urls, model, {}, scaled, prompts, args)
    # plain workers: each computes what its own prefix cache lacks (usage.cached_tokens)
    computed = sum(s.prompt_tokens - (s.cached_tokens or 0) for s in res.sent)
    res.workers = {"plain": {"prompt": float(res.prompt_tokens), "pdx": 0.0,
                             "engine": float(res.prompt_tokens - computed), "computed": float(computed)}}
    return res


def _baseline(args: argparse.Namespace, model_path: str, model: str, scaled: list[Any],
              prompts: list[list[int]]) -> RunResult | None:
    if args.baseline_url:
        return _plain_run([u.strip().rstrip("/") for u in args.baseline_url.split(",") if u.strip()],
                          model, scaled, prompts, args)
    if args.baseline_workers <= 0:
        return None
    import os
    import tempfile

    from pdx.engine.vllm import VllmOptions, start_server

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pdx-bench-replay-"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    servers = []
    try:
        for i in range(args.baseline_workers):
            opts = VllmOptions(model=model_path, served_model_name=model, max_model_len=args.max_context,
                               cpu_bind=str(i % cores))
            servers.append(start_server(opts, workdir / f"plain-{i}"))
            print(f"replay: plain vLLM {i} at {servers[-1].url}", file=sys.stderr, flush=True)
        return _plain_run([s.url for s in servers], model, scaled, prompts, args)
    finally:
        for s in servers:
            s.stop()


# --- the workload ----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> Report:
    from pdx.model import ensure_model

    built = ensure_model(args.model)
    model = args.served_model_name or args.model
    scaled, prompts, oracle = build_requests(args, built.vocab_size)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    print(f"replay: {len(scaled)} requests, {sum(len(p) for p in prompts)} prompt tokens, "
          f"span {scaled[-1].timestamp / 1000 * args.time_scale - scaled[0].timestamp / 1000 * args.time_scale:.0f} s, "
          f"oracle hit ratio {oracle:.3f}", file=sys.stderr, flush=True)
    if args.up:
        pdx_run, url = _run_up(args, model, scaled, prompts)
    else:
        url = args.url.rstrip("/")
        pdx_run = run_target("pdx", [url], model, headers, scaled, prompts, args, admin_url=url)
    base = _baseline(args, str(built.path), model, scaled, prompts)

    report = Report("replay")
    ttft = pdx_run.ttfts_ms
    for p in (50, 90, 99):
        b = percentile(base.ttfts_ms, p) if base and base.ttfts_ms else None
        report.add(Result(f"replay_ttft_p{p}_ms", percentile(ttft, p), "ms",
                          f"plain_vllm_ttft_p{p}_ms" if b is not None else None, b, lower_is_better=True))
    hit = pdx_run.hit_ratio()
    if hit is not None:
        report.add(Result("replay_hit_ratio", hit, "ratio", "oracle_hit_ratio", oracle,
                          extra={"workers": pdx_run.workers, "tiers": pdx_run.tiers}))
    if base is not None:
        bh = base.hit_ratio()
        if bh is not None:
            report.add(Result("plain_vllm_hit_ratio", bh, "ratio", "oracle_hit_ratio", oracle))
    report.add(Result("replay_failures", float(pdx_run.failures), "requests",
                      extra={"errors": sorted({s.error for s in pdx_run.sent if s.error})[:5]}))
    if base is not None:
        report.add(Result("plain_vllm_failures", float(base.failures), "requests"))
    report.notes.append(f"trace {args.trace}: first {len(scaled)} requests, lengths x {args.scale} (cut to "
                        f"{args.max_context} tokens), gaps x {args.time_scale}, max_tokens <= {args.max_tokens}")
    report.notes.append(f"pdx run {pdx_run.wall_s:.0f} s on {url}" + (
        f"; baseline {base.label} {base.wall_s:.0f} s" if base else "; no baseline"))
    for wid, d in pdx_run.workers.items():
        report.notes.append(f"worker {wid}: {d.get('prompt', 0):.0f} prompt tokens, {d.get('pdx', 0):.0f} loaded "
                            f"by pdx, {d.get('engine', 0):.0f} hit in vLLM's prefix cache, "
                            f"{d.get('computed', 0):.0f} computed")
    if pdx_run.tiers:
        report.notes.append("agent tiers served (chunk tokens): " + ", ".join(
            f"{k} {v:.0f}" for k, v in sorted(pdx_run.tiers.items())))
    if args.plot:
        plot(args.plot, pdx_run, base, scaled, oracle, args)
        report.notes.append(f"plot: {args.plot}")
    return report


def plot(path: str, pdx_run: RunResult, base: RunResult | None, scaled: list[Any], oracle: float,
         args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pdx.trace import Oracle

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for run_, colour in ((pdx_run, "tab:blue"), (base, "tab:grey")):
        if run_ is None:
            continue
        xs = [s.at_s for s in run_.sent if s.ttft_s is not None and not s.error]
        ys = [s.ttft_s * 1e3 for s in run_.sent if s.ttft_s is not None and not s.error]
        ax1.scatter(xs, ys, s=8, alpha=0.6, color=colour, label=f"{run_.label} (p99 {percentile(ys, 99):.0f} ms)")
        bad = [s.at_s for s in run_.sent if s.error or s.ttft_s is None]
        if bad:
            ax1.scatter(bad, [0] * len(bad), marker="x", color="red", label=f"{run_.label} failures")
    ax1.set_ylabel("TTFT (ms)")
    ax1.set_yscale("log")
    ax1.legend(loc="upper left", fontsize=8)
    ax1.set_title(f"replay of {Path(args.trace).name}: {len(scaled)} requests, lengths x {args.scale}, "
                  f"gaps x {args.time_scale}", fontsize=10)
    o = Oracle(scaled[0].input_length and max(1, round(args.block_tokens * args.scale)))
    t_first = scaled[0].timestamp
    ox, oy = [], []
    for r in scaled:
        o.see(r)
        ox.append((r.timestamp - t_first) / 1000.0 * args.time_scale)
        oy.append(o.hit_ratio)
    ax2.plot(ox, oy, color="tab:green", label=f"oracle (cumulative; final {oracle:.3f})")
    if pdx_run.samples:
        ax2.plot([t for t, _ in pdx_run.samples], [r for _, r in pdx_run.samples], "o-", color="tab:blue",
                 label="pdx (cumulative, prefill workers, from their metrics)")
    if base is not None:
        cum, tot, bx, by = 0, 0, [], []
        for s in base.sent:
            tot += s.prompt_tokens
            cum += s.cached_tokens or 0
            bx.append(s.at_s)
            by.append(cum / tot if tot else 0.0)
        ax2.plot(bx, by, color="tab:grey", label="plain vLLM (cumulative, own prefix caches)")
    ax2.set_ylabel("hit ratio")
    ax2.set_xlabel("time since the first request (s)")
    ax2.set_ylim(0, 1)
    ax2.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
