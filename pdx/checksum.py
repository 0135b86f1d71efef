"""Chunk checksums: xxh3-64 (seed 0) over the payload bytes.

Checked whenever a chunk comes back from disk or Redis, and by a receiver that
asks for it after a transfer; a mismatch is a miss (and a counter), never data.

Two paths, one value. ``xxhash.xxh3_64_intdigest`` is the reference; it holds the
GIL while it hashes, so a thread verifying received chunks stalls every other
Python thread of the process (the one driving the transfer included) for
~60 µs per MiB. Buffers of ``NATIVE_MIN`` bytes or more therefore go to the same
C function, ``XXH3_64bits``, called through ``ctypes`` (which releases the GIL
for the call) from the ``xxhash`` package's own extension: no build step, no
other dependency. The native path is used only when that symbol is exported
and gives the reference's value on a self-test at first use; otherwise (or with
``PDX_CHECKSUM_NATIVE=0``) every call takes the reference path.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable

import numpy as np
import xxhash

log = logging.getLogger(__name__)

#: smallest buffer hashed with the GIL released (below it the call overhead dominates).
NATIVE_MIN = 64 * 1024

_Native = Callable[[int, int], int]
_native: list[_Native | None] = []  # [] until first use, then [function or None]


def reference(data: bytes | bytearray | memoryview) -> int:
    """The reference xxh3-64 of ``data`` (holds the GIL while hashing)."""
    return xxhash.xxh3_64_intdigest(data)


def _load_native() -> _Native | None:
    if os.environ.get("PDX_CHECKSUM_NATIVE", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(xxhash._xxhash.__file__)  # type: ignore[attr-defined]
        fn = lib.XXH3_64bits
    except (AttributeError, OSError) as exc:
        log.info("checksums hold the GIL: xxhash's XXH3_64bits is not reachable (%s)", exc)
        return None
    fn.restype = ctypes.c_uint64
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    probe = np.frombuffer(np.random.default_rng(15).bytes(NATIVE_MIN + 13), dtype=np.uint8)
    base = int(probe.ctypes.data)
    for off, n in ((0, 0), (1, 7), (3, 240), (5, NATIVE_MIN)):
        if int(fn(base + off, n)) != reference(probe[off:off + n].tobytes()):
            log.warning("checksums hold the GIL: xxhash's XXH3_64bits disagrees with xxh3_64_intdigest")
            return None
    return fn  # type: ignore[no-any-return]


def native() -> _Native | None:
    """The GIL-free ``XXH3_64bits(address, length)``, or None when it is not usable."""
    if not _native:
        _native.append(_load_native())
    return _native[0]


def checksum(data: bytes | bytearray | memoryview) -> int:
    """xxh3-64 of ``data``: the native path (GIL released) for large buffers, else the reference."""
    n = data.nbytes if isinstance(data, memoryview) else len(data)
    if n >= NATIVE_MIN:
        fn = native()
        if fn is not None:
            try:
                arr = np.frombuffer(data, dtype=np.uint8)  # holds the buffer while we hash it
            except (ValueError, TypeError, BufferError):  # not one contiguous buffer: the reference decides
                return reference(data)
            try:
                return int(fn(int(arr.ctypes.data), n))
            finally:
                del arr
    return reference(data)
