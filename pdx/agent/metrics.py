"""Prometheus metrics of one agent, in a registry of its own (shared with its store).

The HTTP endpoint serves ``registry`` on ``/metrics``: the store's series
(``pdx_store_*``, including expired leases and reservations) next to the
agent's (``pdx_agent_*``): control-plane latency per op, requests, bad frames,
transfers (jobs, chunks by outcome, bytes, duration), leases, peers, the engine.
Nothing is registered globally, so several agents in one process (tests) never
collide. Thread-safe.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from pdx.agent.protocol import Op

#: 10 µs .. 10 s: a lookup is tens of µs, a deferred wait up to the caller's timeout.
LATENCY_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1,
                   0.25, 1.0, 2.5, 10.0)
TRANSFER_BUCKETS = (1e-4, 1e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ControlStats(Collector):
    """Control-plane latency histogram (``pdx_agent_control_seconds``) and request counts
    (``pdx_agent_control_requests_total``) by op, kept in plain lists.

    Written only by the control-loop thread (``observe``: a bisect and two adds, a
    fraction of what prometheus-client's locked children cost on every request);
    turned into metric families at scrape time by ``collect`` on the HTTP thread.
    A scrape racing an update may see a count and a sum one request apart.
    """

    def __init__(self, ops: Sequence[str], buckets: Sequence[float]) -> None:
        self.ops = list(ops)
        self.buckets = list(buckets)
        n = len(self.ops)
        self._bins = [[0] * (len(self.buckets) + 1) for _ in range(n)]
        self._sums = [0.0] * n
        self._results = [[0, 0] for _ in range(n)]  # ok, error

    def observe(self, i: int, seconds: float, ok: bool) -> None:
        """Count one request of op index ``i`` (its position in ``ops``)."""
        self._bins[i][bisect.bisect_left(self.buckets, seconds)] += 1
        self._sums[i] += seconds
        self._results[i][0 if ok else 1] += 1

    def collect(self) -> Iterator[Metric]:
        hist = HistogramMetricFamily(
            "pdx_agent_control_seconds",
            "control-plane request handling time in the agent, by op (deferred ops until the reply)",
            labels=["op"])
        reqs = CounterMetricFamily("pdx_agent_control_requests", "control requests by op and result",
                                   labels=["op", "result"])
        for i, op in enumerate(self.ops):
            bins = list(self._bins[i])
            cum = list(itertools.accumulate(bins))
            buckets = [(repr(le), c) for le, c in zip(self.buckets, cum)] + [("+Inf", cum[-1])]
            hist.add_metric([op], buckets, self._sums[i])
            ok, err = self._results[i]
            reqs.add_metric([op, "ok"], ok)
            reqs.add_metric([op, "error"], err)
        yield hist
        yield reqs


class AgentMetrics:
    """The agent's series; ``registry`` also receives the store's."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.control = ControlStats([op.value for op in Op], LATENCY_BUCKETS)
        r.register(self.control)
        self.bad_frames = Counter(
            "pdx_agent_bad_frames",
            "control frames refused: framing (wrong frame count) or decode (bad msgpack, version, op, args)",
            ["reason"], registry=r)
        self.auth_failures = Counter("pdx_agent_peer_auth_failures",
                                     "peer requests refused by the shared-secret check", registry=r)
        self.peer_denied = Counter(
            "pdx_agent_peer_denied", "peer requests refused: no valid session, outside the peer's grants, "
            "over its quota, or a key this agent did not ask for; by op", ["op"], registry=r)
        self.unknown_peers = Counter(
            "pdx_agent_unknown_peer_fetches", "fetches/sends refused because the peer is neither registered "
            "with the same proxy nor listed in transport.peers (the engine recomputes)", registry=r)
        self.jobs = Counter("pdx_agent_transfer_jobs", "fetch/send jobs finished, by kind and result "
                            "(ok: every chunk usable, partial, failed)", ["kind", "result"], registry=r)
        self.chunks = Counter("pdx_agent_transfer_chunks", "chunks of finished jobs, by kind and status",
                              ["kind", "status"], registry=r)
        self.bytes = Counter("pdx_agent_transfer_bytes", "payload bytes moved by jobs", ["kind"], registry=r)
        self.transfer_seconds = Histogram("pdx_agent_transfer_seconds", "duration of fetch/send jobs",
                                          ["kind"], buckets=TRANSFER_BUCKETS, registry=r)
        self.loaded_tokens = Counter(
            "pdx_agent_loaded_tokens", "prompt tokens of the chunks this agent handed its engine for a load, by "
            "source: l1 / disk / nixl (its own store, by the tier that held the chunk), shared (promoted from a "
            "shared tier: redis, mooncake, s3), pd (fetched from the prefill agent of a P/D pair), "
            "peer (fetched from another agent on the proxy's hint: peer-to-peer reuse)",
            ["source"], registry=r)
        self.jobs_active = Gauge("pdx_agent_transfer_jobs_active", "jobs queued or running", registry=r)
        self.leases_granted = Counter("pdx_agent_leases_granted", "pins granted, by origin (local, peer)",
                                      ["origin"], registry=r)
        self.leases_released = Counter(
            "pdx_agent_leases_released", "pins released by unpin or release(owner) (expiries: "
            "pdx_store_expired_leases)", registry=r)
        self.leases_active = Gauge("pdx_agent_leases_active", "pins currently held", registry=r)
        self.peers = Gauge("pdx_agent_peers", "peer agents this agent has a session with", registry=r)
        self.engine_up = Gauge("pdx_agent_engine_up", "1 while the supervised engine process runs",
                               registry=r)
        self.engine_restarts = Counter("pdx_agent_engine_restarts",
                                       "engine restarts after an unexpected exit", registry=r)
        self.registrations = Counter("pdx_agent_engine_registrations",
                                     "register_engine calls, by outcome (created, attached, refused)",
                                     ["outcome"], registry=r)
        self.announcements = Counter("pdx_agent_announcements", "announcements to the proxy, by result",
                                     ["result"], registry=r)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's current value (0 if never set): for tests and the bench."""
        v = self.registry.get_sample_value(name, labels or {})
        return 0.0 if v is None else v
