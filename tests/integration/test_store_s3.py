"""The S3 tier against a real S3-compatible server (moto's, over HTTP): round trip, server down, corruption."""

from __future__ import annotations

import logging
import time
from typing import Any

import boto3
import numpy as np
import pytest

from pdx.config import L1Config, S3Config, StoreConfig
from pdx.keys import ChunkKey
from pdx.store import ChunkStore, Tier

pytestmark = [pytest.mark.integration, pytest.mark.s3]

SLAB = 64 * 1024
FP = "0123456789abcdef"
BUCKET = "pdx-test"
S3Server = Any  # the s3_server fixture (tests/integration/conftest.py)


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # the usual AWS environment, as a deployment would set it (moto accepts any keys)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_REGION", "us-east-1")


def key(i: int) -> ChunkKey:
    return ChunkKey(i.to_bytes(16, "little"))


def payload(i: int, n: int = SLAB) -> bytes:
    return np.random.default_rng(i).integers(0, 256, n, dtype=np.uint8).tobytes()


def make(server: S3Server, **scfg: Any) -> ChunkStore:
    s = {"bucket": BUCKET, "endpoint_url": server.endpoint_url, "write": "all", "timeout_s": 2.0,
         "retry_after_s": 0.2, "batch_size": 4, **scfg}
    cfg = StoreConfig(chunk_tokens=16, l1=L1Config(capacity=8 * SLAB), tiers=(S3Config(**s),))
    return ChunkStore(cfg, SLAB, FP)


def raw_client(server: S3Server) -> Any:
    return boto3.client("s3", endpoint_url=server.endpoint_url, region_name="us-east-1")


def test_round_trip_through_the_bucket(s3_server: S3Server) -> None:
    a = make(s3_server)
    try:
        for i in range(5):
            a.put(key(i), payload(i), num_tokens=16)
        assert a.flush(20)
    finally:
        a.close()
    objects = raw_client(s3_server).list_objects_v2(Bucket=BUCKET, Prefix="pdx/")["Contents"]
    assert sorted(o["Key"] for o in objects) == sorted(f"pdx/{key(i).hex()}" for i in range(5))
    b = make(s3_server)
    try:
        keys = [key(i) for i in range(6)]
        assert b.lookup(keys).prefix_chunks == 0
        r = b.lookup(keys, remote=True)
        assert r.prefix_chunks == 5 and r.tiers[:5] == (Tier.S3,) * 5 and r.tiers[5] is None
        pins = b.get(keys)
        assert [p is not None for p in pins] == [True] * 5 + [False]
        for i, p in enumerate(pins[:5]):
            assert p is not None
            with b.view(p) as v:
                assert bytes(v) == payload(i)
        assert b.metrics.value("pdx_store_bytes_out_total", {"tier": "s3"}) == 5 * SLAB
    finally:
        b.close()


def test_server_down_is_a_miss_then_recovery(s3_server: S3Server, caplog: pytest.LogCaptureFixture) -> None:
    s = make(s3_server)
    try:
        s.put(key(1), payload(1))
        assert s.flush(20)
        s3_server.stop()
        s.discard(key(1))
        with caplog.at_level(logging.WARNING, logger="pdx.store.remote"):
            assert s.lookup([key(1)], remote=True).prefix_chunks == 0
            assert s.get([key(1)]) == [None]
        assert any("serving misses" in rec.getMessage() for rec in caplog.records)
        assert s.stats().chunks == 0
        s3_server.start()
        s3_server.create_bucket(BUCKET)  # moto keeps nothing across a restart
        s.put(key(2), payload(2))
        deadline = time.monotonic() + 30
        while s.lookup([key(2)], remote=True).prefix_chunks == 0 or not s.tier(Tier.S3).reachable:  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the tier did not recover after the server came back"
            s.discard(key(2))
            s.put(key(2), payload(2))
            assert s.flush(20)
            time.sleep(0.2)  # the tier's back-off (retry_after_s); not a synchronisation
        s.discard(key(2))
        pins = s.get([key(2)])
        assert pins[0] is not None
        with s.view(pins[0]) as v:
            assert bytes(v) == payload(2)
    finally:
        s.close()


def test_corrupted_object_is_caught_by_the_checksum(s3_server: S3Server) -> None:
    s = make(s3_server)
    try:
        s.put(key(3), payload(3))
        assert s.flush(20)
        s.discard(key(3))
        client = raw_client(s3_server)
        name = f"pdx/{key(3).hex()}"
        body = bytearray(client.get_object(Bucket=BUCKET, Key=name)["Body"].read())
        body[-1] ^= 0xFF
        client.put_object(Bucket=BUCKET, Key=name, Body=bytes(body))
        assert s.get([key(3)]) == [None]  # recomputed by the caller, never the bad bytes
        assert s.metrics.value("pdx_store_integrity_failures_total", {"tier": "s3"}) == 1
        assert "Contents" not in client.list_objects_v2(Bucket=BUCKET, Prefix=name)  # deleted
    finally:
        s.close()
