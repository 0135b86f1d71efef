"""Remote lookups: every remote tier asked at once, each within its own budget.

``RemoteLookups.exists(tiers, keys)`` runs each tier's ``exists`` on a small
thread pool and waits for each at most ``tier.lookup_timeout_s`` from the start
of the lookup. A tier that has not answered by then is a miss for this lookup
(counted in ``pdx_store_lookup_timeouts_total``) while the others' answers are
used: a dead or slow server (a Mooncake master that is gone makes each client
call wait seconds) cannot turn another tier's hits into misses, nor make the
whole lookup outlast the engine's lookup budget. Its call goes on in the
background, bounded by the tier's own timeout; until it returns, later lookups
skip that tier at once instead of queueing behind it, and so does ``ChunkStore.get``
(``stuck``): a load does not wait seconds on a server that is hanging.

Thread-safe; called by ``ChunkStore.lookup(remote=True)`` from any thread.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Sequence

from pdx.keys import ChunkKey
from pdx.store.metrics import StoreMetrics
from pdx.store.tier import LowerTier


class RemoteLookups:
    def __init__(self, metrics: StoreMetrics, workers: int) -> None:
        self._metrics = metrics
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, workers), thread_name_prefix="pdx-lookup")
        self._lock = threading.Lock()
        self._late: dict[int, int] = {}  # id(tier) -> its calls still out past their budget

    def exists(self, tiers: Sequence[LowerTier], keys: Sequence[ChunkKey]) -> list[list[bool] | None]:
        """Per tier: its answer for ``keys``, or ``None`` (no answer within its budget, or skipped)."""
        start = time.monotonic()
        futures: list[concurrent.futures.Future[list[bool]] | None] = []
        for tier in tiers:
            try:
                futures.append(None if self.stuck(tier) else self._pool.submit(tier.exists, keys))
            except RuntimeError:  # shut down: the store is closing
                futures.append(None)
        out: list[list[bool] | None] = []
        for tier, fut in zip(tiers, futures):
            if fut is None:
                out.append(None)
                continue
            try:
                out.append(fut.result(timeout=max(0.0, start + tier.lookup_timeout_s - time.monotonic())))
            except concurrent.futures.TimeoutError:
                out.append(None)
                self._metrics.lookup_timeouts[tier.tier.value].inc()
                with self._lock:
                    self._late[id(tier)] = self._late.get(id(tier), 0) + 1
                fut.add_done_callback(self._landed_cb(tier))
            except Exception:  # tiers never raise; a bug here must not fail the lookup
                out.append(None)
        return out

    def stuck(self, tier: LowerTier) -> bool:
        """True while a lookup call of ``tier`` is still out past its budget (its server hangs)."""
        with self._lock:
            return self._late.get(id(tier), 0) > 0

    def _landed_cb(self, tier: LowerTier) -> Callable[[concurrent.futures.Future[list[bool]]], None]:
        def landed(_fut: concurrent.futures.Future[list[bool]]) -> None:
            with self._lock:
                self._late[id(tier)] -= 1

        return landed

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
