"""The blend pass (CacheBlend): KV for a prompt region assembled from cached segments, repaired.

Input: the region's token ids (positions ``0..N-1``), the exact KV of its first ``P`` tokens
(today's exact prefix reuse), and for the rest a list of spans, each with the KV of a cached
segment (computed after an anchor at some base position) or nothing. ``assemble`` re-rotates each
segment's K to the span's position (``pdx.connector.blend.rope``) and lays everything out per layer.
``blend_pass`` then:

1. computes layers ``0..c`` exactly for every token in ``[P, N)`` and keeps that fresh KV;
2. at the check layer ``c`` measures, per token, the deviation of fresh from cached K (or V) and
   selects the tokens to recompute (``pdx.connector.blend.policy``);
3. above ``c`` recomputes only the selected tokens, with an exact causal mask on absolute
   positions, over a KV that is fresh for selected tokens and cached for the others;
4. returns the whole region's KV per layer (the caller scatters it into the paged cache).

The exact prefix is never recomputed and its KV is returned unchanged. At ``r = 1`` the pass is a
full prefill of ``[P, N)`` after the prefix; at ``r = 0`` with every token cached it computes
nothing and returns the assembled KV (bit-exact when every delta is zero).

The KV it returns is approximate unless ``r = 1``: callers must never store it, or anything
computed on top of it, under exact prefix keys. Callers hold ``torch.no_grad``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pdx.connector.blend.errors import BlendError
from pdx.connector.blend.model import BlendModel, LayerKV, attend
from pdx.connector.blend.policy import BlendOptions, Policy, select


@dataclass(frozen=True)
class SegmentKV:
    """A cached segment: per-layer KV of its tokens, K after RoPE at positions ``base, base+1, ...``."""

    kv: list[LayerKV]
    base: int

    @property
    def num_tokens(self) -> int:
        return int(self.kv[0][0].shape[0])


@dataclass(frozen=True)
class Span:
    """Tokens ``[start, end)`` of the region and the cached segment for them (None: not cached)."""

    start: int
    end: int
    segment: SegmentKV | None = None


@dataclass
class Assembled:
    """The region's KV before repair: per layer ``[N, kv_heads, d]``, plus per-token facts."""

    kv: list[LayerKV]
    prefix_len: int
    cached: torch.Tensor  # bool [N]
    segment_of: torch.Tensor  # long [N]; -1 for the prefix
    segment_offset: torch.Tensor  # long [N]


@dataclass
class BlendResult:
    kv: list[LayerKV]
    #: region indices recomputed above the check layer
    recomputed: torch.Tensor
    #: per-token deviation at the check layer for tokens ``[P, N)`` (empty when nothing ran)
    deviation: torch.Tensor


def assemble(model: BlendModel, num_tokens: int, prefix: list[LayerKV] | None,
             spans: Sequence[Span]) -> Assembled:
    """Lay out the prefix KV and each span's re-rotated segment KV; ``BlendError`` on bad spans."""
    p = int(prefix[0][0].shape[0]) if prefix else 0
    shape = (num_tokens, model.num_kv_heads, model.head_dim)
    ref = prefix[0][0] if prefix else next(s.segment.kv[0][0] for s in spans if s.segment is not None)
    kv = [(torch.zeros(shape, dtype=ref.dtype), torch.zeros(shape, dtype=ref.dtype))
          for _ in range(model.num_layers)]
    cached = torch.zeros(num_tokens, dtype=torch.bool)
    seg_of = torch.full((num_tokens,), -1, dtype=torch.long)
    seg_off = torch.zeros(num_tokens, dtype=torch.long)
    if prefix:
        if len(prefix) != model.num_layers:
            raise BlendError(f"prefix KV has {len(prefix)} layers, the model {model.num_layers}")
        for layer, (k, v) in enumerate(prefix):
            kv[layer][0][:p] = k
            kv[layer][1][:p] = v
        cached[:p] = True
    at = p
    for i, s in enumerate(spans):
        if s.start != at or s.end <= s.start or s.end > num_tokens:
            raise BlendError(f"span {i} [{s.start}, {s.end}) does not continue the region at {at} "
                             f"(region of {num_tokens} tokens)")
        at = s.end
        seg_of[s.start:s.end] = i
        seg_off[s.start:s.end] = torch.arange(s.end - s.start)
        if s.segment is None:
            continue
        if s.segment.num_tokens != s.end - s.start or len(s.segment.kv) != model.num_layers:
            raise BlendError(f"span {i} has {s.end - s.start} tokens, its cached segment "
                             f"{s.segment.num_tokens} tokens / {len(s.segment.kv)} layers")
        delta = s.start - s.segment.base
        for layer, (k, v) in enumerate(s.segment.kv):
            kv[layer][0][s.start:s.end] = model.rope.rotate(k, delta)
            kv[layer][1][s.start:s.end] = v
        cached[s.start:s.end] = True
    if at != num_tokens:
        raise BlendError(f"spans end at {at}, the region at {num_tokens}")
    return Assembled(kv=kv, prefix_len=p, cached=cached, segment_of=seg_of, segment_offset=seg_off)


def blend_pass(model: BlendModel, ids: torch.Tensor, region: Assembled,
               options: BlendOptions, *, in_place: bool = False) -> BlendResult:
    """Repair ``region`` for tokens ``ids`` (``[N]``) as ``options`` say; see the module docstring.

    ``in_place``: write the repaired KV into ``region.kv`` itself (no copy of the whole region;
    ``region`` is then used up)."""
    options.checked(model.num_layers)
    n, p = int(ids.shape[0]), region.prefix_len
    kv = region.kv if in_place else [(k.clone(), v.clone()) for k, v in region.kv]
    empty = torch.empty(0)
    if p >= n or (options.recompute_ratio == 0.0 and bool(region.cached[p:].all())):
        return BlendResult(kv=kv, recomputed=torch.empty(0, dtype=torch.long), deviation=empty)
    all_pos = torch.arange(n)
    act = torch.arange(p, n)  # region indices of the tokens still computed
    h = model.embed(ids[p:])
    deviation = empty
    last = model.num_layers - 1
    for layer in range(model.num_layers):
        q, k, v = model.qkv(layer, h, act)
        if layer == options.check_layer:
            ref_k, ref_v = (kv[layer][0][act], kv[layer][1][act])
            fresh, ref = (v, ref_v) if options.policy is Policy.HKVD_V else (k, ref_k)
            deviation = (fresh - ref).flatten(1).norm(dim=1)
            kv[layer][0][act] = k
            kv[layer][1][act] = v
            pick = select(options, deviation, region.cached[act], region.segment_of[act],
                          region.segment_offset[act])
            act, h, q = act[pick], h[pick], q[pick]
        else:
            kv[layer][0][act] = k
            kv[layer][1][act] = v
        if layer == last or act.numel() == 0:
            break  # only the KV of the region is wanted: the last layer's output is not
        h = model.finish_layer(layer, h, attend(model, q, act, kv[layer][0], kv[layer][1], all_pos))
    return BlendResult(kv=kv, recomputed=act, deviation=deviation)
