"""Prometheus metrics of one proxy, in its own ``CollectorRegistry`` (never the global one).

Updated from the event-loop thread on the request path (each update is a dict
look-up and an add: a few microseconds in all per request); ``/metrics`` renders
them. Worker gauges are filled at scrape time from the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _WorkerCollector(Collector):
    def __init__(self, describe: Callable[[], list[dict[str, Any]]]) -> None:
        self._describe = describe

    def collect(self) -> Iterable[GaugeMetricFamily]:
        up = GaugeMetricFamily("pdx_proxy_worker_up", "1 when the worker is in the pool",
                               labels=["worker", "role", "state"])
        inflight = GaugeMetricFamily("pdx_proxy_worker_inflight", "this proxy's requests on the worker",
                                     labels=["worker", "role"])
        for w in self._describe():
            up.add_metric([w["id"], w["role"], w["state"]],
                          1.0 if w["state"] in ("healthy", "unknown") else 0.0)
            inflight.add_metric([w["id"], w["role"]], float(w["inflight"]))
        yield up
        yield inflight


class ProxyMetrics:
    def __init__(self, describe_workers: Callable[[], list[dict[str, Any]]] | None = None) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("pdx_proxy_requests", "requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("pdx_proxy_request_seconds", "time from request to the end of the answer",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttfb = Histogram("pdx_proxy_first_byte_seconds",
                              "time from request to the first byte of the answer sent to the client",
                              ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.upstream_errors = Counter("pdx_proxy_upstream_errors",
                                       "failed calls to workers, by side and kind", ["side", "kind"],
                                       registry=r)
        self.retries = Counter("pdx_proxy_retries", "calls retried on another worker", ["side"],
                               registry=r)
        self.prefill_fallback = Counter("pdx_proxy_prefill_fallback",
                                        "requests whose decode worker computed the prompt because "
                                        "no prefill worker answered", registry=r)
        self.degraded = Counter("pdx_proxy_degraded",
                                "requests served without one half of the P/D pair: missing=decode "
                                "(a prefill worker served it whole), missing=prefill (the decode "
                                "worker computed the prompt)", ["missing"], registry=r)
        self.routes = Counter("pdx_proxy_routes", "routing decisions, by policy reason", ["reason"],
                              registry=r)
        self.cached_chunks = Counter("pdx_proxy_routed_cached_chunks",
                                     "prompt chunks the chosen worker already held", registry=r)
        self.prompt_chunks = Counter("pdx_proxy_routed_prompt_chunks",
                                     "full prompt chunks of cache-aware routed requests", registry=r)
        self.peer_hints = Counter(
            "pdx_proxy_peer_hints", "requests sent to a worker holding less of the prefix than another "
            "agent: decision=fetch (a hint named the holder) or recompute (the cost model said computing "
            "is cheaper)", ["decision"], registry=r)
        self.peer_hint_chunks = Counter(
            "pdx_proxy_peer_hint_chunks", "chunks the target lacked and the holder had, by decision",
            ["decision"], registry=r)
        self.disconnects = Counter("pdx_proxy_client_disconnects",
                                   "clients that went away before their answer was complete", registry=r)
        self.rejected = Counter("pdx_proxy_rejected", "requests refused before reaching a worker",
                                ["reason"], registry=r)
        self.inflight = Gauge("pdx_proxy_inflight", "requests being served", registry=r)
        self.queued = Gauge("pdx_proxy_queued", "requests waiting for a slot", registry=r)
        self.registrations = Counter("pdx_proxy_announcements", "agent announcements received",
                                     ["result"], registry=r)
        if describe_workers is not None:
            r.register(_WorkerCollector(describe_workers))
        # Label children cached: .labels() costs more than .inc().
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def count_request(self, endpoint: str, status: int, seconds: float | None = None) -> None:
        self._child(self.requests, endpoint, str(status)).inc()
        if seconds is not None:
            self._child(self.latency, endpoint).observe(seconds)

    def observe_ttfb(self, endpoint: str, seconds: float) -> None:
        self._child(self.ttfb, endpoint).observe(seconds)

    def count_degraded(self, missing: str) -> None:
        self._child(self.degraded, missing).inc()

    def count_peer_hint(self, decision: str, chunks: int) -> None:
        self._child(self.peer_hints, decision).inc()
        self._child(self.peer_hint_chunks, decision).inc(chunks)

    def count_route(self, reason: str) -> None:
        self._child(self.routes, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
