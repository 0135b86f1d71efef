"""The compiled Triton kernel on a real GPU: byte for byte equal to the reference."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))
from kernel_cases import Case, cases, ints, make_caches, spans_strategy

from pdx.kernels import pack, pack_batch, payload_bytes, spans_for_tokens, unpack, unpack_batch
from pdx.kernels.plan import expected_shape
from pdx.layout import KVDtype, KVLayout, MemoryLayout

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")]

AFFINE = [MemoryLayout.NHD, MemoryLayout.HND, MemoryLayout.KV_CONCAT, MemoryLayout.CPU_VEC]


@settings(max_examples=40, deadline=None)
@given(cases(AFFINE), st.integers(1, 3), st.data())
def test_triton_equals_reference(case: Case, n_chunks: int, data: st.DataObject) -> None:
    lay = case.layout
    src = make_caches(lay, case.num_blocks, case.storage, case.seed, device="cuda")
    r0, r1 = lay.head_range
    h0 = data.draw(st.integers(r0, r1 - 1))
    h1 = data.draw(st.integers(h0 + 1, r1))
    jobs = [case.spans] + [data.draw(spans_strategy(case.num_blocks, lay.block_size)) for _ in range(n_chunks - 1)]
    outs = {}
    for impl in ("reference", "triton"):
        bufs = [torch.zeros(payload_bytes(lay, sum(s[2] for s in j), (h0, h1)), dtype=torch.uint8, device="cuda")
                for j in jobs]
        pack_batch(src, lay, list(zip(jobs, bufs)), heads=(h0, h1), impl=impl)
        outs[impl] = bufs
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(outs["reference"], outs["triton"]))
    results = []
    for impl in ("reference", "triton"):
        dst = make_caches(lay, case.num_blocks, case.storage, case.seed + 1, device="cuda")
        assert unpack_batch(dst, lay, [(outs["reference"][0], jobs[0])], chunk_heads=(h0, h1), impl=impl) == (h0, h1)
        results.append([ints(d) for d in dst])
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("ml", [MemoryLayout.KV_CONCAT, MemoryLayout.NHD])
@pytest.mark.parametrize("block_size", [16, 128])
def test_8b_shaped_request_on_a_side_stream_and_into_pinned_host_memory(ml: MemoryLayout, block_size: int) -> None:
    lay = KVLayout("m", KVDtype.BF16, num_layers=32, num_kv_heads=8, head_size=128, block_size=block_size,
                   memory_layout=ml)
    blocks = 1024 // block_size
    shape = expected_shape(ml, blocks * 2, 8, block_size, 128)
    backing = torch.randint(-2**15, 2**15, (32, *shape), dtype=torch.int16, device="cuda")
    caches = list(backing.view(torch.bfloat16).unbind(0))  # one allocation, as vLLM does
    table = torch.randperm(blocks * 2)[:blocks].tolist()
    chunks = [spans_for_tokens(table, block_size, start, 256) for start in range(0, 1024, 256)]
    size = payload_bytes(lay, 256)
    on_gpu = [torch.empty(size, dtype=torch.uint8, device="cuda") for _ in chunks]
    pinned = [torch.empty(size, dtype=torch.uint8).pin_memory() for _ in chunks]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    pack_batch(caches, lay, list(zip(chunks, on_gpu)), impl="triton", stream=side)
    pack_batch(caches, lay, list(zip(chunks, pinned)), impl="triton", stream=side)
    side.synchronize()
    for spans, g, h in zip(chunks, on_gpu, pinned):
        want = torch.empty_like(g)
        pack(caches, lay, spans, want, impl="cpu")  # the vectorised torch path, on the GPU
        torch.cuda.synchronize()
        assert torch.equal(g, want)
        assert torch.equal(h, want.cpu())
    dst = [torch.zeros_like(c) for c in caches]
    unpack_batch(dst, lay, list(zip(pinned, chunks)), impl="triton", stream=side)
    side.synchronize()
    again = torch.empty_like(on_gpu[0])
    for spans, g in zip(chunks, on_gpu):
        pack(dst, lay, spans, again, impl="triton")
        torch.cuda.synchronize()
        assert torch.equal(again, g)


def test_auto_picks_triton_for_cuda_caches() -> None:
    lay = KVLayout("m", KVDtype.FP32, num_layers=2, num_kv_heads=2, head_size=64, block_size=16,
                   memory_layout=MemoryLayout.KV_CONCAT)
    caches = make_caches(lay, 4, "separate", 1, device="cuda")
    out = torch.empty(payload_bytes(lay, 20), dtype=torch.uint8, device="cuda")
    pack(caches, lay, [(2, 0, 16), (0, 0, 4)], out)
    dst = [torch.zeros_like(c) for c in caches]
    unpack(out, dst, lay, [(1, 0, 16), (3, 0, 4)])
    torch.cuda.synchronize()
    assert all(torch.equal(ints(d[1]), ints(c[2])) for d, c in zip(dst, caches))
