"""The blend request format and segment keys. Pure data: no torch, no vLLM.

A request asks for blending under ``kv_transfer_params.pdx.blend``::

    {"segments": [[64, 700], [700, 1290]],   # token spans of the prompt, in order
     "anchor": 64,                          # optional: tokens [0, anchor) are the anchor
     "recompute_ratio": 0.15, "check_layer": 1, "policy": "hkvd_k", "seed": 0}   # optional

A request that *stores* a segment says ``"store": true``, with one segment right after its anchor
(``{"segments": [[64, 700]], "store": true}``): it is computed exactly, like any other request,
and the segment's KV is stored under its segment key as well (in pieces of at most
``chunk_tokens`` tokens, ``segment_pieces``).

Segments come from the request (a client, or a proxy that received documents as separate
message parts), never from separator strings. Each segment is cached once as its KV computed
right after its anchor (BOS, or a system prompt), and found again by ``segment_key``: a hash of
the model's chunk fingerprint, the tenant namespace, the anchor's tokens and the segment's
tokens. The anchor itself is an exact prefix: it keeps today's exact prefix keys.

``parse_blend`` is called by the connector's scheduler half; it raises ``BlendRequestError``
naming the bad field. Segment keys are seeded differently from ``pdx.keys`` chunk keys, so a
segment can never be mistaken for an exact prefix chunk (and vice versa).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import xxhash

from pdx.connector.blend.errors import BlendRequestError
from pdx.connector.blend.policy import BlendOptions, parse_policy

#: the key of the blend block inside ``kv_transfer_params["pdx"]``
BLEND_KEY = "blend"
MAX_SEGMENTS = 64
_FIELDS = {"segments", "anchor", "recompute_ratio", "check_layer", "policy", "seed", "store"}


@dataclass(frozen=True)
class BlendRequest:
    """A validated blend request: the anchor length, the segment spans, the options."""

    anchor: int
    segments: tuple[tuple[int, int], ...]
    options: BlendOptions
    #: store the (single, in-context) segment instead of blending
    store: bool = False

    @property
    def region_end(self) -> int:
        """Tokens ``[0, region_end)`` are produced by the blend pass; vLLM computes the rest."""
        return self.segments[-1][1]


def parse_blend(pdx_params: Mapping[str, Any] | None, num_prompt_tokens: int,
                defaults: BlendOptions | None = None) -> BlendRequest | None:
    """The request's blend block (``pdx_params`` is ``kv_transfer_params["pdx"]``), or None."""
    if not pdx_params or BLEND_KEY not in pdx_params:
        return None
    raw = pdx_params[BLEND_KEY]
    if not isinstance(raw, Mapping):
        raise BlendRequestError("pdx.blend must be an object")
    unknown = set(raw) - _FIELDS
    if unknown:
        raise BlendRequestError(f"pdx.blend: unknown fields {sorted(unknown)}; known: {sorted(_FIELDS)}")
    segs = raw.get("segments")
    if not isinstance(segs, Sequence) or isinstance(segs, str | bytes) or not segs:
        raise BlendRequestError("pdx.blend.segments must be a non-empty list of [start, end] spans")
    if len(segs) > MAX_SEGMENTS:
        raise BlendRequestError(f"pdx.blend.segments: {len(segs)} spans, at most {MAX_SEGMENTS}")
    spans: list[tuple[int, int]] = []
    for i, s in enumerate(segs):
        if (not isinstance(s, Sequence) or isinstance(s, str | bytes) or len(s) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in s)):
            raise BlendRequestError(f"pdx.blend.segments[{i}] must be [start, end] integers")
        spans.append((int(s[0]), int(s[1])))
    anchor = raw.get("anchor", spans[0][0])
    if not isinstance(anchor, int) or isinstance(anchor, bool) or not 0 <= anchor <= spans[0][0]:
        raise BlendRequestError(f"pdx.blend.anchor must be an integer in [0, {spans[0][0]}] "
                                "(the anchor precedes the first segment)")
    at = anchor
    for i, (a, b) in enumerate(spans):
        if a < at or b <= a:
            raise BlendRequestError(f"pdx.blend.segments[{i}] [{a}, {b}) is empty, out of order or "
                                    "overlaps the previous span")
        at = b
    if at >= num_prompt_tokens:
        raise BlendRequestError(f"pdx.blend.segments end at {at}, but the prompt has {num_prompt_tokens} "
                                "tokens: at least its last token must follow the segments")
    store = raw.get("store", False)
    if not isinstance(store, bool):
        raise BlendRequestError("pdx.blend.store must be true or false")
    if store and (len(spans) != 1 or spans[0][0] != anchor):
        raise BlendRequestError("pdx.blend.store: a storing request names exactly one segment, starting "
                                "at the anchor (its KV must be computed right after the anchor)")
    opts = defaults or BlendOptions()
    try:
        if "recompute_ratio" in raw:
            opts = replace(opts, recompute_ratio=float(raw["recompute_ratio"]))
        if "check_layer" in raw:
            opts = replace(opts, check_layer=int(raw["check_layer"]))
        if "policy" in raw:
            opts = replace(opts, policy=parse_policy(raw["policy"]))
        if "seed" in raw:
            opts = replace(opts, seed=int(raw["seed"]))
    except (TypeError, ValueError) as exc:
        if isinstance(exc, BlendRequestError):
            raise
        raise BlendRequestError(f"pdx.blend: bad option value: {exc}") from None
    return BlendRequest(anchor=anchor, segments=tuple(spans), options=opts, store=store)


def anchor_id(anchor_tokens: Sequence[int] | np.ndarray) -> bytes:
    """16 bytes naming the fixed context a segment was computed after."""
    return xxhash.xxh3_128_digest(b"pdx-anchor/1|" + np.asarray(anchor_tokens, dtype="<u4").tobytes())


def segment_key(chunk_fingerprint: str, anchor: bytes, segment_tokens: Sequence[int] | np.ndarray,
                namespace: str = "") -> bytes:
    """The key of a segment's KV computed right after ``anchor`` (``anchor_id``).

    The seed's ``pdx-blend/1`` tag keeps it apart from every exact chunk key (seeded ``pdx/1``).
    """
    seed = f"pdx-blend/1|{chunk_fingerprint}|{namespace}|".encode()
    return xxhash.xxh3_128_digest(seed + anchor + np.asarray(segment_tokens, dtype="<u4").tobytes())


def segment_pieces(key: bytes, num_tokens: int, chunk_tokens: int) -> list[tuple[bytes, int]]:
    """The stored pieces of a segment of ``num_tokens`` tokens: ``(piece key, tokens)`` in order.

    A pool slab holds at most ``chunk_tokens`` tokens, so a segment is stored as consecutive
    pieces of that size (the last one shorter). Piece keys derive from the segment key.
    """
    if num_tokens <= 0 or chunk_tokens <= 0:
        raise ValueError("a segment and a chunk hold at least one token")
    out = []
    for i, at in enumerate(range(0, num_tokens, chunk_tokens)):
        out.append((xxhash.xxh3_128_digest(b"pdx-blend-piece/1|" + key + i.to_bytes(4, "little")),
                    min(chunk_tokens, num_tokens - at)))
    return out


def blend_cache_salt(request_id: str, salt: str | None = None) -> str:
    """A ``cache_salt`` unique to one blended request (keeps its tenant's salt as a prefix).

    vLLM's prefix cache hashes the salt into every block of the request, so no later request can
    be handed a block computed on top of blended (approximate) KV as if it were exact.
    """
    return f"{salt or ''}|pdx-blend|{request_id}"
