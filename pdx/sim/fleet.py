"""The simulated fleet's state: each worker's store (L1 under a real eviction policy, a local
disk in LRU order as ``DiskTier`` keeps it) and the shared tier every worker reads and writes.

Units are trace blocks: one chunk key per whole block of a prompt, so one L1 slab holds one
block's KV (``block_tokens * kv_bytes_per_token`` bytes). What the real store does and this
model keeps:

* a lookup finds the prompt's leading run of keys, each in L1, else on disk, else in the
  shared tier (``ChunkStore.lookup`` order); the first key found nowhere ends the run;
* a hit is read (``touch``), a chunk read from disk or the shared tier is promoted into L1,
  a computed chunk is committed to L1;
* L1 eviction is the store's own policy object (``pdx.store.eviction``) and an evicted chunk
  is written behind to disk and to the shared tier, as ``WriteBack`` does;
* what an agent announces is its L1 keys (``ChunkStore.keys``), summarised by the real
  ``KeySummary``.

Pins are not modelled (a simulated request holds nothing while it waits).
Single-threaded; owned by one ``Simulation``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from pdx.scheduler.summary import KeySummary
from pdx.store.eviction import make_policy

L1, DISK, SHARED = "l1", "disk", "shared"


class LRUTier:
    """A lower tier of fixed capacity (blocks), least recently used out (disk, shared)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[bytes, None] = OrderedDict()

    def __contains__(self, key: bytes) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def read(self, key: bytes) -> None:
        self._keys.move_to_end(key)

    def write(self, key: bytes) -> None:
        if self.capacity <= 0:
            return
        self._keys[key] = None
        self._keys.move_to_end(key)
        while len(self._keys) > self.capacity:
            self._keys.popitem(last=False)


class SimStore:
    """One agent's store. ``l1_blocks`` slabs under ``eviction``; optional disk and shared tier."""

    def __init__(self, l1_blocks: int, eviction: str = "lru", disk_blocks: int = 0,
                 shared: LRUTier | None = None) -> None:
        self.capacity = max(0, l1_blocks)
        self.policy = make_policy(eviction, max(1, self.capacity))
        self.l1: set[bytes] = set()
        self.disk = LRUTier(disk_blocks) if disk_blocks > 0 else None
        self.shared = shared
        self.version = 0  # changes whenever L1's key set does (summaries are rebuilt then)
        self._summary: KeySummary | None = None
        self._summary_version = -1
        self.evictions = 0

    def lookup(self, keys: Sequence[bytes]) -> list[str]:
        """Tier of each key of the leading run found (L1, disk, shared); stops at the first miss."""
        out: list[str] = []
        for k in keys:
            if k in self.l1:
                out.append(L1)
            elif self.disk is not None and k in self.disk:
                out.append(DISK)
            elif self.shared is not None and k in self.shared:
                out.append(SHARED)
            else:
                break
        return out

    def commit(self, keys: Sequence[bytes], tiers: Sequence[str] = ()) -> None:
        """After a request: the first ``len(tiers)`` keys were read from those tiers, the rest
        computed (or received); every key ends in L1."""
        for i, k in enumerate(keys):
            tier = tiers[i] if i < len(tiers) else None
            if tier == DISK and self.disk is not None:
                self.disk.read(k)
            elif tier == SHARED and self.shared is not None:
                self.shared.read(k)
            if k in self.l1:
                self.policy.touch(k)
            else:
                self._insert(k)

    def _insert(self, key: bytes) -> None:
        if self.capacity <= 0:
            self._write_behind(key)
            return
        while len(self.l1) >= self.capacity:
            victim = self.policy.evict(lambda _k: True)
            if victim is None:
                break
            self.l1.discard(victim)  # type: ignore[arg-type]
            self.evictions += 1
            self._write_behind(victim)  # type: ignore[arg-type]
        self.l1.add(key)
        self.policy.insert(key)
        self.version += 1

    def _write_behind(self, key: bytes) -> None:
        if self.disk is not None:
            self.disk.write(key)
        if self.shared is not None:
            self.shared.write(key)

    def summary(self, fp_rate: float = 0.01) -> KeySummary:
        """The agent's announcement summary of L1 (rebuilt only when L1 changed)."""
        if self._summary is None or self._summary_version != self.version:
            self._summary = KeySummary.build(list(self.l1), fp_rate)
            self._summary_version = self.version
        return self._summary
