"""Shared builders for the kernel tests (unit, interpreter and GPU): random caches in
every storage arrangement vLLM uses, random block tables and spans, and a layout-free
oracle for "which cache elements did an unpack touch"."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from pdx.kernels import pack, payload_bytes, unpack
from pdx.kernels.plan import expected_shape
from pdx.layout import KVDtype, KVLayout, MemoryLayout

TORCH_DTYPES = {
    KVDtype.BF16: torch.bfloat16, KVDtype.FP16: torch.float16, KVDtype.FP32: torch.float32,
    KVDtype.FP8_E4M3: torch.float8_e4m3fn, KVDtype.FP8_E5M2: torch.uint8,
}
INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
#: separate tensors; one backing tensor with layers outermost; blocks outermost (layers interleaved)
STORAGES = ("separate", "stacked", "interleaved")


def head_dim(ml: MemoryLayout) -> int:
    return {MemoryLayout.NHD: 3, MemoryLayout.HND: 2}.get(ml, 1)


def block_dim(ml: MemoryLayout) -> int:
    return 1 if ml in (MemoryLayout.NHD, MemoryLayout.HND) else 0


def make_caches(layout: KVLayout, num_blocks: int, storage: str, seed: int,
                device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """Random bits (NaN patterns included) in the layout's registered shape."""
    shape = expected_shape(layout.memory_layout, num_blocks, layout.heads_per_rank, layout.block_size,
                           layout.head_size)
    dtype = TORCH_DTYPES[layout.dtype]
    size = layout.dtype.itemsize
    gen = torch.Generator().manual_seed(seed)
    n = layout.num_layers
    bd = block_dim(layout.memory_layout)
    if storage == "stacked":
        full = (n, *shape)
    elif storage == "interleaved":
        full = (*shape[: bd + 1], n, *shape[bd + 1:])
    else:
        full = (n, *shape)
    bits = torch.randint(-(2 ** (8 * size - 1)), 2 ** (8 * size - 1), full, generator=gen, dtype=torch.int64)
    backing = bits.to(INT[size]).view(dtype).to(device)
    if storage == "separate":
        return [backing[i].clone() for i in range(n)]
    if storage == "stacked":
        return list(backing.unbind(0))
    return list(backing.unbind(bd + 1))


def ints(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT[t.element_size()])


def touched(layout: KVLayout, num_blocks: int, spans: list[tuple[int, int, int]],
            chunk_heads: tuple[int, int] | None = None) -> list[torch.Tensor]:
    """Bool masks of the elements an unpack of ``spans`` writes (found by unpacking all-ones bytes)."""
    zeros = [torch.zeros_like(ints(c)).view(c.dtype) for c in make_caches(layout, num_blocks, "separate", 0)]
    tokens = sum(s[2] for s in spans)
    ones = torch.full((payload_bytes(layout, tokens, chunk_heads),), 255, dtype=torch.uint8)
    unpack(ones, zeros, layout, spans, chunk_heads=chunk_heads, impl="reference")
    return [ints(z) != 0 for z in zeros]


@dataclass(frozen=True)
class Case:
    layout: KVLayout
    num_blocks: int
    storage: str
    spans: list[tuple[int, int, int]]
    seed: int

    @property
    def tokens(self) -> int:
        return sum(s[2] for s in self.spans)


def layout_params(ml: MemoryLayout) -> st.SearchStrategy[dict[str, object]]:
    if ml is MemoryLayout.CPU_AMX:  # vLLM's AMX pages: bf16, blocks of 32*k, head size of 16*k
        return st.fixed_dictionaries({"dtype": st.just(KVDtype.BF16), "block_size": st.sampled_from([32, 64]),
                                      "head_size": st.sampled_from([16, 32])})
    return st.fixed_dictionaries({"dtype": st.sampled_from(list(KVDtype)),
                                  "block_size": st.sampled_from([1, 2, 3, 4, 8, 16]),
                                  "head_size": st.sampled_from([4, 8, 24, 32])})


@st.composite
def spans_strategy(draw: st.DrawFn, num_blocks: int, block_size: int, distinct: bool = True) -> list[tuple[int, int, int]]:
    """A block table walk: partial first block, whole middle blocks, partial last block."""
    count = draw(st.integers(1, min(num_blocks, 5)))
    if distinct:
        table = draw(st.permutations(range(num_blocks)))[:count]
    else:
        table = draw(st.lists(st.integers(0, num_blocks - 1), min_size=count, max_size=count))
    start = draw(st.integers(0, block_size - 1))
    spans = []
    for i, b in enumerate(table):
        s = start if i == 0 else 0
        n = block_size - s
        if i == count - 1:
            n = draw(st.integers(1, n))
        spans.append((b, s, n))
    return spans


@st.composite
def cases(draw: st.DrawFn, layouts: list[MemoryLayout] | None = None) -> Case:
    ml = draw(st.sampled_from(layouts or list(MemoryLayout)))
    p = draw(layout_params(ml))
    heads, tp = draw(st.sampled_from([(1, 1), (2, 1), (4, 2), (8, 4), (2, 4), (3, 3)]))
    rank = draw(st.integers(0, tp - 1))
    layout = KVLayout("m", p["dtype"], num_layers=draw(st.integers(1, 3)), num_kv_heads=heads,  # type: ignore[arg-type]
                      head_size=p["head_size"], block_size=p["block_size"], tp_rank=rank,  # type: ignore[arg-type]
                      tp_size=tp, memory_layout=ml)
    num_blocks = draw(st.integers(2, 7))
    spans = draw(spans_strategy(num_blocks, layout.block_size))
    return Case(layout, num_blocks, draw(st.sampled_from(STORAGES)), spans, draw(st.integers(0, 2**16)))


def pack_bytes(case: Case, caches: list[torch.Tensor], impl: str, heads: tuple[int, int] | None = None) -> bytes:
    out = bytearray(payload_bytes(case.layout, case.tokens, heads))
    assert pack(caches, case.layout, case.spans, out, heads=heads, impl=impl) == len(out)
    return bytes(out)
