"""The proxy's view of its workers: who they are, whether they are in the pool, how loaded.

Fed from three sides, all on the proxy's event-loop thread (nothing here blocks,
nothing here is thread-safe):

* the config's static worker list (``ProxyConfig.workers``) at start;
* agent announcements (``announce``), arriving on ``/admin/register``: they add
  workers, refresh heartbeats, load and key summaries;
* health: the proxy's health loop (``record_check``) and the request path
  (``record_failure`` / ``record_success``).

A worker is in the pool (``available``) when its health is not ``UNHEALTHY`` and,
if its agent has ever announced itself, its last heartbeat is younger than the
heartbeat timeout. It returns by itself when a health check passes or a
heartbeat arrives. Policies read ``candidates()`` and the load fields; the flow
updates ``inflight`` through ``begin`` / ``end``.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any
from urllib.parse import urlsplit

from pdx.config import ProxyWorkerConfig
from pdx.scheduler.messages import AgentAnnouncement, WorkerRole

log = logging.getLogger("pdx.scheduler")

#: chunk fingerprint used for the proxy's own routing hints when no agent announced one.
HINT_FINGERPRINT = "pdx-proxy-hint"


class WorkerState(str, Enum):
    UNKNOWN = "unknown"  # not checked yet; in the pool
    HEALTHY = "healthy"  # in the pool
    UNHEALTHY = "unhealthy"  # failed checks or calls; out until a check passes
    STALE = "stale"  # its agent stopped heartbeating; out until the next announcement
    LEFT = "left"  # its agent said it is leaving; out until it announces again


class WorkerSource(str, Enum):
    STATIC = "static"  # from the config; never removed
    AGENT = "agent"  # from an announcement; removed when it leaves


class Side(str, Enum):
    """Which half of the P/D flow a worker is picked for."""

    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True)
class KeySpace:
    """What ``pdx.keys.chunk_keys`` needs: keys are comparable only within one space."""

    fingerprint: str
    chunk_tokens: int
    namespace: str = ""


def normalize_url(url: str) -> str:
    """``HTTP://Host:80/`` -> ``http://host:80``: the identity of a worker."""
    parts = urlsplit(url.strip())
    path = parts.path.rstrip("/")
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{path}"


