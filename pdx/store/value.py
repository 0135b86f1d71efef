"""The value format of the remote tiers (Redis, Mooncake, S3): a 32-byte header, then the payload.

::

    magic "PDXR" | version u16 | header size u16 | num_tokens u32 | reserved u32
    | checksum u64 (xxh3-64 of the payload) | length u64 | payload

``unpack_value`` checks the header; ``copy_verified`` also checks the payload's checksum and copies
it where the caller says: every remote tier's read path.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from pdx.store.pool import copy_and_hash
from pdx.store.types import ChunkMeta

__all__ = ["HEADER_SIZE", "MAGIC", "VERSION", "CorruptValue", "copy_verified", "pack_header", "pack_value",
           "unpack_value"]

MAGIC = b"PDXR"
VERSION = 1
_HEADER = struct.Struct("<4sHHIIQQ")
HEADER_SIZE = _HEADER.size
assert HEADER_SIZE == 32

def pack_header(meta: ChunkMeta) -> bytes:
    return _HEADER.pack(MAGIC, VERSION, HEADER_SIZE, meta.num_tokens, 0, meta.checksum, meta.nbytes)


def pack_value(meta: ChunkMeta, payload: bytes | memoryview) -> bytes:
    """Header and payload as one value (a copy; the tier itself sends them without joining)."""
    return b"".join((pack_header(meta), payload))


def unpack_value(value: bytes) -> tuple[ChunkMeta, memoryview]:
    """``(meta, payload view)``; ``ValueError`` saying what is wrong. Checksum not yet checked."""
    if len(value) < HEADER_SIZE:
        raise ValueError(f"value of {len(value)} bytes is shorter than the header")
    magic, version, hsize, num_tokens, _r, csum, length = _HEADER.unpack_from(value, 0)
    if magic != MAGIC:
        raise ValueError(f"not a pdx chunk (magic {magic!r})")
    if version != VERSION or hsize != HEADER_SIZE:
        raise ValueError(f"chunk value version {version} (header {hsize}), expected {VERSION}")
    if len(value) != HEADER_SIZE + length:
        raise ValueError(f"value holds {len(value) - HEADER_SIZE} payload bytes, header says {length}")
    return ChunkMeta(nbytes=length, checksum=csum, num_tokens=num_tokens), memoryview(value)[HEADER_SIZE:]


class CorruptValue(ValueError):
    """A remote value whose header or payload checksum is wrong (the message says which)."""


def copy_verified(value: bytes, dest_of: Callable[[ChunkMeta], Any]) -> ChunkMeta | None:
    """Check ``value``'s header, copy its payload into ``dest_of(meta)`` and check the copy's checksum.

    The payload is hashed while it is copied (one pass, ``copy_and_hash``). Returns the chunk's
    meta, or None when ``dest_of`` gave no destination. Raises ``CorruptValue``; the destination
    then holds bytes that must not be used (the store gives that slab back).
    """
    try:
        meta, payload = unpack_value(value)
    except ValueError as exc:
        raise CorruptValue(str(exc)) from exc
    with payload:
        dest = dest_of(meta)
        if dest is None:
            return None
        with memoryview(dest).cast("B")[: meta.nbytes] as target:
            if copy_and_hash(target, payload) != meta.checksum:
                raise CorruptValue("payload checksum mismatch")
    return meta
