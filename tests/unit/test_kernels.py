"""pack/unpack: round trips, TP head slicing, cpu == reference byte for byte, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_cases import (
    Case,
    cases,
    head_dim,
    ints,
    make_caches,
    pack_bytes,
    spans_strategy,
    touched,
)

from pdx.errors import LayoutError, SpanError
from pdx.kernels import pack, pack_batch, payload_bytes, spans_for_tokens, unpack, unpack_batch
from pdx.layout import KVDtype, KVLayout, MemoryLayout

IMPLS = ["reference", "cpu"]


@settings(max_examples=60, deadline=None)
@given(cases())
def test_round_trip_reproduces_the_blocks_and_cpu_equals_reference(case: Case) -> None:
    src = make_caches(case.layout, case.num_blocks, case.storage, case.seed)
    chunk = pack_bytes(case, src, "cpu")
    assert chunk == pack_bytes(case, src, "reference")
    mask = touched(case.layout, case.num_blocks, case.spans)
    per_token = 2 * case.layout.num_layers * case.layout.heads_per_rank * case.layout.head_size
    assert sum(int(m.sum()) for m in mask) == case.tokens * per_token  # every chunk element lands once
    results = []
    for impl in IMPLS:
        dst = make_caches(case.layout, case.num_blocks, case.storage, case.seed + 1)
        before = [ints(d).clone() for d in dst]
        unpack(chunk, dst, case.layout, case.spans, impl=impl)
        for s, d, b, m in zip(src, dst, before, mask):
            assert torch.equal(ints(d), torch.where(m, ints(s), b))  # the spans' slots, nothing else
        results.append([ints(d) for d in dst])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@settings(max_examples=40, deadline=None)
@given(cases(), st.data())
def test_packing_a_head_subset_holds_only_those_heads(case: Case, data: st.DataObject) -> None:
    r0, r1 = case.layout.head_range
    h0 = data.draw(st.integers(r0, r1 - 1))
    h1 = data.draw(st.integers(h0 + 1, r1))
    src = make_caches(case.layout, case.num_blocks, case.storage, case.seed)
    sub = pack_bytes(case, src, "cpu", heads=(h0, h1))
    assert sub == pack_bytes(case, src, "reference", heads=(h0, h1))
    # The same bytes as slicing those heads out of the full chunk.
    full = np.frombuffer(pack_bytes(case, src, "cpu"), dtype=np.uint8)
    lay, t = case.layout, case.tokens
    per_head = lay.head_size * t * lay.dtype.itemsize
    parts = full.reshape(lay.num_layers, 2, r1 - r0, per_head)[:, :, h0 - r0:h1 - r0]
    assert sub == parts.tobytes()


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(list(MemoryLayout)), st.sampled_from([(2, 1, 2), (4, 2, 1), (4, 1, 4), (8, 2, 4), (2, 1, 4)]),
       st.integers(0, 2**16), st.data())
def test_prefill_and_decode_with_different_tp_sizes(ml: MemoryLayout, tps: tuple[int, int, int], seed: int,
                                                    data: st.DataObject) -> None:
    """P with TP=p packs one chunk per rank; each D rank (TP=d) unpacks its heads from every chunk."""
    heads, p_tp, d_tp = tps
    dtype, block, dim = (KVDtype.BF16, 32, 16) if ml is MemoryLayout.CPU_AMX else (KVDtype.FP32, 4, 8)
    base = dict(model_id="m", dtype=dtype, num_layers=2, num_kv_heads=heads, head_size=dim,
                block_size=block, memory_layout=ml)
    num_blocks = 5
    spans = data.draw(spans_strategy(num_blocks, block))
    tokens = sum(s[2] for s in spans)
    full = KVLayout(**base)  # type: ignore[arg-type]
    truth = make_caches(full, num_blocks, "separate", seed)  # all heads, as if TP=1
    hd = head_dim(ml)
    chunks = []
    for r in range(p_tp):
        lay = KVLayout(**base, tp_size=p_tp, tp_rank=r)  # type: ignore[arg-type]
        h0, h1 = lay.head_range
        mine = [t.narrow(hd, h0, h1 - h0).contiguous() for t in truth]
        out = torch.empty(payload_bytes(lay, tokens), dtype=torch.uint8)
        pack(mine, lay, spans, out, impl=data.draw(st.sampled_from(IMPLS)))
        chunks.append((out, lay.head_range))
    for r in range(d_tp):
        lay = KVLayout(**base, tp_size=d_tp, tp_rank=r)  # type: ignore[arg-type]
        h0, h1 = lay.head_range
        dst = [torch.zeros_like(t.narrow(hd, h0, h1 - h0)) for t in truth]
        written: set[int] = set()
        for out, c_heads in chunks:
            lo, hi = max(c_heads[0], h0), min(c_heads[1], h1)
            if lo >= hi:
                with pytest.raises(LayoutError, match="do not overlap"):
                    unpack(out, dst, lay, spans, chunk_heads=c_heads)
                continue
            got = unpack(out, dst, lay, spans, chunk_heads=c_heads, impl=data.draw(st.sampled_from(IMPLS)))
            assert got == (lo, hi)
            written.update(range(lo, hi))
        assert written == set(range(h0, h1))
        mask = touched(lay, num_blocks, spans)
        for t, d, m in zip(truth, dst, mask):
            want = ints(t.narrow(hd, h0, h1 - h0))
            assert torch.equal(ints(d), torch.where(m, want, torch.zeros_like(want)))


@settings(max_examples=25, deadline=None)
@given(cases(), st.integers(1, 3), st.data())
def test_batches_equal_one_chunk_at_a_time(case: Case, n_chunks: int, data: st.DataObject) -> None:
    lay = case.layout
    src = make_caches(lay, case.num_blocks, case.storage, case.seed)
    jobs = [data.draw(spans_strategy(case.num_blocks, lay.block_size, distinct=False)) for _ in range(n_chunks)]
    outs = [torch.zeros(payload_bytes(lay, sum(s[2] for s in j)), dtype=torch.uint8) for j in jobs]
    sizes = pack_batch(src, lay, list(zip(jobs, outs)), impl="cpu")
    assert sizes == [o.numel() for o in outs]
    for j, o in zip(jobs, outs):
        single = torch.zeros_like(o)
        pack(src, lay, j, single, impl="reference")
        assert torch.equal(single, o)


def test_unpack_batch_writes_every_chunk() -> None:
    lay = KVLayout("m", KVDtype.FP16, num_layers=2, num_kv_heads=2, head_size=8, block_size=4,
                   memory_layout=MemoryLayout.KV_CONCAT)
    src = make_caches(lay, 6, "stacked", 1)
    jobs = [[(4, 1, 3), (0, 0, 4)], [(2, 0, 4), (5, 0, 2)]]
    outs = [torch.empty(payload_bytes(lay, sum(s[2] for s in j)), dtype=torch.uint8) for j in jobs]
    pack_batch(src, lay, list(zip(jobs, outs)))
    dst = [torch.zeros_like(c) for c in src]
    assert unpack_batch(dst, lay, list(zip(outs, jobs))) == (0, 2)
    for j, o in zip(jobs, outs):
        again = torch.zeros_like(o)
        pack(dst, lay, j, again)
        assert torch.equal(again, o)


def test_fp32_vllm_cpu_layout_by_hand() -> None:
    """A CPU_VEC page written element by element the way vLLM's vec kernel does, packed and read back."""
    n, d, heads = 4, 3, 2
    lay = KVLayout("m", KVDtype.FP32, num_layers=1, num_kv_heads=heads, head_size=d, block_size=n,
                   memory_layout=MemoryLayout.CPU_VEC)
    cache = torch.zeros(3, heads, n, 2 * d)
    k = torch.arange(n * heads * d, dtype=torch.float32).view(n, heads, d) + 1
    v = -k
    page = cache.view(3, heads, 2 * n * d)
    for t in range(n):
        for h in range(heads):
            for j in range(d):
                page[2, h, j * n + t] = k[t, h, j]  # key column-major
                page[2, h, n * d + t * d + j] = v[t, h, j]  # value row-major after it
    out = torch.empty(payload_bytes(lay, 3) // 4, dtype=torch.float32)
    for impl in IMPLS:
        pack([cache], lay, [(2, 1, 3)], out, impl=impl)
        chunk = out.view(2, heads, 3 * d)
        assert torch.equal(chunk[0].view(heads, d, 3), k[1:].permute(1, 2, 0))
        assert torch.equal(chunk[1].view(heads, 3, d), v[1:].permute(1, 0, 2))


def test_spans_for_tokens() -> None:
    assert spans_for_tokens([7, 3, 9], 4, 2, 9) == [(7, 2, 2), (3, 0, 4), (9, 0, 3)]
    assert spans_for_tokens([7, 3, 9], 4, 4, 4) == [(3, 0, 4)]
    with pytest.raises(SpanError):
        spans_for_tokens([7, 3], 4, 6, 4)
    with pytest.raises(SpanError):
        spans_for_tokens([7, 3], 4, 0, 0)


# --- bad input -------------------------------------------------------------------------------

LAY = KVLayout("m", KVDtype.BF16, num_layers=2, num_kv_heads=4, head_size=8, block_size=4, tp_size=2, tp_rank=1,
               memory_layout=MemoryLayout.NHD)


def _caches() -> list[torch.Tensor]:
    return make_caches(LAY, 5, "separate", 0)


def _out(tokens: int = 4) -> torch.Tensor:
    return torch.zeros(payload_bytes(LAY, tokens), dtype=torch.uint8)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("spans", "match"), [
    ([(5, 0, 4)], "block id 5 out of range"),
    ([(-1, 0, 4)], "block id -1 out of range"),
    ([(1, 2, 3)], "does not fit a block of 4"),
    ([(1, -1, 2)], "does not fit"),
    ([(1, 0, 0)], "does not fit"),
    ([], "no spans"),
    ([(1, 0)], "a span is"),
])
def test_bad_spans(spans: list[tuple[int, ...]], match: str, impl: str) -> None:
    with pytest.raises(SpanError, match=match):
        pack(_caches(), LAY, spans, _out(), impl=impl)
    with pytest.raises(ValueError, match=match):  # SpanError is a ValueError too
        unpack(_out(), _caches(), LAY, spans, impl=impl)


