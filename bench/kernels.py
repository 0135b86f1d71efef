"""``pdx-bench kernels``: pack/unpack of one request's KV against a contiguous copy of the same bytes.

The KV cache is shaped like an 8B model's (32 layers, 8 KV heads, head size 128, bf16 by
default) in one backing tensor per rank, as vLLM allocates it, with the request's blocks
scattered at random. One request (4,096 tokens, 512 MiB of KV) is packed into chunks of
256 tokens in one ``pack_batch`` call and unpacked back with one ``unpack_batch``. The
baseline, measured in the same run and the same repeats, is ``copy_`` of the same
number of bytes between two preallocated contiguous tensors on the same device.

CPU rows use the layout vLLM's CPU backend really uses (``cpu_vec``; ``--layouts`` adds
``nhd``/``kv_concat``/``hnd``). Note: vLLM's CPU backend only takes block sizes that are
multiples of 32; the 16-token rows show the cost of short runs. With more than one
thread count the rows get a ``_t<threads>`` suffix: every copy is its own parallel
region, so on a loaded machine a second thread can cost more than it brings (the
baseline is one region). On CUDA the rows
``pack_gpu_gbps``/``unpack_gpu_gbps`` use the Triton kernel on vLLM's GPU layout
(``kv_concat``) against a device-to-device copy.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from bench.report import Report, Result, gbps, median, progress


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=4096, help="tokens in the request (default 4096)")
    p.add_argument("--chunk-tokens", type=int, default=256, help="tokens per chunk (default 256)")
    p.add_argument("--block-sizes", default="16,128", help="comma-separated block sizes (default 16,128)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32", "fp8_e4m3"])
    p.add_argument("--layouts", default="cpu_vec", help="CPU layouts to measure, comma-separated "
                   "(cpu_vec, nhd, hnd, kv_concat; default cpu_vec)")
    p.add_argument("--threads", default="", help="torch CPU thread counts to measure, comma-separated "
                   "(default: 1 and torch's own setting)")
    p.add_argument("--impls", default="cpu", help="CPU implementations, comma-separated: cpu (the native "
                   "strided copy where built, else torch), cpu_torch (torch only); rows of any but the first get "
                   "a _<impl> suffix (default cpu)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per figure (median reported)")
    p.add_argument("--no-gpu", action="store_true", help="skip the CUDA rows even where CUDA is available")
    p.add_argument("--no-cpu", action="store_true", help="skip the CPU rows")


def _timer(device: Any) -> Callable[[Callable[[], object]], float]:
    import torch

    if device.type == "cuda":
        def timed(fn: Callable[[], object]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end)) / 1e3
    else:
        def timed(fn: Callable[[], object]) -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return timed


def _setup(args: argparse.Namespace, layout_name: str, block_size: int, device: Any) -> dict[str, Any]:
    import torch

    from pdx.kernels import payload_bytes, spans_for_tokens
    from pdx.kernels.plan import expected_shape
    from pdx.layout import KVDtype, KVLayout, MemoryLayout

    ml = MemoryLayout(layout_name)
    layout = KVLayout("bench-8b", KVDtype(args.dtype), num_layers=args.layers, num_kv_heads=args.kv_heads,
                      head_size=args.head_size, block_size=block_size, memory_layout=ml)
    blocks_needed = -(-args.tokens // block_size)
    num_blocks = blocks_needed + blocks_needed // 4 + 1
    shape = expected_shape(ml, num_blocks, args.kv_heads, block_size, args.head_size)
    itemsize = layout.dtype.itemsize
    int_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[itemsize]
    gen = torch.Generator().manual_seed(0)
    backing = torch.randint(-100, 100, (args.layers, *shape), generator=gen, dtype=torch.int16).to(int_dtype)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8_e4m3": torch.uint8}
    backing = backing.view(torch_dtype[args.dtype]).to(device)
    caches = list(backing.unbind(0))
    table = torch.randperm(num_blocks, generator=gen)[:blocks_needed].tolist()
    chunks = []
    nbytes = 0
    for start in range(0, args.tokens, args.chunk_tokens):
        n = min(args.chunk_tokens, args.tokens - start)
        chunks.append((spans_for_tokens(table, block_size, start, n), payload_bytes(layout, n)))
        nbytes += payload_bytes(layout, n)
    pool = torch.empty(nbytes, dtype=torch.uint8, device=device)
    bufs, off = [], 0
    for _, size in chunks:
        bufs.append(pool[off:off + size])
        off += size
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(7)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(0)
    return dict(layout=layout, caches=caches, packs=[(s, b) for (s, _), b in zip(chunks, bufs)],
                unpacks=[(b, s) for (s, _), b in zip(chunks, bufs)], nbytes=nbytes, src=src, dst=dst)


def _check(setup: dict[str, Any], impl: str) -> None:
    """The measured path agrees with the reference on the first chunk (the figures are of correct work)."""
    import torch

    from pdx.kernels import pack

    spans, buf = setup["packs"][0]
    want = torch.zeros_like(buf)
    pack(setup["caches"], setup["layout"], spans, want, impl="reference")
    if not torch.equal(buf.cpu(), want.cpu()):
        raise AssertionError(f"{impl} pack differs from the reference")


def _measure(report: Report, args: argparse.Namespace, setup: dict[str, Any], impl: str, device: Any,
             suffix: str, extra: dict[str, Any], label: str) -> None:
    from pdx.kernels import pack_batch, unpack_batch

    timed = _timer(device)
    layout, caches = setup["layout"], setup["caches"]
    src, dst, nbytes = setup["src"], setup["dst"], setup["nbytes"]
    kind = "gpu" if device.type == "cuda" else "cpu"
    ops: dict[str, Callable[[], object]] = {
        "copy": lambda: dst.copy_(src),
        "pack": lambda: pack_batch(caches, layout, setup["packs"], impl=impl),
        "unpack": lambda: unpack_batch(caches, layout, setup["unpacks"], impl=impl),
    }
    for fn in ops.values():  # warm up (page faults, kernel compilation)
        fn()
    _check(setup, impl)
    times: dict[str, list[float]] = {k: [] for k in ops}
    for _ in progress(range(args.repeats), label):
        for name, fn in ops.items():
            times[name].append(timed(fn))
    base = gbps(nbytes, median(times["copy"]))
    base_name = f"copy_{kind}_gbps{suffix}"
    report.add(Result(base_name, base, "GB/s", extra=extra))
    for name in ("pack", "unpack"):
        report.add(Result(f"{name}_{kind}_gbps{suffix}", gbps(nbytes, median(times[name])), "GB/s",
                          baseline_name=base_name, baseline=base, extra=extra))


def run(args: argparse.Namespace) -> Report:
    import torch

    report = Report("kernels")
    block_sizes = [int(x) for x in args.block_sizes.split(",") if x]
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    default_threads = torch.get_num_threads()
    threads = [int(x) for x in args.threads.split(",") if x] or sorted({1, default_threads})
    cpu = torch.device("cpu")
    report.notes.append(f"{args.tokens} tokens, {args.layers} layers x {args.kv_heads} KV heads x head size "
                        f"{args.head_size}, {args.dtype}, chunks of {args.chunk_tokens} tokens, blocks scattered "
                        f"at random; baseline: copy_ of the same bytes between contiguous tensors")
    impls = [x.strip() for x in args.impls.split(",") if x.strip()]
    from pdx.kernels import native

    report.notes.append("cpu: native strided copy for cpu_vec" if native.available()
                        else "cpu: native strided copy NOT available, torch path measured")
    if args.no_cpu:
        layouts = []
    try:
        for ml in layouts:
            for bs in block_sizes:
                setup = _setup(args, ml, bs, cpu)
                for nt in threads:
                    torch.set_num_threads(nt)
                    for impl in impls:
                        suffix = f"_bs{bs}" + ("" if ml == "cpu_vec" else f"_{ml}") + (
                            f"_t{nt}" if len(threads) > 1 else "") + ("" if impl == impls[0] else f"_{impl}")
                        extra = {"layout": ml, "block_size": bs, "threads": nt, "impl": impl,
                                 "bytes": setup["nbytes"]}
                        _measure(report, args, setup, impl, cpu, suffix, extra, f"{impl} {ml} bs{bs} t{nt}")
                del setup
    finally:
        torch.set_num_threads(default_threads)
    if torch.cuda.is_available() and not args.no_gpu:
        gpu = torch.device("cuda")
        report.notes.append(f"GPU: {torch.cuda.get_device_name(gpu)}; Triton kernel on kv_concat")
        for bs in block_sizes:
            setup = _setup(args, "kv_concat", bs, gpu)
            extra = {"layout": "kv_concat", "block_size": bs, "impl": "triton", "bytes": setup["nbytes"]}
            _measure(report, args, setup, "triton", gpu, f"_bs{bs}", extra, f"gpu bs{bs}")
            del setup
            torch.cuda.empty_cache()
    else:
        report.notes.append("no CUDA device: GPU rows skipped")
    return report
