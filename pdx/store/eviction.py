"""Eviction policies for L1: which committed, unpinned chunk leaves the pool next.

One small interface (``EvictionPolicy``) and three policies registered by name in
``EVICTION_POLICIES``: ``lru`` (default), ``lfu`` and ``s3fifo``. The store calls
a policy under its own lock, so policies are not thread-safe and never block.
They know only keys; pins and reservations stay in the index, which passes an
``evictable`` predicate so a pinned chunk is skipped, never chosen.

Every operation is O(1) except ``evict``, which may step over pinned chunks
(at worst a pass over them, when nearly everything is pinned).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import ClassVar

from pdx.registry import Registry

Key = Hashable


class EvictionPolicy(ABC):
    """Orders committed chunks for eviction.

    ``capacity`` is the number of slabs; policies that size internal queues from
    it (S3-FIFO) use it, others ignore it. Calls:

    * ``insert(key)``: a chunk was committed to L1 (the key is not tracked yet);
    * ``touch(key)``: a tracked chunk was read (pinned);
    * ``remove(key)``: a tracked chunk left L1 for another reason (dropped, replaced);
    * ``evict(evictable)``: choose a tracked key with ``evictable(key)`` true,
      stop tracking it and return it; ``None`` when no tracked key is evictable.
    """

    name: ClassVar[str] = ""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity

    @abstractmethod
    def insert(self, key: Key) -> None: ...

    @abstractmethod
    def touch(self, key: Key) -> None: ...

    @abstractmethod
    def remove(self, key: Key) -> None: ...

    @abstractmethod
    def evict(self, evictable: Callable[[Key], bool]) -> Key | None: ...

    @abstractmethod
    def __len__(self) -> int: ...


class LRUPolicy(EvictionPolicy):
    """Least recently committed or read goes first."""

    name = "lru"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._order: OrderedDict[Key, None] = OrderedDict()  # oldest first

    def insert(self, key: Key) -> None:
        self._order[key] = None

    def touch(self, key: Key) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: Key) -> None:
        self._order.pop(key, None)

    def evict(self, evictable: Callable[[Key], bool]) -> Key | None:
        for key in self._order:
            if evictable(key):
                del self._order[key]
                return key
        return None

    def __len__(self) -> int:
        return len(self._order)


class LFUPolicy(EvictionPolicy):
    """Fewest reads goes first; ties go least recently used first.

    Counts start at 1 on insert and age: after every ``capacity`` reads all counts
    are halved, so a chunk that was hot long ago cools down instead of staying
    forever (chunks whose counts merge keep their order, colder ones first).
    """

    name = "lfu"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._freq: dict[Key, int] = {}
        self._buckets: dict[int, OrderedDict[Key, None]] = {}  # freq -> keys, oldest first
        self._reads = 0

    def _add(self, key: Key, freq: int) -> None:
        self._freq[key] = freq
        bucket = self._buckets.get(freq)
        if bucket is None:
            bucket = self._buckets[freq] = OrderedDict()
        bucket[key] = None

    def _drop(self, key: Key) -> int | None:
        freq = self._freq.pop(key, None)
        if freq is not None:
            bucket = self._buckets[freq]
            del bucket[key]
            if not bucket:
                del self._buckets[freq]
        return freq

    def insert(self, key: Key) -> None:
        self._drop(key)
        self._add(key, 1)

    def touch(self, key: Key) -> None:
        freq = self._drop(key)
        if freq is not None:
            self._add(key, freq + 1)
        self._reads += 1
        if self._reads >= max(1, self.capacity):
            self._age()

    def _age(self) -> None:
        """Halve every count (O(chunks), once per ``capacity`` reads: O(1) per read)."""
        self._reads = 0
        old, self._freq, self._buckets = self._buckets, {}, {}
        for freq in sorted(old):
            for key in old[freq]:
                self._add(key, max(1, freq // 2))

    def remove(self, key: Key) -> None:
        self._drop(key)

    def evict(self, evictable: Callable[[Key], bool]) -> Key | None:
        for freq in sorted(self._buckets):
            for key in self._buckets[freq]:
                if evictable(key):
                    self._drop(key)
                    return key
        return None

    def __len__(self) -> int:
        return len(self._freq)


class S3FIFOPolicy(EvictionPolicy):
    """S3-FIFO (Yang et al., SOSP 2023): a small probationary FIFO, a main FIFO and a ghost list.

    New chunks enter the small queue (10% of capacity); one read while there
    promotes a chunk to main when it reaches the tail, otherwise it is evicted
    and its key remembered in the ghost list, so a quick return goes straight to
    main. Main is a FIFO with reinsertion: a chunk with reads left (capped at 3)
    is moved back to the head with one read fewer. One-pass scans thus leave
    the main queue alone.
    """

    name = "s3fifo"
    MAX_FREQ = 3

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._small_target = max(1, capacity // 10)
        self._ghost_cap = max(1, capacity - self._small_target)
        self._small: OrderedDict[Key, None] = OrderedDict()  # oldest (tail) first
        self._main: OrderedDict[Key, None] = OrderedDict()
        self._ghost: OrderedDict[Key, None] = OrderedDict()
        self._freq: dict[Key, int] = {}

    def insert(self, key: Key) -> None:
        self.remove(key)
        if key in self._ghost:  # evicted from probation recently and back: it is wanted
            del self._ghost[key]
            self._main[key] = None
        else:
            self._small[key] = None
        self._freq[key] = 0

    def touch(self, key: Key) -> None:
        freq = self._freq.get(key)
        if freq is not None and freq < self.MAX_FREQ:
            self._freq[key] = freq + 1

    def remove(self, key: Key) -> None:
        if self._freq.pop(key, None) is not None:
            self._small.pop(key, None)
            self._main.pop(key, None)

    def _remember(self, key: Key) -> None:
        self._ghost[key] = None
        while len(self._ghost) > self._ghost_cap:
            self._ghost.popitem(last=False)

    def evict(self, evictable: Callable[[Key], bool]) -> Key | None:
        small, main, freq = self._small, self._main, self._freq
        # Consecutive pinned chunks stepped over in each queue: when a queue's
        # count reaches its length, everything in it is pinned.
        small_skips = main_skips = 0
        budget = (self.MAX_FREQ + 2) * (len(small) + len(main)) + 4
        for _ in range(budget):
            use_small = len(small) > small_skips and (
                len(small) >= self._small_target or len(main) <= main_skips
            )
            if use_small:
                key = next(iter(small))
                if not evictable(key):
                    small.move_to_end(key)
                    small_skips += 1
                    continue
                del small[key]
                if freq[key] >= 1:  # read while on probation: promote
                    main[key] = None
                    small_skips = 0
                    continue
                del freq[key]
                self._remember(key)
                return key
            if len(main) > main_skips:
                key = next(iter(main))
                if not evictable(key):
                    main.move_to_end(key)
                    main_skips += 1
                    continue
                if freq[key] > 0:
                    freq[key] -= 1
                    main.move_to_end(key)
                    main_skips = 0
                    continue
                del main[key]
                del freq[key]
                return key
            return None
        return None

    def __len__(self) -> int:
        return len(self._freq)


EVICTION_POLICIES: Registry[type[EvictionPolicy]] = Registry("eviction policy")
EVICTION_POLICIES.add("lru", "pdx.store.eviction:LRUPolicy")
EVICTION_POLICIES.add("lfu", "pdx.store.eviction:LFUPolicy")
EVICTION_POLICIES.add("s3fifo", "pdx.store.eviction:S3FIFOPolicy")


def make_policy(name: str, capacity: int) -> EvictionPolicy:
    """The policy registered as ``name`` (``UnknownName`` lists the known ones)."""
    return EVICTION_POLICIES.get(name)(capacity)
