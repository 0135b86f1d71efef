"""Derive ``MemoryLayout`` from the KV tensors an engine registers and its attention backend.

Called once by the connector's ``register_kv_caches`` (worker process), before any
pack/unpack. Pure Python, no torch. Anything it does not know is a ``LayoutError``
naming what it saw: a wrong guess would silently corrupt KV.

What vLLM registers (read from its code, see ``docs/kernels.md``): every attention layer
gets a view of logical shape ``[num_blocks, kv_heads, block_size, C]``, with
``C = 2*head_size`` elements for unquantised K and V. GPU backends split ``C`` into K
and V halves; the CPU backend instead reads each (block, head) page as ``2*block_size``
rows of ``head_size`` (K rows first) and its ISA decides the order inside them. Older
vLLM versions registered ``[2, num_blocks, block_size, kv_heads, head_size]``.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdx.errors import LayoutError
from pdx.layout import KVDtype, MemoryLayout

#: vLLM backends whose per-layer view is ``[blocks, heads, block, 2*head_size]`` with K|V halves
#: (or, in older vLLM, ``[2, blocks, block, heads, head_size]``).
GPU_BACKENDS = frozenset({
    "FLASH_ATTN", "TRITON_ATTN", "FLASHINFER", "FLEX_ATTENTION", "ROCM_ATTN",
    "ROCM_AITER_FA", "ROCM_AITER_UNIFIED_ATTN",
})
CPU_BACKEND = "CPU_ATTN"
#: CPU_ATTN ISAs (``vllm.v1.attention.backends.cpu_attn._get_attn_isa``) and their page layout.
CPU_ISA_LAYOUTS = {"vec": MemoryLayout.CPU_VEC, "vec16": MemoryLayout.CPU_VEC, "amx": MemoryLayout.CPU_AMX}


def detect_layout(
    tensor_shape: Sequence[int],
    attn_backend_name: str,
    num_kv_heads: int,
    head_size: int,
    block_size: int,
    *,
    tensor_stride: Sequence[int] | None = None,
    cpu_isa: str | None = None,
    kv_dtype: KVDtype | str | None = None,
) -> MemoryLayout:
    """The ``MemoryLayout`` of one registered per-layer KV tensor.

    ``num_kv_heads`` are the heads this rank holds (the tensor's), ``block_size`` the
    tokens per block *of the tensor* (vLLM's kernel block size when it splits manager
    blocks). ``tensor_stride`` (elements), when given, is checked where the layout needs
    contiguity. ``cpu_isa`` is required for ``CPU_ATTN``: the attention layer's ``.isa``
    (set by vLLM's CPU metadata builder) or ``pdx.kernels.vllm_cpu.attention_isa(...)``.
    ``kv_dtype`` rules out combinations vLLM never produces (AMX pages are bf16 only).
    """
    shape = tuple(int(x) for x in tensor_shape)
    name = attn_backend_name.upper()
    heads, dim, block = num_kv_heads, head_size, block_size
    concat = (shape[0] if shape else -1, heads, block, 2 * dim)
    if name == CPU_BACKEND:
        if len(shape) != 4 or shape[1:] != concat[1:]:
            raise LayoutError(f"{name}: expected a [num_blocks, {heads}, {block}, {2 * dim}] tensor, "
                              f"got {list(shape)}")
        if tensor_stride is not None and (tensor_stride[3] != 1 or tensor_stride[2] != 2 * dim):
            raise LayoutError(f"{name}: a (block, head) page must be contiguous, got strides "
                              f"{list(tensor_stride)}")
        if cpu_isa is None:
            raise LayoutError(f"{name}: the order inside a block depends on the attention ISA; pass "
                              "cpu_isa= (the attention layer's .isa, or "
                              "pdx.kernels.vllm_cpu.attention_isa(...))")
        layout = CPU_ISA_LAYOUTS.get(cpu_isa.lower())
        if layout is None:
            raise LayoutError(f"{name}: ISA {cpu_isa!r} has a block layout pdx does not know; "
                              f"supported: {', '.join(sorted(CPU_ISA_LAYOUTS))}")
        if layout is MemoryLayout.CPU_AMX and kv_dtype is not None and KVDtype(kv_dtype) is not KVDtype.BF16:
            raise LayoutError(f"{name}: AMX pages are known for bf16 only, not {KVDtype(kv_dtype).value}")
        return layout
    if name in GPU_BACKENDS:
        if len(shape) == 4:
            if shape[1:] != concat[1:]:
                raise LayoutError(f"{name}: expected [num_blocks, {heads}, {block}, {2 * dim}], got "
                                  f"{list(shape)} (quantised or MLA caches are not supported)")
            return MemoryLayout.KV_CONCAT
        if len(shape) == 5 and shape[0] == 2 and shape[4] == dim:
            nhd = shape[2:4] == (block, heads)
            hnd = shape[2:4] == (heads, block)
            if nhd and hnd:
                raise LayoutError(f"{name}: shape {list(shape)} is NHD and HND alike (block_size == "
                                  "kv_heads); cannot tell them apart")
            if nhd:
                return MemoryLayout.NHD
            if hnd:
                return MemoryLayout.HND
        raise LayoutError(f"{name}: unknown KV tensor shape {list(shape)} for {heads} heads, head size "
                          f"{dim}, block size {block}; known: [num_blocks, heads, block, 2*head_size], "
                          "[2, num_blocks, block, heads, head_size], [2, num_blocks, heads, block, head_size]")
    raise LayoutError(f"attention backend {attn_backend_name!r} is not supported; known: "
                      f"{', '.join(sorted(GPU_BACKENDS | {CPU_BACKEND}))}")
