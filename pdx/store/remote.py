"""What the remote tiers (Mooncake, S3) share: server health with back-off, and bounded calls.

``ServerHealth.call(what, fn)`` runs one client call on the tier's small thread
pool and waits at most ``timeout_s``: a call that raises one of the tier's
failure types or runs past the timeout marks the server down (one warning, one
counted error). While it is down, every call is an immediate miss (no network
wait) for ``retry_after_s``; the next call after that tries again, and success
logs the recovery. Never raises the tier's failures.

Thread-safe. Who calls it: the tiers' ``exists``/``read`` (any thread) and
their writer thread.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from pdx.store.metrics import StoreMetrics

log = logging.getLogger(__name__)
R = TypeVar("R")


class ServerDown(Exception):
    """Raised inside a call to say the server answered with a failure code (not an exception)."""


class ServerHealth:
    def __init__(self, label: str, where: str, metrics: StoreMetrics, clock: Callable[[], float],
                 retry_after_s: float, timeout_s: float, failures: tuple[type[BaseException], ...],
                 workers: int = 4) -> None:
        self._label = label
        self._where = where
        self._metrics = metrics
        self._clock = clock
        self._retry_after = retry_after_s
        self._timeout = timeout_s
        self._failures: tuple[type[BaseException], ...] = (ServerDown, *failures)
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=f"pdx-{label}")
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._retry_at = 0.0

    @property
    def reachable(self) -> bool:
        return self._down_since is None

    def call(self, what: str, fn: Callable[[], R]) -> tuple[bool, R | None]:
        """``(True, result)``, or ``(False, None)`` when down, failing or too slow."""
        if self._down_since is not None and self._clock() < self._retry_at:
            return False, None
        try:
            fut = self._pool.submit(fn)
        except RuntimeError:  # pool shut down: the tier is closing
            return False, None
        try:
            result = fut.result(timeout=self._timeout)
        except concurrent.futures.TimeoutError:
            self.failed(what, TimeoutError(f"no answer within {self._timeout:.1f}s"))
            return False, None
        except self._failures as exc:
            self.failed(what, exc)
            return False, None
        if self._down_since is not None:
            with self._lock:
                if self._down_since is not None:
                    log.warning("%s tier: %s reachable again after %.1fs", self._label, self._where,
                                self._clock() - self._down_since)
                    self._down_since = None
        return True, result

    def failed(self, what: str, exc: BaseException) -> None:
        self._metrics.tier_errors[self._label].inc()
        with self._lock:
            now = self._clock()
            self._retry_at = now + self._retry_after
            if self._down_since is None:
                self._down_since = now
                log.warning("%s tier: %s failed while %s (%s: %s); serving misses and retrying every %.1fs",
                            self._label, self._where, what, type(exc).__name__, exc, self._retry_after)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def call_ok(health: ServerHealth, what: str, fn: Callable[[], Any]) -> bool:
    """``health.call`` for calls whose result does not matter."""
    return health.call(what, fn)[0]
