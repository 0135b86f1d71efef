"""``pdx-bench e2e``: time to first token on real vLLM (CPU) with and without pdx.

Rows (each beside a baseline measured in the same run, on the same prompts):

* ``ttft_cached_ms``: a prompt whose KV a ``kv_both`` engine loads from its agent's store
  (the second time it sees the prompt); baseline ``ttft_recompute_ms``: the first time,
  when the engine computes (and stores) the whole prompt.
* ``ttft_nohit_ms``: that first, computed request (pdx looks up, misses, stores); baseline a
  plain vLLM server without any connector: pdx's overhead when nothing is reused.
* ``ttft_pd_ms``: disaggregated, nothing reused: prefill engine (``max_tokens=1``,
  ``do_remote_decode``) then decode engine (loads the KV over the two agents, emits the
  first token); the sum of both requests. Baseline the plain server again.
* ``kv_load_gbps`` / ``kv_fetch_load_gbps``: KV bytes over the connector's load time (pin or
  fetch, checksum, unpack into vLLM's blocks) for the cached and the P/D loads, from the
  connector's log lines; baseline a single-threaded memcpy of the same bytes.

With ``--short-tokens N`` (default 1000; 0 leaves them out), on other prompts of ``N`` tokens
(the ``_1k`` rows at the default), measured on the same servers:

* ``ttft_cached_1k_ms``: the repeat on the ``kv_both`` engine (pdx loads every token but the
  last: its whole chunks and its stored tail); baseline ``vllm_prefix_cache_hit_ms``: the same
  prompt's repeat on a plain vLLM server with its own prefix cache on.
* ``ttft_pd_1k_ms``: P/D as ``ttft_pd_ms``; baseline ``ttft_plain_1k_ms``, plain vLLM without
  prefix cache.

Every TTFT is the latency of a non-streamed ``/v1/completions`` call with ``max_tokens=1``
(prefill plus one token, HTTP included), median over ``--repeats`` distinct prompts of
``--prompt-tokens`` tokens; vLLM's own prefix cache is off everywhere but on the server of
``vllm_prefix_cache_hit_ms``. Each engine runs on
one pinned core (two cores: P/D uses both). At most two vLLM servers run at a time.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.report import Report, Result, gbps, median, progress

LOAD_LINE = re.compile(r"request \S+: loaded (\d+) tokens \((\d+) chunks\) from (.+?) in ([0-9.]+) ms")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="small", help="embedded model preset (default small; tiny is quick)")
    p.add_argument("--prompt-tokens", type=int, default=4096, help="tokens per prompt (default 4096)")
    p.add_argument("--repeats", type=int, default=3, help="distinct prompts per figure (median reported)")
    p.add_argument("--short-tokens", type=int, default=1000,
                   help="tokens per prompt of the short rows (ttft_cached_1k_ms, ttft_pd_1k_ms; default 1000, "
                   "0: leave them out)")
    p.add_argument("--chunk-tokens", type=int, default=128, help="pdx chunk size (default 128)")
    p.add_argument("--transport", default="tcp", help="agent-to-agent transport for P/D: tcp, shm, nixl, ucx "
                   "(default tcp)")
    p.add_argument("--workdir", default="", help="folder for logs and run files (default: a temp folder)")
    p.add_argument("--data-dir", default="", help="pdx data folder holding the built models")


def run(args: argparse.Namespace) -> Report:

    from pdx.deploy.agent_engine import AgentEngine
    from pdx.engine.vllm import VllmOptions, start_server
    from pdx.model import ensure_model, paragraph

    report = Report("e2e")
    model = ensure_model(args.model, args.data_dir)
    spec = model.spec
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pdx-bench-e2e-"))
    workdir.mkdir(parents=True, exist_ok=True)
    n = args.prompt_tokens
    prompts = _prompts(model.path, n, args.repeats + 1, paragraph)
    warm, timed = prompts[0][:256], prompts[1:]
    sn = max(0, args.short_tokens)
    # other texts than the long prompts' (a short prompt must not be a prefix of a long one)
    short = _prompts(model.path, sn, args.repeats, paragraph, seed0=9500) if sn else []
    # vLLM's own prefix cache off: a repeat's speed-up must come from pdx's store
    vopts: dict[str, Any] = {"served_model_name": args.model, "max_model_len": max(8192, n + 64, sn + 64),
                             "kv_cache_gib": 2, "prefix_caching": False}

    # 1. the plain server: the baseline of the no-hit and P/D rows
    plain = start_server(VllmOptions(model=str(model.path), cpu_bind="0", **vopts),
                         workdir / "plain")
    try:
        ttft(plain.url, warm, args.model)
        plain_ms = [ttft(plain.url, ids, args.model)[0] for ids in progress(timed, "plain")]
        plain_short_ms = [ttft(plain.url, ids, args.model)[0] for ids in progress(short, "plain short")]
    finally:
        plain.stop()

    # 1b. vLLM's own prefix cache: the short prompts' repeats (the baseline of ttft_cached_1k_ms)
    vllm_hit_ms: list[float] = []
    if short:
        cached_vllm = start_server(VllmOptions(model=str(model.path), cpu_bind="0", **{**vopts, "prefix_caching": True}),
                                   workdir / "plain-prefix-cache")
        try:
            ttft(cached_vllm.url, warm, args.model)
            for ids in progress(short, "vLLM prefix cache"):
                ttft(cached_vllm.url, ids, args.model)
                vllm_hit_ms.append(ttft(cached_vllm.url, ids, args.model)[0])
        finally:
            cached_vllm.stop()

    store = {"chunk_tokens": args.chunk_tokens, "l1": {"capacity": "1GiB"}}
    transport = {"backend": args.transport}
    # 2. kv_both: first request computes and stores, the second loads from the store
    both = AgentEngine("both", model.path, "both", workdir, cpu_bind="0", served_model_name=args.model,
                       store=store, vllm=vopts).start()
    try:
        ttft(both.url, warm, args.model)
        first_ms, again_ms = [], []
        for ids in progress(timed, "kv_both"):
            first_ms.append(ttft(both.url, ids, args.model)[0])
            again_ms.append(ttft(both.url, ids, args.model)[0])
        cached_loads = _loads(both.engine_log_text(), local=True)
        again_short_ms: list[float] = []
        short_loaded: list[int] = []
        for ids in progress(short, "kv_both short"):
            ttft(both.url, ids, args.model)
            n_loads = len(_loads(both.engine_log_text(), local=True))
            again_short_ms.append(ttft(both.url, ids, args.model)[0])
            short_loaded.extend(t for t, _ in _loads(both.engine_log_text(), local=True)[n_loads:])
    finally:
        both.stop()

    # 3. P/D: prefill on core 0, decode on core 1
    prefill = AgentEngine("prefill", model.path, "prefill", workdir, cpu_bind="0", served_model_name=args.model,
                          store=store, transport=transport, vllm=vopts).start()
    try:
        decode = AgentEngine("decode", model.path, "decode", workdir, cpu_bind="1", served_model_name=args.model,
                             store=store, transport=transport, vllm=vopts).start()
        try:
            ttft(prefill.url, warm, args.model)
            ttft(decode.url, warm, args.model)

            def pd_pairs(prompts: list[list[int]], label: str) -> tuple[list[float], list[float], list[float]]:
                """(TTFT, prefill part, decode part) in ms of one P/D pair per prompt."""
                both_ms, p_ms, d_ms = [], [], []
                for ids in progress(prompts, label):
                    p, out = ttft(prefill.url, ids, args.model, kv_transfer_params={"do_remote_decode": True})
                    d, _ = ttft(decode.url, ids, args.model, kv_transfer_params=out["kv_transfer_params"])
                    both_ms.append(p + d)
                    p_ms.append(p)
                    d_ms.append(d)
                return both_ms, p_ms, d_ms

            pd_ms, p_part, d_part = pd_pairs(timed, "P/D")
            fetch_loads = _loads(decode.engine_log_text(), local=False)
            pd_short_ms, p_short, d_short = pd_pairs(short, "P/D short")
        finally:
            decode.stop()
    finally:
        prefill.stop()

    if short:
        k = f"{sn // 1000}k" if sn % 1000 == 0 else str(sn)
        report.add(Result(f"ttft_cached_{k}_ms", median(again_short_ms), "ms", "vllm_prefix_cache_hit_ms",
                          median(vllm_hit_ms), lower_is_better=True,
                          extra={"samples": again_short_ms, "baseline_samples": vllm_hit_ms,
                                 "loaded_tokens": short_loaded, "prompt_tokens": sn}))
        report.add(Result(f"ttft_pd_{k}_ms", median(pd_short_ms), "ms", f"ttft_plain_{k}_ms",
                          median(plain_short_ms), lower_is_better=True,
                          extra={"samples": pd_short_ms, "baseline_samples": plain_short_ms,
                                 "prefill_ms": p_short, "decode_ms": d_short}))
    token_bytes = _token_bytes(spec)
    report.add(Result("ttft_cached_ms", median(again_ms), "ms", "ttft_recompute_ms", median(first_ms),
                      lower_is_better=True, extra={"samples": again_ms, "baseline_samples": first_ms}))
    report.add(Result("ttft_nohit_ms", median(first_ms), "ms", "ttft_plain_vllm_ms", median(plain_ms),
                      lower_is_better=True, extra={"samples": first_ms, "baseline_samples": plain_ms}))
    report.add(Result("ttft_pd_ms", median(pd_ms), "ms", "ttft_plain_vllm_ms", median(plain_ms),
                      lower_is_better=True, extra={"samples": pd_ms, "baseline_samples": plain_ms,
                                                   "prefill_ms": p_part, "decode_ms": d_part}))
    copy = _memcpy_gbps(max(1, _median_bytes(cached_loads + fetch_loads, token_bytes)))
    for name, loads in (("kv_load_gbps", cached_loads), ("kv_fetch_load_gbps", fetch_loads)):
        if loads and token_bytes:
            nbytes = sum(t for t, _ in loads) * token_bytes
            secs = sum(s for _, s in loads)
            report.add(Result(name, gbps(nbytes, secs), "GB/s", "memcpy_gbps", copy,
                              extra={"loads": len(loads), "bytes": nbytes}))
    report.notes.extend([
        f"model {args.model}: {_describe(spec)}",
        f"prompts: {n} tokens, {args.repeats} distinct prompts per figure; chunks of {args.chunk_tokens} tokens "
        f"({n - 1} tokens loadable per prompt: all but the last); max_tokens=1",
        f"hardware: {_cpu_name()}, {_cores()} cores; one pinned core per engine; vLLM CPU, float32; "
        f"P/D transport {args.transport}",
        *([f"short rows: {sn}-token prompts, {args.repeats} distinct; the vLLM prefix-cache baseline is the "
           "second request of each on a plain server with prefix caching on (first request not timed)"]
          if short else []),
        f"logs: {workdir}",
    ])
    return report


def _prompts(model_path: Path, n: int, count: int, paragraph: Callable[[int, int], str],
             seed0: int = 9000) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path))
    out = []
    for seed in range(count):
        words = n
        while True:
            ids = list(tok.encode(paragraph(seed0 + seed, words), add_special_tokens=False))
            if len(ids) >= n:
                out.append(ids[:n])
                break
            words = int(words * 1.5)
    return out


def ttft(url: str, ids: list[int], name: str, **body: Any) -> tuple[float, dict[str, Any]]:
    """One non-streamed ``/v1/completions`` call with ``max_tokens=1``: (milliseconds, its answer)."""
    import httpx

    payload = {"model": name, "prompt": ids, "max_tokens": 1, "temperature": 0.0, **body}
    t0 = time.perf_counter()
    resp = httpx.post(f"{url}/v1/completions", json=payload, timeout=600.0)
    dt = time.perf_counter() - t0
    if resp.status_code != 200:
        raise RuntimeError(f"{url}: {resp.status_code} {resp.text[:500]}")
    out: dict[str, Any] = resp.json()
    return dt * 1e3, out


def _loads(log_text: str, local: bool) -> list[tuple[int, float]]:
    """(tokens, seconds) of each load the connector logged, from the local store or from a peer."""
    out = []
    for m in LOAD_LINE.finditer(log_text):
        if (m.group(3) == "the local store") == local:
            out.append((int(m.group(1)), float(m.group(4)) / 1e3))
    return out


def _token_bytes(spec: Any) -> int:
    return int(spec.kv_bytes_per_token(4)) if spec is not None else 0


def _median_bytes(loads: list[tuple[int, float]], token_bytes: int) -> int:
    return int(median([t for t, _ in loads]) * token_bytes) if loads else 0


def _memcpy_gbps(nbytes: int, repeats: int = 5) -> float:
    import numpy as np

    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return gbps(nbytes, median(times))


def _describe(spec: Any) -> str:
    if spec is None:
        return "?"
    return (f"{spec.num_layers} layers, hidden {spec.hidden_size}, {spec.num_kv_heads} KV heads of "
            f"{spec.head_dim}, {spec.num_params() / 1e6:.0f}M parameters, {spec.kv_bytes_per_token(4)} B of KV "
            "per token (float32)")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)
