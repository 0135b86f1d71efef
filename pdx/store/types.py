"""Value types the store hands out: reservations, pins, lookups, chunk metadata.

All are frozen dataclasses: a caller may keep them, share them between threads
and send their fields over the control plane (they hold only ints, bytes and
strings). Offsets are byte offsets into the shared-memory pool (see
``pdx.store.pool``), valid in every process that attached it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import NewType

from pdx.keys import ChunkKey

ReservationId = NewType("ReservationId", int)
LeaseId = NewType("LeaseId", int)


class Tier(str, Enum):
    """Where a chunk lives. Ordered from fastest to slowest."""

    L1 = "l1"
    DISK = "disk"
    REDIS = "redis"
    MOONCAKE = "mooncake"
    S3 = "s3"
    NIXL = "nixl"


@dataclass(frozen=True, slots=True)
class ChunkMeta:
    """What the store knows of a chunk besides its bytes."""

    nbytes: int
    checksum: int
    num_tokens: int


@dataclass(frozen=True, slots=True)
class Reservation:
    """A slab handed out for one chunk write; commit or abort it before ``expires_at``.

    The writer (often another process that attached the pool) writes ``nbytes``
    at ``offset``; nothing else touches the slab until commit, abort or expiry.
    ``expires_at`` is in the store's clock (``time.monotonic`` unless injected).
    """

    id: ReservationId
    key: ChunkKey
    slab: int
    offset: int
    nbytes: int
    expires_at: float


@dataclass(frozen=True, slots=True)
class Pin:
    """A committed chunk held in place by a lease until ``unpin`` or ``expires_at``.

    While the lease lives the slab is neither evicted nor reused, so the holder
    may read (or send) ``nbytes`` at ``offset``. The bytes must not be modified.
    """

    lease_id: LeaseId
    key: ChunkKey
    slab: int
    offset: int
    nbytes: int
    checksum: int
    num_tokens: int
    expires_at: float


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    """A committed L1 chunk, as ``commit`` returns it."""

    key: ChunkKey
    slab: int
    offset: int
    nbytes: int
    checksum: int
    num_tokens: int


@dataclass(frozen=True, slots=True)
class LookupResult:
    """Where each chunk of a prompt lives, and how long the leading run of present chunks is.

    ``tiers[i]`` is the fastest tier holding ``keys[i]`` (``None``: nowhere, or
    not asked: remote tiers are only consulted with ``remote=True``). ``prefix_chunks``
    counts the leading keys that are present somewhere; those tokens can be
    loaded instead of recomputed.
    """

    keys: tuple[ChunkKey, ...]
    tiers: tuple[Tier | None, ...]
    prefix_chunks: int
    chunk_tokens: int

    @property
    def prefix_tokens(self) -> int:
        return self.prefix_chunks * self.chunk_tokens

    @property
    def l1_prefix_chunks(self) -> int:
        """Leading chunks already in L1 (pinnable without any I/O)."""
        n = 0
        for t in self.tiers:
            if t is not Tier.L1:
                break
            n += 1
        return n


@dataclass(frozen=True, slots=True)
class StoreStats:
    """A snapshot for health endpoints."""

    slab_size: int
    slab_count: int
    free_slabs: int
    reserved_slabs: int
    pinned_slabs: int
    chunks: int
    used_bytes: int
    leases: int
    disk_chunks: int
    redis_reachable: bool | None
