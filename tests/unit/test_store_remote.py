"""The remote tiers' shared parts: the value format's verified copy, and ServerHealth's back-off and probe."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pdx.checksum import checksum
from pdx.store.metrics import StoreMetrics
from pdx.store.remote import ServerDown, ServerHealth
from pdx.store.types import ChunkMeta
from pdx.store.value import CorruptValue, copy_verified, pack_value


def _value(payload: bytes, tokens: int = 16) -> bytes:
    return pack_value(ChunkMeta(len(payload), checksum(payload), tokens), payload)


def test_copy_verified_copies_a_good_value() -> None:
    payload = bytes(range(256)) * 1000
    dest = bytearray(len(payload) + 10)
    meta = copy_verified(_value(payload), lambda m: memoryview(dest))
    assert meta == ChunkMeta(len(payload), checksum(payload), 16)
    assert bytes(dest[: len(payload)]) == payload


@pytest.mark.parametrize(("damage", "message"), [
    (lambda v: v[:-1] + bytes([v[-1] ^ 1]), "checksum mismatch"),
    (lambda v: b"XXXX" + v[4:], "not a pdx chunk"),
    (lambda v: v[:-5], "header says"),
    (lambda v: v[:10], "shorter than the header"),
])
def test_copy_verified_refuses_a_damaged_value(damage: Callable[[bytes], bytes], message: str) -> None:
    payload = b"\x07" * 4096
    with pytest.raises(CorruptValue, match=message):
        copy_verified(damage(_value(payload)), lambda m: memoryview(bytearray(m.nbytes)))


def test_copy_verified_without_a_destination_is_none() -> None:
    assert copy_verified(_value(b"abc"), lambda m: None) is None


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_server_health_backs_off_and_asks_the_probe_before_a_retry() -> None:
    clock, metrics = _Clock(), StoreMetrics()
    healthy = {"probe": False}
    calls: list[str] = []
    health = ServerHealth("mooncake", "master m", metrics, clock, retry_after_s=2.0, timeout_s=5.0,
                          failures=(OSError,), workers=0, probe=lambda: healthy["probe"])

    def failing() -> int:
        calls.append("fail")
        raise ServerDown("code -900")

    def working() -> int:
        calls.append("ok")
        return 7

    assert health.call("reading", failing) == (False, None)
    assert not health.reachable
    assert health.call("reading", working) == (False, None)  # within the back-off: no call at all
    clock.now += 3.0
    assert health.call("reading", working) == (False, None)  # the probe says still down: no call
    assert calls == ["fail"]
    clock.now += 3.0
    healthy["probe"] = True
    assert health.call("reading", working) == (True, 7)
    assert health.reachable and calls == ["fail", "ok"]
    assert metrics.value("pdx_store_tier_errors_total", {"tier": "mooncake"}) == 1
    health.close()


def test_server_health_marks_a_slow_call_down() -> None:
    import threading

    clock, metrics = _Clock(), StoreMetrics()
    health = ServerHealth("s3", "bucket b", metrics, clock, retry_after_s=2.0, timeout_s=0.05,
                          failures=(OSError,), workers=1)
    gate = threading.Event()
    try:
        assert health.call("writing", lambda: gate.wait(5.0)) == (False, None)
        assert not health.reachable
    finally:
        gate.set()
        health.close()
