"""Validation shared by every implementation: caches, spans, chunk buffers and heads.

``make_plan`` turns the public arguments into a ``Plan`` (or raises ``LayoutError`` /
``SpanError`` naming the bad argument); the implementations (``reference``, ``cpu``,
``triton_kernels``) only execute plans. Plans hold integer views of the caches and
chunk buffers (``int8/16/32`` of the KV dtype's size) so that every copy is a bit copy,
fp8 included. A plan borrows the caller's tensors; it is built and run in one call.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

from pdx.errors import LayoutError, SpanError
from pdx.layout import KVDtype, KVLayout, MemoryLayout

#: (block id, first token slot in the block, number of tokens)
Span = tuple[int, int, int]

PAGED = (MemoryLayout.KV_CONCAT, MemoryLayout.CPU_VEC, MemoryLayout.CPU_AMX)

_TORCH_DTYPES: dict[KVDtype, tuple[str, ...]] = {
    KVDtype.BF16: ("bfloat16",),
    KVDtype.FP16: ("float16",),
    KVDtype.FP32: ("float32",),
    KVDtype.FP8_E4M3: ("float8_e4m3fn", "uint8", "int8"),
    KVDtype.FP8_E5M2: ("float8_e5m2", "uint8", "int8"),
}
_INT_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


class Direction(Enum):
    PACK = "pack"  # paged caches -> chunk buffers
    UNPACK = "unpack"  # chunk buffers -> paged caches


@dataclass(frozen=True)
class Caches:
    """One rank's per-layer KV caches, validated, as integer views."""

    layers: tuple[torch.Tensor, ...]
    #: ``[num_layers, *layer_shape]`` view over all layers when they sit in one storage at a
    #: constant positive stride (vLLM allocates them so), else None.
    stacked: torch.Tensor | None
    memory_layout: MemoryLayout
    num_blocks: int
    block_size: int
    head_size: int
    heads: int  # heads each layer holds
    itemsize: int

    @property
    def device(self) -> torch.device:
        return self.layers[0].device


@dataclass(frozen=True)
class Job:
    """One chunk: its spans in chunk order and its payload as ``[layers, 2, chunk_heads*head_size*T]``."""

    spans: tuple[Span, ...]
    num_tokens: int
    payload: torch.Tensor


@dataclass(frozen=True)
class Plan:
    direction: Direction
    caches: Caches
    jobs: tuple[Job, ...]
    chunk_heads: int  # heads a chunk holds
    chunk_head_lo: int  # first chunk head copied (index into the chunk)
    cache_head_lo: int  # first cache head copied (index into the cache)
    num_heads: int  # heads copied
    stream: Any = None  # torch.cuda.Stream for the triton path


def expected_shape(memory_layout: MemoryLayout, num_blocks: int, heads: int, block_size: int,
                   head_size: int) -> tuple[int, ...]:
    if memory_layout is MemoryLayout.NHD:
        return (2, num_blocks, block_size, heads, head_size)
    if memory_layout is MemoryLayout.HND:
        return (2, num_blocks, heads, block_size, head_size)
    return (num_blocks, heads, block_size, 2 * head_size)


