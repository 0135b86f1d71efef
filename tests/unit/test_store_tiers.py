"""``store.tiers``: the type-tagged, ordered list of lower tiers, and the old sections' fate."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from pdx.config import (
    AgentConfig,
    DiskConfig,
    L1Config,
    MooncakeConfig,
    RedisConfig,
    S3Config,
    StoreConfig,
    load_config,
)
from pdx.errors import ConfigError
from pdx.keys import ChunkKey
from pdx.store import ChunkMeta, ChunkStore, Tier
from pdx.store.lookup import RemoteLookups
from pdx.store.metrics import StoreMetrics
from pdx.store.tier import LowerTier, Sink, WriteItem

SLAB = 4096


def test_tiers_load_in_order_with_their_types() -> None:
    cfg = load_config(AgentConfig, data={"store": {"tiers": [
        {"type": "disk", "capacity": "1GiB"},
        {"type": "redis", "url": "redis://10.0.0.1:6379/0"},
        {"type": "mooncake", "master": "10.0.0.2:50051", "protocol": "rdma"},
        {"type": "s3", "bucket": "kv", "endpoint_url": "http://10.0.0.3:9000"},
    ]}}, env={})
    kinds = [type(t) for t in cfg.store.lower_tiers]
    assert kinds == [DiskConfig, RedisConfig, MooncakeConfig, S3Config]
    assert all(t.enabled for t in cfg.store.lower_tiers)  # listed means on
    assert cfg.store.lower_tiers[0].capacity == 1 << 30


def test_an_entry_can_be_turned_off() -> None:
    cfg = load_config(StoreConfig, data={"tiers": [{"type": "disk", "enabled": False}]}, env={})
    assert cfg.lower_tiers == ()


def test_old_sections_still_load_as_tiers() -> None:
    cfg = load_config(StoreConfig, data={"disk": {"enabled": True}, "redis": {"enabled": True}}, env={})
    assert [type(t) for t in cfg.lower_tiers] == [DiskConfig, RedisConfig]


@pytest.mark.parametrize(("raw", "message"), [
    ({"tiers": [{"type": "tape"}]}, r"tiers\[0\]\.type: expected one of 'disk', 'redis', 'mooncake', 's3', 'nixl'"),
    ({"tiers": [{"capacity": 1}]}, r"tiers\[0\]\.type"),
    ({"tiers": [{"type": "disk", "bucket": "x"}]}, r"unknown key tiers\[0\]\.'bucket'"),
    ({"tiers": [{"type": "disk"}, {"type": "disk"}]}, "more than one tier of type 'disk'"),
    ({"tiers": [{"type": "disk"}], "redis": {"enabled": True}}, r"(?s)store\.redis\.enabled and store\.tiers.*- \{type: redis"),
])
def test_bad_tier_lists_say_what_is_wrong(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(StoreConfig, data=raw, env={})


def test_store_builds_the_listed_tiers(tmp_path: Path) -> None:
    cfg = StoreConfig(chunk_tokens=16, l1=L1Config(capacity=2 * SLAB, slab_size=SLAB),
                      tiers=(DiskConfig(enabled=True, path=str(tmp_path), write="all"),))
    with ChunkStore(cfg, chunk_fingerprint="fp") as store:
        assert [t.tier for t in store.tiers] == [Tier.DISK]
        assert store.local_tiers == store.tiers and store.remote_tiers == []
        key = ChunkKey(bytes(16))
        store.put(key, b"x" * SLAB)
        assert store.flush(10.0)
        assert store.tier_health()["disk"]["chunks"] == 1
        assert store.tier_health()["redis"]["enabled"] is False


class _FakeRemote(LowerTier):
    """A remote tier whose ``exists`` answers after ``delay`` (unit tests only)."""

    tier = Tier.MOONCAKE

    def __init__(self, kind: Tier, held: set[ChunkKey], delay: float, budget: float) -> None:
        super().__init__(StoreMetrics(), 4)
        self.tier = kind  # type: ignore[misc]
        self.held, self.delay, self.lookup_timeout_s = held, delay, budget
        self.release = threading.Event()
        self.calls = self.reads = 0
        self.barrier: threading.Barrier | None = None

    def exists(self, keys: Sequence[ChunkKey]) -> list[bool]:
        self.calls += 1
        if self.delay:
            self.release.wait(self.delay)
        if self.barrier is not None:
            try:
                self.barrier.wait()  # answers only while the other tier is being asked too
            except threading.BrokenBarrierError:
                return [False] * len(keys)
        return [k in self.held for k in keys]

    def read(self, keys: Sequence[ChunkKey], sink: Sink) -> list[ChunkMeta | None]:
        self.reads += 1
        return [None] * len(keys)

    def write_batch(self, items: list[WriteItem]) -> None:
        return None


def _remote_store(tiers: list[LowerTier]) -> ChunkStore:
    store = ChunkStore(StoreConfig(chunk_tokens=16, l1=L1Config(capacity=2 * SLAB, slab_size=SLAB)),
                       chunk_fingerprint="fp")
    store.tiers.extend(tiers)  # fakes in place of configured tiers
    store._remote_lookups = RemoteLookups(store.metrics, 8)
    return store


def test_a_stuck_remote_tier_does_not_hide_the_hits_of_the_next_one() -> None:
    keys = [ChunkKey(bytes([i]) * 16) for i in range(4)]
    stuck = _FakeRemote(Tier.MOONCAKE, set(keys), delay=30.0, budget=0.2)
    redis = _FakeRemote(Tier.REDIS, set(keys[:3]), delay=0.0, budget=0.2)
    store = _remote_store([stuck, redis])
    try:
        t0 = time.monotonic()
        r = store.lookup(keys, remote=True)
        took = time.monotonic() - t0
        assert r.prefix_chunks == 3 and r.tiers == (Tier.REDIS,) * 3 + (None,)
        assert took < 10.0, took  # bounded by the budget (0.2 s), not by the stuck call (30 s)
        assert store.metrics.value("pdx_store_lookup_timeouts_total", {"tier": "mooncake"}) == 1
        # while its call is still out, later lookups skip the stuck tier at once
        assert store.lookup(keys, remote=True).prefix_chunks == 3
        assert stuck.calls == 1
        assert store.get(keys) == [None] * 4  # a load skips the hanging tier too (the fakes hold no bytes)
        assert stuck.reads == 0 and redis.reads == 1
        assert store.metrics.value("pdx_store_misses_total", {"tier": "mooncake", "op": "lookup"}) >= 4
        stuck.release.set()  # its call returns: the tier is asked again, and its answer counts
        stuck.delay = 0.0
        deadline = time.monotonic() + 10
        while store.lookup(keys, remote=True).prefix_chunks != 4:
            assert time.monotonic() < deadline, "the tier was not asked again once its call returned"
            time.sleep(0.01)
        assert store.lookup(keys, remote=True).tiers == (Tier.MOONCAKE,) * 4  # list order wins
    finally:
        stuck.release.set()
        store.close()


def test_remote_tiers_are_asked_at_once() -> None:
    keys = [ChunkKey(bytes([i]) * 16) for i in range(2)]
    a = _FakeRemote(Tier.MOONCAKE, {keys[0]}, delay=0.0, budget=10.0)
    b = _FakeRemote(Tier.REDIS, {keys[1]}, delay=0.0, budget=10.0)
    a.barrier = b.barrier = threading.Barrier(2, timeout=5.0)
    store = _remote_store([a, b])
    try:
        r = store.lookup(keys, remote=True)
        assert r.tiers == (Tier.MOONCAKE, Tier.REDIS) and r.prefix_chunks == 2
        assert a.calls == b.calls == 1
    finally:
        store.close()
