"""The discrete-event simulation of a P/D fleet over a trace, driving pdx's real routing code.

What is real: the proxy's ``WorkerRegistry`` (on a simulated clock), the routing policy
(``pdx.scheduler.policies.make_policy``: the same ``route`` / ``observe`` calls, in the same
order, as ``proxy/flow.py``), the agents' announcements (``AgentAnnouncement`` with a real
``KeySummary`` of each worker's L1 every ``heartbeat_s``), the store's eviction policies
(``pdx.store.eviction``) and the chunk keys (``pdx.keys.chunk_keys``, one "token" per trace
block: the hash ids are the token ids of a key space whose chunk is one block).

What is modelled (``pdx.sim.cost``): a prefill worker serves its queue one request at a time
(loads the cached prefix from its tiers, computes the rest); the prompt's KV then moves to the
decode worker, which adds the request to its running batch; the first token comes one decode
step later. TTFT = queueing + load + compute + transfer + one step. A request the policy sends
straight to a decode worker (``skip_prefill``) loads and computes there.

Single-threaded and deterministic for a given trace and settings. ``Simulation.run`` returns a
``SimResult``; nothing here prints.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pdx.config import CacheAwareConfig, ProxyWorkerConfig
from pdx.scheduler.messages import AgentAnnouncement, AgentLoad, WorkerRole
from pdx.scheduler.policies import RouteRequest, make_policy
from pdx.scheduler.registry import KeySpace, Side, Worker, WorkerRegistry
from pdx.sim.cost import CostModel
from pdx.sim.fleet import DISK, L1, SHARED, LRUTier, SimStore
from pdx.trace import Oracle, TraceRequest

#: the key space of simulated agents: one chunk = one trace block
FINGERPRINT = "pdx-sim"
SPACE = KeySpace(FINGERPRINT, 1)


@dataclass(frozen=True)
class SimConfig:
    """One simulated fleet. Capacities are bytes of KV per worker (disk, L1) or in all (shared)."""

    prefill: int = 16
    decode: int = 16
    policy: str = "cache_aware"
    l1_bytes: int = 64 << 30
    disk_bytes: int = 0
    shared_bytes: int = 0
    eviction: str = "lru"
    block_tokens: int = 512
    heartbeat_s: float = 1.0
    decode_l1: bool = True  # decode agents keep the chunks they receive in their L1
    settings: CacheAwareConfig = field(default_factory=CacheAwareConfig)


@dataclass
class _Job:
    req: TraceRequest
    rreq: RouteRequest
    keys: list[bytes]
    arrival: float
    prefill: Worker | None
    decode: Worker
    cost_p: int
    cost_d: int
    queued_s: float = 0.0
    hit_tiers: list[str] = field(default_factory=list)


@dataclass
class _State:
    """A simulated worker: its store, its queue (prefill) or batch (decode), what it did."""

    worker: Worker
    store: SimStore
    queue: deque[_Job] = field(default_factory=deque)
    running: _Job | None = None
    batch: int = 0
    busy_s: float = 0.0
    decode_tokens: int = 0
    seq: int = 0


@dataclass
class SimResult:
    """What one run measured. Token counts are prompt tokens."""

    config: SimConfig
    requests: int
    prompt_tokens: int
    hit_tokens: int
    oracle_tokens: int
    tier_tokens: dict[str, int]
    ttft_s: list[float]
    queue_s: list[float]
    prefill_busy_s: list[float]
    decode_work: list[int]
    duration_s: float
    reasons: dict[str, int]
    evictions: int

    @property
    def hit_ratio(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def oracle_hit_ratio(self) -> float:
        return self.oracle_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def prefill_imbalance(self) -> float:
        return _imbalance(self.prefill_busy_s)

    @property
    def decode_imbalance(self) -> float:
        return _imbalance([float(x) for x in self.decode_work])

    @property
    def load_imbalance(self) -> float:
        """max/mean busy time, the worse of the two sides."""
        return max(self.prefill_imbalance, self.decode_imbalance)

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.config.policy, "eviction": self.config.eviction,
            "prefill": self.config.prefill, "decode": self.config.decode,
            "l1_bytes": self.config.l1_bytes, "disk_bytes": self.config.disk_bytes,
            "shared_bytes": self.config.shared_bytes, "requests": self.requests,
            "hit_ratio": self.hit_ratio, "oracle_hit_ratio": self.oracle_hit_ratio,
            "prefill_imbalance": self.prefill_imbalance, "decode_imbalance": self.decode_imbalance,
            "ttft_p50_s": percentile(self.ttft_s, 50), "ttft_p90_s": percentile(self.ttft_s, 90),
            "ttft_p99_s": percentile(self.ttft_s, 99), "queue_p50_s": percentile(self.queue_s, 50),
            "queue_p99_s": percentile(self.queue_s, 99), "tier_tokens": dict(self.tier_tokens),
            "routes": dict(self.reasons), "evictions": self.evictions, "duration_s": self.duration_s,
        }


def _imbalance(xs: Sequence[float]) -> float:
    mean = sum(xs) / len(xs) if xs else 0.0
    return max(xs) / mean if mean > 0 else 1.0


def percentile(xs: Sequence[float], p: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


_ARRIVE, _PREFILL_DONE, _DECODE_DONE, _HEARTBEAT = range(4)


class Simulation:
    """See the module docstring. One instance per run."""

    def __init__(self, cfg: SimConfig, cost: CostModel) -> None:
        if cfg.prefill < 0 or cfg.decode < 1:
            raise ValueError("a fleet needs at least one decode worker and no negative counts")
        self.cfg = cfg
        self.cost = cost
        self.now = 0.0
        block_bytes = cfg.block_tokens * cost.kv_bytes_per_token
        static = [ProxyWorkerConfig(url=f"http://prefill-{i}.sim:8000", role="prefill", id=f"prefill-{i}")
                  for i in range(cfg.prefill)]
        static += [ProxyWorkerConfig(url=f"http://decode-{i}.sim:8000", role="decode", id=f"decode-{i}")
                   for i in range(cfg.decode)]
        self.registry = WorkerRegistry(static, heartbeat_timeout_s=max(5.0, 3 * cfg.heartbeat_s),
                                       hint_keys=cfg.settings.hint_keys, default_chunk_tokens=1,
                                       clock=lambda: self.now)
        self.policy = make_policy(cfg.policy, cfg.settings)
        self.shared = LRUTier(cfg.shared_bytes // block_bytes) if cfg.shared_bytes > 0 else None
        self.states: dict[str, _State] = {}
        for w in self.registry.all():
            l1 = cfg.l1_bytes // block_bytes
            if w.role is WorkerRole.DECODE and not cfg.decode_l1:
                l1 = 0
            self.states[w.id] = _State(w, SimStore(l1, cfg.eviction, cfg.disk_bytes // block_bytes, self.shared))
        self._events: list[tuple[float, int, int, Any]] = []
        self._seq = itertools.count()
        self._ttft: list[float] = []
        self._queue: list[float] = []
        self._tiers = {L1: 0, DISK: 0, SHARED: 0, "decode_local": 0, "computed": 0}
        self._hit = 0
        self._reasons: dict[str, int] = {}

    def _at(self, t: float, kind: int, payload: Any) -> None:
        heapq.heappush(self._events, (t, next(self._seq), kind, payload))

    # --- announcements -------------------------------------------------------------------------

    def _announce(self, st: _State) -> None:
        w = st.worker
        if w.role is WorkerRole.PREFILL:
            load = AgentLoad(requests=len(st.queue) + (st.running is not None),
                             tokens=sum(j.cost_p for j in st.queue) + (st.running.cost_p if st.running else 0))
        else:
            load = AgentLoad(requests=st.batch, tokens=w.inflight_tokens)
        st.seq += 1
        self.registry.announce(AgentAnnouncement(
            agent_id=w.id, role=w.role, engine_url=w.url, load=load, chunk_fingerprint=FINGERPRINT,
            chunk_tokens=1, keys=st.store.summary(), heartbeat_s=self.cfg.heartbeat_s, seq=st.seq,
            timestamp=self.now))

    # --- the request path ------------------------------------------------------------------------

    def _arrive(self, req: TraceRequest, index: int) -> None:
        bt = self.cfg.block_tokens
        ids = req.hash_ids[: req.full_blocks(bt)]
        rreq = RouteRequest(f"r{index}", req.input_length, max(1, req.output_length), token_ids=ids)
        keys = [bytes(k) for k in rreq.keys(SPACE)]
        route = self.policy.route(rreq, self.registry.candidates(Side.PREFILL),
                                  self.registry.candidates(Side.DECODE))
        self._reasons[route.reason] = self._reasons.get(route.reason, 0) + 1
        d = route.decode[0]
        p = route.prefill[0] if route.prefill else None
        job = _Job(req, rreq, keys, self.now, p, d, rreq.cost(Side.PREFILL), rreq.cost(Side.DECODE))
        if p is None:
            self._decode_only(job)
            return
        self.registry.begin(p, job.cost_p)
        st = self.states[p.id]
        st.queue.append(job)
        if st.running is None:
            self._start_prefill(st)

    def _start_prefill(self, st: _State) -> None:
        job = st.queue.popleft()
        st.running = job
        job.queued_s = self.now - job.arrival
        tiers = st.store.lookup(job.keys)
        job.hit_tiers = tiers
        service = self._load_and_compute(job, tiers)
        st.busy_s += service
        self._at(self.now + service, _PREFILL_DONE, st)

    def _load_and_compute(self, job: _Job, tiers: list[str]) -> float:
        bt = self.cfg.block_tokens
        t = 0.0
        for tier in (L1, DISK, SHARED):
            n = tiers.count(tier)
            if n:
                t += self.cost.load_s(tier, n * bt)
                self._tiers[tier] += n * bt
        hit = len(tiers) * bt
        computed = job.req.input_length - hit
        self._tiers["computed"] += computed
        self._hit += hit
        return t + self.cost.prefill_s(computed, hit)

    def _prefill_done(self, st: _State) -> None:
        job = st.running
        assert job is not None and job.prefill is not None
        st.running = None
        st.store.commit(job.keys, job.hit_tiers)
        self.registry.end(job.prefill, job.cost_p)
        self.policy.observe(job.rreq, job.prefill)
        if st.queue:
            self._start_prefill(st)
        transfer = self.cost.transfer_s(job.req.input_length)
        dst = self.states[job.decode.id]
        dst.store.commit(job.keys)  # the decode agent keeps what it received
        self._start_decode(job, dst, self.now + transfer)

    def _decode_only(self, job: _Job) -> None:
        st = self.states[job.decode.id]
        tiers = st.store.lookup(job.keys)
        before = self._tiers[L1]
        work = self._load_and_compute(job, tiers)
        # hits on the decode worker's own L1 are "decode_local": no prefill worker was involved
        self._tiers["decode_local"] += self._tiers[L1] - before
        self._tiers[L1] = before
        st.busy_s += work
        st.store.commit(job.keys, tiers)
        self._start_decode(job, st, self.now + work)

    def _start_decode(self, job: _Job, st: _State, ready: float) -> None:
        self.registry.begin(job.decode, job.cost_d)
        st.batch += 1
        step = self.cost.decode_step(st.batch)
        first = ready + step
        self._ttft.append(first - job.arrival)
        self._queue.append(job.queued_s)
        self.policy.observe(job.rreq, job.decode)
        out = max(1, job.req.output_length)
        st.decode_tokens += out
        self._at(first + (out - 1) * step, _DECODE_DONE, (st, job))

    def _decode_done(self, st: _State, job: _Job) -> None:
        st.batch -= 1
        self.registry.end(job.decode, job.cost_d)

    # --- the loop ----------------------------------------------------------------------------------

    def run(self, trace: Sequence[TraceRequest]) -> SimResult:
        if not trace:
            raise ValueError("empty trace")
        oracle = Oracle(self.cfg.block_tokens)
        t0 = trace[0].timestamp / 1000.0
        for st in self.states.values():
            self._announce(st)
        hb = self.cfg.heartbeat_s
        n = len(self.states)
        for i, st in enumerate(self.states.values()):  # staggered, as independent agents are
            self._at(hb * (i + 1) / n, _HEARTBEAT, st)
        next_req = 0
        last_arrival = (trace[-1].timestamp / 1000.0) - t0
        while True:
            arrival = trace[next_req].timestamp / 1000.0 - t0 if next_req < len(trace) else float("inf")
            if self._events and self._events[0][0] <= arrival:
                t, _, kind, payload = heapq.heappop(self._events)
                self.now = t
                if kind == _PREFILL_DONE:
                    self._prefill_done(payload)
                elif kind == _DECODE_DONE:
                    self._decode_done(*payload)
                elif kind == _HEARTBEAT:
                    self._announce(payload)
                    if t <= last_arrival or any(s.running or s.batch for s in self.states.values()):
                        self._at(t + hb, _HEARTBEAT, payload)
                continue
            if next_req >= len(trace):
                if not self._events:
                    break
                continue
            self.now = arrival
            req = trace[next_req]
            oracle.see(req)
            self._arrive(req, next_req)
            next_req += 1
        prefill_states = [s for s in self.states.values() if s.worker.role is WorkerRole.PREFILL]
        decode_states = [s for s in self.states.values() if s.worker.role is WorkerRole.DECODE]
        return SimResult(
            config=self.cfg, requests=len(trace), prompt_tokens=oracle.total_tokens,
            hit_tokens=self._hit, oracle_tokens=oracle.hit_tokens, tier_tokens=dict(self._tiers),
            ttft_s=self._ttft, queue_s=self._queue,
            prefill_busy_s=[s.busy_s for s in prefill_states] or [s.busy_s for s in decode_states],
            decode_work=[s.decode_tokens for s in decode_states], duration_s=self.now,
            reasons=dict(self._reasons), evictions=sum(s.store.evictions for s in self.states.values()))
