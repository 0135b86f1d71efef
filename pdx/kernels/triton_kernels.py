"""Triton pack/unpack for CUDA caches: all layers of a batch of chunks in one launch.

The kernel sees every affine layout (NHD, HND, KV_CONCAT, CPU_VEC) through one address
formula per K/V: ``layer_base + block*s_block + head*s_head + slot*s_slot + dim*s_dim +
kv_offset`` (elements), with the strides taken from the layer views of ``cpu.kv_views``.
Layer and chunk base addresses come from int64 pointer tables, so layers may be separate
allocations and chunks separate slabs (device memory or pinned host memory the GPU can
address). Grid: (token tiles of all chunks, layers); a program copies ``BLOCK_T`` tokens
of one chunk, every copied head, K and V. K is transposed on the way (chunks keep K
dim-major); Triton stages that through shared memory.

Called through ``pdx.kernels.pack_batch``/``unpack_batch``; the launch goes on
``plan.stream`` (or the current stream) and returns without waiting. The small tables
are copied host-to-device on the same stream from pinned memory. With
``TRITON_INTERPRET=1`` the kernel runs on CPU tensors (how the unit tests check it
without a GPU).
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch
import triton
import triton.language as tl

from pdx.errors import LayoutError
from pdx.kernels.cpu import kv_views
from pdx.kernels.plan import Direction, Plan
from pdx.layout import MemoryLayout

BLOCK_T = 32


@triton.jit
def _kv_copy_kernel(
    layer_ptrs, chunk_ptrs, tiles, jobs, tok_block, tok_slot,
    s_block, s_head, k_off, k_slot, k_dim, v_off, v_slot, v_dim,
    chunk_heads, chunk_h0, cache_h0, n_heads,
    D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, ELEM_BYTES: tl.constexpr,
    UNPACK: tl.constexpr,
):
    tile = tl.program_id(0)
    layer = tl.program_id(1)
    job = tl.load(tiles + 2 * tile)
    first = tl.load(tiles + 2 * tile + 1)
    num_tokens = tl.load(jobs + 2 * job)
    token_base = tl.load(jobs + 2 * job + 1)
    i = first + tl.arange(0, BLOCK_T)
    t_mask = i < num_tokens
    blk = tl.load(tok_block + token_base + i, mask=t_mask, other=0)
    slot = tl.load(tok_slot + token_base + i, mask=t_mask, other=0)
    d = tl.arange(0, BLOCK_D)
    mask = t_mask[:, None] & (d < D)[None, :]
    layer_addr = tl.load(layer_ptrs + layer)
    chunk_addr = tl.load(chunk_ptrs + job)
    if ELEM_BYTES == 1:
        cache = layer_addr.to(tl.pointer_type(tl.int8))
        chunk = chunk_addr.to(tl.pointer_type(tl.int8))
    elif ELEM_BYTES == 2:
        cache = layer_addr.to(tl.pointer_type(tl.int16))
        chunk = chunk_addr.to(tl.pointer_type(tl.int16))
    else:
        cache = layer_addr.to(tl.pointer_type(tl.int32))
        chunk = chunk_addr.to(tl.pointer_type(tl.int32))
    part = chunk_heads * D * num_tokens  # elements of one layer's K (or V) in the chunk
    k_chunk = chunk + layer * 2 * part
    v_chunk = k_chunk + part
    row = blk[:, None] * s_block
    k_cache_td = row + slot[:, None] * k_slot + d[None, :] * k_dim + k_off
    v_cache_td = row + slot[:, None] * v_slot + d[None, :] * v_dim + v_off
    for h in range(n_heads):
        head = (cache_h0 + h) * s_head
        ch = chunk_h0 + h
        k_chunk_td = (ch * D + d[None, :]) * num_tokens + i[:, None]  # K: [heads, D, T]
        v_chunk_td = (ch * num_tokens + i[:, None]) * D + d[None, :]  # V: [heads, T, D]
        if UNPACK:
            x = tl.load(k_chunk + k_chunk_td, mask=mask)
            tl.store(cache + head + k_cache_td, x, mask=mask)
            y = tl.load(v_chunk + v_chunk_td, mask=mask)
            tl.store(cache + head + v_cache_td, y, mask=mask)
        else:
            x = tl.load(cache + head + k_cache_td, mask=mask)
            tl.store(k_chunk + k_chunk_td, x, mask=mask)
            y = tl.load(cache + head + v_cache_td, mask=mask)
            tl.store(v_chunk + v_chunk_td, y, mask=mask)


def _strides(plan: Plan) -> tuple[int, ...]:
    """(s_block, s_head, k_off, k_slot, k_dim, v_off, v_slot, v_dim) in elements."""
    first = plan.caches.layers[0]
    k, v = kv_views(first.unsqueeze(0), plan.caches)  # K [1,B,H,D,N], V [1,B,H,N,D]
    if k.stride(1) != v.stride(1) or k.stride(2) != v.stride(2):
        raise LayoutError("K and V differ in block or head stride")  # no supported layout does this
    base = first.storage_offset()
    return tuple(int(x) for x in (k.stride(1), k.stride(2), k.storage_offset() - base, k.stride(4),
                                  k.stride(3), v.storage_offset() - base, v.stride(3), v.stride(4)))


def _tables(plan: Plan) -> tuple[np.ndarray, list[int]]:
    """One int64 array: layer ptrs, chunk ptrs, (tokens, token base) per job, (job, first) per
    tile, block per token, slot per token; plus the section offsets."""
    jobs = plan.jobs
    layer_ptrs = [t.data_ptr() for t in plan.caches.layers]
    chunk_ptrs = [job.payload.data_ptr() for job in jobs]
    job_info: list[int] = []
    tiles: list[int] = []
    blocks: list[np.ndarray] = []
    slots: list[np.ndarray] = []
    base = 0
    for j, job in enumerate(jobs):
        job_info += [job.num_tokens, base]
        for first in range(0, job.num_tokens, BLOCK_T):
            tiles += [j, first]
        for b, s, n in job.spans:
            blocks.append(np.full(n, b, dtype=np.int64))
            slots.append(np.arange(s, s + n, dtype=np.int64))
        base += job.num_tokens
    parts = [np.asarray(layer_ptrs, dtype=np.uint64).view(np.int64), np.asarray(chunk_ptrs, dtype=np.uint64).view(np.int64),
             np.asarray(job_info, dtype=np.int64), np.asarray(tiles, dtype=np.int64),
             np.concatenate(blocks), np.concatenate(slots)]
    offsets = np.cumsum([0] + [len(p) for p in parts]).tolist()
    return np.concatenate(parts), offsets


def run(plan: Plan) -> None:
    c = plan.caches
    if c.memory_layout is MemoryLayout.CPU_AMX:
        raise LayoutError("the triton path has no cpu_amx pages (a CPU-only layout); use impl='cpu'")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    dev = c.device
    if dev.type != "cuda" and not interpret:
        raise LayoutError(f"the triton path needs CUDA caches, got {dev}")
    host, off = _tables(plan)
    table = torch.from_numpy(host)
    if dev.type == "cuda":
        stream = plan.stream if plan.stream is not None else torch.cuda.current_stream(dev)
        ctx: contextlib.AbstractContextManager[object] = torch.cuda.stream(stream)
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        if dev.type == "cuda":
            table = table.pin_memory().to(dev, non_blocking=True)
        sec = [table[off[k]:off[k + 1]] for k in range(6)]
        n_tiles = (off[4] - off[3]) // 2
        grid = (n_tiles, len(c.layers))
        _kv_copy_kernel[grid](
            sec[0], sec[1], sec[3], sec[2], sec[4], sec[5],
            *_strides(plan),
            plan.chunk_heads, plan.chunk_head_lo, plan.cache_head_lo, plan.num_heads,
            D=c.head_size, BLOCK_T=BLOCK_T, BLOCK_D=triton.next_power_of_2(c.head_size),
            ELEM_BYTES=c.itemsize, UNPACK=plan.direction is Direction.UNPACK,
            num_warps=4,
        )
