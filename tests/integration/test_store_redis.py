"""L3 Redis tier against a real redis-server: round trips, TTL, corrupt values, Redis gone and back."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from pdx.config import DiskConfig, L1Config, RedisConfig, StoreConfig
from pdx.keys import ChunkKey
from pdx.store import ChunkStore, Tier
from pdx.store.redis_tier import HEADER_SIZE

pytestmark = [pytest.mark.redis, pytest.mark.integration]

SLAB = 8192
FP = "0123456789abcdef"


RedisServer = Any  # the redis_server fixture (tests/integration/conftest.py)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class FakeClock:
    def __init__(self) -> None:
        self.t = 50.0

    def __call__(self) -> float:
        return self.t


def key(i: int) -> ChunkKey:
    return ChunkKey(i.to_bytes(16, "little"))


def payload(i: int, n: int = SLAB) -> bytes:
    return np.random.default_rng(i).integers(0, 256, n, dtype=np.uint8).tobytes()


def make(url: str, slabs: int = 8, clock: Any = None, tmp: Path | None = None, **rcfg: Any) -> ChunkStore:
    r = {"enabled": True, "url": url, "write": "all", "socket_timeout_s": 0.5, **rcfg}
    disk = DiskConfig(enabled=tmp is not None, write="evicted")
    cfg = StoreConfig(chunk_tokens=16, l1=L1Config(capacity=slabs * SLAB), redis=RedisConfig(**r), disk=disk)
    kwargs = {"clock": clock} if clock is not None else {}
    return ChunkStore(cfg, SLAB, FP, tmp, **kwargs)


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def test_put_all_then_another_store_gets_from_redis(redis_server: RedisServer, raw: redis.Redis) -> None:
    a = make(redis_server.url, batch_size=3)
    try:
        for i in range(5):
            a.put(key(i), payload(i), num_tokens=16)
        assert a.flush(10)
        assert a.metrics.value("pdx_store_bytes_in_total", {"tier": "redis"}) == 5 * SLAB
    finally:
        a.close()
    assert raw.exists(b"pdx:" + key(0).hex().encode())
    b = make(redis_server.url)
    try:
        keys = [key(i) for i in range(6)]
        assert b.lookup(keys).prefix_chunks == 0  # local tiers only
        r = b.lookup(keys, remote=True)
        assert r.tiers == (Tier.REDIS,) * 5 + (None,) and r.prefix_chunks == 5
        pins = b.get(keys, owner="req")
        assert [p is not None for p in pins] == [True] * 5 + [False]
        for i, p in enumerate(pins[:5]):
            assert p is not None and bytes(b.view(p)) == payload(i) and p.num_tokens == 16
        assert b.lookup(keys[:5]).tiers == (Tier.L1,) * 5
        m = b.metrics
        assert m.value("pdx_store_hits_total", {"tier": "redis", "op": "get"}) == 5
        assert m.value("pdx_store_misses_total", {"tier": "redis", "op": "get"}) == 1
        assert m.value("pdx_store_bytes_out_total", {"tier": "redis"}) == 5 * SLAB
        b.release_owner("req")
        b.flush(10)
        # chunks that came from Redis are not written back to it
        assert m.value("pdx_store_bytes_in_total", {"tier": "redis"}) == 0
    finally:
        b.close()


def test_ttl_and_prefix(redis_server: RedisServer, raw: redis.Redis) -> None:
    s = make(redis_server.url, ttl_s=100, key_prefix="tenant7:")
    try:
        s.put(key(1), payload(1))
        s.flush(10)
        ttl = raw.ttl(b"tenant7:" + key(1).hex().encode())
        assert 0 < ttl <= 100
    finally:
        s.close()


def test_corrupted_value_is_a_miss_and_is_deleted(redis_server: RedisServer, raw: redis.Redis) -> None:
    s = make(redis_server.url)
    try:
        for i in range(2):
            s.put(key(i), payload(i))
        s.flush(10)
        for i in range(2):
            assert s.discard(key(i))
        name0 = b"pdx:" + key(0).hex().encode()
        value = bytearray(raw.get(name0))  # type: ignore[arg-type]
        value[HEADER_SIZE + 123] ^= 0x10
        raw.set(name0, bytes(value))
        name1 = b"pdx:" + key(1).hex().encode()
        raw.set(name1, b"garbage that is not a chunk at all, but long enough....")
        assert s.get([key(0)]) == [None]
        assert s.get([key(1)]) == [None]
        assert s.metrics.value("pdx_store_integrity_failures_total", {"tier": "redis"}) == 2
        assert raw.exists(name0, name1) == 0
        assert s.stats().reserved_slabs == 0 and s.stats().chunks == 0
    finally:
        s.close()


def test_redis_stopped_mid_run_gives_misses_then_recovers(
        redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    s = make(redis_server.url, clock=clock, retry_after_s=5.0)
    try:
        s.put(key(0), payload(0))
        assert s.flush(10)
        s.discard(key(0))
        assert s.get([key(0)], owner="r")[0] is not None  # served by Redis
        s.release_owner("r")

        redis_server.stop()
        assert s.discard(key(0))
        with caplog.at_level(logging.WARNING, logger="pdx.store.redis_tier"):
            assert s.get([key(0)]) == [None]  # no exception: a miss
            assert s.lookup([key(0)], remote=True).tiers == (None,)
            s.put(key(1), payload(1))  # write-behind dropped, no exception
            assert s.flush(10)
            clock.t += 5.0  # retry window passed: tries again, fails again
            assert s.get([key(0)]) == [None]
        m = s.metrics
        errors = m.value("pdx_store_tier_errors_total", {"tier": "redis"})
        assert errors == 2  # the first failure and the retry; calls in between cost nothing
        assert m.value("pdx_store_write_drops_total", {"tier": "redis"}) == 1
        assert len([r for r in caplog.records if "serving misses" in r.getMessage()]) == 1
        assert s.stats().redis_reachable is False

        redis_server.start()  # back, empty (no persistence)
        clock.t += 5.0
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pdx.store.redis_tier"):
            s.put(key(2), payload(2))
            assert s.flush(10)
        assert any("reachable again" in r.getMessage() for r in caplog.records)
        assert s.stats().redis_reachable is True
        s.discard(key(2))
        (p,) = s.get([key(2)])
        assert p is not None and bytes(s.view(p)) == payload(2)
    finally:
        s.close()


def test_unreachable_at_start_is_not_an_error(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pdx.store.redis_tier"):
        s = make(f"redis://127.0.0.1:{free_port()}/0")
    try:
        s.put(key(1), payload(1))  # the write-behind is dropped: no exception
        assert s.flush(10)
        assert s.discard(key(1))
        assert s.get([key(1)]) == [None]
        assert "serving misses" in caplog.text
    finally:
        s.close()


def test_evicted_chunks_go_to_disk_and_redis(redis_server: RedisServer, tmp_path: Path) -> None:
    s = make(redis_server.url, slabs=2, tmp=tmp_path, write="evicted")
    try:
        for i in range(4):
            s.put(key(i), payload(i))
        assert s.flush(10)
        assert s.lookup([key(i) for i in range(4)]).tiers == (Tier.DISK, Tier.DISK, Tier.L1, Tier.L1)
    finally:
        s.close()
    # a fresh host without the disk cache finds them in Redis
    other = make(redis_server.url, slabs=4)
    try:
        r = other.lookup([key(0), key(1)], remote=True)
        assert r.tiers == (Tier.REDIS, Tier.REDIS)
        pins = other.get([key(0), key(1)])
        assert [bytes(other.view(p)) for p in pins if p] == [payload(0), payload(1)]
    finally:
        other.close()


def test_get_stops_reading_after_a_missing_chunk(redis_server: RedisServer, raw: redis.Redis) -> None:
    a = make(redis_server.url, slabs=40)
    try:
        for i in range(40):
            a.put(key(i), payload(i, 1024))
        assert a.flush(10)
    finally:
        a.close()
    raw.delete(b"pdx:" + key(5).hex().encode())
    b = make(redis_server.url, slabs=40, batch_size=4)
    try:
        pins = b.get([key(i) for i in range(40)])
        assert [p is not None for p in pins] == [True] * 5 + [False] * 35
        # batches of 4: [0-3] all found, [4-7] missing 5 -> nothing after that batch is read
        assert b.metrics.value("pdx_store_hits_total", {"tier": "redis", "op": "get"}) == 7
        assert b.metrics.value("pdx_store_bytes_out_total", {"tier": "redis"}) == 7 * 1024
        assert b.stats().pinned_slabs == 5
    finally:
        b.close()


def test_server_refusing_writes_drops_them_and_stays_usable(
        redis_server: RedisServer, raw: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    s = make(redis_server.url, slabs=16, batch_size=4)
    try:
        s.put(key(0), payload(0))
        assert s.flush(10)
        used = int(raw.info("memory")["used_memory"])
        raw.config_set("maxmemory", used + 2 * SLAB)
        raw.config_set("maxmemory-policy", "noeviction")
        with caplog.at_level(logging.WARNING, logger="pdx.store.redis_tier"):
            for i in range(1, 9):
                s.put(key(i), payload(i))
            assert s.flush(10)
        assert len([r for r in caplog.records if "refused" in r.getMessage()]) == 1
        m = s.metrics
        refused = m.value("pdx_store_write_drops_total", {"tier": "redis"})
        assert refused >= 6  # OOM answers, one per SET, without breaking the batch
        assert m.value("pdx_store_tier_errors_total", {"tier": "redis"}) == refused
        assert s.stats().redis_reachable is True
        assert s.discard(key(0))
        (p,) = s.get([key(0)])  # the connection still works for reads
        assert p is not None and bytes(s.view(p)) == payload(0)
    finally:
        s.close()