def test_bad_buffers() -> None:
    caches = _caches()
    with pytest.raises(SpanError, match="need"):
        pack(caches, LAY, [(0, 0, 4)], _out(3))
    with pytest.raises(SpanError, match="read-only"):
        pack(caches, LAY, [(0, 0, 4)], bytes(len(_out())))
    with pytest.raises(SpanError, match="aligned"):
        pack(caches, LAY, [(0, 0, 4)], torch.zeros(len(_out()) + 1, dtype=torch.uint8)[1:])
    with pytest.raises(SpanError, match="contiguous"):
        pack(caches, LAY, [(0, 0, 4)], torch.zeros(2 * len(_out()), dtype=torch.uint8)[::2])
    with pytest.raises(SpanError, match="buffer protocol"):
        pack(caches, LAY, [(0, 0, 4)], 12)
    # A read-only chunk is fine to unpack from, and so is a bigger buffer.
    chunk = bytearray(len(_out()) + 100)
    pack(caches, LAY, [(0, 0, 4)], chunk)
    dst = [torch.zeros_like(c) for c in caches]
    unpack(bytes(chunk), dst, LAY, [(3, 0, 4)])
    assert all(torch.equal(ints(d[:, 3]), ints(c[:, 0])) for d, c in zip(dst, caches))


