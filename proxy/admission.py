"""Bounded admission: at most ``max_inflight`` requests served, at most ``max_queue`` waiting.

The proxy's generate handlers ``await admission.acquire()`` before touching a
worker and ``admission.release()`` when done (always, in ``finally``). A request
that finds the queue full is refused at once (429); one that waits longer than
``queue_timeout_s`` is refused (503). Both carry ``Retry-After``. Memory stays
bounded: a waiting request holds one future and its parsed body.

Event-loop thread only (not thread-safe). Waiters are served first in, first out.
"""

from __future__ import annotations

import asyncio
from collections import deque

from pdx.errors import Overloaded


class Admission:
    def __init__(self, max_inflight: int, max_queue: int, queue_timeout_s: float,
                 retry_after_s: float = 1.0) -> None:
        self.max_inflight = max_inflight
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.retry_after_s = retry_after_s
        self.inflight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        """Take a slot, waiting in the queue if needed; raises ``Overloaded``."""
        if self.inflight < self.max_inflight and not self._waiters:
            self.inflight += 1
            return
        if len(self._waiters) >= self.max_queue:
            raise Overloaded(f"the proxy is at capacity ({self.inflight} requests in flight, "
                             f"{len(self._waiters)} waiting); retry later",
                             retry_after=self.retry_after_s)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                await fut
        except (TimeoutError, asyncio.CancelledError) as exc:
            if fut.done() and not fut.cancelled():
                # The slot was handed over just as we gave up: pass it on.
                self.release()
            else:
                fut.cancel()
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise Overloaded(f"waited {self.queue_timeout_s:g}s for a free slot; retry later",
                             status=503, retry_after=self.retry_after_s) from None

    def release(self) -> None:
        """Give a slot back: to the oldest waiter if any, else to the pool."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.inflight -= 1
