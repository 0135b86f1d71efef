"""Readable torch reference of pack/unpack: the oracle the fast paths are tested against.

One token, one layer, one of K/V at a time, addressed directly in the engine's tensor
the way each ``MemoryLayout`` documents it; the CPU pages use the offsets of vLLM's
``reshape_and_cache`` (``cpu_attn_vec.hpp``, ``cpu_attn_amx.hpp``). Deliberately shares
no addressing code with ``cpu.py`` or ``triton_kernels.py``. Slow; for tests and tiny
inputs. Blocking; runs on any device torch supports.
"""

from __future__ import annotations

import torch

from pdx.kernels.plan import Direction, Plan
from pdx.layout import MemoryLayout


def page_offsets(memory_layout: MemoryLayout, kv: int, slot: int, block_size: int, head_size: int) -> torch.Tensor:
    """Offsets, inside one (block, head) page of ``2*block_size*head_size`` elements, of
    K (``kv=0``) or V (``kv=1``) of token ``slot``, for ``head_size`` dims in order."""
    n, d = block_size, head_size
    dims = torch.arange(d)
    if memory_layout is MemoryLayout.CPU_VEC:
        # K written column-major ([head_size, block_size]), V row-major, after K.
        return dims * n + slot if kv == 0 else n * d + slot * d + dims
    if memory_layout is MemoryLayout.CPU_AMX:
        if kv == 0:
            # K: 16-token groups; inside a group each 4-byte pair of dims of the 16 tokens is adjacent.
            return (slot // 16) * 16 * d + 2 * (slot % 16) + 32 * (dims // 2) + dims % 2
        # V: dims in groups of 16; inside a group, pairs of tokens interleave element by element.
        return n * d + (slot // 2) * 32 + slot % 2 + (dims // 16) * 16 * n + (dims % 16) * 2
    raise ValueError(f"{memory_layout} has no pages")


def _token(cache: torch.Tensor, ml: MemoryLayout, kv: int, block: int, slot: int, h0: int, h1: int,
           block_size: int, head_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(view, offsets): K or V of one token for cache heads [h0, h1) is ``view`` ([heads, head_size])
    or, for paged CPU layouts, ``view[:, offsets]`` with ``view`` the heads' flat pages."""
    d = head_size
    if ml is MemoryLayout.NHD:
        return cache[kv, block, slot, h0:h1, :], None
    if ml is MemoryLayout.HND:
        return cache[kv, block, h0:h1, slot, :], None
    if ml is MemoryLayout.KV_CONCAT:
        return cache[block, h0:h1, slot, kv * d:(kv + 1) * d], None
    pages = cache[block, h0:h1].view(h1 - h0, -1)  # view: pages are contiguous
    return pages, page_offsets(ml, kv, slot, block_size, head_size).to(cache.device)


def run(plan: Plan) -> None:
    c = plan.caches
    d, hc = c.head_size, plan.chunk_heads
    a, b = plan.chunk_head_lo, plan.chunk_head_lo + plan.num_heads  # heads in the chunk
    h0, h1 = plan.cache_head_lo, plan.cache_head_lo + plan.num_heads  # the same heads in the cache
    for job in plan.jobs:
        t_total = job.num_tokens
        i = 0  # token index in the chunk
        for block, start, n in job.spans:
            for slot in range(start, start + n):
                for layer, cache in enumerate(c.layers):
                    k_chunk = job.payload[layer, 0].view(hc, d, t_total)[a:b, :, i]
                    v_chunk = job.payload[layer, 1].view(hc, t_total, d)[a:b, i, :]
                    for kv, chunk_part in ((0, k_chunk), (1, v_chunk)):
                        view, offsets = _token(cache, c.memory_layout, kv, block, slot, h0, h1,
                                               c.block_size, d)
                        if plan.direction is Direction.PACK:
                            chunk_part.copy_(view if offsets is None else view[:, offsets])
                        elif offsets is None:
                            view.copy_(chunk_part)
                        else:
                            view[:, offsets] = chunk_part
                i += 1