def prepare_caches(kv_caches: Sequence[torch.Tensor], layout: KVLayout) -> Caches:
    if len(kv_caches) != layout.num_layers:
        raise LayoutError(f"got {len(kv_caches)} layer caches, layout has {layout.num_layers} layers")
    first = kv_caches[0]
    if not isinstance(first, torch.Tensor):
        raise LayoutError(f"KV caches must be torch tensors, got {type(first).__name__}")
    allowed = _TORCH_DTYPES[layout.dtype]
    if str(first.dtype).removeprefix("torch.") not in allowed:
        raise LayoutError(f"cache dtype {first.dtype} does not match layout dtype {layout.dtype.value} "
                          f"(expected torch.{' or torch.'.join(allowed)})")
    ml = layout.memory_layout
    block_dim = 1 if ml in (MemoryLayout.NHD, MemoryLayout.HND) else 0
    if first.dim() <= block_dim:
        raise LayoutError(f"{ml.value}: cache has shape {list(first.shape)}")
    num_blocks = first.shape[block_dim]
    heads, n, d = layout.heads_per_rank, layout.block_size, layout.head_size
    want = expected_shape(ml, num_blocks, heads, n, d)
    if tuple(first.shape) != want:
        raise LayoutError(f"{ml.value}: cache shape {list(first.shape)}, expected {list(want)} "
                          f"for {heads} heads, block size {n}, head size {d}")
    for i, c in enumerate(kv_caches):
        if (not isinstance(c, torch.Tensor) or c.dtype != first.dtype or c.shape != first.shape
                or c.stride() != first.stride() or c.device != first.device):
            raise LayoutError(f"layer {i} cache differs from layer 0 in type, dtype, shape, strides or device")
    if ml in PAGED and ml is not MemoryLayout.KV_CONCAT and (first.stride(3) != 1 or first.stride(2) != 2 * d):
        raise LayoutError(f"{ml.value}: each (block, head) page must be contiguous, strides {first.stride()}")
    if ml is MemoryLayout.CPU_AMX and (layout.dtype is not KVDtype.BF16 or n % 16 or d % 16):
        raise LayoutError("cpu_amx pages are known for bf16 caches with block and head sizes "
                          f"that are multiples of 16, not {layout.dtype.value}, {n}, {d}")
    int_dtype = _INT_DTYPES[first.element_size()]
    layers = tuple(c.view(int_dtype) for c in kv_caches)
    return Caches(layers, _stack(layers), ml, num_blocks, n, d, heads, first.element_size())


