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

Every TTFT is the latency of a non-streamed ``/v1/completions`` call with ``max_tokens=1``
(prefill plus one token, HTTP included), median over ``--repeats`` distinct prompts of
``--prompt-tokens`` tokens; vLLM's own prefix cache is off everywhere. Each engine runs on
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
    p.add_argument("--chunk-tokens", type=int, default=128, help="pdx chunk size (default 128)")
    p.add_argument("--transport", default="tcp", help="agent-to-agent transport for P/D: tcp, shm, nixl, ucx "
                   "(default tcp)")
    p.add_argument("--workdir", default="", help="folder for logs and run files (default: a temp folder)")
    p.add_argument("--data-dir", default="", help="pdx data folder holding the built models")


def run(args: argparse.Namespace) -> Report:
    import httpx

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
    # vLLM's own prefix cache off: a repeat's speed-up must come from pdx's store
    vopts: dict[str, Any] = {"served_model_name": args.model, "max_model_len": max(8192, n + 64),
                             "kv_cache_gib": 2, "prefix_caching": False}

    def ttft(url: str, ids: list[int], name: str, **body: Any) -> tuple[float, dict[str, Any]]:
        payload = {"model": name, "prompt": ids, "max_tokens": 1, "temperature": 0.0, **body}
        t0 = time.perf_counter()
        resp = httpx.post(f"{url}/v1/completions", json=payload, timeout=600.0)
        dt = time.perf_counter() - t0
        if resp.status_code != 200:
            raise RuntimeError(f"{url}: {resp.status_code} {resp.text[:500]}")
        out: dict[str, Any] = resp.json()
        return dt * 1e3, out

    # 1. the plain server: the baseline of the no-hit and P/D rows
    plain = start_server(VllmOptions(model=str(model.path), cpu_bind="0", **vopts),
                         workdir / "plain")
    try:
        ttft(plain.url, warm, args.model)
        plain_ms = [ttft(plain.url, ids, args.model)[0] for ids in progress(timed, "plain")]
    finally:
        plain.stop()

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
            pd_ms, p_part, d_part = [], [], []
            for ids in progress(timed, "P/D"):
                p_ms, out = ttft(prefill.url, ids, args.model, kv_transfer_params={"do_remote_decode": True})
                d_ms, _ = ttft(decode.url, ids, args.model, kv_transfer_params=out["kv_transfer_params"])
                pd_ms.append(p_ms + d_ms)
                p_part.append(p_ms)
                d_part.append(d_ms)
            fetch_loads = _loads(decode.engine_log_text(), local=False)
        finally:
            decode.stop()
    finally:
        prefill.stop()

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
        f"logs: {workdir}",
    ])
    return report


def _prompts(model_path: Path, n: int, count: int, paragraph: Callable[[int, int], str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path))
    out = []
    for seed in range(count):
        words = n
        while True:
            ids = list(tok.encode(paragraph(9000 + seed, words), add_special_tokens=False))
            if len(ids) >= n:
                out.append(ids[:n])
                break
            words = int(words * 1.5)
    return out


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
