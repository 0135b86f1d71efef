"""L1 bookkeeping: which slab holds which chunk, reservations, leases, free slabs.

``L1Index`` is pure metadata: it never touches chunk bytes and never blocks. It
is not thread-safe; ``ChunkStore`` calls it under its one lock and passes the
current time in, so expiry is testable with an injected clock.

Slab states::

    free --reserve--> reserved --commit--> committed (in the eviction policy)
      ^                  |  \\--abort / expiry--> free
      |                  \\--commit of a key already present--> free
      \\------evict (only when no lease pins it)-- committed

A reservation being committed (its checksum computed outside the lock) cannot
expire or be aborted. Expired reservations and leases are found through two
heaps ordered by deadline (stale heap entries are skipped, and the heaps are
rebuilt when mostly stale, so memory stays bounded).
"""

from __future__ import annotations

import heapq
import itertools
import math
from enum import Enum
from typing import cast

from pdx.errors import CapacityError, ReservationError
from pdx.keys import ChunkKey
from pdx.store.eviction import EvictionPolicy


class ReservationState(Enum):
    RESERVED = "reserved"
    COMMITTING = "committing"


class Entry:
    """A committed chunk in L1."""

    __slots__ = ("checksum", "key", "nbytes", "num_tokens", "pins", "slab")

    def __init__(self, key: ChunkKey, slab: int, nbytes: int, checksum: int, num_tokens: int) -> None:
        self.key = key
        self.slab = slab
        self.nbytes = nbytes
        self.checksum = checksum
        self.num_tokens = num_tokens
        self.pins = 0


class ReservationRecord:
    __slots__ = ("expires_at", "id", "key", "nbytes", "slab", "state")

    def __init__(self, rid: int, key: ChunkKey, slab: int, nbytes: int, expires_at: float) -> None:
        self.id = rid
        self.key = key
        self.slab = slab
        self.nbytes = nbytes
        self.expires_at = expires_at
        self.state = ReservationState.RESERVED


class Lease:
    __slots__ = ("entry", "expires_at", "id", "owner")

    def __init__(self, lid: int, entry: Entry, owner: str, expires_at: float) -> None:
        self.id = lid
        self.entry = entry
        self.owner = owner
        self.expires_at = expires_at


