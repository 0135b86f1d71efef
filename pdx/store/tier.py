"""The interface of the tiers below L1 (disk, Redis, Mooncake, S3) and their write-behind worker.

Each tier lives in its own module and is registered by its ``type:`` tag in
``TIERS``; ``ChunkStore`` builds the tiers of ``store.tiers`` in order.

A lower tier stores chunks as ``(key, payload, ChunkMeta)`` and hands them back
verified. Its contract, for ``ChunkStore``:

* ``local``: ``True`` for a tier with an in-memory index of what it holds
  (disk); lookups ask it every time. Remote tiers (Redis, Mooncake, S3) are
  asked only when the caller wants remote lookups.
* ``has(key)``: cheap local membership (an in-memory index); remote tiers
  answer ``False`` and are asked through ``exists``. Non-blocking.
* ``exists(keys)``: membership, may block on the network. Never raises.
* ``read(keys, sink)``: blocking. For each chunk found, the tier calls
  ``sink(i, meta)`` for a destination (a writable memoryview of at least
  ``meta.nbytes``, normally an L1 slab), fills it and verifies the checksum.
  Returns per key the verified ``ChunkMeta`` or ``None`` (absent, sink refused,
  unreachable, corrupt). Never raises: a failing tier is a miss, counted.
* ``submit(item)``: non-blocking write-behind. Queues ``item`` for the tier's own
  writer thread and returns ``True``, or returns ``False`` when the queue is
  full or the tier is closed (the item was dropped; the caller still owns it and
  must release what it holds). The writer calls ``item.done()`` once it has
  finished with ``item.data`` (written or failed), without holding any tier lock.
* ``flush(timeout_s)``: wait until every queued item was handled.
* ``close()``: drain for a bounded time, stop the writer, release resources.
* ``use_pool(buffer)``: optional; the L1 pool, for tiers that send from it in place.
* ``lookup_timeout_s``: the most a remote lookup waits for this tier; past it the
  tier counts as a miss for that lookup while the others still answer.

Thread-safety: every method may be called from any thread.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from pdx.keys import ChunkKey
from pdx.registry import Registry
from pdx.store.metrics import StoreMetrics
from pdx.store.types import ChunkMeta, Tier

log = logging.getLogger(__name__)

#: ``sink(index_in_keys, meta) -> destination or None (skip this chunk)``
Sink = Callable[[int, ChunkMeta], memoryview | None]


@dataclass(slots=True)
class WriteItem:
    """One chunk to write behind. ``data`` stays valid until ``done`` is called.

    ``offset``: where ``data`` lies in the L1 pool (a pinned slab), or -1 for a copy
    elsewhere; a tier that registered the pool (``use_pool``) sends such data without a copy.
    """

    key: ChunkKey
    data: memoryview | bytes
    meta: ChunkMeta
    done: Callable[[], None] | None = None
    offset: int = -1


class LowerTier(ABC):
    """Base of the tiers below L1: the write-behind queue and writer thread live here."""

    tier: ClassVar[Tier]
    #: has an in-memory index (``has``); remote tiers are asked through ``exists``
    local: ClassVar[bool] = False
    #: keys per ``read`` call the store makes (bounds the memory of one reply)
    read_batch: int = 8
    #: the most ``ChunkStore.lookup(remote=True)`` waits for this tier's ``exists``
    lookup_timeout_s: float = 0.5
    #: how long the writer waits for a batch to fill before writing a partial one
    gather_s: float = 0.0

    def __init__(self, metrics: StoreMetrics, queue_depth: int, batch_size: int = 1) -> None:
        self.metrics = metrics
        self._label = self.tier.value
        self._queue: deque[WriteItem] = deque()
        self._depth = max(1, queue_depth)
        self._batch = max(1, batch_size)
        self._cond = threading.Condition()
        self._pending = 0  # queued + being written
        self._closing = False
        self._writer: threading.Thread | None = None

    def _start_writer(self) -> None:
        self._writer = threading.Thread(target=self._write_loop, name=f"pdx-{self._label}-writer",
                                        daemon=True)
        self._writer.start()

    # --- the contract ------------------------------------------------------------------------

    def has(self, key: ChunkKey) -> bool:
        return False

    @abstractmethod
    def exists(self, keys: Sequence[ChunkKey]) -> list[bool]: ...

    @abstractmethod
    def read(self, keys: Sequence[ChunkKey], sink: Sink) -> list[ChunkMeta | None]: ...

    @abstractmethod
    def write_batch(self, items: list[WriteItem]) -> None:
        """Write ``items`` (called on the writer thread only). Failures are logged and counted."""

    def use_pool(self, buffer: memoryview) -> None:
        """The L1 pool's bytes, given once by the store before any write (the pool outlives the
        tier). A tier whose client can move registered memory without a copy registers it here."""
        return None

    @property
    def reachable(self) -> bool:
        """False while a remote tier treats its server as gone (every call a miss until a retry works)."""
        return True

    def used_bytes(self) -> float:
        return 0.0

    def capacity_bytes(self) -> float:
        return 0.0

    def chunk_count(self) -> float:
        return 0.0

    # --- write-behind ------------------------------------------------------------------------

    def submit(self, item: WriteItem) -> bool:
        with self._cond:
            if self._closing or self._writer is None or len(self._queue) >= self._depth:
                accepted = False
            else:
                self._queue.append(item)
                self._pending += 1
                self._cond.notify_all()
                accepted = True
        if not accepted:
            self.metrics.write_drops[self._label].inc()
        return accepted

    def flush(self, timeout_s: float) -> bool:
        """Wait until the queue is empty and nothing is being written; ``False`` on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout_s)

    def close(self, drain_s: float = 5.0) -> None:
        """Let queued writes finish for up to ``drain_s``, then stop (idempotent)."""
        self.flush(drain_s)
        with self._cond:
            self._closing = True
            left = list(self._queue)
            self._queue.clear()
            self._pending -= len(left)
            self._cond.notify_all()
        for item in left:  # dropped unwritten: hand the data back
            self.metrics.write_drops[self._label].inc()
            if item.done is not None:
                item.done()
        if self._writer is not None and self._writer is not threading.current_thread():
            self._writer.join(timeout=max(1.0, drain_s))

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                if self.gather_s > 0 and len(self._queue) < self._batch:
                    # chunks of one request are committed moments apart: one full batch, not several
                    self._cond.wait_for(lambda: len(self._queue) >= self._batch or self._closing, self.gather_s)
                batch = [self._queue.popleft() for _ in range(min(self._batch, len(self._queue)))]
            try:
                self.write_batch(batch)
            except Exception:  # a bug, not an I/O failure (those are handled inside)
                log.exception("%s tier: write-behind batch failed", self._label)
                self.metrics.tier_errors[self._label].inc()
            finally:
                for item in batch:
                    if item.done is not None:
                        try:
                            item.done()
                        except Exception:
                            log.exception("%s tier: releasing a written chunk failed", self._label)
                with self._cond:
                    self._pending -= len(batch)
                    self._cond.notify_all()


class TierFactory(Protocol):
    """How ``ChunkStore`` builds a tier: its config section and the store's context."""

    def __call__(self, config: Any, *, chunk_fingerprint: str, data_dir: Path | None,
                 metrics: StoreMetrics, clock: Callable[[], float]) -> LowerTier: ...


TIERS: Registry[TierFactory] = Registry("store tier")
TIERS.add("disk", "pdx.store.disk:DiskTier")
TIERS.add("redis", "pdx.store.redis_tier:RedisTier", install="pip install 'pdx[redis]'")
TIERS.add("mooncake", "pdx.store.mooncake_tier:MooncakeTier", install="pip install 'pdx[mooncake]'")
TIERS.add("s3", "pdx.store.s3_tier:S3Tier", install="pip install 'pdx[s3]'")
TIERS.add("nixl", "pdx.store.nixl_tier:NixlStorageTier", install="pip install 'pdx[nixl]'")
