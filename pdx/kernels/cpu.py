"""Fast torch path: vectorised copies between paged caches and chunk buffers.

Every layout with an affine address (NHD, HND, KV_CONCAT, CPU_VEC) is seen through two
strided views, ``K[layers, blocks, heads, head_size, block_size]`` and
``V[layers, blocks, heads, block_size, head_size]``, which match the chunk's
``K[layers, heads, head_size, tokens]`` / ``V[layers, heads, tokens, head_size]`` once
the tokens axis is cut into spans. Each span (or run of consecutive whole blocks)
becomes one copy covering all layers and heads, and all copies of a call go to torch in
a single ``_foreach_copy_``: no Python loop per token or per layer, nothing allocated
but views. When the layer caches do not share one storage at a constant stride the same
copies are made layer by layer. ``CPU_AMX`` pages are not affine: they go through one
index gather/scatter per chunk, built from vLLM's offsets.

``CPU_VEC`` caches on CPU go to ``pdx.kernels.native`` first (a C strided copy: with
16-token blocks K moves in 32-byte runs, where torch's per-run overhead dominates);
``run_torch`` is this module's own path, used when the extension is missing or stale.

Blocking. Uses torch's intra-op thread pool as configured by the process (on 2 cores,
2 threads roughly double the rate of 1; the bench shows both). Works on CUDA tensors
too (the fallback where Triton is missing). Not thread-safe for concurrent writes to
the same blocks or buffers; the caller owns every tensor and buffer.
"""

from __future__ import annotations

import torch

from pdx.kernels.plan import Caches, Direction, Job, Plan
from pdx.layout import MemoryLayout


def kv_views(stack: torch.Tensor, caches: Caches) -> tuple[torch.Tensor, torch.Tensor]:
    """K ``[L, B, H, D, N]`` and V ``[L, B, H, N, D]`` views of ``stack`` (``[L, *layer_shape]``)."""
    d, n = caches.head_size, caches.block_size
    ml = caches.memory_layout
    if ml is MemoryLayout.NHD:  # [L, 2, B, N, H, D]
        return stack[:, 0].permute(0, 1, 3, 4, 2), stack[:, 1].permute(0, 1, 3, 2, 4)
    if ml is MemoryLayout.HND:  # [L, 2, B, H, N, D]
        return stack[:, 0].transpose(-1, -2), stack[:, 1]
    if ml is MemoryLayout.KV_CONCAT:  # [L, B, H, N, 2D]
        return stack[..., :d].transpose(-1, -2), stack[..., d:]
    if ml is MemoryLayout.CPU_VEC:  # pages: K as [D, N], then V as [N, D]
        s_l, s_b, s_h = stack.stride()[:3]
        num_l, num_b, num_h = stack.shape[:3]
        base = stack.storage_offset()
        k = stack.as_strided((num_l, num_b, num_h, d, n), (s_l, s_b, s_h, n, 1), base)
        v = stack.as_strided((num_l, num_b, num_h, n, d), (s_l, s_b, s_h, d, 1), base + n * d)
        return k, v
    raise ValueError(f"{ml} is not affine")


def _runs(spans: tuple[tuple[int, int, int], ...], block_size: int) -> list[tuple[int, int, int, int]]:
    """(block, start, tokens, count): whole blocks with consecutive ids merge into one run."""
    runs: list[tuple[int, int, int, int]] = []
    for b, s, n in spans:
        if runs and s == 0 and n == block_size:
            pb, ps, pn, k = runs[-1]
            if ps == 0 and pn == block_size and pb + k == b:
                runs[-1] = (pb, 0, block_size, k + 1)
                continue
        runs.append((b, s, n, 1))
    return runs