def test_unpack_refuses_overlapping_spans() -> None:
    with pytest.raises(SpanError, match="overlap"):
        unpack(_out(5), _caches(), LAY, [(1, 0, 3), (1, 2, 2)])
    with pytest.raises(SpanError, match="overlap"):
        unpack_batch(_caches(), LAY, [(_out(), [(1, 0, 4)]), (_out(), [(1, 3, 1), (2, 0, 3)])])
    pack(_caches(), LAY, [(1, 0, 3), (1, 2, 2)], _out(5))  # reading a slot twice is fine


def test_caches_that_do_not_match_the_layout() -> None:
    caches = _caches()
    with pytest.raises(LayoutError, match="dtype"):
        pack([c.float() for c in caches], LAY, [(0, 0, 4)], _out())
    with pytest.raises(LayoutError, match="2 layers"):
        pack(caches[:1], LAY, [(0, 0, 4)], _out())
    with pytest.raises(LayoutError, match="expected"):
        pack([c[:, :, :, :1] for c in caches], LAY, [(0, 0, 4)], _out())
    with pytest.raises(LayoutError, match="differs"):
        pack([caches[0], caches[1][:, :4]], LAY, [(0, 0, 4)], _out())
    with pytest.raises(LayoutError, match="this rank holds"):
        pack(caches, LAY, [(0, 0, 4)], _out(), heads=(0, 4))
    with pytest.raises(LayoutError, match="do not overlap"):
        unpack(_out(), caches, LAY, [(0, 0, 4)], chunk_heads=(0, 2))
    with pytest.raises(LayoutError, match="outside"):
        unpack(_out(), caches, LAY, [(0, 0, 4)], chunk_heads=(2, 9))
    paged = KVLayout("m", KVDtype.BF16, num_layers=1, num_kv_heads=2, head_size=8, block_size=4,
                     memory_layout=MemoryLayout.CPU_VEC)
    strided = torch.zeros(3, 2, 4, 32, dtype=torch.bfloat16)[..., :16]
    with pytest.raises(LayoutError, match="page must be contiguous"):
        pack([strided], paged, [(0, 0, 4)], bytearray(payload_bytes(paged, 4)))
    amx = KVLayout("m", KVDtype.FP16, num_layers=1, num_kv_heads=2, head_size=16, block_size=32,
                   memory_layout=MemoryLayout.CPU_AMX)
    with pytest.raises(LayoutError, match="bf16"):
        pack([torch.zeros(3, 2, 32, 32, dtype=torch.float16)], amx, [(0, 0, 4)], bytearray(payload_bytes(amx, 4)))


def test_unknown_implementation() -> None:
    from pdx.errors import BackendUnavailable, UnknownName

    with pytest.raises(UnknownName, match="known: cpu, cpu_torch, reference, triton"):
        pack(_caches(), LAY, [(0, 0, 4)], _out(), impl="magic")
    with pytest.raises(BackendUnavailable, match="CUDA"):
        pack(_caches(), LAY, [(0, 0, 4)], _out(), impl="triton")
