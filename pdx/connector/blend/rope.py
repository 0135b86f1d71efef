"""RoPE re-rotation: move a segment's cached K from the position it was computed at to where it is used.

K is stored after RoPE at the segment's base position ``b``. Rotary embedding is a rotation by
``pos * inv_freq`` in each frequency pair, so K at ``b + delta`` is K at ``b`` rotated by
``delta * inv_freq``: no recompute. The angles, cos and sin are computed in float64 from the model's
own ``inv_freq`` and the product is taken in float64, so a round trip to another position and
back costs one float32 rounding (relative error ~1e-7), whatever the distance.

This holds only where the embedding is a pure rotation with position-independent frequencies:
``rope_scaling`` types ``default``, ``linear`` and ``llama3`` (they only change ``inv_freq``).
Types whose frequencies depend on the sequence length (``dynamic``, ``longrope``), scale the
result (``yarn``'s attention factor is harmless but its variants differ per engine) or split the
dimensions (``mrope``) are refused by ``check_rope_type``.

Pure torch; called by the blend pass (``pdx.connector.blend.blend``) and its tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pdx.connector.blend.errors import BlendUnsupported

#: rope types whose embedding at position p is a rotation by p * inv_freq
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def check_rope_type(rope_type: str | None, *, neox_style: bool = True) -> None:
    """Raise ``BlendUnsupported`` naming the type unless K can be re-rotated by a position delta."""
    kind = rope_type or "default"
    if kind not in SUPPORTED_ROPE_TYPES:
        raise BlendUnsupported(f"CacheBlend cannot re-rotate RoPE of type {kind!r}: its frequencies or "
                               f"scale depend on more than the position; supported: "
                               f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    if not neox_style:
        raise BlendUnsupported("CacheBlend supports the NeoX (rotate-half) RoPE layout only")


@dataclass(frozen=True)
class Rope:
    """The model's rotary frequencies, as float64 (``inv_freq`` has ``head_dim // 2`` entries)."""

    inv_freq: torch.Tensor

    @classmethod
    def of(cls, inv_freq: Any) -> Rope:
        return cls(torch.as_tensor(inv_freq).detach().to("cpu", torch.float64).reshape(-1))

    @property
    def rotary_dim(self) -> int:
        return 2 * int(self.inv_freq.numel())

    def rotate(self, k: torch.Tensor, delta: torch.Tensor | int) -> torch.Tensor:
        """``k`` (``[tokens, heads, head_dim]``, after RoPE) rotated by ``delta`` positions.

        ``delta`` is an int or a per-token integer tensor. Returns a new tensor of ``k``'s dtype;
        a zero delta returns ``k`` itself unchanged (bit-exact).
        """
        if isinstance(delta, int):
            if delta == 0:
                return k
            d = torch.tensor([float(delta)], dtype=torch.float64)  # one angle set, broadcast over tokens
        else:
            if not bool(delta.any()):
                return k
            d = delta.to(torch.float64)
        rd = self.rotary_dim
        if k.shape[-1] < rd:
            raise BlendUnsupported(f"head size {k.shape[-1]} is smaller than the rotary dim {rd}")
        ang = d[:, None] * self.inv_freq[None, :]  # [T or 1, rd/2], float64
        cos = torch.cat((ang.cos(), ang.cos()), dim=-1)[:, None, :]
        sin = torch.cat((ang.sin(), ang.sin()), dim=-1)[:, None, :]
        x = k[..., :rd].to(torch.float64)
        half = rd // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        out = k.clone()
        out[..., :rd] = (x * cos + rot * sin).to(k.dtype)
        return out
