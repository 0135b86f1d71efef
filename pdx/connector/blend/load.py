"""The worker half of a CacheBlend load: chunk bytes to tensors, the pass, tensors back to chunk bytes.

``PdxWorkerSide`` pins a blended request's segment pieces, checks them, and calls ``blend_region``
here with their payloads and the exact prefix vLLM's own cache already holds for the request (packed
out of its blocks). The result is turned back into pdx's chunk format (``kv_payload``) and written
into the request's blocks with pdx's own unpack kernel, through the same slot mapping as any load.

Chunk format (``pdx.kernels.format``): per layer, K as ``[heads][head_size][tokens]`` then V as
``[heads][tokens][head_size]``. ``payload_kv`` and ``kv_payload`` convert between that and the
blend pass's per-layer ``(K, V)`` tensors ``[tokens, heads, head_size]``.

The KV produced here is approximate unless ``r = 1``: the scheduler half never stores it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pdx.connector.blend.blend import SegmentKV, Span, assemble, blend_pass
from pdx.connector.blend.errors import BlendError, BlendUnsupported
from pdx.connector.blend.model import BlendModel, LayerKV
from pdx.connector.blend.policy import BlendOptions, parse_policy
from pdx.connector.metadata import BlendLoad
from pdx.layout import KVDtype, KVLayout

_TORCH = {KVDtype.FP32: torch.float32, KVDtype.BF16: torch.bfloat16, KVDtype.FP16: torch.float16}


def _dtype(layout: KVLayout) -> torch.dtype:
    try:
        return _TORCH[layout.dtype]
    except KeyError:
        raise BlendUnsupported(f"CacheBlend does not blend {layout.dtype.value} KV caches") from None


def payload_kv(layout: KVLayout, data: np.ndarray, num_tokens: int) -> list[LayerKV]:
    """Per-layer ``(K, V)`` ``[tokens, heads, head_size]`` of a chunk payload (copies the bytes)."""
    dt = _dtype(layout)
    h, d, n = layout.heads_per_rank, layout.head_size, num_tokens
    raw = torch.from_numpy(np.array(data, dtype=np.uint8, copy=True).reshape(-1))
    if raw.numel() != n * layout.token_bytes():
        raise BlendError(f"a payload of {raw.numel()} bytes is not {n} tokens of this layout")
    x = raw.view(dt).reshape(layout.num_layers, 2, h * d * n)
    out: list[LayerKV] = []
    for layer in range(layout.num_layers):
        k = x[layer, 0].reshape(h, d, n).permute(2, 0, 1).contiguous()
        v = x[layer, 1].reshape(h, n, d).permute(1, 0, 2).contiguous()
        out.append((k, v))
    return out


def kv_payload(layout: KVLayout, kv: Sequence[LayerKV], start: int, end: int) -> np.ndarray:
    """The chunk payload (bytes) of tokens ``[start, end)`` of per-layer ``kv``."""
    dt = _dtype(layout)
    parts = []
    for k, v in kv:
        parts.append(k[start:end].to(dt).permute(1, 2, 0).reshape(-1))
        parts.append(v[start:end].to(dt).permute(1, 0, 2).reshape(-1))
    flat = torch.cat(parts).detach().contiguous()
    return flat.view(torch.uint8).numpy()


def cat_kv(parts: Sequence[list[LayerKV]]) -> list[LayerKV]:
    """Concatenate per-layer KV along tokens."""
    if len(parts) == 1:
        return parts[0]
    return [(torch.cat([p[i][0] for p in parts]), torch.cat([p[i][1] for p in parts]))
            for i in range(len(parts[0]))]


def blend_region(model: BlendModel, load: BlendLoad, prefix: list[LayerKV] | None,
                 segments: Sequence[list[LayerKV]]) -> tuple[list[LayerKV], int]:
    """Assemble and blend tokens ``[0, region_end)`` of ``load``; returns (per-layer KV of the whole
    region, tokens recomputed above the check layer).

    ``prefix``: exact KV of tokens ``[0, load.start)`` (vLLM's own prefix cache), or None when
    ``load.start`` is 0. ``segments``: each segment's stored KV (base position ``seg.base``).
    Tokens of the region outside every segment (the anchor when not in ``prefix``, gaps) are
    computed by the pass.
    """
    n = len(load.token_ids)
    p = load.start
    if (prefix is None) != (p == 0) or (prefix is not None and int(prefix[0][0].shape[0]) != p):
        raise BlendError(f"prefix KV does not cover the {p} tokens before the blended range")
    spans: list[Span] = []
    at = p
    for seg, kv in zip(load.segments, segments, strict=True):
        if int(kv[0][0].shape[0]) != seg.end - seg.start:
            raise BlendError(f"segment [{seg.start}, {seg.end}) has {int(kv[0][0].shape[0])} stored tokens")
        a = max(seg.start, p)
        if seg.end <= a:
            continue
        if a > at:
            spans.append(Span(at, a))
        off = a - seg.start
        cut = kv if off == 0 else [(k[off:], v[off:]) for k, v in kv]
        spans.append(Span(a, seg.end, SegmentKV(kv=cut, base=seg.base + off)))
        at = seg.end
    if at < n:
        spans.append(Span(at, n))
    if not spans:
        raise BlendError("nothing to blend")
    options = BlendOptions(recompute_ratio=load.recompute_ratio, check_layer=load.check_layer,
                           policy=parse_policy(load.policy), seed=load.seed)
    ids = torch.tensor(load.token_ids, dtype=torch.long)
    with torch.inference_mode():
        region = assemble(model, n, prefix, spans)
        result = blend_pass(model, ids, region, options, in_place=True)
    return result.kv, int(result.recomputed.numel())


class ModelHandle:
    """The engine's model as a ``BlendModel`` (``VllmLlama`` over the handle), made once per worker.
    A model that cannot be adapted raises ``BlendUnsupported`` every time, without retrying."""

    def __init__(self) -> None:
        self._model: Any = None
        self._error: BlendUnsupported | None = None

    def get(self) -> BlendModel:
        if self._model is not None:
            return self._model  # type: ignore[no-any-return]
        if self._error is not None:
            raise self._error
        from pdx.connector.blend.handle import loaded_model
        from pdx.connector.blend.vllm_model import VllmLlama

        try:
            self._model = VllmLlama(loaded_model())
        except BlendUnsupported as exc:
            self._error = exc
            raise
        return self._model  # type: ignore[no-any-return]
