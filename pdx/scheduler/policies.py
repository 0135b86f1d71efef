"""Routing policies: for one request, which prefill worker(s) and which decode worker(s).

The proxy's flow calls ``policy.route(request, prefill_candidates, decode_candidates)``
on its event-loop thread for every request; it must not block (microseconds:
no I/O, no tokenizing; a policy that needs token ids says so with
``needs_tokens`` and the flow fills ``RouteRequest.token_ids`` first). The
result lists workers in order of preference: the flow tries the first and falls
back to the next ones on failure. An empty prefill list means "skip prefill,
the decode worker computes (or already holds) the prompt".

After a call to a worker succeeds, the flow calls ``policy.observe(request,
worker)`` so a policy can learn (``cache_aware`` remembers which keys went where).

Policies are chosen by name through ``POLICIES`` (``pdx.registry.Registry``).
Not thread-safe: one policy instance per proxy event loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from pdx.config import CacheAwareConfig
from pdx.keys import ChunkKey, chunk_keys
from pdx.registry import Registry
from pdx.scheduler.registry import KeySpace, Side, Worker


@dataclass(eq=False)
class RouteRequest:
    """What a policy sees of one request (built by the proxy's flow)."""

    request_id: str
    prompt_tokens: int  # exact when token_ids is set, else an estimate
    max_tokens: int
    token_ids: Sequence[int] | None = None
    #: the ``cache_salt`` the workers will see (the tenant's): keys are salted like the connector's
    cache_salt: str = ""
    _keys: dict[KeySpace, list[ChunkKey]] = field(default_factory=dict, repr=False)

    def keys(self, space: KeySpace) -> list[ChunkKey]:
        """The prompt's chunk keys in ``space`` (computed once per space; needs ``token_ids``)."""
        got = self._keys.get(space)
        if got is None:
            if self.token_ids is None:
                got = []
            else:
                got = chunk_keys(self.token_ids, space.fingerprint, space.chunk_tokens, space.namespace,
                                 salt=self.cache_salt)
            self._keys[space] = got
        return got

    def cost(self, side: Side) -> int:
        """Tokens this request adds to a worker's outstanding work on ``side``."""
        return self.prompt_tokens if side is Side.PREFILL else self.prompt_tokens + self.max_tokens


@dataclass(frozen=True)
class Route:
    """A policy's answer. ``prefill`` empty = skip prefill. ``decode`` has at least one worker."""

    prefill: tuple[Worker, ...]
    decode: tuple[Worker, ...]
    reason: str
    cached_chunks: int = 0  # prompt chunks the first-choice worker already holds
    total_chunks: int = 0  # full chunks of the prompt (0 when not computed)


class RoutingPolicy(ABC):
    """Base of every policy; see the module docstring for the contract."""

    name: ClassVar[str] = ""
    needs_tokens: ClassVar[bool] = False

    def __init__(self, settings: CacheAwareConfig | None = None) -> None:
        self.settings = settings or CacheAwareConfig()
        self._turn = {Side.PREFILL: 0, Side.DECODE: 0}

    @abstractmethod
    def route(self, req: RouteRequest, prefill: Sequence[Worker],
              decode: Sequence[Worker]) -> Route:
        """Order the candidates; ``decode`` is never empty (the flow checks)."""

    def observe(self, req: RouteRequest, worker: Worker) -> None:  # noqa: B027 - optional hook
        """``worker`` just served ``req`` (prefill answered, or decode sent its first byte)."""

    # --- helpers shared by the policies ----------------------------------------------------

    def _next_turn(self, side: Side) -> int:
        t = self._turn[side]
        self._turn[side] = t + 1
        return t

    def rotated(self, workers: Sequence[Worker], side: Side) -> list[Worker]:
        """``workers`` starting at the next round-robin position."""
        n = len(workers)
        if n <= 1:
            return list(workers)
        start = self._next_turn(side) % n
        return [*workers[start:], *workers[:start]]

    def by_load(self, workers: Sequence[Worker], side: Side) -> list[Worker]:
        """Least loaded first. Prefill cost grows with prompt tokens, so prefill compares tokens
        first; a decode step's cost grows with the batch, so decode compares requests first.
        Ties rotate, so equal workers share the load."""
        ws = self.rotated(workers, side)
        if side is Side.PREFILL:
            return sorted(ws, key=lambda w: (w.load_tokens, w.load_requests))
        return sorted(ws, key=lambda w: (w.load_requests, w.load_tokens))


def pair(prefill: list[Worker], decode: list[Worker], reason: str, cached: int = 0,
         total: int = 0) -> Route:
    """Build a ``Route``, keeping a ``both`` worker from being its own prefill worker.

    When the first decode choice is also the first prefill choice, another prefill
    worker goes first; if there is none, prefill is skipped (the worker would only
    send KV to itself).
    """
    if prefill and decode and prefill[0] is decode[0]:
        others = [w for w in prefill if w is not decode[0]]
        if not others:
            return Route((), tuple(decode), reason + "+same_worker", cached, total)
        prefill = [*others, decode[0]]
    return Route(tuple(prefill), tuple(decode), reason, cached, total)


class RoundRobin(RoutingPolicy):
    """Each side in turn, ignoring load and cache."""

    name = "round_robin"

    def route(self, req: RouteRequest, prefill: Sequence[Worker], decode: Sequence[Worker]) -> Route:
        return pair(self.rotated(prefill, Side.PREFILL), self.rotated(decode, Side.DECODE), self.name)


class LeastLoaded(RoutingPolicy):
    """Fewest outstanding tokens (prefill) / requests (decode), counting this proxy's requests
    and, when an agent reports a higher figure (other proxies), the agent's."""

    name = "least_loaded"

    def route(self, req: RouteRequest, prefill: Sequence[Worker], decode: Sequence[Worker]) -> Route:
        return pair(self.by_load(prefill, Side.PREFILL), self.by_load(decode, Side.DECODE), self.name)


POLICIES: Registry[type[RoutingPolicy]] = Registry("routing policy")
POLICIES.add("round_robin", "pdx.scheduler.policies:RoundRobin")
POLICIES.add("least_loaded", "pdx.scheduler.policies:LeastLoaded")
POLICIES.add("cache_aware", "pdx.scheduler.cache_aware:CacheAware")
POLICIES.add("prefix_affinity", "pdx.scheduler.affinity:PrefixAffinity")


def make_policy(name: str, settings: CacheAwareConfig | None = None) -> RoutingPolicy:
    """The policy registered as ``name``; raises ``UnknownName`` listing the known ones."""
    return POLICIES.get(name)(settings)
