"""Peer-to-peer reuse: which agent to name in a hint, and whether fetching beats recomputing.

The routing policy picks the worker for each half of a request by reuse *and* load, so the
worker it picks sometimes holds less of the prompt's prefix than another agent does: the holder
is busy, or it is a decode worker that loaded the prefix for an earlier turn while the new
request is prefilled elsewhere. ``PeerReuse.hint(request, target)`` then finds the agent holding
the longest leading run of the prompt's chunks (its announced key summary, or the proxy's own
hints of what it sent there) and, when the **cost model** says that fetching what the target
lacks is cheaper than computing it, returns a ``Hint`` naming that agent's peer address and how
many leading chunks it holds. The flow puts it into the request's ``kv_transfer_params.pdx.hint``;
the target's connector fetches the chunks through its own agent over the peer plane (the holder
grants them through its usual trust model: a session opened with the deployment secret, pins for
that session only, and only to agents registered with the same proxy).

The cost model (``PeerCost``), for the ``n`` chunks the holder has beyond the target:

* fetch: ``fetch_fixed_ms + bytes / link bandwidth``, with ``bytes = n * chunk_tokens *
  bytes_per_token`` (configured, or the holder's announced pool bytes per chunk);
* recompute: ``n * chunk_tokens / prefill rate``, the rate measured by the proxy (an exponential
  average over its prefill calls: tokens the worker had to compute / the call's duration), or the
  configured one until a measurement exists.

Event-loop thread only, like the registry; microseconds per call (one held-prefix walk per
worker with an agent, as the policies do).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pdx.config import PeerReuseConfig
from pdx.scheduler.policies import RouteRequest
from pdx.scheduler.registry import Worker, WorkerRegistry

#: bytes per token assumed when neither the config nor an announcement tells (Llama-3-8B, 16 bits)
DEFAULT_BYTES_PER_TOKEN = 128 * 1024
#: prefill calls that computed fewer tokens than this do not update the measured rate (their time
#: is mostly fixed overhead)
MIN_RATE_TOKENS = 256
#: weight of one measurement in the prefill-rate average
RATE_ALPHA = 0.2
#: version of the ``kv_transfer_params.pdx`` block the hint travels in; equals
#: ``pdx.connector.params.PARAMS_VERSION`` (a unit test checks; the proxy does not import the connector)
PARAMS_VERSION = 2


@dataclass(frozen=True)
class Hint:
    """Ask the target to fetch the first ``chunks`` chunks from the agent at ``agent``."""

    agent: str  # the holder's peer address (as announced: ``transport_address``)
    chunks: int  # leading chunks the holder holds
    agent_id: str
    worker_id: str
    extra_chunks: int  # of those, how many the target lacks

    def to_dict(self) -> dict[str, object]:
        """The ``kv_transfer_params.pdx.hint`` object (``pdx.connector.params.PeerHint``)."""
        return {"agent": self.agent, "chunks": self.chunks, "agent_id": self.agent_id}

    def params(self, remote_decode: bool = False) -> dict[str, object]:
        """The whole ``kv_transfer_params`` carrying this hint (``remote_decode``: a P/D prefill)."""
        out: dict[str, object] = {"do_remote_decode": True} if remote_decode else {}
        out["pdx"] = {"v": PARAMS_VERSION, "hint": self.to_dict()}
        return out


@dataclass(frozen=True)
class PeerCost:
    """Estimated seconds to fetch or to recompute ``tokens`` prompt tokens (see the module docstring)."""

    link_gbps: float
    fetch_fixed_s: float
    prefill_tokens_per_s: float

    def fetch_s(self, nbytes: int) -> float:
        return self.fetch_fixed_s + nbytes * 8 / (self.link_gbps * 1e9)

    def recompute_s(self, tokens: int) -> float:
        return tokens / self.prefill_tokens_per_s

    def fetch_wins(self, tokens: int, nbytes: int) -> bool:
        return self.fetch_s(nbytes) < self.recompute_s(tokens)


def bytes_per_token(w: Worker, configured: int) -> int:
    """KV bytes per token of ``w``'s chunks: configured, else from its announcement (pool bytes
    in use / chunks held / chunk tokens: every slab is one full chunk), else the default."""
    if configured:
        return configured
    a = w.announcement
    if a is not None and a.keys is not None and a.keys.count and a.load.pool_used_bytes and a.chunk_tokens:
        return max(1, a.load.pool_used_bytes // (a.keys.count * a.chunk_tokens))
    return DEFAULT_BYTES_PER_TOKEN


def held_by_agent(w: Worker, keys: Sequence[bytes]) -> int:
    """Leading ``keys`` that ``w``'s own agent holds (its key summary, or what this proxy sent
    there): unlike ``Worker.held_prefix``, not counting shared tiers, which a peer fetch would not
    read from that agent's pool."""
    summary = w.announcement.keys if w.announcement else None
    n = 0
    for k in keys:
        if not (k in w.hints or (summary is not None and k in summary)):
            break
        n += 1
    return n


class PeerReuse:
    """Peer hints for one proxy (see the module docstring)."""

    def __init__(self, cfg: PeerReuseConfig, registry: WorkerRegistry,
                 count: Callable[[str, int], None] | None = None) -> None:
        self.cfg = cfg
        self.registry = registry
        self._count = count or (lambda _decision, _chunks: None)
        self.prefill_rate = 0.0  # measured tokens/s; 0 until the first measurement

    def cost(self) -> PeerCost:
        rate = self.prefill_rate or self.cfg.prefill_tokens_per_s
        return PeerCost(self.cfg.link_gbps, self.cfg.fetch_fixed_ms / 1e3, rate)

    def observe_prefill(self, computed_tokens: int, seconds: float) -> None:
        """A prefill call computed ``computed_tokens`` in ``seconds``: update the measured rate."""
        if computed_tokens < MIN_RATE_TOKENS or seconds <= 0:
            return
        rate = computed_tokens / seconds
        self.prefill_rate = rate if not self.prefill_rate else \
            (1 - RATE_ALPHA) * self.prefill_rate + RATE_ALPHA * rate

    def hint(self, req: RouteRequest, target: Worker) -> Hint | None:
        """The hint for sending ``req`` to ``target``, or None (nobody holds more, or recomputing
        is cheaper). Counts the decision (``fetch``/``recompute``) when a holder exists."""
        if not self.cfg.enabled or req.token_ids is None:
            return None
        space = target.key_space
        keys = req.keys(space)
        if not keys:
            return None
        mine = target.held_prefix(keys)
        now = self.registry.clock()
        best: Worker | None = None
        best_n = mine + self.cfg.min_chunks - 1
        for w in self.registry.all():
            a = w.announcement
            if w is target or a is None or not a.transport_address or not w.available(now) \
                    or w.key_space != space:
                continue
            n = held_by_agent(w, keys)
            if n > best_n or (best is not None and n == best_n and w.load_requests < best.load_requests):
                best, best_n = w, n
        if best is None or best.announcement is None:
            return None
        extra = best_n - mine
        tokens = extra * space.chunk_tokens
        nbytes = tokens * bytes_per_token(best, self.cfg.bytes_per_token)
        if not self.cost().fetch_wins(tokens, nbytes):
            self._count("recompute", extra)
            return None
        self._count("fetch", extra)
        return Hint(best.announcement.transport_address, best_n, best.announcement.agent_id, best.id, extra)