class L1Index:
    """Metadata of one slab pool. Every method is O(1) amortised except eviction scans."""

    def __init__(self, slab_count: int, policy: EvictionPolicy) -> None:
        self.slab_count = slab_count
        self.policy = policy
        self.entries: dict[ChunkKey, Entry] = {}
        self.reservations: dict[int, ReservationRecord] = {}
        self.leases: dict[int, Lease] = {}
        self.owners: dict[str, set[int]] = {}
        self.pinned_slabs = 0
        self.used_bytes = 0  # payload bytes of committed chunks
        self._free = list(range(slab_count - 1, -1, -1))  # pop() hands out slab 0 first
        self._ids = itertools.count(1)
        self._res_heap: list[tuple[float, int]] = []
        self._lease_heap: list[tuple[float, int]] = []

    # --- capacity ----------------------------------------------------------------------------

    @property
    def free_slabs(self) -> int:
        return len(self._free)

    def alloc(self) -> tuple[int, Entry | None]:
        """A slab for a new reservation, evicting if needed: ``(slab, evicted entry or None)``.

        Raises ``CapacityError`` when every slab is pinned or reserved.
        """
        if self._free:
            return self._free.pop(), None
        key = self.policy.evict(self._evictable)
        if key is None:
            raise CapacityError(
                f"L1 pool full: all {self.slab_count} slabs are pinned ({self.pinned_slabs} chunks "
                f"held by leases) or reserved ({len(self.reservations)} uncommitted writes); "
                "release pins (unpin / release_owner), let leases expire, or raise store.l1.capacity"
            )
        entry = self.entries.pop(cast(ChunkKey, key))
        self.used_bytes -= entry.nbytes
        return entry.slab, entry

    def _evictable(self, key: object) -> bool:
        return self.entries[key].pins == 0  # type: ignore[index]

    def drop(self, key: ChunkKey) -> Entry | None:
        """Remove an unpinned committed chunk (its slab becomes free); ``None`` if absent or pinned."""
        entry = self.entries.get(key)
        if entry is None or entry.pins:
            return None
        del self.entries[key]
        self.policy.remove(key)
        self.used_bytes -= entry.nbytes
        self._free.append(entry.slab)
        return entry

    # --- reservations ------------------------------------------------------------------------

    def reserve(self, key: ChunkKey, nbytes: int, now: float, timeout_s: float
                ) -> tuple[ReservationRecord, Entry | None]:
        """Reserve a slab for ``key``: ``(record, evicted entry or None)``."""
        slab, evicted = self.alloc()
        rid = next(self._ids)
        rec = ReservationRecord(rid, key, slab, nbytes, now + timeout_s)
        self.reservations[rid] = rec
        heapq.heappush(self._res_heap, (rec.expires_at, rid))
        return rec, evicted

    def reservation(self, rid: int) -> ReservationRecord:
        rec = self.reservations.get(rid)
        if rec is None:
            raise ReservationError(
                f"reservation {rid} is unknown: already committed or aborted, or expired and reclaimed"
            )
        return rec

    def begin_commit(self, rid: int) -> ReservationRecord:
        """Freeze a reservation while its checksum is computed outside the lock."""
        rec = self.reservation(rid)
        if rec.state is ReservationState.COMMITTING:
            raise ReservationError(f"reservation {rid} is already being committed")
        rec.state = ReservationState.COMMITTING
        rec.expires_at = math.inf
        return rec

    def finish_commit(self, rid: int, checksum: int, num_tokens: int) -> tuple[Entry, bool]:
        """Make the reserved slab a committed chunk: ``(entry, True)``.

        If the key was committed meanwhile by another writer, the new slab is
        freed and ``(existing entry, False)`` returned.
        """
        rec = self.reservations.pop(rid)
        existing = self.entries.get(rec.key)
        if existing is not None:
            self._free.append(rec.slab)
            return existing, False
        entry = Entry(rec.key, rec.slab, rec.nbytes, checksum, num_tokens)
        self.entries[rec.key] = entry
        self.used_bytes += rec.nbytes
        self.policy.insert(rec.key)
        return entry, True

    def abort(self, rid: int, committing: bool = False) -> bool:
        """Give a reserved slab back; ``False`` if the reservation is gone (idempotent).

        A reservation being committed is only aborted by its committer
        (``committing=True``); anyone else gets ``ReservationError``.
        """
        rec = self.reservations.get(rid)
        if rec is None:
            return False
        if rec.state is ReservationState.COMMITTING and not committing:
            raise ReservationError(f"reservation {rid} is being committed")
        del self.reservations[rid]
        self._free.append(rec.slab)
        return True

    # --- leases ------------------------------------------------------------------------------

    def pin(self, key: ChunkKey, owner: str, expires_at: float) -> Lease | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        return self.pin_entry(entry, owner, expires_at)

    def pin_entry(self, entry: Entry, owner: str, expires_at: float) -> Lease:
        lid = next(self._ids)
        lease = Lease(lid, entry, owner, expires_at)
        self.leases[lid] = lease
        if math.isfinite(expires_at):
            heapq.heappush(self._lease_heap, (expires_at, lid))
        if owner:
            self.owners.setdefault(owner, set()).add(lid)
        if entry.pins == 0:
            self.pinned_slabs += 1
        entry.pins += 1
        self.policy.touch(entry.key)
        return lease

    def unpin(self, lid: int) -> bool:
        """Release a lease; ``False`` if unknown, released or expired (idempotent)."""
        lease = self.leases.pop(lid, None)
        if lease is None:
            return False
        if lease.owner:
            ids = self.owners.get(lease.owner)
            if ids is not None:
                ids.discard(lid)
                if not ids:
                    del self.owners[lease.owner]
        entry = lease.entry
        entry.pins -= 1
        if entry.pins == 0:
            self.pinned_slabs -= 1
        return True

    def release_owner(self, owner: str) -> int:
        ids = self.owners.pop(owner, set())
        for lid in ids:
            lease = self.leases.get(lid)
            if lease is not None:
                lease.owner = ""  # already detached from owners
                self.unpin(lid)
        return len(ids)

    def extend(self, lid: int, expires_at: float) -> bool:
        lease = self.leases.get(lid)
        if lease is None:
            return False
        lease.expires_at = expires_at
        if math.isfinite(expires_at):
            heapq.heappush(self._lease_heap, (expires_at, lid))
        return True

    # --- expiry ------------------------------------------------------------------------------

    def reap(self, now: float) -> tuple[int, int]:
        """Reclaim reservations and leases whose deadline passed: ``(reservations, leases)``."""
        expired_res = expired_leases = 0
        heap = self._res_heap
        while heap and heap[0][0] <= now:
            deadline, rid = heapq.heappop(heap)
            rec = self.reservations.get(rid)
            if rec is not None and rec.expires_at == deadline:
                self.abort(rid)
                expired_res += 1
        heap = self._lease_heap
        while heap and heap[0][0] <= now:
            deadline, lid = heapq.heappop(heap)
            lease = self.leases.get(lid)
            if lease is not None and lease.expires_at == deadline:
                self.unpin(lid)
                expired_leases += 1
        self._compact()
        return expired_res, expired_leases

    def _compact(self) -> None:
        # Committed reservations and released leases leave stale heap entries
        # behind; rebuild a heap once it is mostly stale so memory stays bounded.
        if len(self._res_heap) > 64 and len(self._res_heap) > 4 * len(self.reservations):
            self._res_heap = [(r.expires_at, r.id) for r in self.reservations.values()
                              if math.isfinite(r.expires_at)]
            heapq.heapify(self._res_heap)
        if len(self._lease_heap) > 64 and len(self._lease_heap) > 4 * len(self.leases):
            self._lease_heap = [(lease.expires_at, lease.id) for lease in self.leases.values()
                                if math.isfinite(lease.expires_at)]
            heapq.heapify(self._lease_heap)
