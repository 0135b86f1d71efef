"""The worker half: store (pack + commit) and load (pin/fetch + verify + unpack) with the real
kernels on torch caches, against a fake agent; load errors and their timing."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
from connector_fakes import PEERS, FakeAgent

torch = pytest.importorskip("torch")

from pdx.connector.metadata import ChunkLoad, ChunkStore, LoadSpec, StepPlan, StoreSpec  # noqa: E402
from pdx.connector.worker import KernelCodec, PdxWorkerSide, WorkerSettings, slice_payload  # noqa: E402
from pdx.kernels import pack, payload_bytes  # noqa: E402
from pdx.keys import chunk_keys, tail_key  # noqa: E402
from pdx.layout import KVDtype, KVLayout, MemoryLayout  # noqa: E402

BS, CT, BLOCKS = 16, 32, 24
LAYOUT = KVLayout(model_id="m", dtype=KVDtype.FP32, num_layers=2, num_kv_heads=2, head_size=32,
                  block_size=BS, memory_layout=MemoryLayout.CPU_VEC)
CHUNK = payload_bytes(LAYOUT, CT)


@pytest.fixture(autouse=True)
def _clear_peers() -> Any:
    yield
    PEERS.clear()


def _caches(seed: int) -> list[Any]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(BLOCKS, 2, BS, 64, generator=g) for _ in range(LAYOUT.num_layers)]


def _worker(agent: FakeAgent, caches: list[Any], **over: Any) -> PdxWorkerSide:
    fields: dict[str, Any] = dict(chunk_tokens=CT, block_size=BS, load_timeout_s=5.0)
    fields.update(over)
    return PdxWorkerSide(WorkerSettings(**fields), agent, KernelCodec(caches, LAYOUT, "cpu"), agent.pool(),
                         LAYOUT, CHUNK)


def _tokens(caches: list[Any], blocks: list[int], start: int, end: int) -> Any:
    """Packed bytes of tokens [start, end) (the kernels are tested elsewhere: the oracle here)."""
    from pdx.kernels import spans_for_tokens

    out = np.zeros(payload_bytes(LAYOUT, end - start), dtype=np.uint8)
    pack(caches, LAYOUT, spans_for_tokens(blocks, BS, start, end - start), out, impl="reference")
    return out


def _wait_finished(w: PdxWorkerSide, timeout: float = 10.0) -> set[str]:
    deadline = time.monotonic() + timeout
    done: set[str] = set()
    while time.monotonic() < deadline:
        done |= w.finished()
        if done and not w.loads_in_flight():
            return done
        time.sleep(0.01)
    raise AssertionError("load did not finish")


KEYS = chunk_keys(list(range(CT * 4)), LAYOUT.chunk_fingerprint, CT)
SRC_BLOCKS = [3, 9, 4, 12, 5, 6, 7, 8]
DST_BLOCKS = [20, 1, 2, 15, 16, 17, 18, 19]


def _stored(agent: FakeAgent, caches: list[Any], n: int = 4) -> PdxWorkerSide:
    w = _worker(agent, caches)
    plan = StepPlan(CT, BS, stores=[StoreSpec("s", tuple(SRC_BLOCKS), tuple(ChunkStore(i, KEYS[i])
                                                                           for i in range(n)))])
    w.store(plan)
    return w


def _load_plan(n: int = 4, peer: str = "", start: int = 0) -> StepPlan:
    chunks = tuple(ChunkLoad(i, KEYS[i], max(start, i * CT), (i + 1) * CT) for i in range(start // CT, n))
    return StepPlan(CT, BS, loads=[LoadSpec("r", tuple(DST_BLOCKS), chunks, peer=peer, remote_request_id="p")])


def test_store_then_load_is_bit_exact() -> None:
    src, dst = _caches(1), _caches(2)
    agent = FakeAgent(slab_size=CHUNK)
    w = _stored(agent, src)
    assert w.stats.stored_chunks == 4
    assert set(agent.chunks) == set(KEYS)
    # a second store of the same keys reserves nothing new
    w.store(StepPlan(CT, BS, stores=[StoreSpec("s2", tuple(SRC_BLOCKS), (ChunkStore(0, KEYS[0]),))]))
    assert w.stats.stored_chunks == 4 and w.stats.store_skipped == 1
    r = _worker(agent, dst)
    r.start_loads(_load_plan())
    assert _wait_finished(r) == {"r"}
    assert r.take_load_errors() == set()
    assert np.array_equal(_tokens(dst, DST_BLOCKS, 0, 4 * CT), _tokens(src, SRC_BLOCKS, 0, 4 * CT))
    assert r.stats.loaded_tokens == 4 * CT and r.stats.loaded_bytes == 4 * CHUNK
    assert agent.pins.get("load:r") is None  # released after the unpack
    w.close()
    r.close()


def test_partial_first_chunk_writes_only_its_tail() -> None:
    src, dst = _caches(1), _caches(2)
    agent = FakeAgent(slab_size=CHUNK)
    _stored(agent, src)
    before = _tokens(dst, DST_BLOCKS, 0, 40)
    r = _worker(agent, dst)
    r.start_loads(_load_plan(n=3, start=40))  # tokens 0..39 are vLLM's own prefix-cache hit
    _wait_finished(r)
    assert r.take_load_errors() == set()
    assert np.array_equal(_tokens(dst, DST_BLOCKS, 0, 40), before)
    assert np.array_equal(_tokens(dst, DST_BLOCKS, 40, 96), _tokens(src, SRC_BLOCKS, 40, 96))
    r.close()


def test_last_chunk_loaded_in_part_leaves_the_last_token_alone() -> None:
    src, dst = _caches(1), _caches(2)
    agent = FakeAgent(slab_size=CHUNK)
    _stored(agent, src)
    end = 4 * CT - 1  # vLLM computes the prompt's last token itself
    before = _tokens(dst, DST_BLOCKS, end, 4 * CT)
    chunks = tuple(ChunkLoad(i, KEYS[i], i * CT, min(end, (i + 1) * CT)) for i in range(4))
    r = _worker(agent, dst)
    r.start_loads(StepPlan(CT, BS, loads=[LoadSpec("r", tuple(DST_BLOCKS), chunks)]))
    _wait_finished(r)
    assert r.take_load_errors() == set()
    assert np.array_equal(_tokens(dst, DST_BLOCKS, 0, end), _tokens(src, SRC_BLOCKS, 0, end))
    assert np.array_equal(_tokens(dst, DST_BLOCKS, end, 4 * CT), before)
    r.close()


def test_slice_payload_matches_packing_the_slice() -> None:
    src = _caches(5)
    full = _tokens(src, SRC_BLOCKS, 32, 64)
    assert np.array_equal(slice_payload(LAYOUT, full, 32, 5, 29), _tokens(src, SRC_BLOCKS, 37, 61))
    with pytest.raises(ValueError):
        slice_payload(LAYOUT, full, 32, 10, 40)


def test_corrupt_chunk_is_not_unpacked_and_reported_with_the_request() -> None:
    src, dst = _caches(1), _caches(2)
    agent = FakeAgent(slab_size=CHUNK)
    _stored(agent, src)
    c = agent.chunks[KEYS[1]]
    agent.buf[c.offset + 100] ^= 0xFF  # bit rot in the pool
    before = _tokens(dst, DST_BLOCKS, CT, 4 * CT)
    r = _worker(agent, dst)
    r.start_loads(_load_plan())
    done = _wait_finished(r)
    assert done == {"r"}
    # chunk 1 (tokens 32..63) and everything after it: blocks 2..7 of the table
    assert r.take_load_errors() == {DST_BLOCKS[i] for i in range(2, 8)}
    assert r.take_load_errors() == set()  # reported once
    assert np.array_equal(_tokens(dst, DST_BLOCKS, 0, CT), _tokens(src, SRC_BLOCKS, 0, CT))
    # nothing from the corrupt chunk on was written
    assert np.array_equal(_tokens(dst, DST_BLOCKS, CT, 4 * CT), before)
    assert r.stats.corrupt_chunks == 1
    r.close()


def test_errors_only_become_visible_with_the_finished_request() -> None:
    agent = FakeAgent(slab_size=CHUNK)
    r = _worker(agent, _caches(2))
    r.start_loads(_load_plan())  # nothing stored: every chunk is missing
    deadline = time.monotonic() + 5
    while r.loads_in_flight() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert r.take_load_errors() == set()  # finished() not called yet
    assert r.finished() == {"r"}
    assert r.take_load_errors() == set(DST_BLOCKS)
    r.close()


def test_fetch_from_peer_and_remote_pins_released() -> None:
    src, dst = _caches(1), _caches(2)
    prefill = FakeAgent(slab_size=CHUNK, peer_address="tcp://p:1")
    _stored(prefill, src)
    prefill.pin(KEYS, owner="pd:p")
    decode = FakeAgent(slab_size=CHUNK)
    r = _worker(decode, dst)
    r.start_loads(_load_plan(peer="tcp://p:1"))
    _wait_finished(r)
    assert r.take_load_errors() == set()
    assert np.array_equal(_tokens(dst, DST_BLOCKS, 0, 4 * CT), _tokens(src, SRC_BLOCKS, 0, 4 * CT))
    assert "pd:p" not in prefill.pins  # the decode side's fetch let the prefill side's pins go
    assert set(decode.chunks) == set(KEYS)  # fetched chunks stay in the local store for reuse
    r.close()


def test_tail_chunk_is_stored_fetched_and_loaded_bit_exact() -> None:
    src, dst = _caches(1), _caches(2)
    tokens = list(range(CT * 3 + 22))  # decode computes the last token: the tail holds 21
    keys = chunk_keys(tokens, LAYOUT.chunk_fingerprint, CT)
    tail = tail_key(tokens, CT * 3 + 21, LAYOUT.chunk_fingerprint, CT)
    assert tail is not None
    prefill = FakeAgent(slab_size=CHUNK, peer_address="tcp://p:1")
    w = _worker(prefill, src)
    stores = (*(ChunkStore(i, keys[i]) for i in range(3)), ChunkStore(3, tail, num_tokens=21))
    w.store(StepPlan(CT, BS, stores=[StoreSpec("s", tuple(SRC_BLOCKS), stores)]))
    assert prefill.chunks[tail].nbytes == payload_bytes(LAYOUT, 21) and prefill.chunks[tail].num_tokens == 21
    assert w.stats.stored_bytes == 3 * CHUNK + payload_bytes(LAYOUT, 21)
    decode = FakeAgent(slab_size=CHUNK)
    r = _worker(decode, dst)
    before = _tokens(dst, DST_BLOCKS, CT * 3 + 21, CT * 4)
    loads = (*(ChunkLoad(i, keys[i], i * CT, (i + 1) * CT) for i in range(3)),
             ChunkLoad(3, tail, 3 * CT, 3 * CT + 21, num_tokens=21))
    r.start_loads(StepPlan(CT, BS, loads=[LoadSpec("r", tuple(DST_BLOCKS), loads, peer="tcp://p:1")]))
    _wait_finished(r)
    assert r.take_load_errors() == set()
    end = CT * 3 + 21
    assert np.array_equal(_tokens(dst, DST_BLOCKS, 0, end), _tokens(src, SRC_BLOCKS, 0, end))
    assert np.array_equal(_tokens(dst, DST_BLOCKS, end, CT * 4), before)  # nothing past the tail
    # A tail chunk whose size is not what the plan says is not unpacked.
    r2 = _worker(decode, _caches(3))
    bad = (ChunkLoad(3, tail, 3 * CT, 3 * CT + 20, num_tokens=20),)
    r2.start_loads(StepPlan(CT, BS, loads=[LoadSpec("r2", tuple(DST_BLOCKS), bad)]))
    _wait_finished(r2)
    assert r2.take_load_errors() == {DST_BLOCKS[6], DST_BLOCKS[7]}
    for x in (w, r, r2):
        x.close()


@pytest.mark.parametrize("mode", ["corrupt_status", "bit_flip", "dead_peer", "hang"])
def test_bad_transfers_become_load_errors(mode: str) -> None:
    src, dst = _caches(1), _caches(2)
    prefill = FakeAgent(slab_size=CHUNK, peer_address="tcp://p:2")
    _stored(prefill, src)
    decode = FakeAgent(slab_size=CHUNK)
    peer = "tcp://p:2"
    expect_from = 0
    if mode == "corrupt_status":
        decode.corrupt_keys = {KEYS[2]}
        expect_from = 2
    elif mode == "bit_flip":
        decode.flip_on_fetch = True
    elif mode == "dead_peer":
        peer = "tcp://nobody:1"
    else:
        decode.hang_fetch = True
    r = _worker(decode, dst, load_timeout_s=0.5)
    t0 = time.monotonic()
    r.start_loads(_load_plan(peer=peer))
    _wait_finished(r)
    assert time.monotonic() - t0 < 5.0
    first_bad_block = expect_from * CT // BS
    assert r.take_load_errors() == set(DST_BLOCKS[first_bad_block:])
    if mode == "hang":
        assert "cancel" in decode.calls
    r.close()


def test_agent_down_during_store_and_load_never_raises() -> None:
    agent = FakeAgent(slab_size=CHUNK)
    w = _worker(agent, _caches(1))
    agent.down = True
    w.store(StepPlan(CT, BS, stores=[StoreSpec("s", tuple(SRC_BLOCKS), (ChunkStore(0, KEYS[0]),))]))
    assert w.stats.store_errors == 1
    w.start_loads(_load_plan(n=1))
    assert _wait_finished(w) == {"r"}
    assert w.take_load_errors() == set(DST_BLOCKS[:2])
    w.close()


def test_agent_restart_reattaches_the_pool() -> None:
    agent = FakeAgent(slab_size=CHUNK)
    caches = _caches(1)
    calls: list[int] = []

    def reattach() -> tuple[Any, Any, int]:
        calls.append(1)
        return KernelCodec(caches, LAYOUT, "cpu"), agent.pool(), CHUNK

    w = PdxWorkerSide(WorkerSettings(CT, BS), agent, KernelCodec(caches, LAYOUT, "cpu"), agent.pool(), LAYOUT,
                      CHUNK, reattach=reattach)
    old_pool, old_buf = w._pool, agent.buf
    # the agent restarted: a new instance with a new pool segment
    agent.instance = "inst-2"
    agent.buf = np.zeros_like(old_buf)
    w.store(StepPlan(CT, BS, stores=[StoreSpec("s", tuple(SRC_BLOCKS), (ChunkStore(0, KEYS[0]),))]))
    assert calls == [1] and old_pool.closed  # type: ignore[attr-defined]
    assert w.stats.stored_chunks == 1
    off = agent.chunks[KEYS[0]].offset
    assert agent.buf[off:off + CHUNK].any() and not old_buf.any()  # written into the new mapping
    w.store(StepPlan(CT, BS, stores=[StoreSpec("s", tuple(SRC_BLOCKS), (ChunkStore(1, KEYS[1]),))]))
    assert calls == [1]  # once per restart
    w.close()


def test_sync_load_runs_inline_and_reports_errors_in_the_same_step() -> None:
    src, dst = _caches(1), _caches(2)
    agent = FakeAgent(slab_size=CHUNK)
    _stored(agent, src, n=2)  # chunks 2 and 3 are missing
    r = _worker(agent, dst)
    plan = _load_plan()
    spec = plan.loads[0]
    plan.loads[0] = LoadSpec(spec.req_id, spec.block_ids, spec.chunks, sync=True)
    r.start_loads(plan)  # returns after the unpack
    assert np.array_equal(_tokens(dst, DST_BLOCKS, 0, 2 * CT), _tokens(src, SRC_BLOCKS, 0, 2 * CT))
    assert r.finished() == set() and r.loads_in_flight() == 0  # never reported as finished
    assert r.take_load_errors() == set(DST_BLOCKS[4:])
    r.close()


def test_peer_hint_load_falls_back_to_the_local_store_then_recompute() -> None:
    """Peer-to-peer reuse: chunks the hinted peer does not deliver come from the local store's tiers
    (its pin promotes them); what neither has is recomputed, and nothing wrong is unpacked."""
    src, dst = _caches(1), _caches(2)
    holder = FakeAgent(slab_size=CHUNK, peer_address="tcp://p:3")
    _stored(holder, src, n=2)  # the peer holds chunks 0-1 only
    target = FakeAgent(slab_size=CHUNK)
    _stored(target, src, n=3)  # the local store (as if from its shared tier) holds 0-2
    for k in KEYS[:2]:
        target.chunks.pop(k)  # ...but not 0-1 any more: those must come from the peer
    r = _worker(target, dst)
    chunks = tuple(ChunkLoad(i, KEYS[i], i * CT, (i + 1) * CT) for i in range(4))
    r.start_loads(StepPlan(CT, BS, loads=[LoadSpec("h", tuple(DST_BLOCKS), chunks, peer="tcp://p:3",
                                                   hint=True)]))
    assert _wait_finished(r) == {"h"}
    # chunk 3 is held nowhere: its blocks are recomputed; 0-1 came from the peer, 2 from the store
    assert r.take_load_errors() == set(DST_BLOCKS[3 * CT // BS:])
    assert np.array_equal(_tokens(dst, DST_BLOCKS, 0, 3 * CT), _tokens(src, SRC_BLOCKS, 0, 3 * CT))
    assert r.stats.loaded_tokens == 3 * CT
    assert "fetch" in target.calls and "pin" in target.calls
    r.close()


def test_a_p_d_load_does_not_fall_back_to_the_local_store() -> None:
    src, dst = _caches(1), _caches(2)
    prefill = FakeAgent(slab_size=CHUNK, peer_address="tcp://p:4")
    _stored(prefill, src, n=2)
    decode = FakeAgent(slab_size=CHUNK)
    r = _worker(decode, dst)
    r.start_loads(_load_plan(peer="tcp://p:4"))
    _wait_finished(r)
    assert r.take_load_errors() == set(DST_BLOCKS[2 * CT // BS:])
    assert decode.calls.count("pin") == 0
    r.close()
