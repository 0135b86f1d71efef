"""L1 pool through ChunkStore: reserve/commit/abort, pins and leases, eviction, capacity, lookup."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from pdx.checksum import checksum
from pdx.config import Eviction, L1Config, RedisConfig, StoreConfig, load_config
from pdx.errors import CapacityError, ConfigError, IntegrityError, ReservationError, StoreError
from pdx.keys import ChunkKey, chunk_keys, tail_key
from pdx.layout import KVDtype, KVLayout
from pdx.store import ChunkStore, Tier, attach

SLAB = 4096
FP = "0123456789abcdef"


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def key(i: int) -> ChunkKey:
    return ChunkKey(i.to_bytes(16, "little"))


def payload(i: int, n: int = SLAB) -> bytes:
    return np.random.default_rng(i).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(clock: FakeClock, slabs: int = 4, eviction: Eviction = Eviction.LRU, **l1: object) -> ChunkStore:
    cfg = StoreConfig(chunk_tokens=16, l1=L1Config(capacity=slabs * SLAB, eviction=eviction,
                                                  lease_s=10.0, reservation_timeout_s=5.0, **l1))
    return ChunkStore(cfg, SLAB, FP, clock=clock)


@pytest.fixture
def store(clock: FakeClock) -> Iterator[ChunkStore]:
    s = make(clock)
    yield s
    s.close()


def test_geometry_and_attach_in_process(store: ChunkStore) -> None:
    assert store.slab_size == SLAB and store.slab_count == 4
    offsets = [store.slab_offset(i) for i in range(4)]
    assert offsets == sorted(set(offsets)) and all(o % 4096 == 0 for o in offsets)
    with pytest.raises(IndexError):
        store.slab_offset(4)
    other = attach(store.pool_name)
    try:
        assert (other.slab_size, other.slab_count) == (SLAB, 4)
        assert other.slab_offset(3) == store.slab_offset(3)
    finally:
        other.close()


def test_reserve_write_commit_pin_read(store: ChunkStore) -> None:
    data = payload(1)
    res = store.reserve(key(1), len(data))
    v = store.view(res)
    v[:] = data
    v.release()
    info = store.commit(res.id, num_tokens=16)
    assert info.checksum == checksum(data) and info.nbytes == len(data)
    (pin,) = store.pin([key(1)])
    assert pin is not None and pin.checksum == checksum(data) and pin.num_tokens == 16
    assert bytes(store.view(pin)) == data
    assert store.unpin(pin.lease_id) is True
    assert store.unpin(pin.lease_id) is False  # idempotent


def test_commit_verifies_given_checksum(store: ChunkStore) -> None:
    data = payload(2)
    res = store.reserve(key(2), len(data))
    store.view(res)[:] = data
    with pytest.raises(IntegrityError, match=r"reservation \d+ aborted"):
        store.commit(res.id, checksum=checksum(data) ^ 1)
    assert store.lookup([key(2)]).prefix_chunks == 0
    assert store.stats().free_slabs == 4
    assert store.metrics.value("pdx_store_integrity_failures_total", {"tier": "l1"}) == 1
    res = store.reserve(key(2), len(data))
    store.view(res)[:] = data
    assert store.commit(res.id, checksum=checksum(data)).checksum == checksum(data)


def test_commit_twice_and_abort(store: ChunkStore) -> None:
    res = store.reserve(key(3), 100)
    store.commit(res.id)
    with pytest.raises(ReservationError, match="unknown"):
        store.commit(res.id)
    res2 = store.reserve(key(4), 100)
    assert store.abort(res2.id) is True
    assert store.abort(res2.id) is False
    with pytest.raises(ReservationError):
        store.commit(res2.id)
    assert store.stats().free_slabs == 3


def test_same_key_committed_twice_keeps_one(store: ChunkStore) -> None:
    data = payload(5)
    r1, r2 = store.reserve(key(5), len(data)), store.reserve(key(5), len(data))
    for r in (r1, r2):
        store.view(r)[:] = data
    a, b = store.commit(r1.id), store.commit(r2.id)
    assert a == b
    s = store.stats()
    assert (s.chunks, s.free_slabs) == (1, 3)


def test_chunk_larger_than_slab_is_refused(store: ChunkStore) -> None:
    with pytest.raises(StoreError, match="does not fit a slab of 4096"):
        store.reserve(key(1), SLAB + 1)
    with pytest.raises(StoreError):
        store.put(key(1), b"x" * (SLAB + 1))


def test_reservation_expires_and_slab_is_reclaimed(store: ChunkStore, clock: FakeClock) -> None:
    res = store.reserve(key(1), 10)
    assert res.expires_at == clock.t + 5.0
    clock.advance(4.9)
    store.reap()
    assert store.stats().reserved_slabs == 1
    clock.advance(0.2)
    store.reap()
    assert store.stats().reserved_slabs == 0 and store.stats().free_slabs == 4
    with pytest.raises(ReservationError, match="expired"):
        store.commit(res.id)
    assert store.metrics.value("pdx_store_expired_reservations_total") == 1


def test_expired_reservation_cannot_be_committed_late(store: ChunkStore, clock: FakeClock) -> None:
    res = store.reserve(key(1), 10)
    clock.advance(6)
    with pytest.raises(ReservationError):  # commit reaps first
        store.commit(res.id)


def test_lease_expiry_releases_pin(store: ChunkStore, clock: FakeClock) -> None:
    for i in range(4):
        store.put(key(i), payload(i))
    pins = store.pin([key(0), key(1)], lease_s=3.0)
    assert all(p is not None for p in pins)
    assert store.stats().pinned_slabs == 2
    clock.advance(2.0)
    assert store.extend(pins[1].lease_id, 5.0)  # type: ignore[union-attr]
    clock.advance(1.5)
    store.reap()
    s = store.stats()
    assert (s.pinned_slabs, s.leases) == (1, 1)
    assert store.metrics.value("pdx_store_expired_leases_total") == 1
    assert store.unpin(pins[0].lease_id) is False  # type: ignore[union-attr]
    clock.advance(4.0)
    store.reap()
    assert store.stats().pinned_slabs == 0
    assert store.metrics.value("pdx_store_expired_leases_total") == 2


def test_release_owner(store: ChunkStore) -> None:
    for i in range(3):
        store.put(key(i), payload(i))
    store.pin([key(0), key(1)], owner="req-1")
    store.pin([key(1), key(2)], owner="req-2")
    assert store.stats().pinned_slabs == 3
    assert store.release_owner("req-1") == 2
    assert store.stats().pinned_slabs == 2
    assert store.release_owner("req-1") == 0
    assert store.release_owner("req-2") == 2
    assert store.stats().pinned_slabs == 0


def test_full_pool_evicts_lru(store: ChunkStore) -> None:
    for i in range(4):
        store.put(key(i), payload(i))
    p = store.pin([key(0)])[0]
    assert p is not None
    store.unpin(p.lease_id)  # key 0 was read: now most recent
    store.put(key(4), payload(4))
    store.put(key(5), payload(5))
    tiers = store.lookup([key(i) for i in range(6)]).tiers
    assert tiers == (Tier.L1, None, None, Tier.L1, Tier.L1, Tier.L1)
    assert store.metrics.value("pdx_store_evictions_total", {"tier": "l1"}) == 2


def test_pinned_and_reserved_slabs_are_never_evicted(store: ChunkStore) -> None:
    for i in range(3):
        store.put(key(i), payload(i))
    pins = store.pin([key(0), key(1), key(2)])
    store.reserve(key(9), 10)
    with pytest.raises(CapacityError, match=r"all 4 slabs are pinned \(3 chunks.*reserved \(1"):
        store.reserve(key(10), 10)
    assert store.metrics.value("pdx_store_capacity_errors_total") == 1
    assert store.lookup([key(0), key(1), key(2)]).prefix_chunks == 3  # nothing lost
    store.unpin(pins[1].lease_id)  # type: ignore[union-attr]
    store.put(key(10), payload(10))
    assert store.lookup([key(1)]).prefix_chunks == 0


def test_capacity_error_clears_when_leases_expire(store: ChunkStore, clock: FakeClock) -> None:
    for i in range(4):
        store.put(key(i), payload(i))
    store.pin([key(i) for i in range(4)], lease_s=1.0)
    with pytest.raises(CapacityError):
        store.put(key(5), payload(5))
    clock.advance(1.0)
    store.put(key(5), payload(5))  # reserve reaps the expired leases first


@pytest.mark.parametrize("policy", list(Eviction))
def test_every_policy_runs_in_the_store(clock: FakeClock, policy: Eviction) -> None:
    s = make(clock, slabs=8, eviction=policy)
    try:
        pinned = [i for i in range(40) if i % 8 == 0]
        for i in range(40):
            s.put(key(i), payload(i, 512))
            if i in pinned:
                s.pin([key(i)], lease_s=1000.0)
        st = s.stats()
        assert (st.chunks, st.pinned_slabs, st.free_slabs) == (8, 5, 0)
        # pinned chunks survived every eviction; every chunk present holds its own bytes
        assert s.lookup([key(i) for i in pinned]).prefix_chunks == 5
        present = 0
        for i in range(40):
            (p,) = s.pin([key(i)])
            if p is not None:
                present += 1
                assert bytes(s.view(p)) == payload(i, 512)
                s.unpin(p.lease_id)
        assert present == 8
    finally:
        s.close()


def test_put_numpy_and_checksum(store: ChunkStore) -> None:
    arr = np.arange(1024, dtype=np.float32)
    info = store.put(key(1), arr)
    assert info.nbytes == arr.nbytes and info.checksum == checksum(arr.tobytes())
    assert info.num_tokens == 16  # chunk_tokens by default


def test_lookup_prefix_and_tokens(clock: FakeClock) -> None:
    cfg = StoreConfig(chunk_tokens=16, namespace="tenant-a", l1=L1Config(capacity=8 * SLAB))
    s = ChunkStore(cfg, SLAB, FP, clock=clock)
    try:
        tokens = np.arange(16 * 5)
        keys = chunk_keys(tokens, FP, 16, "tenant-a")
        for k in keys[:2] + keys[3:]:
            s.put(k, b"x" * 64)
        r = s.lookup_tokens(tokens)
        assert r.keys == tuple(keys)
        assert r.tiers == (Tier.L1, Tier.L1, None, Tier.L1, Tier.L1)
        assert (r.prefix_chunks, r.prefix_tokens, r.l1_prefix_chunks) == (2, 32, 2)
        assert s.lookup_tokens(tokens, namespace="other").prefix_chunks == 0
        m = s.metrics
        assert m.value("pdx_store_hits_total", {"tier": "l1", "op": "lookup"}) == 4
        assert m.value("pdx_store_miss_tokens_total", {"tier": "l1", "op": "lookup"}) == 16 + 80
        assert m.value("pdx_store_requests_total", {"op": "lookup", "result": "partial"}) == 1
        assert m.value("pdx_store_requests_total", {"op": "lookup", "result": "miss"}) == 1
        # a probe (the connector's candidate tail keys) answers the same and counts nothing
        tail = tail_key(tokens, 16 * 5 - 1, FP, 16, "tenant-a")
        assert tail is not None
        s.put(tail, b"y" * 60, num_tokens=15)
        probe = s.lookup([keys[0], tail, keys[2]], count=False)
        assert probe.tiers == (Tier.L1, Tier.L1, None)
        assert m.value("pdx_store_hits_total", {"tier": "l1", "op": "lookup"}) == 4
        assert m.value("pdx_store_requests_total", {"op": "lookup", "result": "partial"}) == 1
    finally:
        s.close()


def test_get_pins_leading_run_only(store: ChunkStore) -> None:
    for i in (0, 1, 3):
        store.put(key(i), payload(i))
    pins = store.get([key(i) for i in range(4)], owner="r")
    assert [p is not None for p in pins] == [True, True, False, False]
    assert store.stats().pinned_slabs == 2
    assert store.release_owner("r") == 2


def test_discard(store: ChunkStore) -> None:
    store.put(key(1), payload(1))
    (p,) = store.pin([key(1)])
    assert store.discard(key(1)) is False  # pinned
    store.unpin(p.lease_id)  # type: ignore[union-attr]
    assert store.discard(key(1)) is True
    assert store.lookup([key(1)]).prefix_chunks == 0 and store.stats().free_slabs == 4


def test_metrics_registry_is_per_store(clock: FakeClock) -> None:
    a, b = make(clock), make(clock)
    try:
        a.put(key(1), payload(1))
        assert a.metrics.registry is not b.metrics.registry
        assert a.metrics.value("pdx_store_bytes_in_total", {"tier": "l1"}) == SLAB
        assert b.metrics.value("pdx_store_bytes_in_total", {"tier": "l1"}) == 0
        assert a.metrics.value("pdx_store_chunks", {"tier": "l1"}) == 1
        assert a.metrics.value("pdx_store_capacity_bytes", {"tier": "l1"}) == 4 * SLAB
    finally:
        a.close()
        b.close()


def test_close_unlinks_pool_and_refuses_calls(clock: FakeClock) -> None:
    s = make(clock)
    name = s.pool_name
    s.close()
    s.close()
    with pytest.raises(StoreError, match="no pdx pool"):
        attach(name)
    with pytest.raises(StoreError, match="closed"):
        s.reserve(key(1), 10)


def test_from_layout_and_config(clock: FakeClock) -> None:
    layout = KVLayout("m", KVDtype.FP16, num_layers=2, num_kv_heads=2, head_size=64, block_size=16)
    cfg = load_config(StoreConfig, data={"chunk_tokens": 16, "l1": {"capacity": "1MiB"}}, env={})
    s = ChunkStore.from_layout(cfg, layout, clock=clock)
    try:
        assert s.slab_size == layout.chunk_bytes(16) == 16384
        assert s.slab_count == 64 and s.chunk_fingerprint == layout.chunk_fingerprint
    finally:
        s.close()


def test_bad_sizes_are_clear_errors(clock: FakeClock) -> None:
    with pytest.raises(StoreError, match="holds no slab"):
        ChunkStore(StoreConfig(l1=L1Config(capacity=1000)), SLAB, FP, clock=clock)
    with pytest.raises(StoreError, match="no slab size"):
        ChunkStore(StoreConfig(), 0, FP, clock=clock)


def test_fixed_shm_name_in_use_is_refused(clock: FakeClock) -> None:
    name = f"pdx-test-{id(clock)}"
    a = make(clock, shm_name=name)
    try:
        with pytest.raises(StoreError, match="in use by a running pool"):
            # same pid owns it: a second store may not take it over
            make(clock, shm_name=name)
    finally:
        a.close()


def test_bad_redis_url_is_a_config_error(clock: FakeClock) -> None:
    pytest.importorskip("redis", reason="the redis extra is not installed")
    cfg = StoreConfig(l1=L1Config(capacity=SLAB), redis=RedisConfig(enabled=True, url="http://nope"))
    with pytest.raises(ConfigError, match=r"store\.redis\.url"):
        ChunkStore(cfg, SLAB, FP, clock=clock)
