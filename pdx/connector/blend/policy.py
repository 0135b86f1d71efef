"""Which tokens the blend pass recomputes above its check layer.

``BlendOptions`` are per-request (``kv_transfer_params.pdx.blend``) with config defaults.
``select`` is called by the blend pass once, at the check layer, with the per-token deviation
between fresh and cached KV measured there.

Policies:

* ``hkvd_k`` / ``hkvd_v``: the ``r·N`` tokens whose K (or V) deviates most (CacheBlend's
  "high KV deviation" tokens);
* ``random``: ``r·N`` tokens drawn uniformly (seeded): the control that any claim about HKVD
  must beat;
* ``first_k``: the first ``ceil(r·len)`` tokens of every segment (EPIC's choice);
* ``r = 0``: nothing is recomputed, the cached KV is used as is (after re-rotation);
* ``r = 1``: every token is recomputed: the pass is a full prefill of the region.

Tokens without cached KV are always selected, on top of the ``r·N`` budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch

from pdx.connector.blend.errors import BlendRequestError


class Policy(str, Enum):
    HKVD_K = "hkvd_k"
    HKVD_V = "hkvd_v"
    RANDOM = "random"
    FIRST_K = "first_k"


@dataclass(frozen=True)
class BlendOptions:
    """How one request is blended."""

    #: fraction of the region's reusable tokens recomputed above the check layer, in [0, 1]
    recompute_ratio: float = 0.15
    #: layers 0..check_layer are computed for every token; deviation is measured at check_layer
    check_layer: int = 1
    policy: Policy = Policy.HKVD_K
    #: seed of the ``random`` policy
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.recompute_ratio <= 1.0:
            raise BlendRequestError(f"blend recompute_ratio must be in [0, 1], got {self.recompute_ratio}")
        if self.check_layer < 0:
            raise BlendRequestError(f"blend check_layer must be >= 0, got {self.check_layer}")
        if not isinstance(self.policy, Policy):
            object.__setattr__(self, "policy", parse_policy(self.policy))

    def checked(self, num_layers: int) -> BlendOptions:
        """Self, after checking ``check_layer`` against the model (``BlendRequestError``)."""
        if self.check_layer >= num_layers:
            raise BlendRequestError(f"blend check_layer {self.check_layer} is not a layer of this "
                                    f"{num_layers}-layer model")
        return self


def parse_policy(name: object) -> Policy:
    try:
        return Policy(str(name))
    except ValueError:
        raise BlendRequestError(f"unknown blend policy {name!r}; known: "
                                f"{', '.join(p.value for p in Policy)}") from None


def select(options: BlendOptions, deviation: torch.Tensor, cached: torch.Tensor,
           segment_of: torch.Tensor, segment_offset: torch.Tensor) -> torch.Tensor:
    """Indices (sorted, into the candidate tokens) to recompute above the check layer.

    ``deviation``: per-candidate deviation at the check layer (ignored by ``random`` and
    ``first_k``); ``cached``: bool, whether the token had cached KV; ``segment_of``: segment index
    per token; ``segment_offset``: position of the token inside its segment.
    """
    n = int(deviation.numel())
    r = options.recompute_ratio
    must = ~cached
    if r >= 1.0:
        return torch.arange(n)
    budget = math.ceil(r * int(cached.sum())) if r > 0 else 0
    pick = must.clone()
    if budget > 0:
        if options.policy in (Policy.HKVD_K, Policy.HKVD_V):
            score = deviation.to(torch.float64).masked_fill(must, -math.inf)
            pick[torch.topk(score, budget).indices] = True
        elif options.policy is Policy.RANDOM:
            gen = torch.Generator().manual_seed(options.seed)
            candidates = torch.nonzero(cached).flatten()
            order = torch.randperm(len(candidates), generator=gen)[:budget]
            pick[candidates[order]] = True
        else:  # FIRST_K: ceil(r * len) leading tokens of each segment
            for s in torch.unique(segment_of).tolist():
                member = segment_of == s
                k = math.ceil(r * int(member.sum()))
                pick |= member & (segment_offset < k)
    return torch.nonzero(pick).flatten()