def _pairs(plan: Plan, job: Job, stack: torch.Tensor, payload: torch.Tensor,
           dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """Append (chunk view, cache view) pairs for one job over the layers of ``stack``/``payload``."""
    c = plan.caches
    d, n_blk, t = c.head_size, c.block_size, job.num_tokens
    k_cache, v_cache = kv_views(stack, c)
    num_l = stack.shape[0]
    a, b = plan.chunk_head_lo, plan.chunk_head_lo + plan.num_heads
    h0, h1 = plan.cache_head_lo, plan.cache_head_lo + plan.num_heads
    k_chunk = payload[:, 0].view(num_l, plan.chunk_heads, d, t)[:, a:b]
    v_chunk = payload[:, 1].view(num_l, plan.chunk_heads, t, d)[:, a:b]
    i = 0
    for blk, start, n, count in _runs(job.spans, n_blk):
        if count == 1:
            pairs = [
                (k_chunk[..., i:i + n], k_cache[:, blk, h0:h1, :, start:start + n]),
                (v_chunk[:, :, i:i + n], v_cache[:, blk, h0:h1, start:start + n]),
            ]
        else:
            width = count * n_blk
            kd = k_chunk[..., i:i + width].unflatten(-1, (count, n_blk)).permute(0, 3, 1, 2, 4)
            vd = v_chunk[:, :, i:i + width].unflatten(2, (count, n_blk)).permute(0, 2, 1, 3, 4)
            pairs = [(kd, k_cache[:, blk:blk + count, h0:h1]), (vd, v_cache[:, blk:blk + count, h0:h1])]
        for chunk_view, cache_view in pairs:
            dst.append(chunk_view)
            src.append(cache_view)
        i += n * count


def _copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    foreach = getattr(torch, "_foreach_copy_", None)
    if foreach is not None:
        foreach(dst, src)
    else:  # pragma: no cover - older torch
        for x, y in zip(dst, src):
            x.copy_(y)


def _gather_index(plan: Plan, job: Job) -> torch.Tensor:
    """Element offsets (inside one layer) of the copied heads of ``job``, in chunk order."""
    c = plan.caches
    d, n = c.head_size, c.block_size
    dev = c.device
    blocks = torch.tensor([b for b, s, m in job.spans for _ in range(m)], dtype=torch.int64, device=dev)
    slots = torch.tensor([s + j for b, s, m in job.spans for j in range(m)], dtype=torch.int64, device=dev)
    dims = torch.arange(d, dtype=torch.int64, device=dev)
    heads = torch.arange(plan.cache_head_lo, plan.cache_head_lo + plan.num_heads, dtype=torch.int64, device=dev)
    s_b, s_h = c.layers[0].stride(0), c.layers[0].stride(1)
    token_base = blocks * s_b  # [T]
    head_base = heads * s_h  # [h]
    assert c.memory_layout is MemoryLayout.CPU_AMX
    # K: 16-token groups of 4-byte dim pairs; V: 16-dim groups with token pairs interleaved.
    k_tok = (slots // 16) * 16 * d + 2 * (slots % 16)
    k_dim = 32 * (dims // 2) + dims % 2
    v_tok = n * d + (slots // 2) * 32 + slots % 2
    v_dim = (dims // 16) * 16 * n + (dims % 16) * 2
    k_idx = head_base[:, None, None] + k_dim[None, :, None] + (token_base + k_tok)[None, None, :]  # [h, D, T]
    v_idx = head_base[:, None, None] + (token_base + v_tok)[None, :, None] + v_dim[None, None, :]  # [h, T, D]
    return torch.cat([k_idx.reshape(-1), v_idx.reshape(-1)])


def _run_gather(plan: Plan) -> None:
    c = plan.caches
    first = c.layers[0]
    extent = (c.num_blocks - 1) * first.stride(0) + (c.heads - 1) * first.stride(1) + 2 * c.block_size * c.head_size
    if c.stacked is not None and c.stacked.stride(0) >= extent:
        stacks = [(c.stacked, slice(None))]
    else:  # separate or interleaved layers: one layer at a time
        stacks = [(layer.unsqueeze(0), slice(i, i + 1)) for i, layer in enumerate(c.layers)]
    for job in plan.jobs:
        idx = _gather_index(plan, job)
        t, d = job.num_tokens, c.head_size
        a, b = plan.chunk_head_lo, plan.chunk_head_lo + plan.num_heads
        for stack, layers in stacks:
            flat = stack.as_strided((stack.shape[0], extent), (stack.stride(0), 1), stack.storage_offset())
            payload = job.payload[layers]
            k_part = payload[:, 0].view(-1, plan.chunk_heads, d * t)[:, a:b]
            v_part = payload[:, 1].view(-1, plan.chunk_heads, t * d)[:, a:b]
            if plan.direction is Direction.PACK:
                values = torch.index_select(flat, 1, idx)
                half = values.shape[1] // 2
                k_part.copy_(values[:, :half].view_as(k_part))
                v_part.copy_(values[:, half:].view_as(v_part))
            else:
                values = torch.cat([k_part.reshape(k_part.shape[0], -1), v_part.reshape(v_part.shape[0], -1)], 1)
                flat.index_copy_(1, idx, values)


def run(plan: Plan) -> None:
    """``impl="cpu"``: the native strided copy where it applies and is built, else ``run_torch``."""
    from pdx.kernels import native

    if not native.run(plan):
        run_torch(plan)


def run_torch(plan: Plan) -> None:
    """``impl="cpu_torch"``: the pure-torch path (the fallback, and the native path's reference)."""
    c = plan.caches
    if c.memory_layout is MemoryLayout.CPU_AMX:
        _run_gather(plan)
        return
    dst: list[torch.Tensor] = []
    src: list[torch.Tensor] = []
    for job in plan.jobs:
        if c.stacked is not None:
            _pairs(plan, job, c.stacked, job.payload, dst, src)
        else:
            for i, layer in enumerate(c.layers):
                _pairs(plan, job, layer.unsqueeze(0), job.payload[i:i + 1], dst, src)
    if plan.direction is Direction.PACK:
        _copy_all(dst, src)
    else:
        _copy_all(src, dst)
