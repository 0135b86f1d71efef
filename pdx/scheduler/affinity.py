"""``prefix_affinity``: weigh expected reuse against load, with a load bound and two random choices.

Where ``cache_aware`` prefers the longest cached prefix until a worker has ``max_imbalance``
more requests than the least loaded one, this policy prices both in one unit, tokens of prefill
work, as the better gateways do:

1. for each prefill candidate ``w``: ``held(w)`` = leading chunks of the prompt it holds (its
   agent's key summary, the proxy's hints), and its **expected work** ``load_tokens(w) +
   prompt_tokens - held(w) * chunk_tokens``: what is queued there plus what this prompt would
   still compute there;
2. **load bound** (consistent hashing with bounded loads): a worker whose outstanding tokens
   exceed ``bound_factor`` x the mean (plus this prompt) is not a candidate, whatever it holds;
3. **power of two choices**: among the workers within the bound, compare the one with the
   longest held prefix (the affinity choice; ties to the less loaded) with two others drawn at
   random (deterministic per policy instance), and take the least expected work. Random pairs
   spread load like ``least_loaded`` does without herding every request onto the same idle
   worker between two load updates.

Decode: ``skip_prefill`` exactly as ``cache_aware`` (a decode worker holding every full chunk
serves the request alone), else least loaded. ``observe`` records hints like ``cache_aware``.
Cost per request: that of ``cache_aware`` (one held-prefix walk per worker) plus a few
arithmetic operations per worker.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from pdx.config import CacheAwareConfig
from pdx.scheduler.cache_aware import CacheAware
from pdx.scheduler.policies import Route, RouteRequest, pair
from pdx.scheduler.registry import Side, Worker

#: a worker over this many times the mean outstanding tokens is out of the running
BOUND_FACTOR = 1.25
#: how far (in prompts) a worker's recent work may exceed the bound
RECENT_SLACK = 0.25
#: the recent-work window, in requests per worker
WINDOW_PER_WORKER = 8
#: requests remembered between routing and the prefill's answer
MAX_TRACKED = 65536


class PrefixAffinity(CacheAware):
    name = "prefix_affinity"
    needs_tokens = True

    def __init__(self, settings: CacheAwareConfig | None = None, *, seed: int = 0,
                 bound_factor: float = BOUND_FACTOR) -> None:
        super().__init__(settings)
        self._rng = random.Random(seed)
        self.bound_factor = bound_factor
        self._recent: dict[str, float] = {}  # worker id -> prompt tokens it computed lately (decayed)
        self._seen = 0  # requests routed (the recent-work bound waits for half a window)
        self._pending: dict[str, int] = {}  # worker id -> tokens its routed, unanswered requests compute
        self._routed: dict[str, tuple[str, int]] = {}  # request id -> (prefill worker id, tokens)

    def observe(self, req: RouteRequest, worker: Worker) -> None:
        super().observe(req, worker)
        got = self._routed.get(req.request_id)
        if got is not None and got[0] == worker.id:  # its prefill answered
            del self._routed[req.request_id]
            self._pending[worker.id] = max(0, self._pending.get(worker.id, 0) - got[1])

    def _account(self, workers: Sequence[Worker], chosen: Worker, computed: int) -> None:
        """Decay every worker's recent work by one step of a window of ``WINDOW_PER_WORKER`` x
        workers requests, then add what ``chosen`` will compute for this request."""
        keep = 1.0 - 1.0 / (WINDOW_PER_WORKER * len(workers))
        recent = self._recent
        for w in workers:
            recent[w.id] = recent.get(w.id, 0.0) * keep
        recent[chosen.id] += max(0, computed)
        if len(recent) > 4 * len(workers):  # forget workers that left
            ids = {w.id for w in workers}
            self._recent = {k: v for k, v in recent.items() if k in ids}

    def route(self, req: RouteRequest, prefill: Sequence[Worker], decode: Sequence[Worker]) -> Route:
        decode_order = self.by_load(decode, Side.DECODE)
        if req.token_ids is None:
            return pair(self.by_load(prefill, Side.PREFILL), decode_order, "least_loaded")
        if self.settings.skip_prefill and decode:
            floor = min(w.load_requests for w in decode)
            for w in decode_order:
                keys = req.keys(w.key_space)
                if keys and w.load_requests <= floor + self.settings.max_imbalance \
                        and w.held_prefix(keys) == len(keys):
                    rest = [d for d in decode_order if d is not w]
                    return Route((), (w, *rest), "skip_prefill", len(keys), len(keys))
        if not prefill:
            return pair([], decode_order, "no_prefill_workers")

        order = self.rotated(prefill, Side.PREFILL)  # ties rotate, as in least_loaded
        n = len(order)
        loads = [w.load_tokens for w in order]
        held = [w.held_prefix(req.keys(w.key_space)) for w in order]
        # queued work is what those requests will compute, not their whole prompts: a worker whose
        # queue holds cached requests is not as busy as its outstanding tokens say
        pending = [min(self._pending.get(w.id, 0), w.load_tokens) if w.load_requests else 0 for w in order]
        work = [queued + req.prompt_tokens - h * w.key_space.chunk_tokens
                for w, queued, h in zip(order, pending, held)]
        recent = [self._recent.get(w.id, 0.0) for w in order]
        bound_now = self.bound_factor * (sum(loads) + req.prompt_tokens) / n
        # one request above the share is always allowed, so a quiet fleet keeps its affinity
        bound_recent = self.bound_factor * sum(recent) / n + RECENT_SLACK * req.prompt_tokens
        # the recent-work bound waits for half a window of requests (a fresh fleet keeps its
        # affinity), and never keeps a request from a worker it adds no prefill work to
        self._seen += 1
        if self._seen < WINDOW_PER_WORKER * n // 2:
            bound_recent = float("inf")
        within = [i for i in range(n) if loads[i] <= bound_now
                  and (recent[i] <= bound_recent or work[i] == pending[i])] \
            or [min(range(n), key=lambda i: (loads[i], recent[i]))]
        affinity = max(within, key=lambda i: (held[i], -loads[i]))
        picks = {affinity}
        if len(within) > 1:
            picks.update(self._rng.sample(within, min(2, len(within))))
        best = min(picks, key=lambda i: (work[i], loads[i]))
        computed = max(0, work[best] - pending[best])
        self._account(order, order[best], computed)
        self._pending[order[best].id] = pending[best] + computed
        self._routed[req.request_id] = (order[best].id, computed)
        while len(self._routed) > MAX_TRACKED:  # answers that never came (failures): forget the oldest
            self._routed.pop(next(iter(self._routed)))
        reason = "cache_hit" if held[best] else ("imbalance" if max(held) else "cache_miss")
        others = sorted((i for i in range(len(order)) if i != best), key=lambda i: (work[i], loads[i]))
        total = len(req.keys(order[best].key_space))
        return pair([order[best], *(order[i] for i in others)], decode_order, reason, held[best], total)