def _stack(layers: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    first = layers[0]
    if len(layers) == 1:
        return first.unsqueeze(0)
    ptr = first.untyped_storage().data_ptr()
    if any(c.untyped_storage().data_ptr() != ptr for c in layers):
        return None
    offsets = [c.storage_offset() for c in layers]
    step = offsets[1] - offsets[0]
    if step <= 0 or any(b - a != step for a, b in itertools.pairwise(offsets)):
        return None
    return first.as_strided((len(layers), *first.shape), (step, *first.stride()), offsets[0])


def normalize_spans(spans: Sequence[Sequence[int]], caches: Caches) -> tuple[tuple[Span, ...], int]:
    """Check spans against the caches; returns them as int tuples and their token count."""
    out: list[Span] = []
    total = 0
    for span in spans:
        try:
            b, s, n = (int(x) for x in span)
        except (TypeError, ValueError):
            raise SpanError(f"a span is (block_id, start, num_tokens), got {span!r}") from None
        if not 0 <= b < caches.num_blocks:
            raise SpanError(f"block id {b} out of range [0, {caches.num_blocks})")
        if s < 0 or n <= 0 or s + n > caches.block_size:
            raise SpanError(f"span {(b, s, n)} does not fit a block of {caches.block_size} tokens")
        out.append((b, s, n))
        total += n
    if not out:
        raise SpanError("no spans: a chunk holds at least one token")
    return tuple(out), total


def check_no_overlap(jobs: Sequence[Job]) -> None:
    """Unpack writes every slot once: two spans may not cover the same (block, slot)."""
    ranges = sorted((b, s, s + n) for job in jobs for b, s, n in job.spans)
    for (b0, _, e0), (b1, s1, _) in itertools.pairwise(ranges):
        if b0 == b1 and s1 < e0:
            raise SpanError(f"spans overlap in block {b0}: unpack would write slot {s1} twice")


def byte_tensor(buf: Any, *, writable: bool) -> torch.Tensor:
    """A 1-D uint8 tensor over ``buf`` (a tensor, or any buffer: memoryview, bytearray, numpy, mmap)."""
    if isinstance(buf, torch.Tensor):
        if not buf.is_contiguous():
            raise SpanError("chunk buffer tensor must be contiguous")
        return buf.reshape(-1).view(torch.uint8)
    try:
        view = memoryview(buf)
    except TypeError:
        raise SpanError(f"chunk buffer must be a tensor or support the buffer protocol, "
                        f"got {type(buf).__name__}") from None
    if writable and view.readonly:
        raise SpanError("pack needs a writable buffer, got a read-only one")
    if not view.c_contiguous:
        raise SpanError("chunk buffer must be C-contiguous")
    view = view.cast("B")
    if view.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():
        # A read-only source is never written (unpack only reads chunks).
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(view, dtype=torch.uint8)


def payload_view(buf: Any, caches: Caches, chunk_heads: int, num_tokens: int, *, writable: bool,
                 allow_pinned: bool) -> torch.Tensor:
    data = byte_tensor(buf, writable=writable)
    nbytes = 2 * len(caches.layers) * chunk_heads * caches.head_size * num_tokens * caches.itemsize
    if data.numel() < nbytes:
        raise SpanError(f"chunk buffer is {data.numel()} bytes, {num_tokens} tokens of {chunk_heads} "
                        f"heads need {nbytes}")
    if data.device != caches.device and not (allow_pinned and data.device.type == "cpu" and data.is_pinned()):
        raise SpanError(f"chunk buffer is on {data.device}, the caches on {caches.device}")
    if data.data_ptr() % caches.itemsize:
        raise SpanError(f"chunk buffer must be aligned to {caches.itemsize} bytes")
    return data[:nbytes].view(_INT_DTYPES[caches.itemsize]).view(len(caches.layers), 2, -1)


def make_plan(direction: Direction, kv_caches: Sequence[torch.Tensor], layout: KVLayout,
              chunks: Sequence[tuple[Sequence[Sequence[int]], Any]], heads: tuple[int, int] | None,
              *, allow_pinned: bool = False, stream: Any = None) -> Plan:
    """``chunks``: (spans, buffer) per chunk. ``heads``: global heads the chunk(s) hold
    (pack: heads to pack, a sub-range of the rank's; unpack: the chunks' heads, of which
    the rank's are written). Default: the rank's own."""
    caches = prepare_caches(kv_caches, layout)
    r0, r1 = layout.head_range
    c0, c1 = (r0, r1) if heads is None else (int(heads[0]), int(heads[1]))
    if not 0 <= c0 < c1 <= layout.num_kv_heads:
        raise LayoutError(f"head range [{c0}, {c1}) outside [0, {layout.num_kv_heads})")
    if direction is Direction.PACK and not r0 <= c0 < c1 <= r1:
        raise LayoutError(f"cannot pack heads [{c0}, {c1}): this rank holds [{r0}, {r1})")
    lo, hi = max(c0, r0), min(c1, r1)
    if lo >= hi:
        raise LayoutError(f"chunk heads [{c0}, {c1}) and this rank's heads [{r0}, {r1}) do not overlap")
    if not chunks:
        raise SpanError("no chunks given")
    jobs = []
    for spans, buf in chunks:
        norm, total = normalize_spans(spans, caches)
        payload = payload_view(buf, caches, c1 - c0, total, writable=direction is Direction.PACK,
                               allow_pinned=allow_pinned)
        jobs.append(Job(norm, total, payload))
    if direction is Direction.UNPACK:
        check_no_overlap(jobs)
    return Plan(direction, caches, tuple(jobs), c1 - c0, lo - c0, lo - r0, hi - lo, stream)


def spans_for_tokens(block_ids: Sequence[int], block_size: int, start: int, num_tokens: int) -> list[Span]:
    """Spans covering tokens ``[start, start+num_tokens)`` of a request whose block table is
    ``block_ids`` (token ``t`` lives in ``block_ids[t // block_size]``, slot ``t % block_size``)."""
    if start < 0 or num_tokens <= 0:
        raise SpanError(f"token range [{start}, {start + num_tokens}) is empty or negative")
    end = start + num_tokens
    if end > len(block_ids) * block_size:
        raise SpanError(f"token range ends at {end}, the block table covers {len(block_ids) * block_size}")
    spans: list[Span] = []
    t = start
    while t < end:
        slot = t % block_size
        n = min(block_size - slot, end - t)
        spans.append((int(block_ids[t // block_size]), slot, n))
        t += n
    return spans
