"""Non-prefix KV reuse (CacheBlend) for ``PdxConnector``.

A prompt's documents may be cached as *segments*, each computed after an *anchor* (BOS or a
system prompt) at some base position. A request that names its segments (``kv_transfer_params
.pdx.blend``) gets their KV re-rotated to where they now stand, then repaired by the *blend pass*,
which recomputes only the tokens whose KV deviates most. See ``docs/cacheblend.md``.

Modules: ``rope`` (re-rotation), ``policy`` (options and token selection), ``model`` (the
interface to the model's modules, an exact reference forward), ``blend`` (the pass), ``request``
(the request format and segment keys). Blended KV is approximate: it is never stored under exact
prefix keys.
"""

from pdx.connector.blend.blend import Assembled, BlendResult, SegmentKV, Span, assemble, blend_pass
from pdx.connector.blend.errors import BlendError, BlendRequestError, BlendUnsupported
from pdx.connector.blend.policy import BlendOptions, Policy

__all__ = [
    "Assembled",
    "BlendError",
    "BlendOptions",
    "BlendRequestError",
    "BlendResult",
    "BlendUnsupported",
    "Policy",
    "SegmentKV",
    "Span",
    "assemble",
    "blend_pass",
]
