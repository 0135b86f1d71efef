"""The tiered KV chunk store: L1 slabs in shared memory, then local disk, then Redis.

``ChunkStore`` (``pdx.store.store``) is the facade the agent owns; ``attach``
(``pdx.store.pool``) is what another process (the engine's connector) calls to
map the L1 pool and read or write chunks in place. Eviction policies and lower
tiers are chosen by name through ``EVICTION_POLICIES`` and ``TIERS``; the Redis
tier imports redis-py only when it is enabled. See docs/store.md.
"""

from pdx.store.eviction import EVICTION_POLICIES, EvictionPolicy, make_policy
from pdx.store.metrics import StoreMetrics
from pdx.store.pool import AttachedPool, SlabPool, attach
from pdx.store.store import ChunkStore
from pdx.store.tier import TIERS, LowerTier
from pdx.store.types import (
    ChunkInfo,
    ChunkMeta,
    LeaseId,
    LookupResult,
    Pin,
    Reservation,
    ReservationId,
    StoreStats,
    Tier,
)

__all__ = [
    "EVICTION_POLICIES",
    "TIERS",
    "AttachedPool",
    "ChunkInfo",
    "ChunkMeta",
    "ChunkStore",
    "EvictionPolicy",
    "LeaseId",
    "LookupResult",
    "LowerTier",
    "Pin",
    "Reservation",
    "ReservationId",
    "SlabPool",
    "StoreMetrics",
    "StoreStats",
    "Tier",
    "attach",
    "make_policy",
]
