"""Pack paged KV caches into contiguous chunks and unpack them back.

Data path: the connector's worker half calls ``pack`` on the prefill side (and
whenever KV is stored) to copy a request's blocks into chunk buffers inside pool slabs,
and ``unpack`` on the decode side (and on every cache hit) to copy chunks into the
blocks vLLM allocated. The chunk format is in ``pdx.kernels.format``; the engine's
layout comes from ``detect_layout``.

Arguments shared by every function:

* ``kv_caches``: the rank's per-layer KV tensors, as registered by the engine (one per
  layer, same shape/strides/dtype), in layer order. fp8 caches may be ``uint8``.
* ``layout``: the rank's ``KVLayout``; ``memory_layout`` says how to read the tensors.
* ``spans``: ``(block_id, start, num_tokens)`` triples covering the chunk's tokens in
  order; first and last may be partial blocks (``spans_for_tokens`` builds them).
* chunk buffers: a contiguous tensor on the caches' device (the triton path also takes
  pinned host tensors) or any writable buffer (memoryview over a pool slab, bytearray,
  numpy); only the first ``payload_bytes(...)`` bytes are used. Nothing is allocated
  per chunk on the fast paths.
* ``impl``: ``"auto"`` (triton for CUDA caches when importable, else cpu), or
  ``"reference"``, ``"cpu"`` (the native strided copy for ``CPU_VEC`` caches when it
  is built and fresh, else torch), ``"cpu_torch"`` (torch only), ``"triton"``.
* ``stream``: triton only: the CUDA stream to launch on (default: current stream).

Head slicing for different TP sizes: a chunk holds a contiguous range of global KV
heads. ``pack(..., heads=)`` packs a sub-range of the rank's heads (default: all of
them); ``unpack(..., chunk_heads=)`` names the chunk's heads and writes those the rank
holds, returning that range. A decode rank whose heads come from several prefill ranks'
chunks unpacks one chunk from each.

Blocking: reference and cpu return when the bytes are copied; triton returns after the
launch (synchronise the stream before reading the buffers or freeing them). Errors:
``LayoutError`` for caches that do not match the layout or head ranges that do not fit,
``SpanError`` (a ``LayoutError`` and ``ValueError``) for bad spans or buffers,
``BackendUnavailable`` for a missing implementation. The caller owns every buffer; no
function keeps a reference after it returns (triton: after the stream reaches it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pdx.errors import BackendUnavailable, LayoutError
from pdx.kernels.detect import detect_layout
from pdx.kernels.format import (
    HEADER_BYTES,
    ChunkHeader,
    check_payload,
    decode_header,
    encode_header,
    make_header,
    payload_bytes,
    payload_offsets,
)
from pdx.layout import KVLayout
from pdx.registry import Registry

if TYPE_CHECKING:
    import torch

    from pdx.kernels.plan import Plan

__all__ = [
    "HEADER_BYTES",
    "IMPLEMENTATIONS",
    "ChunkHeader",
    "check_payload",
    "decode_header",
    "detect_layout",
    "encode_header",
    "make_header",
    "pack",
    "pack_batch",
    "payload_bytes",
    "payload_offsets",
    "spans_for_tokens",
    "unpack",
    "unpack_batch",
]

#: name -> ``run(plan)``; modules are imported when first used.
IMPLEMENTATIONS: Registry[Callable[[Plan], None]] = Registry("kernel implementation")
IMPLEMENTATIONS.add("reference", "pdx.kernels.reference:run", install="pip install torch")
IMPLEMENTATIONS.add("cpu", "pdx.kernels.cpu:run", install="pip install torch")
IMPLEMENTATIONS.add("cpu_torch", "pdx.kernels.cpu:run_torch", install="pip install torch")
IMPLEMENTATIONS.add("triton", "pdx.kernels.triton_kernels:run", install="pip install triton (needs a CUDA GPU)")

SpanLike = Sequence[Sequence[int]]


def _resolve(impl: str, kv_caches: Sequence[torch.Tensor]) -> tuple[str, Callable[[Plan], None]]:
    if impl == "auto":
        impl = "cpu"
        if kv_caches and getattr(kv_caches[0], "is_cuda", False):
            try:
                return "triton", IMPLEMENTATIONS.get("triton")
            except BackendUnavailable:
                pass
    elif impl == "triton" and kv_caches and not kv_caches[0].is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendUnavailable("kernel implementation 'triton' needs CUDA tensors")
    return impl, IMPLEMENTATIONS.get(impl)


def pack_batch(kv_caches: Sequence[torch.Tensor], layout: KVLayout, chunks: Sequence[tuple[SpanLike, Any]],
               *, heads: tuple[int, int] | None = None, impl: str = "auto", stream: Any = None) -> list[int]:
    """Pack each ``(spans, out)`` of ``chunks``; returns the payload bytes written to each.

    triton packs all chunks and layers in one launch.
    """
    from pdx.kernels.plan import Direction, make_plan

    name, run = _resolve(impl, kv_caches)
    plan = make_plan(Direction.PACK, kv_caches, layout, chunks, heads, allow_pinned=name == "triton",
                     stream=stream)
    run(plan)
    return [job.payload.numel() * job.payload.element_size() for job in plan.jobs]


def pack(kv_caches: Sequence[torch.Tensor], layout: KVLayout, spans: SpanLike, out: Any, *,
         heads: tuple[int, int] | None = None, impl: str = "auto", stream: Any = None) -> int:
    """Pack the tokens of ``spans`` (all layers, K and V, ``heads``) into ``out``; returns bytes written."""
    return pack_batch(kv_caches, layout, [(spans, out)], heads=heads, impl=impl, stream=stream)[0]


def unpack_batch(kv_caches: Sequence[torch.Tensor], layout: KVLayout, chunks: Sequence[tuple[Any, SpanLike]],
                 *, chunk_heads: tuple[int, int] | None = None, impl: str = "auto",
                 stream: Any = None) -> tuple[int, int]:
    """Unpack each ``(chunk, spans)`` of ``chunks`` into the caches; returns the global heads written.

    Spans of all chunks together may not cover a slot twice. triton unpacks all chunks
    and layers in one launch.
    """
    from pdx.kernels.plan import Direction, make_plan

    name, run = _resolve(impl, kv_caches)
    plan = make_plan(Direction.UNPACK, kv_caches, layout, [(spans, buf) for buf, spans in chunks],
                     chunk_heads, allow_pinned=name == "triton", stream=stream)
    run(plan)
    lo = layout.head_range[0] + plan.cache_head_lo
    return lo, lo + plan.num_heads


def unpack(chunk: Any, kv_caches: Sequence[torch.Tensor], layout: KVLayout, spans: SpanLike, *,
           chunk_heads: tuple[int, int] | None = None, impl: str = "auto", stream: Any = None) -> tuple[int, int]:
    """Write ``chunk``'s tokens into the blocks of ``spans``; returns the global heads written.

    ``chunk_heads``: the global heads the chunk holds (default: this rank's). Raises
    ``LayoutError`` when none of them is this rank's.
    """
    return unpack_batch(kv_caches, layout, [(chunk, spans)], chunk_heads=chunk_heads, impl=impl, stream=stream)


def spans_for_tokens(block_ids: Sequence[int], block_size: int, start: int, num_tokens: int) -> list[tuple[int, int, int]]:
    """Spans for tokens ``[start, start+num_tokens)`` of a request with block table ``block_ids``."""
    if block_size <= 0:
        raise LayoutError(f"block_size must be positive, got {block_size}")
    from pdx.kernels.plan import spans_for_tokens as _spans

    return _spans(block_ids, block_size, start, num_tokens)
