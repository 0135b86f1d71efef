"""Which chunks leaving or entering L1 go to which lower tier, and how.

``WriteBack`` is ``ChunkStore``'s helper for write-behind; every method is called
with the store's lock held and never blocks (tiers' ``submit`` only queues):

* ``committed(entry, origin)``: a new L1 chunk. Tiers configured ``write: all``
  get it straight from its slab, which an internal, non-expiring lease pins
  until the tier's writer is done (no copy).
* ``evicted(entry)``: a chunk leaves L1 and its slab is reused right after, so
  tiers configured ``write: evicted`` get one shared copy of its bytes.
* A chunk promoted from a tier is never written back to that same tier.
"""

from __future__ import annotations

import math
import threading

from pdx.keys import ChunkKey
from pdx.store.index import Entry, L1Index
from pdx.store.pool import SlabPool
from pdx.store.tier import LowerTier, WriteItem
from pdx.store.types import ChunkMeta, Tier


class WriteBack:
    def __init__(self, pool: SlabPool, index: L1Index, lock: threading.Lock) -> None:
        self._pool = pool
        self._index = index
        self._lock = lock
        self.write_all: list[LowerTier] = []
        self.write_evicted: list[LowerTier] = []
        self._origin: dict[ChunkKey, Tier] = {}  # L1 chunks promoted from a lower tier

    def add(self, tier: LowerTier, mode: str) -> None:
        (self.write_all if mode == "all" else self.write_evicted).append(tier)

    def committed(self, entry: Entry, origin: Tier | None) -> None:
        if origin is not None:
            self._origin[entry.key] = origin
        for tier in self.write_all:
            if tier.tier is not origin and not tier.has(entry.key):
                self._submit_pinned(tier, entry)

    def evicted(self, entry: Entry) -> None:
        origin = self._origin.pop(entry.key, None)
        targets = [t for t in self.write_evicted if t.tier is not origin and not t.has(entry.key)]
        if not targets:
            return
        view = self._pool.view(self._pool.slab_offset(entry.slab), entry.nbytes)
        data = bytes(view)
        view.release()
        meta = ChunkMeta(entry.nbytes, entry.checksum, entry.num_tokens)
        for tier in targets:
            tier.submit(WriteItem(entry.key, data, meta))

    def forget(self, key: ChunkKey) -> None:
        """``key`` left L1 without eviction (discarded)."""
        self._origin.pop(key, None)

    def _submit_pinned(self, tier: LowerTier, entry: Entry) -> None:
        lease = self._index.pin_entry(entry, "", math.inf)
        view = self._pool.view(self._pool.slab_offset(entry.slab), entry.nbytes)

        def done(lid: int = lease.id, v: memoryview = view) -> None:  # on the tier's writer thread
            v.release()
            with self._lock:
                self._index.unpin(lid)

        item = WriteItem(entry.key, view, ChunkMeta(entry.nbytes, entry.checksum, entry.num_tokens), done,
                         offset=self._pool.slab_offset(entry.slab))
        if not tier.submit(item):
            view.release()
            self._index.unpin(lease.id)
