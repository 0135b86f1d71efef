"""Prometheus metrics of one store, in a registry of its own.

Each ``ChunkStore`` owns a ``StoreMetrics`` whose ``registry`` the agent serves on
``/metrics``; nothing is registered globally, so two stores in one process (tests,
benchmarks) never collide. Counters are pre-bound per label set so the hot paths
pay one increment, not a label lookup. Usage gauges are read from callbacks at
scrape time and cost nothing in between.

Thread-safe (prometheus-client counters carry their own locks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge

from pdx.store.types import Tier

OPS = ("lookup", "get")


class StoreMetrics:
    """Counters and gauges of the store; ``registry`` is what a ``/metrics`` endpoint exposes."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        tier_op = ["tier", "op"]
        hits = Counter("pdx_store_hits", "chunks found in a tier, by operation", tier_op, registry=r)
        hit_tokens = Counter("pdx_store_hit_tokens", "tokens of the chunks found in a tier",
                             tier_op, registry=r)
        misses = Counter("pdx_store_misses", "chunks asked of a tier that it did not hold",
                         tier_op, registry=r)
        miss_tokens = Counter("pdx_store_miss_tokens", "tokens of the chunks a tier did not hold",
                              tier_op, registry=r)
        requests = Counter(
            "pdx_store_requests",
            "lookups and gets by outcome: hit (every chunk present), partial (a leading run), miss",
            ["op", "result"], registry=r)
        bytes_in = Counter("pdx_store_bytes_in", "payload bytes written into a tier", ["tier"], registry=r)
        bytes_out = Counter("pdx_store_bytes_out", "payload bytes read out of a tier", ["tier"], registry=r)
        evictions = Counter("pdx_store_evictions", "chunks evicted from a tier", ["tier"], registry=r)
        integrity = Counter("pdx_store_integrity_failures",
                            "chunks whose checksum or header did not match (served as misses)",
                            ["tier"], registry=r)
        errors = Counter("pdx_store_tier_errors",
                         "I/O or connection failures of a tier (each a miss or a dropped write)",
                         ["tier"], registry=r)
        drops = Counter("pdx_store_write_drops",
                        "write-behind chunks dropped: queue full, tier full or failing",
                        ["tier"], registry=r)
        lookup_late = Counter("pdx_store_lookup_timeouts",
                              "remote lookups a tier did not answer within its lookup_timeout_s "
                              "(a miss there; the other tiers still answered)", ["tier"], registry=r)
        self.expired_leases = Counter("pdx_store_expired_leases",
                                      "pins released because their lease ran out", registry=r)
        self.expired_reservations = Counter(
            "pdx_store_expired_reservations", "reservations reclaimed because nobody committed them",
            registry=r)
        self.capacity_errors = Counter("pdx_store_capacity_errors",
                                       "reservations refused: every slab pinned or reserved", registry=r)
        self.used_bytes = Gauge("pdx_store_used_bytes", "bytes held by a tier (disk: files with headers)", ["tier"],
                                registry=r)
        self.capacity_bytes = Gauge("pdx_store_capacity_bytes", "bytes a tier may hold", ["tier"],
                                    registry=r)
        self.chunks = Gauge("pdx_store_chunks", "chunks held by a tier", ["tier"], registry=r)
        self.pinned_slabs = Gauge("pdx_store_pinned_slabs", "L1 slabs held by at least one lease",
                                  registry=r)
        self.reserved_slabs = Gauge("pdx_store_reserved_slabs", "L1 slabs reserved, not yet committed",
                                    registry=r)

        tiers = [t.value for t in Tier]
        self.hits = {(t, op): hits.labels(t, op) for t in tiers for op in OPS}
        self.hit_tokens = {(t, op): hit_tokens.labels(t, op) for t in tiers for op in OPS}
        self.misses = {(t, op): misses.labels(t, op) for t in tiers for op in OPS}
        self.miss_tokens = {(t, op): miss_tokens.labels(t, op) for t in tiers for op in OPS}
        self.requests = {(op, res): requests.labels(op, res) for op in OPS
                         for res in ("hit", "partial", "miss")}
        self.bytes_in = {t: bytes_in.labels(t) for t in tiers}
        self.bytes_out = {t: bytes_out.labels(t) for t in tiers}
        self.evictions = {t: evictions.labels(t) for t in tiers}
        self.integrity_failures = {t: integrity.labels(t) for t in tiers}
        self.tier_errors = {t: errors.labels(t) for t in tiers}
        self.write_drops = {t: drops.labels(t) for t in tiers}
        self.lookup_timeouts = {t: lookup_late.labels(t) for t in tiers}

    def bind_usage(self, tier: Tier, used: Callable[[], float], capacity: Callable[[], float],
                   chunks: Callable[[], float]) -> None:
        """Read a tier's usage from callbacks at scrape time."""
        self.used_bytes.labels(tier.value).set_function(used)
        self.capacity_bytes.labels(tier.value).set_function(capacity)
        self.chunks.labels(tier.value).set_function(chunks)

    def count(self, tier: str, op: str, hits: int, hit_tokens: int, misses: int, chunk_tokens: int) -> None:
        """Hits and misses of one tier in one operation (a missing chunk counts ``chunk_tokens``)."""
        if hits:
            self.hits[(tier, op)].inc(hits)
            self.hit_tokens[(tier, op)].inc(hit_tokens)
        if misses:
            self.misses[(tier, op)].inc(misses)
            self.miss_tokens[(tier, op)].inc(misses * chunk_tokens)

    def count_lookup(self, tiers: Sequence[Tier | None], prefix: int, searched: Sequence[Tier],
                     chunk_tokens: int) -> None:
        """A lookup's outcome: each searched tier is asked for what the faster ones lacked."""
        found = dict.fromkeys(Tier, 0)
        for t in tiers:
            if t is not None:
                found[t] += 1
        asked = len(tiers)
        for t in searched:
            hits = found[t]
            self.count(t.value, "lookup", hits, hits * chunk_tokens, asked - hits, chunk_tokens)
            asked -= hits
        self.request("lookup", prefix, len(tiers))

    def request(self, op: str, found: int, asked: int) -> None:
        if not asked:
            return
        result = "hit" if found == asked else "partial" if found else "miss"
        self.requests[(op, result)].inc()

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's current value (0 if never set): for tests and the bench."""
        v = self.registry.get_sample_value(name, labels or {})
        return 0.0 if v is None else v
