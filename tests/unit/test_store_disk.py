"""L2 disk tier: write-behind, restart recovery, corrupt files, its own capacity, failing disks."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import cast

import numpy as np
import pytest

from pdx.config import DiskConfig, L1Config, StoreConfig
from pdx.keys import ChunkKey
from pdx.store import ChunkStore, Tier
from pdx.store.disk import HEADER_SIZE, DiskTier
from pdx.store.tier import WriteItem

SLAB = 4096
FP = "0123456789abcdef"


def key(i: int) -> ChunkKey:
    return ChunkKey(i.to_bytes(16, "little"))


def payload(i: int, n: int = SLAB) -> bytes:
    return np.random.default_rng(i).integers(0, 256, n, dtype=np.uint8).tobytes()


def make(data_dir: Path, slabs: int = 4, fp: str = FP, **disk: object) -> ChunkStore:
    dcfg = {"enabled": True, "write": "all", **disk}
    cfg = StoreConfig(chunk_tokens=16, l1=L1Config(capacity=slabs * SLAB), disk=DiskConfig(**dcfg))  # type: ignore[arg-type]
    return ChunkStore(cfg, SLAB, fp, data_dir)


def disk_of(store: ChunkStore) -> DiskTier:
    return cast(DiskTier, store.disk)


def chunk_path(data_dir: Path, k: ChunkKey) -> Path:
    return data_dir / "disk-cache" / FP / (k.hex() + ".chunk")


def test_write_all_then_restart_recovers_index(tmp_path: Path) -> None:
    s = make(tmp_path)
    for i in range(3):
        s.put(key(i), payload(i), num_tokens=16)
    assert s.flush(10)
    files = sorted(p.name for p in (tmp_path / "disk-cache" / FP).rglob("*.chunk"))
    assert files == sorted(key(i).hex() + ".chunk" for i in range(3))
    assert s.metrics.value("pdx_store_bytes_in_total", {"tier": "disk"}) == 3 * SLAB
    s.close()

    s2 = make(tmp_path)
    try:
        r = s2.lookup([key(0), key(1), key(2), key(3)])
        assert r.tiers == (Tier.DISK, Tier.DISK, Tier.DISK, None) and r.prefix_chunks == 3
        pins = s2.get([key(0), key(1), key(2)], owner="req")
        for i, p in enumerate(pins):
            assert p is not None and p.num_tokens == 16
            assert bytes(s2.view(p)) == payload(i)
        assert s2.lookup([key(0)]).tiers == (Tier.L1,)
        m = s2.metrics
        assert m.value("pdx_store_hits_total", {"tier": "disk", "op": "get"}) == 3
        assert m.value("pdx_store_bytes_out_total", {"tier": "disk"}) == 3 * SLAB
        assert m.value("pdx_store_chunks", {"tier": "disk"}) == 3
    finally:
        s2.close()


def test_evicted_chunks_are_written_behind_and_come_back(tmp_path: Path) -> None:
    s = make(tmp_path, slabs=2, write="evicted")
    try:
        for i in range(5):
            s.put(key(i), payload(i))
        assert s.flush(10)
        r = s.lookup([key(i) for i in range(5)])
        assert r.tiers == (Tier.DISK, Tier.DISK, Tier.DISK, Tier.L1, Tier.L1)
        pins = s.get([key(0), key(1)])
        assert [bytes(s.view(p)) for p in pins if p] == [payload(0), payload(1)]
    finally:
        s.close()


def test_corrupt_payload_is_a_miss_and_is_deleted(tmp_path: Path) -> None:
    s = make(tmp_path)
    for i in range(2):
        s.put(key(i), payload(i))
    s.flush(10)
    s.close()
    path = chunk_path(tmp_path, key(0))
    raw = bytearray(path.read_bytes())
    raw[HEADER_SIZE + 100] ^= 0xFF  # one bit-flip in the payload: header still valid
    path.write_bytes(bytes(raw))

    s2 = make(tmp_path)
    try:
        assert s2.lookup([key(0), key(1)]).tiers == (Tier.DISK, Tier.DISK)  # header looked fine
        pins = s2.get([key(0), key(1)])
        assert pins == [None, None]  # chunk 0 corrupt: the run ends there
        assert s2.metrics.value("pdx_store_integrity_failures_total", {"tier": "disk"}) == 1
        assert not path.exists()
        assert s2.lookup([key(0), key(1)]).tiers[0] is None
        (p1,) = s2.get([key(1)])
        assert p1 is not None and bytes(s2.view(p1)) == payload(1)
        assert s2.stats().reserved_slabs == 0  # the slab reserved for chunk 0 went back
    finally:
        s2.close()


def test_restart_drops_truncated_and_bad_files_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = make(tmp_path)
    for i in range(4):
        s.put(key(i), payload(i))
    s.flush(10)
    d = disk_of(s)
    truncated, bad_header, fine = d.path_of(key(0)), d.path_of(key(1)), d.path_of(key(2))
    s.close()
    truncated.write_bytes(truncated.read_bytes()[: HEADER_SIZE + 10])
    raw = bytearray(bad_header.read_bytes())
    raw[40] ^= 1  # inside the header
    bad_header.write_bytes(bytes(raw))
    stale_tmp = fine.with_name("." + fine.name + ".7.tmp")
    stale_tmp.write_bytes(b"half a chunk")
    junk = fine.parent / "notes.txt"
    junk.write_text("not mine")

    with caplog.at_level(logging.WARNING, logger="pdx.store.disk"):
        s2 = make(tmp_path)
    try:
        text = caplog.text
        assert f"{truncated}: length" in text
        assert f"{bad_header}: header checksum mismatch" in text
        assert s2.lookup([key(i) for i in range(4)]).tiers == (None, None, Tier.DISK, Tier.DISK)
        assert not truncated.exists() and not bad_header.exists() and not stale_tmp.exists()
        assert junk.exists()  # not a chunk file: left alone
        assert s2.metrics.value("pdx_store_integrity_failures_total", {"tier": "disk"}) == 2
    finally:
        s2.close()


def test_disk_capacity_evicts_oldest_files(tmp_path: Path) -> None:
    s = make(tmp_path, slabs=8, capacity=3 * (SLAB + HEADER_SIZE))
    try:
        for i in range(5):
            s.put(key(i), payload(i))
            assert s.flush(10)
        d = disk_of(s)
        assert [d.has(key(i)) for i in range(5)] == [False, False, True, True, True]
        assert not d.path_of(key(0)).exists() and d.path_of(key(4)).exists()
        assert s.metrics.value("pdx_store_evictions_total", {"tier": "disk"}) == 2
        assert s.metrics.value("pdx_store_used_bytes", {"tier": "disk"}) == 3 * (SLAB + HEADER_SIZE)
    finally:
        s.close()


def test_capacity_lowered_between_runs(tmp_path: Path) -> None:
    s = make(tmp_path, slabs=8)
    for i in range(4):
        s.put(key(i), payload(i))
        s.flush(10)
    s.close()
    s2 = make(tmp_path, slabs=8, capacity=2 * (SLAB + HEADER_SIZE))
    try:
        assert disk_of(s2).chunk_count() == 2
    finally:
        s2.close()


def test_unwritable_folder_degrades_to_misses_with_one_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="pdx.store.disk"):
        s = make(tmp_path, path=str(blocker / "cache"))
        try:
            for i in range(4):
                s.put(key(i), payload(i))  # never raises
            assert s.flush(10)
            assert s.lookup([key(0)]).tiers == (Tier.L1,)
            assert s.discard(key(0))
            assert s.get([key(0)]) == [None]
            assert s.metrics.value("pdx_store_write_drops_total", {"tier": "disk"}) == 4
            assert s.metrics.value("pdx_store_tier_errors_total", {"tier": "disk"}) == 4
        finally:
            s.close()
    warnings = [r for r in caplog.records if "not written to disk" in r.getMessage()]
    assert len(warnings) == 1


def test_another_chunk_format_never_sees_these_files(tmp_path: Path) -> None:
    s = make(tmp_path)
    s.put(key(1), payload(1))
    s.flush(10)
    s.close()
    other = make(tmp_path, fp="fedcba9876543210")
    try:
        assert other.lookup([key(1)]).tiers == (None,)
    finally:
        other.close()
    again = make(tmp_path)
    try:
        assert again.lookup([key(1)]).tiers == (Tier.DISK,)
    finally:
        again.close()


def test_full_write_queue_drops_instead_of_blocking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = make(tmp_path, slabs=64, queue_depth=1)
    d = disk_of(s)
    gate = threading.Event()
    write = d.write_batch

    def stalled(items: list[WriteItem]) -> None:
        gate.wait(10)
        write(items)

    monkeypatch.setattr(d, "write_batch", stalled)
    try:
        for i in range(6):
            s.put(key(i), payload(i))  # returns at once although the writer is stuck
        drops = s.metrics.value("pdx_store_write_drops_total", {"tier": "disk"})
        assert drops >= 4
        gate.set()
        assert s.flush(10)
        written = sum(d.has(key(i)) for i in range(6))
        assert written + drops == 6
        assert s.stats().pinned_slabs == 0  # dropped and written chunks are all released
    finally:
        gate.set()
        s.close()


def test_files_are_atomic(tmp_path: Path) -> None:
    s = make(tmp_path)
    try:
        s.put(key(1), payload(1))
        s.flush(10)
        path = disk_of(s).path_of(key(1))
        assert os.path.getsize(path) == HEADER_SIZE + SLAB
        assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    finally:
        s.close()


def test_promotion_into_a_full_pool_gives_up_the_tail_of_the_prompt(tmp_path: Path) -> None:
    s = make(tmp_path, slabs=4, write="evicted")
    try:
        for i in range(6):
            s.put(key(i), payload(i))
        assert s.flush(10)
        keys = [key(i) for i in range(6)]
        assert s.lookup(keys).tiers == (Tier.DISK,) * 2 + (Tier.L1,) * 4
        # Chunks 0 and 1 need two slabs; all four hold chunks 2-5, which this
        # get pins. Without 0 and 1 they are useless, so the last ones give way.
        pins = s.get(keys, owner="r")
        assert [p is not None for p in pins] == [True] * 4 + [False] * 2
        for i, p in enumerate(pins[:4]):
            assert p is not None and bytes(s.view(p)) == payload(i)
        assert s.release_owner("r") == 4
    finally:
        s.close()
