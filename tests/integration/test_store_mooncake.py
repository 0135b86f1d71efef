"""The Mooncake tier against a real mooncake_master: round trip, master killed and back, eviction, sharing."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pytest

from pdx.checksum import checksum
from pdx.config import L1Config, MooncakeConfig, RedisConfig, StoreConfig
from pdx.keys import ChunkKey
from pdx.store import ChunkMeta, ChunkStore, Tier
from pdx.store.value import pack_header

pytestmark = [pytest.mark.integration, pytest.mark.mooncake]

SLAB = 64 * 1024
FP = "0123456789abcdef"
MooncakeMaster = Any  # the mooncake_master fixture (tests/integration/conftest.py)


def key(i: int) -> ChunkKey:
    return ChunkKey(i.to_bytes(16, "little"))


def payload(i: int, n: int = SLAB) -> bytes:
    return np.random.default_rng(i).integers(0, 256, n, dtype=np.uint8).tobytes()


def make(master: MooncakeMaster, slabs: int = 8, **mcfg: Any) -> ChunkStore:
    m = {"master": master.master, "metadata_server": master.metadata_server, "write": "all",
         "global_segment_size": 32 << 20, "local_buffer_size": 16 << 20, "retry_after_s": 0.2, "batch_size": 4,
         **mcfg}
    cfg = StoreConfig(chunk_tokens=16, l1=L1Config(capacity=slabs * SLAB), tiers=(MooncakeConfig(**m),))
    return ChunkStore(cfg, SLAB, FP)


def pinned_bytes(store: ChunkStore, pins: list[Any]) -> list[bytes]:
    out = []
    for p in pins:
        with store.view(p) as v:
            out.append(bytes(v))
    return out


def test_round_trip_between_two_agents_sharing_one_master(mooncake_master: MooncakeMaster) -> None:
    a = make(mooncake_master)
    b = make(mooncake_master)
    try:
        for i in range(6):
            a.put(key(i), payload(i), num_tokens=16)
        assert a.flush(10)
        assert a.metrics.value("pdx_store_bytes_in_total", {"tier": "mooncake"}) == 6 * SLAB
        keys = [key(i) for i in range(7)]
        assert b.lookup(keys).prefix_chunks == 0  # local tiers only
        r = b.lookup(keys, remote=True)
        assert r.prefix_chunks == 6 and r.tiers[:6] == (Tier.MOONCAKE,) * 6 and r.tiers[6] is None
        pins = b.get(keys, owner="req")
        assert [p is not None for p in pins] == [True] * 6 + [False]
        assert pinned_bytes(b, pins[:6]) == [payload(i) for i in range(6)]
        assert b.metrics.value("pdx_store_hit_tokens_total", {"tier": "mooncake", "op": "get"}) == 6 * 16
        b.release_owner("req")
        # b promoted them into its L1: a second get is served there, not from the shared tier
        assert b.lookup(keys[:6]).l1_prefix_chunks == 6
    finally:
        a.close()
        b.close()


def test_evicted_chunks_go_through_the_copying_put(mooncake_master: MooncakeMaster) -> None:
    # write: evicted hands the tier a copy (not a pinned slab): put_batch, not the zero-copy path
    a = make(mooncake_master, slabs=2, write="evicted")
    b = make(mooncake_master)
    try:
        for i in range(4):
            a.put(key(i), payload(i), num_tokens=16)
        assert a.flush(10)
        assert a.metrics.value("pdx_store_bytes_in_total", {"tier": "mooncake"}) == 2 * SLAB  # 0 and 1 left L1
        pins = b.get([key(0), key(1)], owner="req")
        assert pinned_bytes(b, pins) == [payload(0), payload(1)]
    finally:
        a.close()
        b.close()


def test_master_killed_mid_run_then_back(mooncake_master: MooncakeMaster, caplog: pytest.LogCaptureFixture) -> None:
    s = make(mooncake_master)
    other = make(mooncake_master)
    try:
        s.put(key(1), payload(1))
        assert s.flush(10)
        mooncake_master.stop(kill=True)
        with caplog.at_level(logging.WARNING, logger="pdx.store.remote"):
            r = other.lookup([key(1)], remote=True)
            assert r.prefix_chunks == 0  # a miss, not an exception
            assert other.get([key(1)]) == [None]
        assert any("serving misses" in rec.getMessage() for rec in caplog.records)
        assert other.stats().chunks == 0
        assert other.tier(Tier.MOONCAKE) is not None and other.tier(Tier.MOONCAKE).reachable is False  # type: ignore[union-attr]
        assert other.metrics.value("pdx_store_tier_errors_total", {"tier": "mooncake"}) >= 1
        mooncake_master.start()
        # A restarted master starts empty; the clients mount their segments again (on their next
        # ping of the master) and new chunks are shared once more. Poll that state, bounded.
        deadline = time.monotonic() + 60
        while other.lookup([key(2)], remote=True).prefix_chunks == 0:
            assert time.monotonic() < deadline, "the tier did not recover after the master came back"
            s.discard(key(2))
            s.put(key(2), payload(2))
            assert s.flush(10)
            time.sleep(0.2)  # the tier's back-off (retry_after_s); not a synchronisation
        pins = other.get([key(2)])
        assert pins[0] is not None and pinned_bytes(other, pins) == [payload(2)]
        assert other.tier(Tier.MOONCAKE).reachable is True  # type: ignore[union-attr]
    finally:
        s.close()
        other.close()


def test_eviction_by_the_master_is_a_miss(mooncake_master: MooncakeMaster) -> None:
    # One client contributes 16 MiB; 600 KiB chunks: the master must evict to take 60 of them.
    big = 600 * 1024
    s = make(mooncake_master, slabs=2, global_segment_size=16 << 20, local_buffer_size=16 << 20)
    cfg = StoreConfig(chunk_tokens=16, l1=L1Config(capacity=2 * big), tiers=s.config.tiers)
    s.close()
    s = ChunkStore(cfg, big, FP)
    try:
        for i in range(60):
            s.put(key(i), payload(i, big))
            s.flush(10)
        keys = [key(i) for i in range(60)]
        r = s.lookup(keys, remote=True)
        present = [t is not None for t in r.tiers]
        assert not all(present), "nothing was evicted"
        assert any(present[-10:]), "recent chunks should still be there"
        first_gone = present.index(False)
        pins = s.get(keys[first_gone : first_gone + 1])
        assert pins == [None]  # a miss, not an error
        assert s.metrics.value("pdx_store_integrity_failures_total", {"tier": "mooncake"}) == 0
    finally:
        s.close()


def test_corrupt_value_is_caught_by_the_checksum(mooncake_master: MooncakeMaster) -> None:
    s = make(mooncake_master)
    try:
        tier = s.tier(Tier.MOONCAKE)
        assert tier is not None
        good = payload(3)
        header = pack_header(ChunkMeta(len(good), checksum(good), 16))
        value = bytearray(header + good)
        value[-1] ^= 0xFF
        client = tier._client  # type: ignore[attr-defined]
        assert client.put(tier.name_of(key(3)), bytes(value)) == 0  # type: ignore[attr-defined]
        assert s.get([key(3)]) == [None]
        assert s.metrics.value("pdx_store_integrity_failures_total", {"tier": "mooncake"}) == 1
        # removal is best effort (the master refuses it while a read lease holds the object): a
        # later get is a miss again, never the bad bytes
        assert s.get([key(3)]) == [None]
    finally:
        s.close()


def test_agent_starts_while_the_master_is_down_and_joins_when_it_comes_up(
        mooncake_master: MooncakeMaster, caplog: pytest.LogCaptureFixture) -> None:
    mooncake_master.stop()
    with caplog.at_level(logging.WARNING, logger="pdx.store"):
        s = make(mooncake_master, timeout_s=1.0)  # no error: the tier starts unjoined
    try:
        tier = s.tier(Tier.MOONCAKE)
        assert tier is not None and tier.reachable is False and tier.joined is False  # type: ignore[attr-defined]
        assert "is not joined" in caplog.text
        s.put(key(1), payload(1))
        assert s.flush(10)
        assert s.metrics.value("pdx_store_write_drops_total", {"tier": "mooncake"}) == 1  # a miss, dropped
        assert tier.exists([key(1)]) == [False]
        mooncake_master.start()
        deadline = time.monotonic() + 60
        while not tier.reachable:  # the joiner tries every retry_after_s (0.2 s here)
            assert time.monotonic() < deadline, "the tier did not join once the master was up"
            time.sleep(0.05)
        assert tier.joined  # type: ignore[attr-defined]
        other = make(mooncake_master)
        try:
            s.put(key(2), payload(2))
            assert s.flush(10)
            pins = other.get([key(2)])
            assert pins[0] is not None and pinned_bytes(other, pins) == [payload(2)]
        finally:
            other.close()
    finally:
        s.close()


def test_a_dead_master_does_not_hide_redis_hits(mooncake_master: MooncakeMaster, redis_server: Any) -> None:
    tiers = (MooncakeConfig(master=mooncake_master.master, metadata_server=mooncake_master.metadata_server,
                            write="all", global_segment_size=32 << 20, local_buffer_size=16 << 20,
                            retry_after_s=0.5, lookup_timeout_s=0.3),
             RedisConfig(enabled=True, url=redis_server.url, write="all", key_prefix="pdx-dead-master:"))
    cfg = StoreConfig(chunk_tokens=16, l1=L1Config(capacity=8 * SLAB), tiers=tiers)
    a, b = ChunkStore(cfg, SLAB, FP), ChunkStore(cfg, SLAB, FP)
    try:
        for i in range(4):
            a.put(key(i), payload(i), num_tokens=16)
        assert a.flush(10)
        keys = [key(i) for i in range(4)]
        assert b.lookup(keys, remote=True).tiers == (Tier.MOONCAKE,) * 4
        mooncake_master.stop(kill=True)
        # over several back-off periods (each retry of the master may wait seconds in the client),
        # every lookup still finds the chunks in Redis, within the connector's lookup budget (1 s)
        end = time.monotonic() + 3.0
        rounds = 0
        while time.monotonic() < end or rounds < 3:
            t0 = time.monotonic()
            r = b.lookup(keys, remote=True)
            assert r.prefix_chunks == 4 and r.tiers == (Tier.REDIS,) * 4, r.tiers
            assert time.monotonic() - t0 < 1.0
            rounds += 1
            time.sleep(0.1)  # spread the lookups over the back-off periods; not a synchronisation
        pins = b.get(keys, owner="req")
        assert pinned_bytes(b, pins) == [payload(i) for i in range(4)]
        assert b.metrics.value("pdx_store_hits_total", {"tier": "redis", "op": "get"}) == 4
    finally:
        a.close()
        b.close()
