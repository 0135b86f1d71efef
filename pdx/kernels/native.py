"""Native CPU path for ``CPU_VEC`` caches: tables of runs for the C strided copy.

``pdx.kernels.cpu.run`` calls ``run(plan)`` first; it returns False (and the torch path
runs) when the plan is not one this path takes (other layouts, CUDA tensors) or the
extension is not usable. The extension (``pdx/kernels/_strided.c``, built by the
package's install or ``python setup.py build_ext --inplace``) is loaded on first use
and refused, with one log line, when it is missing or was built from another version
of its source (the hash compiled in differs from the source beside it): a stale binary
never runs. ``PDX_KERNELS_NATIVE=0`` turns it off.

What moves: a ``CPU_VEC`` page is K as ``[head_size, block]`` then V as
``[block, head_size]``; a chunk is K ``[heads, head_size, T]`` and V ``[heads, T,
head_size]`` per layer. So every K row of a span is one contiguous run of ``n`` tokens
on both sides, and every V span is one run of ``n * head_size`` elements. One group per
(job, K or V, layer stack) holds the outer loops (layers, heads, head dims); its spans
hold the runs. The torch path stays the reference; tests prove both bit-equal.

``python -m pdx.kernels.native --check`` exits 0 when the binary is present and fresh
(``./dev`` uses it to rebuild in place).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from pdx.kernels.plan import Direction, Plan
from pdx.layout import MemoryLayout

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_strided.c")
_state: dict[str, ModuleType | None] = {}


def source_hash() -> str | None:
    """Hash of the C source beside this module (None when it is not shipped)."""
    try:
        return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def _load() -> tuple[ModuleType | None, str]:
    if os.environ.get("PDX_KERNELS_NATIVE", "1") == "0":
        return None, "turned off by PDX_KERNELS_NATIVE=0"
    try:
        from pdx.kernels import _strided  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, f"not built ({exc}); build it with the package install or `python setup.py build_ext --inplace`"
    want = source_hash()
    got = getattr(_strided, "SOURCE_HASH", None)
    if want is not None and got != want:
        return None, (f"stale: built from source {got}, the source is now {want}; rebuild it with "
                      "`python setup.py build_ext --inplace` (or reinstall the package)")
    return _strided, "ok"


def module() -> ModuleType | None:
    """The fresh extension, or None (logged once with the reason)."""
    if "mod" not in _state:
        mod, why = _load()
        if mod is None:
            log.warning("pdx.kernels: native strided copy unavailable, using the torch path: %s", why)
        _state["mod"] = mod
    return _state["mod"]


def available() -> bool:
    return module() is not None


def takes(plan: Plan) -> bool:
    """Whether ``run`` handles this plan (CPU tensors, ``CPU_VEC`` pages)."""
    c = plan.caches
    return c.memory_layout is MemoryLayout.CPU_VEC and c.device.type == "cpu" and all(
        j.payload.device.type == "cpu" for j in plan.jobs)


def _stacks(plan: Plan) -> list[tuple[int, int, int, int]]:
    """(first layer, layers, base address, layer stride in bytes) of each run of layers."""
    c = plan.caches
    isz = c.itemsize
    if c.stacked is not None:
        return [(0, c.stacked.shape[0], c.stacked.data_ptr(), c.stacked.stride(0) * isz)]
    return [(i, 1, layer.data_ptr(), 0) for i, layer in enumerate(c.layers)]


def tables(plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """The (groups, spans) tables of ``plan`` (see ``_strided.c``)."""
    c = plan.caches
    isz, d, n_blk = c.itemsize, c.head_size, c.block_size
    s_b, s_h = c.layers[0].stride(0) * isz, c.layers[0].stride(1) * isz
    a, h0, nh = plan.chunk_head_lo, plan.cache_head_lo, plan.num_heads
    stacks = _stacks(plan)
    groups: list[list[int]] = []
    span_parts: list[np.ndarray] = []
    first = 0
    for job in plan.jobs:
        t = job.num_tokens
        sp = np.asarray(job.spans, dtype=np.int64).reshape(-1, 3)
        blk, start, n = sp[:, 0], sp[:, 1], sp[:, 2]
        tok = np.concatenate(([0], np.cumsum(n)[:-1]))
        k_spans = np.stack([blk * s_b + start * isz, tok * isz, n * isz], axis=1)
        v_spans = np.stack([blk * s_b + (n_blk * d + start * d) * isz, tok * d * isz, n * d * isz], axis=1)
        p = job.payload  # [L, 2, hc*d*t] elements
        p_l = p.stride(0) * isz
        k_base = p.data_ptr() + a * d * t * isz
        v_base = p.data_ptr() + p.stride(1) * isz + a * t * d * isz
        for lo, count, base, c_l in stacks:
            cache = base + h0 * s_h
            groups.append([cache, k_base + lo * p_l, count, nh, d, c_l, s_h, n_blk * isz, p_l, d * t * isz,
                           t * isz, first])
            first += len(k_spans)
            span_parts.append(k_spans)
            groups.append([cache, v_base + lo * p_l, count, nh, 1, c_l, s_h, 0, p_l, t * d * isz, 0, first])
            first += len(v_spans)
            span_parts.append(v_spans)
    return np.asarray(groups, dtype=np.int64), np.ascontiguousarray(np.concatenate(span_parts), dtype=np.int64)


#: below this many bytes per thread a second thread costs more than it brings
MIN_BYTES_PER_THREAD = 1 << 20


def run(plan: Plan) -> bool:
    """Execute ``plan`` natively; False when this path does not take it (nothing was copied)."""
    if not takes(plan):
        return False
    mod = module()
    if mod is None:
        return False
    groups, spans = tables(plan)
    nbytes = sum(j.payload.numel() for j in plan.jobs) * plan.caches.itemsize
    threads = max(1, min(torch.get_num_threads(), nbytes // MIN_BYTES_PER_THREAD))
    mod.copy(groups, spans, plan.direction is Direction.PACK, threads)
    return True


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args != ["--check"]:
        print("usage: python -m pdx.kernels.native --check", file=sys.stderr)
        return 2
    mod, why = _load()
    print(f"pdx native strided copy: {why}", file=sys.stderr)
    return 0 if mod is not None else 1


if __name__ == "__main__":
    sys.exit(main())
