"""The proxy's health loop: probe every worker, move it in and out of the pool.

Every ``interval_s`` each worker gets ``GET <url>/health`` (vLLM answers 200 when
its engine runs) and, when it has an agent, ``GET <agent_url>/readyz``; both must
answer 200 within ``timeout_s``. Results go to ``WorkerRegistry.record_check``:
``unhealthy_after`` failures in a row take a worker out, one success brings it
back. A healthy worker's model names are read once from ``/v1/models``.

Runs as one task on the proxy's event loop; probes of different workers run
concurrently, so one hanging worker does not delay the others.
"""

from __future__ import annotations

import asyncio
import json
import logging

from pdx.errors import TransportError
from pdx.scheduler.registry import Worker, WorkerRegistry
from proxy.upstream import UpstreamPool, UpstreamResponse

log = logging.getLogger("pdx.proxy")

#: a health answer bigger than this is a failed check (the answer is only a status)
MAX_HEALTH_BODY = 64 * 1024


class HealthChecker:
    def __init__(self, registry: WorkerRegistry, pool: UpstreamPool, *,
                 interval_s: float, timeout_s: float, headers: dict[str, str] | None = None) -> None:
        self.registry = registry
        self.pool = pool
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.headers = headers or {}
        self.rounds = 0  # completed rounds, for tests and /admin/workers

    async def run(self, first_delay: bool = False) -> None:
        """Probe every ``interval_s`` until cancelled (``first_delay``: wait before the first round)."""
        if first_delay:
            await asyncio.sleep(self.interval_s)
        while True:
            await self.check_all()
            await asyncio.sleep(self.interval_s)

    async def check_all(self) -> None:
        workers = self.registry.all()
        if workers:
            await asyncio.gather(*(self.check(w) for w in workers))
        self.rounds += 1

    async def _get(self, base: str, path: str) -> tuple[int, bytes] | str:
        """``(status, body)``, or why there is none."""
        resp: UpstreamResponse | None = None
        try:
            async with asyncio.timeout(self.timeout_s):
                resp = await self.pool.request(base, "GET", path, headers=self.headers)
                return resp.status, await resp.read(MAX_HEALTH_BODY)
        except TimeoutError:
            return f"GET {base}{path} timed out"
        except TransportError as exc:
            return f"GET {base}{path} failed: {exc}"
        finally:
            if resp is not None:
                resp.close()

    async def _ok(self, base: str, path: str) -> str:
        """'' when ``base + path`` answers 200, else why not."""
        got = await self._get(base, path)
        if isinstance(got, str):
            return got
        return "" if got[0] == 200 else f"GET {base}{path} answered {got[0]}"

    async def check(self, w: Worker) -> None:
        reason = await self._ok(w.url, "/health")
        if not reason and w.agent_url:
            reason = await self._ok(w.agent_url, "/readyz")
        if self.registry.get(w.id) is not w:
            return  # removed while we probed
        self.registry.record_check(w, not reason, reason)
        if not reason and not w.engine_models:
            await self._read_models(w)

    async def _read_models(self, w: Worker) -> None:
        got = await self._get(w.url, "/v1/models")
        if isinstance(got, str) or got[0] != 200:
            return
        try:
            data = json.loads(got[1])
            names = tuple(m["id"] for m in data.get("data", []) if isinstance(m, dict) and "id" in m)
        except (ValueError, AttributeError, TypeError) as exc:
            log.debug("worker %s: cannot read /v1/models: %s", w.id, exc)
            return
        if names:
            w.engine_models = names
