"""The model as the blend pass sees it: per-layer projections, attention over explicit KV, logits.

``BlendModel`` is the small interface the blend pass needs. Adapters map it onto a real model's own
modules, so the pass runs the engine's weights and kernels for projections, norms, RoPE and MLP;
only attention is computed here (``attend``), over KV tensors indexed by absolute position, which
is what lets a pass recompute an arbitrary subset of tokens.

* ``HFLlama`` adapts ``transformers.LlamaForCausalLM`` (tests, ``pdx-bench blend``).
* ``pdx.connector.blend.vllm_model`` adapts vLLM's Llama inside an engine worker.

``extend`` is an exact forward over KV held as tensors: the reference the blend pass is
checked against, and the exact compute of a request's suffix on top of blended KV.
Pure torch; no vLLM import. Nothing here is thread-safe; callers hold ``torch.no_grad``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from pdx.connector.blend.errors import BlendUnsupported
from pdx.connector.blend.rope import Rope, check_rope_type

#: per layer (K after RoPE, V), each ``[tokens, kv_heads, head_dim]``
LayerKV = tuple[torch.Tensor, torch.Tensor]


class BlendModel(Protocol):
    """What the blend pass calls. Shapes: ``h`` is ``[tokens, hidden]`` (the residual stream)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    rope: Rope

    def embed(self, ids: torch.Tensor) -> torch.Tensor: ...

    def qkv(self, layer: int, h: torch.Tensor,
            positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``[T, heads, d]``, k and v ``[T, kv_heads, d]``; q and k after RoPE at ``positions``."""
        ...

    def finish_layer(self, layer: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The residual stream after the layer, given its attention output ``[T, heads * d]``."""
        ...

    def logits(self, h: torch.Tensor) -> torch.Tensor: ...


def attend(model: BlendModel, q: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           k_pos: torch.Tensor) -> torch.Tensor:
    """Causal attention on absolute positions: query i sees key j iff ``k_pos[j] <= q_pos[i]``.

    ``q`` ``[Tq, heads, d]``; ``k``/``v`` ``[Tk, kv_heads, d]``. Returns ``[Tq, heads * d]``.
    """
    rep = model.num_heads // model.num_kv_heads
    kk = k.repeat_interleave(rep, dim=1) if rep > 1 else k
    vv = v.repeat_interleave(rep, dim=1) if rep > 1 else v
    # 4-D inputs: torch's CPU flash kernel takes them; 3-D ones fall back to a path 3-4x slower
    kt, vt = kk.transpose(0, 1)[None], vv.transpose(0, 1)[None]
    tq = int(q.shape[0])
    # With keys in position order, a block of queries needs only the keys up to its last position:
    # the kernel does not skip masked keys itself, so cut them (about half the work of a prefill).
    ordered = tq > _Q_BLOCK and bool((k_pos[1:] >= k_pos[:-1]).all())
    if not ordered:
        return _attend(model, q, q_pos, kt, vt, k_pos)
    outs = []
    for a in range(0, tq, _Q_BLOCK):
        qp = q_pos[a:a + _Q_BLOCK]
        m = int(torch.searchsorted(k_pos, qp.max(), right=True))
        outs.append(_attend(model, q[a:a + _Q_BLOCK], qp, kt[:, :, :m], vt[:, :, :m], k_pos[:m]))
    return torch.cat(outs)


#: queries per attention call when keys can be cut to the visible ones
_Q_BLOCK = 256


def _attend(model: BlendModel, q: torch.Tensor, q_pos: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor,
            k_pos: torch.Tensor) -> torch.Tensor:
    mask = k_pos[None, :] <= q_pos[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kt, vt, attn_mask=mask[None, None],
                                         scale=model.scale)
    return out[0].transpose(0, 1).reshape(q.shape[0], -1)


def extend(model: BlendModel, ids: torch.Tensor, past: list[LayerKV] | None = None,
           all_logits: bool = False) -> tuple[torch.Tensor, list[LayerKV]]:
    """Exact forward of ``ids`` after ``past`` (KV of positions ``0..len(past)-1``).

    Returns the logits (of the last token, or of every token with ``all_logits``) and the KV
    of all positions (``past`` followed by the new tokens').
    """
    start = int(past[0][0].shape[0]) if past else 0
    n = int(ids.shape[0])
    pos = torch.arange(start, start + n)
    all_pos = torch.arange(start + n)
    h = model.embed(ids)
    out: list[LayerKV] = []
    for layer in range(model.num_layers):
        q, k, v = model.qkv(layer, h, pos)
        if past:
            k = torch.cat((past[layer][0], k))
            v = torch.cat((past[layer][1], v))
        out.append((k, v))
        h = model.finish_layer(layer, h, attend(model, q, pos, k, v, all_pos))
    return model.logits(h if all_logits else h[-1:]), out


@dataclass
class HFLlama:
    """``BlendModel`` over a ``transformers`` Llama (``LlamaForCausalLM``), float32 on CPU."""

    model: Any

    def __post_init__(self) -> None:
        cfg = self.model.config
        inner = self.model.model
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        check_rope_type(rope.get("rope_type") or rope.get("type"))
        if float(getattr(inner.rotary_emb, "attention_scaling", 1.0)) != 1.0:
            raise BlendUnsupported("CacheBlend: RoPE with an attention scaling factor is not supported")
        self.num_layers = int(cfg.num_hidden_layers)
        self.num_heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(cfg.num_key_value_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self.scale = self.head_dim ** -0.5
        self.rope = Rope.of(inner.rotary_emb.inv_freq)
        self._layers = inner.layers

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_tokens(ids)  # type: ignore[no-any-return]

    def qkv(self, layer: int, h: torch.Tensor,
            positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        blk = self._layers[layer]
        attn = blk.self_attn
        x = blk.input_layernorm(h)
        t, d = x.shape[0], self.head_dim
        q = attn.q_proj(x).view(t, self.num_heads, d)
        k = attn.k_proj(x).view(t, self.num_kv_heads, d)
        v = attn.v_proj(x).view(t, self.num_kv_heads, d)
        cos, sin = self.model.model.rotary_emb(x, positions[None, :])
        q, k = apply_rotary_pos_emb(q[None], k[None], cos, sin, unsqueeze_dim=2)
        return q[0], k[0], v

    def finish_layer(self, layer: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        blk = self._layers[layer]
        h = h + blk.self_attn.o_proj(attn)
        return h + blk.mlp(blk.post_attention_layernorm(h))  # type: ignore[no-any-return]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.model.norm(h))  # type: ignore[no-any-return]
