"""What the remote tiers (Redis, Mooncake, S3) share: server health with back-off, and one shape.

``ServerHealth.call(what, fn)`` runs one client call (on the tier's small thread
pool, waiting at most ``timeout_s``; or inline, for a client with its own socket
timeouts): a call that raises one of the tier's failure types or runs past the
timeout marks the server down (one warning, one counted error). While it is
down, every call is an immediate miss (no network wait) for ``retry_after_s``;
the next call after that tries again (first asking ``probe``, a cheap local
check, when the tier has one: a failing probe keeps the server down without a
network wait), and success logs the recovery. Never raises the tier's failures.

``RemoteTier`` is the shape every remote tier shares: ``exists``, ``read`` and
``write_batch`` each run one batched client call under ``ServerHealth``; a value
comes back through ``copy_verified`` (header, checksum) and a corrupt one is a
miss, counted, and removed; a write the server refuses (full, out of memory) is
dropped with one warning per episode, without marking the server down. A tier
supplies the client calls only: ``_exists``, ``_get``, ``_put``, ``_remove``.

Thread-safe. Who calls it: the tiers' ``exists``/``read`` (any thread) and
their writer thread.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pdx.keys import ChunkKey
from pdx.store.metrics import StoreMetrics
from pdx.store.tier import LowerTier, Sink, WriteItem
from pdx.store.types import ChunkMeta
from pdx.store.value import CorruptValue, copy_verified

log = logging.getLogger(__name__)
R = TypeVar("R")


class ServerDown(Exception):
    """Raised inside a call to say the server answered with a failure code (not an exception)."""


class ServerHealth:
    """Back-off around one server. ``workers=0`` runs calls inline (the client bounds them itself)."""

    def __init__(self, label: str, where: str, metrics: StoreMetrics, clock: Callable[[], float],
                 retry_after_s: float, timeout_s: float, failures: tuple[type[BaseException], ...],
                 workers: int = 4, probe: Callable[[], bool] | None = None) -> None:
        self._label = label
        self.where = where
        self._metrics = metrics
        self._clock = clock
        self._retry_after = retry_after_s
        self._timeout = timeout_s
        self._failures: tuple[type[BaseException], ...] = (ServerDown, *failures)
        self._pool = (concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=f"pdx-{label}")
                      if workers > 0 else None)
        self._probe = probe
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._retry_at = 0.0

    @property
    def reachable(self) -> bool:
        return self._down_since is None

    def call(self, what: str, fn: Callable[[], R]) -> tuple[bool, R | None]:
        """``(True, result)``, or ``(False, None)`` when down, failing or too slow."""
        if self._down_since is not None:
            if self._clock() < self._retry_at:
                return False, None
            if self._probe is not None and not self._probe_ok():
                with self._lock:
                    self._retry_at = self._clock() + self._retry_after
                return False, None
        try:
            result = self._run(fn)
        except concurrent.futures.TimeoutError:
            self.failed(what, TimeoutError(f"no answer within {self._timeout:.1f}s"))
            return False, None
        except concurrent.futures.CancelledError:  # shut down while queued: the tier is closing
            return False, None
        except self._failures as exc:
            self.failed(what, exc)
            return False, None
        self.succeeded()
        return True, result

    def _run(self, fn: Callable[[], R]) -> R:
        if self._pool is None:
            return fn()
        try:
            fut = self._pool.submit(fn)
        except RuntimeError:  # pool shut down: the tier is closing
            raise concurrent.futures.CancelledError() from None
        return fut.result(timeout=self._timeout)

    def _probe_ok(self) -> bool:
        try:
            return bool(self._probe()) if self._probe is not None else True
        except Exception:
            return False

    def succeeded(self) -> None:
        if self._down_since is not None:
            with self._lock:
                if self._down_since is not None:
                    log.warning("%s tier: %s reachable again after %.1fs", self._label, self.where,
                                self._clock() - self._down_since)
                    self._down_since = None

    def failed(self, what: str, exc: BaseException) -> None:
        self._metrics.tier_errors[self._label].inc()
        with self._lock:
            now = self._clock()
            self._retry_at = now + self._retry_after
            if self._down_since is None:
                self._down_since = now
                log.warning("%s tier: %s failed while %s (%s: %s); serving misses and retrying every %.1fs",
                            self._label, self.where, what, type(exc).__name__, exc, self._retry_after)

    def mark_down(self, why: str) -> None:
        """Down without a failed call (e.g. not joined yet): misses until a call after the back-off works."""
        with self._lock:
            self._retry_at = self._clock() + self._retry_after
            if self._down_since is None:
                self._down_since = self._clock()
                log.warning("%s tier: %s %s; serving misses until it is", self._label, self.where, why)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def call_ok(health: ServerHealth, what: str, fn: Callable[[], Any]) -> bool:
    """``health.call`` for calls whose result does not matter."""
    return health.call(what, fn)[0]


#: what ``RemoteTier._put`` returns per item: None = written, else why the server refused it
Refusal = str | None


class RemoteTier(LowerTier):
    """A tier on a server shared by a fleet. Subclasses set ``_health`` and the client calls."""

    _health: ServerHealth
    #: what a corrupt value's removal is called in the log ("removing", "deleting")
    _remove_verb = "removing"
    #: each call is a network round trip (or several): fill batches rather than send many small ones
    gather_s = 0.002

    def __init__(self, metrics: StoreMetrics, queue_depth: int, batch_size: int = 1) -> None:
        super().__init__(metrics, queue_depth, batch_size=batch_size)
        self.read_batch = max(1, batch_size)
        self._refusing = False  # the server refuses writes (writer thread only)

    def name_of(self, key: ChunkKey) -> Any:
        raise NotImplementedError

    @property
    def reachable(self) -> bool:
        return self._health.reachable

    # --- what a tier supplies (each runs under ``_health``; a dead server raises or ServerDown) --

    def _exists(self, names: list[Any]) -> list[bool]:
        raise NotImplementedError

    def _get(self, names: list[Any]) -> Sequence[bytes | None]:
        """The value of each name (``None`` or empty: absent)."""
        raise NotImplementedError

    def _put(self, items: list[WriteItem]) -> list[Refusal]:
        raise NotImplementedError

    def _remove(self, names: list[Any]) -> None:
        raise NotImplementedError

    # --- the shared shape ----------------------------------------------------------------------

    def exists(self, keys: Sequence[ChunkKey]) -> list[bool]:
        if not keys:
            return []
        names = [self.name_of(k) for k in keys]
        ok, res = self._health.call("checking keys", lambda: self._exists(names))
        return list(res) if ok and res is not None else [False] * len(keys)

    def read(self, keys: Sequence[ChunkKey], sink: Sink) -> list[ChunkMeta | None]:
        if not keys:
            return []
        names = [self.name_of(k) for k in keys]
        ok, values = self._health.call("reading", lambda: self._get(names))
        if not ok or values is None:
            return [None] * len(keys)
        bad: list[Any] = []
        out = [self._deliver(i, names[i], v, sink, bad) if v else None for i, v in enumerate(values)]
        self._drop_corrupt(bad)
        return out

    def _deliver(self, i: int, name: Any, value: Any, sink: Sink, bad: list[Any]) -> ChunkMeta | None:
        try:
            meta = copy_verified(value, lambda m: sink(i, m))
        except CorruptValue as exc:
            self._corrupt(name, str(exc), bad)
            return None
        if meta is not None:
            self.metrics.bytes_out[self._label].inc(meta.nbytes)
        return meta

    def _corrupt(self, name: Any, why: str, bad: list[Any]) -> None:
        shown = name.decode(errors="replace") if isinstance(name, bytes) else name
        log.warning("%s tier: %s: %s; %s it", self._label, shown, why, self._remove_verb)
        self.metrics.integrity_failures[self._label].inc()
        bad.append(name)

    def _drop_corrupt(self, bad: list[Any]) -> None:
        if bad:
            self._health.call("removing corrupt chunks", lambda: self._remove(bad))

    def write_batch(self, items: list[WriteItem]) -> None:
        ok, refusals = self._health.call("writing", lambda: self._put(items))
        if not ok or refusals is None:
            self.metrics.write_drops[self._label].inc(len(items))
            return
        written = 0
        for item, why in zip(items, refusals):
            if why is None:
                written += item.meta.nbytes
                self._refusing = False
                continue
            if not self._refusing:  # e.g. full or out of memory: dropped, the server is not "down"
                log.warning("%s tier: the server refused a chunk (%s); such chunks are dropped until a "
                            "write succeeds again", self._label, why)
                self._refusing = True
            self.metrics.tier_errors[self._label].inc()
            self.metrics.write_drops[self._label].inc()
        self.metrics.bytes_in[self._label].inc(written)

    def close(self, drain_s: float = 5.0) -> None:
        super().close(drain_s)
        self._health.close()
