"""A compact summary of the chunk keys an agent holds: a Bloom filter.

Agents put one in every announcement (see ``pdx.scheduler.messages``); the proxy's
``cache_aware`` policy asks it, chunk by chunk, how long a prefix of a prompt's keys
a worker holds. Why a Bloom filter rather than a list of keys:

* its size is fixed by the number of keys and the false-positive rate, not by the
  key length: ~1.2 bytes per key at 1 %, against 16 bytes for a raw key;
* it covers *every* key the agent holds, so no prefix is missed because a capped
  list had to drop it;
* a false positive only makes the proxy over-estimate a prefix (the worker then
  computes what it lacks): routing quality, never correctness.

Bit positions come straight from the key bytes (chunk keys are already xxh3-128
hashes, uniformly distributed): ``h1`` = bytes 0..7, ``h2`` = bytes 8..15 (made
odd), position ``i`` = ``(h1 + i*h2) mod num_bits`` (Kirsch-Mitzenmacher double
hashing). Any agent or proxy that follows this rule builds the same filter.

Immutable once built; safe to share between threads. Building costs ~1 µs per key.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pdx.errors import WireError

#: largest filter accepted from the wire (16 Mi bits: ~1.4 M keys at 1 %).
MAX_SUMMARY_BYTES = 2 * 1024 * 1024
#: most hash functions accepted from the wire.
MAX_HASHES = 16

_MASK64 = (1 << 64) - 1


def _positions(key: bytes, num_hashes: int, num_bits: int) -> Iterable[int]:
    if len(key) < 16:
        key = key.ljust(16, b"\0")
    h1 = int.from_bytes(key[:8], "little")
    h2 = int.from_bytes(key[8:16], "little") | 1
    for i in range(num_hashes):
        yield ((h1 + i * h2) & _MASK64) % num_bits


@dataclass(frozen=True)
class KeySummary:
    """Bloom filter over 16-byte chunk keys.

    ``bits`` is little-endian bit order (bit ``p`` is ``bits[p >> 3] >> (p & 7) & 1``);
    ``count`` is how many keys went in (used to size and to report, not to query).
    """

    bits: bytes
    num_hashes: int
    count: int

    @property
    def num_bits(self) -> int:
        return len(self.bits) * 8

    @staticmethod
    def sizing(count: int, fp_rate: float = 0.01) -> tuple[int, int]:
        """``(num_bytes, num_hashes)`` for ``count`` keys at ``fp_rate`` (clamped to the wire limits)."""
        if not 0 < fp_rate < 1:
            raise ValueError(f"fp_rate must be in (0, 1), got {fp_rate}")
        n = max(count, 1)
        num_bits = math.ceil(-n * math.log(fp_rate) / (math.log(2) ** 2))
        num_bytes = min(max(8, (num_bits + 63) // 64 * 8), MAX_SUMMARY_BYTES)
        num_hashes = max(1, min(MAX_HASHES, round(num_bytes * 8 / n * math.log(2))))
        return num_bytes, num_hashes

    @classmethod
    def build(cls, keys: Sequence[bytes], fp_rate: float = 0.01) -> KeySummary:
        """A filter holding ``keys`` (the agent calls this for each announcement)."""
        num_bytes, num_hashes = cls.sizing(len(keys), fp_rate)
        num_bits = num_bytes * 8
        if len(keys) < 64:
            buf = bytearray(num_bytes)
            for key in keys:
                for p in _positions(key, num_hashes, num_bits):
                    buf[p >> 3] |= 1 << (p & 7)
            return cls(bytes(buf), num_hashes, len(keys))
        # The same positions computed with numpy (uint64 arithmetic wraps as the & _MASK64 above):
        # an agent with a million keys, or the simulator's thousands of announcements, builds in
        # milliseconds instead of seconds.
        bits = np.zeros(num_bits, dtype=np.bool_)
        steps = np.arange(num_hashes, dtype=np.uint64)
        for start in range(0, len(keys), 1 << 16):
            part = keys[start:start + (1 << 16)]
            raw = b"".join(part)
            if len(raw) != 16 * len(part):  # not all keys are 16 bytes: cut or pad each
                raw = b"".join(bytes(k[:16]).ljust(16, b"\0") for k in part)
            words = np.frombuffer(raw, dtype="<u8").reshape(-1, 2)
            h1 = words[:, 0:1]
            h2 = words[:, 1:2] | np.uint64(1)
            bits[((h1 + steps * h2) % np.uint64(num_bits)).ravel()] = True
        return cls(np.packbits(bits, bitorder="little").tobytes(), num_hashes, len(keys))

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, (bytes, bytearray)) or not self.bits:
            return False
        bits = self.bits
        key = bytes(key)
        if len(key) < 16:
            key = key.ljust(16, b"\0")
        h1 = int.from_bytes(key[:8], "little")
        h2 = int.from_bytes(key[8:16], "little") | 1
        num_bits = len(bits) * 8
        for i in range(self.num_hashes):  # _positions, inlined: this runs per chunk per worker per request
            p = ((h1 + i * h2) & _MASK64) % num_bits
            if not bits[p >> 3] >> (p & 7) & 1:
                return False
        return True

    def prefix_len(self, keys: Sequence[bytes]) -> int:
        """How many of ``keys``, from the first, the filter holds (stops at the first miss)."""
        n = 0
        for key in keys:
            if key not in self:
                break
            n += 1
        return n

    def to_dict(self) -> dict[str, Any]:
        """JSON- and msgpack-safe: the bits as base64 text."""
        return {"bits": base64.b64encode(self.bits).decode("ascii"),
                "num_hashes": self.num_hashes, "count": self.count}

    @classmethod
    def from_dict(cls, raw: Any, where: str = "keys") -> KeySummary:
        """Inverse of ``to_dict``; raises ``WireError`` naming the bad field."""
        if not isinstance(raw, dict):
            raise WireError(f"{where}: expected a mapping, got {type(raw).__name__}")
        unknown = sorted(set(raw) - {"bits", "num_hashes", "count"})
        if unknown:
            raise WireError(f"{where}: unknown field {unknown[0]!r}")
        bits_raw = raw.get("bits")
        if isinstance(bits_raw, (bytes, bytearray)):  # msgpack may carry raw bytes
            bits = bytes(bits_raw)
        elif isinstance(bits_raw, str):
            if len(bits_raw) > (MAX_SUMMARY_BYTES * 4) // 3 + 4:
                raise WireError(f"{where}.bits: over {MAX_SUMMARY_BYTES} bytes")
            try:
                bits = base64.b64decode(bits_raw, validate=True)
            except ValueError:
                raise WireError(f"{where}.bits: not valid base64") from None
        else:
            raise WireError(f"{where}.bits: expected base64 text, got {type(bits_raw).__name__}")
        if len(bits) > MAX_SUMMARY_BYTES:
            raise WireError(f"{where}.bits: {len(bits)} bytes, over the limit of {MAX_SUMMARY_BYTES}")
        num_hashes = raw.get("num_hashes")
        if isinstance(num_hashes, bool) or not isinstance(num_hashes, int) \
                or not 1 <= num_hashes <= MAX_HASHES:
            raise WireError(f"{where}.num_hashes: expected an integer 1..{MAX_HASHES}, got {num_hashes!r}")
        count = raw.get("count", 0)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise WireError(f"{where}.count: expected a non-negative integer, got {count!r}")
        return cls(bits, num_hashes, count)