class KeyHints:
    """Chunk keys this proxy recently sent to a worker (bounded, least recently used out).

    They bridge the time between agent announcements, and give ``cache_aware``
    something to go on for workers without an agent (their engine's own prefix
    cache then holds what the proxy sent).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def add(self, keys: Iterable[bytes]) -> None:
        if not self.capacity:
            return
        d = self._keys
        for k in keys:
            d[k] = None
            d.move_to_end(k)
        while len(d) > self.capacity:
            d.popitem(last=False)

    def clear(self) -> None:
        self._keys.clear()


@dataclass(eq=False)
class Worker:
    """One engine worker. Owned by ``WorkerRegistry``; event-loop thread only."""

    id: str
    url: str
    role: WorkerRole
    source: WorkerSource
    agent_url: str = ""
    health: WorkerState = WorkerState.UNKNOWN
    failures: int = 0  # consecutive failed checks or calls
    inflight: int = 0  # this proxy's requests on it now
    inflight_tokens: int = 0
    announcement: AgentAnnouncement | None = None
    last_heartbeat: float | None = None  # monotonic time of the last announcement
    heartbeat_timeout_s: float = 5.0
    left: bool = False
    hints: KeyHints = field(default_factory=lambda: KeyHints(0))
    #: hints of the shared tiers this worker writes to and loads from (one object per tier id,
    #: shared by every worker announcing that tier)
    shared: tuple[KeyHints, ...] = ()
    default_chunk_tokens: int = 256
    routed: int = 0  # requests this proxy sent here in total
    engine_models: tuple[str, ...] = ()  # from the engine's /v1/models (health loop)

    def state(self, now: float) -> WorkerState:
        if self.left:
            return WorkerState.LEFT
        if self.last_heartbeat is not None and now - self.last_heartbeat > self.heartbeat_timeout_s:
            return WorkerState.STALE
        return self.health

    def available(self, now: float) -> bool:
        """In the pool: requests may go here (a worker not checked yet counts)."""
        return self.state(now) in (WorkerState.UNKNOWN, WorkerState.HEALTHY)

    def verified(self, now: float) -> bool:
        """In the pool and known to be up: a health check passed or its agent announced it."""
        state = self.state(now)
        return state is WorkerState.HEALTHY or (state is WorkerState.UNKNOWN
                                                 and self.last_heartbeat is not None)

    @property
    def load_requests(self) -> int:
        """Outstanding requests: this proxy's count, or the agent's if higher (other proxies)."""
        reported = self.announcement.load.requests if self.announcement else 0
        return max(self.inflight, reported)

    @property
    def load_tokens(self) -> int:
        reported = self.announcement.load.tokens if self.announcement else 0
        return max(self.inflight_tokens, reported)

    @property
    def key_space(self) -> KeySpace:
        a = self.announcement
        if a is not None and a.chunk_fingerprint and a.chunk_tokens:
            return KeySpace(a.chunk_fingerprint, a.chunk_tokens, a.namespace)
        return KeySpace(HINT_FINGERPRINT, self.default_chunk_tokens)

    def held_prefix(self, keys: Sequence[bytes]) -> int:
        """Leading ``keys`` (in this worker's key space) its agent, the proxy's hints, or a shared
        tier it reads from (keys any worker with that tier was sent) hold."""
        summary = self.announcement.keys if self.announcement else None
        hints = self.hints
        shared = self.shared
        n = 0
        for k in keys:
            if not (k in hints or (summary is not None and k in summary) or any(k in h for h in shared)):
                break
            n += 1
        return n

    def describe(self, now: float) -> dict[str, Any]:
        a = self.announcement
        return {
            "id": self.id, "url": self.url, "role": self.role.value, "source": self.source.value,
            "agent_url": self.agent_url, "state": self.state(now).value,
            "inflight": self.inflight, "inflight_tokens": self.inflight_tokens,
            "routed": self.routed, "failures": self.failures,
            "heartbeat_age_s": None if self.last_heartbeat is None else round(now - self.last_heartbeat, 3),
            "agent_id": a.agent_id if a else None,
            "reported_load": {"requests": a.load.requests, "tokens": a.load.tokens} if a else None,
            "held_chunks": a.keys.count if a and a.keys else 0,
            "hint_keys": len(self.hints),
            "models": list(dict.fromkeys([*(a.models if a else ()), *self.engine_models])),
        }


class WorkerRegistry:
    """All workers, static and announced. Event-loop thread only; every method is O(workers)."""

    def __init__(self, static: Sequence[ProxyWorkerConfig] = (), *, heartbeat_timeout_s: float = 5.0,
                 unhealthy_after: int = 2, hint_keys: int = 65536, default_chunk_tokens: int = 256,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.unhealthy_after = unhealthy_after
        self.hint_keys = hint_keys
        self.default_chunk_tokens = default_chunk_tokens
        self.clock = clock
        self._workers: dict[str, Worker] = {}
        self._by_url: dict[str, Worker] = {}
        self._shared: dict[str, KeyHints] = {}  # shared tier id -> keys sent to workers using it
        for wc in static:
            url = normalize_url(wc.url)
            wid = wc.id or urlsplit(url).netloc
            self._add(Worker(id=self._unique_id(wid), url=url, role=WorkerRole(wc.role),
                             source=WorkerSource.STATIC, agent_url=wc.agent_url.rstrip("/")))

    # --- membership ------------------------------------------------------------------------

    def _unique_id(self, wanted: str) -> str:
        wid, n = wanted, 1
        while wid in self._workers:
            n += 1
            wid = f"{wanted}-{n}"
        return wid

    def _add(self, w: Worker) -> Worker:
        w.hints = KeyHints(self.hint_keys)
        w.default_chunk_tokens = self.default_chunk_tokens
        w.heartbeat_timeout_s = self.heartbeat_timeout_s
        self._workers[w.id] = w
        self._by_url[w.url] = w
        return w

    def __len__(self) -> int:
        return len(self._workers)

    def all(self) -> list[Worker]:
        return list(self._workers.values())

    def get(self, worker_id: str) -> Worker | None:
        return self._workers.get(worker_id)

    def by_url(self, url: str) -> Worker | None:
        return self._by_url.get(normalize_url(url))

    def candidates(self, side: Side) -> list[Worker]:
        """Workers in the pool that can serve ``side``, in a stable order."""
        now = self.clock()
        if side is Side.PREFILL:
            return [w for w in self._workers.values() if w.role.prefills and w.available(now)]
        return [w for w in self._workers.values() if w.role.decodes and w.available(now)]

    def has_role(self, side: Side) -> bool:
        """Whether any worker that can serve ``side`` is known, in the pool or not."""
        if side is Side.PREFILL:
            return any(w.role.prefills for w in self._workers.values())
        return any(w.role.decodes for w in self._workers.values())

    def announce(self, msg: AgentAnnouncement) -> Worker:
        """Apply one announcement (registration or heartbeat); returns the worker it concerns."""
        url = normalize_url(msg.engine_url)
        w = self._by_url.get(url)
        if w is None:
            if msg.leaving:
                raise KeyError(f"no worker at {url} to leave")
            w = self._add(Worker(id=self._unique_id(msg.agent_id), url=url, role=msg.role,
                                 source=WorkerSource.AGENT, agent_url=msg.agent_url.rstrip("/")))
            log.info("worker %s (%s, %s) registered by its agent", w.id, w.role.value, w.url)
        elif w.source is WorkerSource.STATIC and msg.role is not w.role:
            log.warning("agent %s announces role %s for %s, configured as %s; keeping the config",
                        msg.agent_id, msg.role.value, w.id, w.role.value)
        if msg.leaving:
            log.info("worker %s: its agent is leaving", w.id)
            if w.source is WorkerSource.AGENT:
                self._remove(w)
            else:
                w.left = True
                w.announcement = None
                w.hints.clear()
            return w
        old_space = w.key_space
        prev = w.announcement
        if prev is not None and _late(prev, msg):
            return w  # a late, reordered heartbeat: keep the newer one
        was_out = not w.available(self.clock())
        w.announcement = msg
        w.shared = tuple(self._shared.setdefault(t, KeyHints(self.hint_keys)) for t in msg.shared_tiers)
        w.last_heartbeat = self.clock()
        w.heartbeat_timeout_s = max(self.heartbeat_timeout_s, 2.5 * msg.heartbeat_s)
        w.left = False
        if msg.agent_url and w.source is WorkerSource.AGENT:
            w.agent_url = msg.agent_url.rstrip("/")
        if w.key_space != old_space:
            w.hints.clear()
        if was_out and w.available(self.clock()):
            log.info("worker %s is back in the pool (heartbeat)", w.id)
        return w

    def _remove(self, w: Worker) -> None:
        self._workers.pop(w.id, None)
        self._by_url.pop(w.url, None)

    # --- health ----------------------------------------------------------------------------

    def record_check(self, w: Worker, ok: bool, reason: str = "") -> None:
        """Result of one health check from the proxy's health loop."""
        if ok:
            self.record_success(w)
            return
        w.failures += 1
        if w.failures >= self.unhealthy_after and w.health is not WorkerState.UNHEALTHY:
            log.warning("worker %s leaves the pool: %s", w.id, reason or "health check failed")
            w.health = WorkerState.UNHEALTHY
            w.hints.clear()

    def record_success(self, w: Worker) -> None:
        if w.health is WorkerState.UNHEALTHY:
            log.info("worker %s is back in the pool", w.id)
        w.health = WorkerState.HEALTHY
        w.failures = 0

    def record_failure(self, w: Worker, reason: str, *, fatal: bool = False) -> None:
        """A call on the request path failed; ``fatal`` (unreachable) takes it out at once."""
        w.failures += 1
        if (fatal or w.failures >= self.unhealthy_after) and w.health is not WorkerState.UNHEALTHY:
            log.warning("worker %s leaves the pool: %s", w.id, reason)
            w.health = WorkerState.UNHEALTHY
            w.hints.clear()

    # --- load ------------------------------------------------------------------------------

    @staticmethod
    def begin(w: Worker, tokens: int) -> None:
        w.inflight += 1
        w.inflight_tokens += tokens
        w.routed += 1

    @staticmethod
    def end(w: Worker, tokens: int) -> None:
        w.inflight -= 1
        w.inflight_tokens -= tokens

    def describe(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [w.describe(now) for w in self._workers.values()]

    def peers(self) -> list[dict[str, str]]:
        """Agents registered now and not leaving (id, peer-socket address, public key, role): the register
        reply carries it so that agents fetch only from agents of this deployment, and know the key
        each one proves its identity with."""
        out = []
        for w in self._workers.values():
            ann = w.announcement
            if ann is not None and not w.left and ann.transport_address:
                out.append({"agent_id": ann.agent_id, "peer_address": ann.transport_address,
                            "identity_key": ann.identity_key, "role": ann.role.value})
        return out

    def models(self) -> list[str]:
        """Model names of workers in the pool (announced by agents or listed by engines)."""
        now = self.clock()
        names: dict[str, None] = {}
        for w in self._workers.values():
            if w.available(now):
                if w.announcement:
                    names.update(dict.fromkeys(w.announcement.models))
                names.update(dict.fromkeys(w.engine_models))
        return list(names)


#: a heartbeat this far behind the last one is no late one (those are a few periods behind at most):
#: its agent process started again, counting from 1
RESTART_SEQ_GAP = 8


def _late(prev: AgentAnnouncement, msg: AgentAnnouncement) -> bool:
    """``msg`` is an older heartbeat of the agent process that sent ``prev``. Each agent process
    counts ``seq`` from 1: a restarted agent (new ports, or a sequence far behind) is not late, or
    the proxy would ignore it until its count passed the dead process's."""
    if prev.agent_id != msg.agent_id or not msg.seq or msg.seq >= prev.seq:
        return False
    same_process = (prev.agent_url, prev.control_address, prev.transport_address) == (
        msg.agent_url, msg.control_address, msg.transport_address)
    return same_process and prev.seq - msg.seq < RESTART_SEQ_GAP
