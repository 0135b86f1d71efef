"""``BlendModel`` over vLLM's own Llama modules, inside an engine worker.

Called by the connector's worker half (through the model handle) and by the real-vLLM gate
(``tests/e2e/test_blend.py``), with the model object vLLM loaded. Uses the engine's QKV projection,
rotary embedding, norms, MLP and LM head as they are: same weights, same kernels; only attention is
computed by the blend pass. Refuses (``BlendUnsupported``) what it cannot adapt: another architecture,
tensor parallelism, a rotary embedding whose frequencies are not fixed.
"""

from __future__ import annotations

from typing import Any

import torch

from pdx.connector.blend.errors import BlendUnsupported
from pdx.connector.blend.rope import Rope, check_rope_type

#: vLLM rotary embedding classes whose embedding is a rotation by position * inv_freq
_ROPE_CLASSES = {"RotaryEmbedding": "default", "Llama3RotaryEmbedding": "llama3"}


class VllmLlama:
    """See the module docstring. ``model`` is vLLM's ``LlamaForCausalLM`` (or a subclass)."""

    def __init__(self, model: Any) -> None:
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        if inner is None or layers is None or not hasattr(layers[0], "self_attn") or \
                not hasattr(layers[0].self_attn, "qkv_proj"):
            raise BlendUnsupported(f"CacheBlend has no adapter for {type(model).__name__}: it needs "
                                   "Llama-style decoder layers (self_attn.qkv_proj, mlp, two RMSNorms)")
        attn = layers[0].self_attn
        if int(getattr(attn, "total_num_heads", attn.num_heads)) != int(attn.num_heads):
            raise BlendUnsupported("CacheBlend supports tensor parallel size 1 only")
        rot = attn.rotary_emb
        kind = _ROPE_CLASSES.get(type(rot).__name__)
        if kind is None:
            raise BlendUnsupported(f"CacheBlend cannot re-rotate vLLM's {type(rot).__name__}: only "
                                   f"{', '.join(_ROPE_CLASSES)} are rotations by fixed frequencies")
        check_rope_type(kind, neox_style=bool(rot.is_neox_style))
        if int(rot.rotary_dim) != int(attn.head_dim):
            raise BlendUnsupported("CacheBlend supports RoPE over the whole head (partial rotary is not)")
        self.model = model
        self._layers = layers
        self.num_layers = len(layers)
        self.num_heads = int(attn.num_heads)
        self.num_kv_heads = int(attn.num_kv_heads)
        self.head_dim = int(attn.head_dim)
        self.scale = float(attn.scaling)
        self._sizes = [int(attn.q_size), int(attn.kv_size), int(attn.kv_size)]
        self.rope = Rope.of(rot._compute_inv_freq(rot.base))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_tokens(ids)  # type: ignore[no-any-return]

    def qkv(self, layer: int, h: torch.Tensor,
            positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        blk = self._layers[layer]
        x = blk.input_layernorm(h)
        qkv, _ = blk.self_attn.qkv_proj(x)
        q, k, v = qkv.split(self._sizes, dim=-1)
        q, k = blk.self_attn.rotary_emb(positions, q.contiguous(), k.contiguous())
        t, d = x.shape[0], self.head_dim
        return q.reshape(t, self.num_heads, d), k.reshape(t, self.num_kv_heads, d), \
            v.reshape(t, self.num_kv_heads, d)

    def finish_layer(self, layer: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        blk = self._layers[layer]
        out, _ = blk.self_attn.o_proj(attn)
        h = h + out
        return h + blk.mlp(blk.post_attention_layernorm(h))  # type: ignore[no-any-return]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(self.model.model.norm(h))  # type: ignore[no-any-return]
