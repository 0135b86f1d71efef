"""The chunk checksum: the GIL-free native path gives the reference's value for every size and buffer kind."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import xxhash

from pdx import checksum as cks


def test_the_native_path_is_used_and_agrees_with_the_reference() -> None:
    assert cks.native() is not None  # the xxhash wheel exports XXH3_64bits
    rng = np.random.default_rng(1)
    for n in (0, 1, 17, cks.NATIVE_MIN - 1, cks.NATIVE_MIN, cks.NATIVE_MIN + 1, 3 << 20):
        data = rng.bytes(n)
        want = xxhash.xxh3_64_intdigest(data)
        assert cks.checksum(data) == want
        assert cks.checksum(bytearray(data)) == want
        assert cks.checksum(memoryview(bytearray(data))) == want
        assert cks.reference(data) == want
    arr = rng.standard_normal((64, 1024)).astype(np.float32)  # a typed, multi-dimensional view
    assert cks.checksum(memoryview(arr)) == xxhash.xxh3_64_intdigest(arr.tobytes())
    shifted = np.frombuffer(rng.bytes(cks.NATIVE_MIN + 7), dtype=np.uint8)[3:]  # unaligned start
    assert cks.checksum(memoryview(shifted)) == xxhash.xxh3_64_intdigest(shifted.tobytes())


def test_a_strided_view_goes_to_the_reference_which_refuses_it() -> None:
    arr = np.zeros(4 * cks.NATIVE_MIN, dtype=np.uint8)
    with pytest.raises((BufferError, ValueError)):
        cks.checksum(memoryview(arr)[::2])


def test_concurrent_hashing_gives_the_reference_values() -> None:
    """Many threads hashing large buffers at once all get the reference's value."""
    bufs = [os.urandom(1 << 20) for _ in range(8)]
    want = [xxhash.xxh3_64_intdigest(b) for b in bufs]
    got: list[int] = [0] * len(bufs)

    def work(i: int) -> None:
        got[i] = cks.checksum(memoryview(bufs[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(bufs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got == want


def test_it_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDX_CHECKSUM_NATIVE", "0")
    assert cks._load_native() is None
