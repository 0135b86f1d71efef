"""``AgentContext``: what the agent's parts share, instead of the server object.

``AgentServer`` builds one context and hands it to the peer service (``pdx.agent.peers``), the
links (``pdx.agent.links``) and the transfer jobs (``pdx.agent.transfers``); each of them sees the
store, transport and layout (set once the first engine registered), the config, the metrics, the
job table and two executors:

* ``transfers``: long work, the fetch and send jobs (``control.workers`` threads), so a few slow
  peers can hold them without delaying anything else;
* ``control``: short work off the control-loop thread (hashing a commit, a tier read for a pin, a
  remote lookup, releasing a peer's pins), answered through a ``Deferred``.

The local ops that peers share with the engine (``pin_keys``, ``commit_chunks``, ``abort_ids``) are
functions of a context. Thread-safety: the store and transport are thread-safe; the fields are set
once by the registration (under the server's lock) and only read afterwards.
"""

from __future__ import annotations

import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from pdx.agent.jobs import JobTable
from pdx.agent.loop import Deferred
from pdx.agent.metrics import AgentMetrics
from pdx.config import AgentConfig
from pdx.errors import IntegrityError, NotRegistered, ReservationError, StoreError
from pdx.keys import ChunkKey
from pdx.store.types import Tier

if TYPE_CHECKING:
    from pdx.layout import KVLayout
    from pdx.store.store import ChunkStore
    from pdx.transport.base import Transport


@dataclass
class AgentContext:
    """See the module docstring."""

    config: AgentConfig
    agent_id: str
    instance: str
    secret: str
    metrics: AgentMetrics
    jobs: JobTable
    transfers: Executor
    control: Executor
    store: ChunkStore | None = None
    transport: Transport | None = None
    layout: KVLayout | None = None
    transport_address: str = ""
    peer_address: str = ""

    def require_store(self) -> tuple[ChunkStore, Transport, KVLayout]:
        """Store, transport and layout; raises ``NotRegistered`` before the first ``register_engine``."""
        store, transport, layout = self.store, self.transport, self.layout
        if store is None or transport is None or layout is None:
            raise NotRegistered("no engine has registered its KV layout with this agent yet (register_engine)")
        return store, transport, layout

    def deferred(self, fn: Any, *args: Any, timeout_s: float | None = None) -> Deferred:
        """Run ``fn(*args)`` on the control executor; the loop replies when it is done."""
        fut = self.control.submit(fn, *args)
        return Deferred(fut, timeout_s or self.config.control.request_timeout_s * 4)

    def lower_tiers(self) -> bool:
        s = self.store
        return s is not None and bool(s.tiers)


# --- local ops shared by the engine's and the peers' handlers --------------------------------------


def pin_keys(ctx: AgentContext, keys: list[bytes], owner: str, lease_s: float, origin: str) -> Any:
    """Pin ``keys`` under ``owner`` (promoting from lower tiers, then off the loop thread).
    Rows: ``[lease_id, key, offset, nbytes, checksum, num_tokens, expires_in_s]`` (lease 0: absent)."""
    store, _t, _l = ctx.require_store()
    if ctx.lower_tiers():
        return ctx.deferred(_pin, ctx, store, keys, owner, lease_s, origin)
    return _pin(ctx, store, keys, owner, lease_s, origin)


#: owners of the pins the engine's connector takes to unpack a load (``load:<request id>``)
LOAD_OWNER_PREFIX = "load:"


def _pin(ctx: AgentContext, store: ChunkStore, keys: list[bytes], owner: str, lease_s: float,
         origin: str) -> list[list[Any]]:
    ckeys = [ChunkKey(k) for k in keys]
    # an engine's load: note which tier held each chunk (a memory look-up) for loaded_tokens{source}
    load = origin == "local" and owner.startswith(LOAD_OWNER_PREFIX)
    where = store.lookup(ckeys).tiers if load else None
    pins = store.get(ckeys, lease_s=lease_s, owner=owner)
    now = time.monotonic()
    out: list[list[Any]] = []
    n = 0
    for i, (k, p) in enumerate(zip(keys, pins)):
        if p is None:
            out.append([0, k, 0, 0, 0, 0, 0.0])
        else:
            n += 1
            out.append([p.lease_id, k, p.offset, p.nbytes, p.checksum, p.num_tokens,
                        round(p.expires_at - now, 3)])
            if where is not None:
                tier = where[i]
                source = tier.value if tier in (Tier.L1, Tier.DISK, Tier.NIXL) else "shared"
                ctx.metrics.loaded_tokens.labels(source=source).inc(p.num_tokens)
    if n:
        ctx.metrics.leases_granted.labels(origin=origin).inc(n)
    return out


def commit_chunks(store: ChunkStore, ids: list[int], sums: list[int], ntok: int | list[int]) -> list[str]:
    """Commit reservations (hashing each chunk; a checksum, when given, must match): per id ``""`` or
    why not (``corrupt: ...``, ``expired: ...``). Blocking: run it on an executor."""
    out = []
    for i, rid in enumerate(ids):
        try:
            store.commit(rid, checksum=sums[i] if sums else None,
                         num_tokens=ntok if isinstance(ntok, int) else cast("list[int]", ntok)[i])
            out.append("")
        except IntegrityError as exc:
            out.append(f"corrupt: {exc}")
        except ReservationError as exc:
            out.append(f"expired: {exc}")
        except StoreError as exc:
            out.append(str(exc))
    return out


def abort_ids(store: ChunkStore, ids: list[int]) -> int:
    """Abort reservations; returns how many were live (one being committed is left to its commit)."""
    n = 0
    for rid in ids:
        try:
            n += bool(store.abort(rid))
        except ReservationError:
            pass
    return n
