"""``store.tiers``: the type-tagged, ordered list of lower tiers, and the old sections' fate."""

from __future__ import annotations

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
from pdx.store import ChunkStore, Tier

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
