"""A proxy with stand-in workers on a background event loop, for synchronous callers.

Tests (and anyone trying the proxy by hand) build a ``Cluster``: N stand-in
prefill workers, M stand-in decode workers and a ``ProxyServer`` routed over
them, all on one ``BackgroundLoop`` thread. The caller's thread then talks HTTP
to ``cluster.url`` with any client (httpx, the openai package) and inspects
what the stand-ins received. ``close()`` stops everything it started.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from pdx.config import ProxyConfig, ProxyWorkerConfig
from pdx.scheduler.tokenizer import Tokenizer
from proxy.app import ProxyServer
from proxy.standin import StandinWorker

T = TypeVar("T")


class BackgroundLoop:
    """An asyncio loop on a daemon thread. ``run(coro)`` blocks the caller until ``coro``
    finished on the loop (at most ``timeout`` s); ``close()`` stops the loop and joins."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="pdx-bg-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a plain function on the loop's thread (for state the loop owns)."""
        async def wrapper() -> T:
            return fn(*args)
        return self.run(wrapper())

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def wait_until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``cond`` until true; ``TimeoutError`` naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout}s for {what}")
        time.sleep(0.01)


class Cluster:
    """Stand-in workers and a proxy over them. ``cfg`` fields override the proxy config."""

    def __init__(self, n_prefill: int = 1, n_decode: int = 1, *, tokenizer: Tokenizer | None = None,
                 extra_workers: list[ProxyWorkerConfig] | None = None, **cfg: Any) -> None:
        self.bg = BackgroundLoop()
        self.prefill = [StandinWorker(f"p{i}") for i in range(n_prefill)]
        self.decode = [StandinWorker(f"d{i}") for i in range(n_decode)]
        self.server: ProxyServer | None = None
        try:
            for w in (*self.prefill, *self.decode):
                self.bg.run(w.start())
            workers = [ProxyWorkerConfig(url=w.url, role="prefill", id=w.name) for w in self.prefill]
            workers += [ProxyWorkerConfig(url=w.url, role="decode", id=w.name) for w in self.decode]
            workers += extra_workers or []
            base = ProxyConfig(port=0, health_interval_s=0.05, health_timeout_s=1.0, workers=workers)
            config = dataclasses.replace(base, **cfg)
            config.validate()
            self.server = ProxyServer(config, tokenizer=tokenizer)
            self.bg.run(self.server.start())
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    @property
    def admin_url(self) -> str:
        assert self.server is not None
        return self.server.admin_url

    def metric(self, name: str, **labels: str) -> float:
        """Current value of one sample of the proxy's metrics (0 when absent)."""
        assert self.server is not None
        value = self.bg.call(self.server.metrics.registry.get_sample_value, name, labels)
        return float(value or 0.0)

    def close(self) -> None:
        try:
            if self.server is not None:
                self.bg.run(self.server.stop())
            for w in (*self.prefill, *self.decode):
                self.bg.run(w.stop())
        finally:
            self.bg.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
