"""The native strided copy (``pdx.kernels.native``) is bit-equal to the torch path and the
reference on every ``CPU_VEC`` case, and a missing or stale binary falls back to torch."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_cases import Case, cases, ints, make_caches, pack_bytes

from pdx.kernels import native, pack_batch, payload_bytes, unpack, unpack_batch
from pdx.kernels.plan import Direction, make_plan
from pdx.layout import MemoryLayout

needs_native = pytest.mark.skipif(
    native.module() is None and os.environ.get("PDX_REQUIRE_NATIVE") != "1",
    reason="native extension not built here (python setup.py build_ext --inplace); ./dev test requires it")


@pytest.fixture
def threads(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """Run with 1 or 2 threads, however small the copy (the same for every example)."""
    monkeypatch.setattr(native, "MIN_BYTES_PER_THREAD", 1)
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _native_pack(case: Case, caches: list[torch.Tensor], heads: tuple[int, int] | None = None) -> bytes:
    out = bytearray(payload_bytes(case.layout, case.tokens, heads))
    plan = make_plan(Direction.PACK, caches, case.layout, [(case.spans, out)], heads)
    assert native.run(plan)  # the native path ran, not the fallback
    return bytes(out)


@needs_native
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cases([MemoryLayout.CPU_VEC]), st.data())
def test_native_pack_and_unpack_equal_torch_and_reference(threads: int, case: Case, data: st.DataObject) -> None:
    assert native.module() is not None
    src = make_caches(case.layout, case.num_blocks, case.storage, case.seed)
    r0, r1 = case.layout.head_range
    h0 = data.draw(st.integers(r0, r1 - 1))
    h1 = data.draw(st.integers(h0 + 1, r1))
    heads = data.draw(st.sampled_from([None, (h0, h1)]))
    got = _native_pack(case, src, heads)
    assert got == pack_bytes(case, src, "cpu_torch", heads=heads)
    assert got == pack_bytes(case, src, "reference", heads=heads)
    # Unpack a chunk that holds all heads into caches with other bits: only the spans' slots change.
    chunk = pack_bytes(case, src, "reference")
    outs = []
    for impl in ("cpu", "cpu_torch", "reference"):
        dst = make_caches(case.layout, case.num_blocks, case.storage, case.seed + 1)
        unpack(chunk, dst, case.layout, case.spans, impl=impl)
        outs.append([ints(d) for d in dst])
    assert all(torch.equal(a, b) for a, b in zip(outs[0], outs[1]))
    assert all(torch.equal(a, b) for a, b in zip(outs[0], outs[2]))


@needs_native
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cases([MemoryLayout.CPU_VEC]), st.integers(1, 3), st.data())
def test_native_batches_equal_torch(threads: int, case: Case, n_chunks: int, data: st.DataObject) -> None:
    lay = case.layout
    src = make_caches(lay, case.num_blocks, case.storage, case.seed)
    # Chunks over disjoint slots: consecutive slices of one walk over the blocks.
    slots = [(b, s + j) for b, s, n in case.spans for j in range(n)]
    cuts = sorted(data.draw(st.lists(st.integers(1, max(1, len(slots) - 1)), max_size=n_chunks - 1, unique=True)))
    parts = [slots[a:b] for a, b in zip([0, *cuts], [*cuts, len(slots)]) if b > a]
    jobs = [[(b, s, 1) for b, s in part] for part in parts]
    native_outs = [torch.zeros(payload_bytes(lay, len(j)), dtype=torch.uint8) for j in jobs]
    torch_outs = [torch.zeros_like(o) for o in native_outs]
    pack_batch(src, lay, list(zip(jobs, native_outs)), impl="cpu")
    pack_batch(src, lay, list(zip(jobs, torch_outs)), impl="cpu_torch")
    assert all(torch.equal(a, b) for a, b in zip(native_outs, torch_outs))
    a = make_caches(lay, case.num_blocks, case.storage, case.seed + 1)
    b = make_caches(lay, case.num_blocks, case.storage, case.seed + 1)
    unpack_batch(a, lay, list(zip(native_outs, jobs)), impl="cpu")
    unpack_batch(b, lay, list(zip(native_outs, jobs)), impl="cpu_torch")
    assert all(torch.equal(ints(x), ints(y)) for x, y in zip(a, b))


@needs_native
def test_other_layouts_and_devices_are_not_taken() -> None:
    from kernel_cases import KVDtype, KVLayout

    lay = KVLayout("m", KVDtype.FP16, num_layers=1, num_kv_heads=1, head_size=4, block_size=2,
                   memory_layout=MemoryLayout.NHD)
    caches = make_caches(lay, 2, "separate", 0)
    plan = make_plan(Direction.PACK, caches, lay, [([(0, 0, 2)], bytearray(payload_bytes(lay, 2)))], None)
    assert not native.takes(plan)
    assert not native.run(plan)


def test_a_stale_binary_is_refused_and_torch_runs(monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(native, "source_hash", lambda: "0000000000000000")
    monkeypatch.setattr(native, "_state", {})
    with caplog.at_level(logging.WARNING, logger="pdx.kernels.native"):
        assert native.module() is None
        assert native.module() is None  # logged once
    msgs = [r.getMessage() for r in caplog.records if r.name == "pdx.kernels.native"]
    assert len(msgs) == 1
    assert "using the torch path" in msgs[0]
    assert "stale" in msgs[0] or "not built" in msgs[0]
    from kernel_cases import KVDtype, KVLayout

    lay = KVLayout("m", KVDtype.BF16, num_layers=2, num_kv_heads=2, head_size=8, block_size=16,
                   memory_layout=MemoryLayout.CPU_VEC)
    case = Case(lay, 3, "stacked", [(2, 3, 13), (0, 0, 5)], 7)
    src = make_caches(lay, 3, "stacked", 7)
    assert pack_bytes(case, src, "cpu") == pack_bytes(case, src, "reference")


def test_turned_off_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDX_KERNELS_NATIVE", "0")
    monkeypatch.setattr(native, "_state", {})
    assert native.module() is None


def test_check_command_reports_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "_state", {})
    assert native.main(["--check"]) == (0 if native._load()[0] is not None else 1)
    assert native.main([]) == 2
