"""The NIXL storage tier: chunk files moved by NIXL's POSIX plugin (GDS and GDS_MT on CUDA hosts)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from pdx.checksum import checksum
from pdx.config import L1Config, NixlStorageConfig, StoreConfig
from pdx.errors import BackendUnavailable
from pdx.keys import ChunkKey
from pdx.store import ChunkStore, Tier
from pdx.store.metrics import StoreMetrics
from pdx.store.nixl_tier import NixlStorageTier
from pdx.store.tier import WriteItem
from pdx.store.types import ChunkMeta

pytestmark = [pytest.mark.integration]

SLAB = 64 * 1024
FP = "0123456789abcdef"


def key(i: int) -> ChunkKey:
    return ChunkKey(i.to_bytes(16, "little"))


def payload(i: int) -> bytes:
    return np.random.default_rng(i).integers(0, 256, SLAB, dtype=np.uint8).tobytes()


def make(path: Path, plugin: str = "POSIX", slabs: int = 4) -> ChunkStore:
    tier = NixlStorageConfig(path=str(path), plugin=plugin, write="all")  # type: ignore[arg-type]
    return ChunkStore(StoreConfig(chunk_tokens=16, l1=L1Config(capacity=slabs * SLAB), tiers=(tier,)), SLAB, FP)


def cuda_available() -> bool:
    return shutil.which("nvidia-smi") is not None and Path("/dev/nvidiactl").exists()


def test_posix_round_trip_survives_a_restart(tmp_path: Path) -> None:
    pytest.importorskip("nixl_cu12", reason="NIXL is not installed: pip install 'pdx[nixl]'")
    with make(tmp_path) as s:
        for i in range(3):
            s.put(key(i), payload(i), num_tokens=16)
        assert s.flush(20)
        assert s.metrics.value("pdx_store_bytes_in_total", {"tier": "nixl"}) == 3 * SLAB
    files = sorted(p.name for p in (tmp_path / FP).glob("*.chunk"))
    assert files == sorted(key(i).hex() + ".chunk" for i in range(3))
    with make(tmp_path) as s:  # a new agent: index rebuilt from the files
        r = s.lookup([key(0), key(1), key(2), key(3)])  # a local tier: no remote=True needed
        assert r.tiers == (Tier.NIXL, Tier.NIXL, Tier.NIXL, None)
        pins = s.get([key(i) for i in range(3)])
        for i, p in enumerate(pins):
            assert p is not None
            with s.view(p) as v:
                assert bytes(v) == payload(i)


def test_posix_corrupt_file_is_a_miss(tmp_path: Path) -> None:
    pytest.importorskip("nixl_cu12", reason="NIXL is not installed: pip install 'pdx[nixl]'")
    with make(tmp_path) as s:
        s.put(key(7), payload(7))
        assert s.flush(20)
    path = tmp_path / FP / (key(7).hex() + ".chunk")
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with make(tmp_path) as s:
        assert s.get([key(7)]) == [None]
        assert s.metrics.value("pdx_store_integrity_failures_total", {"tier": "nixl"}) == 1
        assert not path.exists()


@pytest.mark.parametrize("plugin", ["GDS", "GDS_MT"])
def test_gds_plugins_need_cuda(tmp_path: Path, plugin: str) -> None:
    pytest.importorskip("nixl_cu12", reason="NIXL is not installed: pip install 'pdx[nixl]'")
    if not cuda_available():
        pytest.skip(f"NIXL's {plugin} plugin needs CUDA and GPUDirect Storage: no NVIDIA driver/GPU here "
                    "(run by bench/gpu_check.sh on GPU hosts)")
    try:
        store = make(tmp_path, plugin)
    except BackendUnavailable as exc:
        pytest.skip(f"{plugin} does not start on this GPU host: {exc}")
    with store as s:
        s.put(key(1), payload(1))
        assert s.flush(20)
        s.discard(key(1))
        pins = s.get([key(1)])
        assert pins[0] is not None
        with s.view(pins[0]) as v:
            assert bytes(v) == payload(1)


def _tier(tmp_path: Path) -> NixlStorageTier:
    cfg = NixlStorageConfig(path=str(tmp_path), plugin="POSIX", write="all")  # type: ignore[arg-type]
    return NixlStorageTier(cfg, chunk_fingerprint=FP, data_dir=None, metrics=StoreMetrics())


def _items(n: int) -> list[WriteItem]:
    return [WriteItem(key(i), payload(i), ChunkMeta(num_tokens=16, nbytes=SLAB, checksum=checksum(payload(i))))
            for i in range(n)]


def test_posix_batch_is_one_transfer_and_reads_back(tmp_path: Path) -> None:
    pytest.importorskip("nixl_cu12", reason="NIXL is not installed: pip install 'pdx[nixl]'")
    tier = _tier(tmp_path)
    calls: list[int] = []
    move = tier._move
    tier._move = lambda op, moves: (calls.append(len(moves)), move(op, moves))[1]  # type: ignore[method-assign]
    try:
        tier.write_batch(_items(6))
        assert calls == [6]  # every payload of the batch in one NIXL transfer
        for i in range(6):
            assert (tmp_path / FP / (key(i).hex() + ".chunk")).read_bytes()[-SLAB:] == payload(i)
        assert not list((tmp_path / FP).glob("*.tmp"))
    finally:
        tier.close()


def test_posix_failed_batch_drops_every_chunk_and_leaves_no_file(tmp_path: Path) -> None:
    pytest.importorskip("nixl_cu12", reason="NIXL is not installed: pip install 'pdx[nixl]'")
    tier = _tier(tmp_path)

    def broken(op: str, moves: list[object]) -> None:
        raise OSError(5, "injected I/O error")

    tier._move = broken  # type: ignore[method-assign,assignment]
    try:
        tier.write_batch(_items(4))
        assert not list((tmp_path / FP).glob("*"))
        assert tier.metrics.value("pdx_store_write_drops_total", {"tier": "nixl"}) == 4
    finally:
        tier.close()
