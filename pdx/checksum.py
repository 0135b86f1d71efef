"""Chunk checksums: xxh3-64 over the payload bytes.

Checked whenever a chunk comes back from disk or Redis, and by a receiver that
asks for it after a transfer; a mismatch is a miss (and a counter), never data.
"""

from __future__ import annotations

import xxhash


def checksum(data: bytes | bytearray | memoryview) -> int:
    return xxhash.xxh3_64_intdigest(data)
