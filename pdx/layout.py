"""KV layout descriptor and the fingerprints derived from it.

Two fingerprints, for two questions:

* ``fingerprint`` — can two engines exchange KV at all? Everything that describes
  the engine's KV: model, dtype, layers, heads, head size, block size, TP shape and
  memory layout. Peers compare it in the transport handshake.
* ``chunk_fingerprint`` — what determines the bytes of a packed chunk? Chunks use
  one canonical order (see ``pdx.kernels``) whatever the engine's paged layout or
  block size, so only model, dtype, layers, head size and the KV heads the chunk
  holds go in. It is mixed into every chunk key, so a different model or dtype can
  never hit another's chunks, while engines with different block sizes share them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from enum import Enum

from pdx.errors import LayoutError

#: bumped whenever the packed chunk format changes, so old chunks stop matching.
CHUNK_FORMAT_VERSION = 1


class KVDtype(str, Enum):
    """Element type of the KV cache. fp8 caches are carried as opaque bytes."""

    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"
    FP8_E4M3 = "fp8_e4m3"
    FP8_E5M2 = "fp8_e5m2"

    @property
    def itemsize(self) -> int:
        return {"bf16": 2, "fp16": 2, "fp32": 4}.get(self.value, 1)


class MemoryLayout(str, Enum):
    """How the engine stores paged KV for one layer.

    ``CPU_KV_CONCAT``: ``[num_blocks, kv_heads, block_size, 2*head_size]`` (vLLM CPU backend as seen).
    ``NHD``: ``[2, num_blocks, block_size, kv_heads, head_size]`` (vLLM flash-attn style).
    ``HND``: ``[2, num_blocks, kv_heads, block_size, head_size]``.
    """

    CPU_KV_CONCAT = "cpu_kv_concat"
    NHD = "nhd"
    HND = "hnd"


@dataclass(frozen=True)
class KVLayout:
    """What an engine's KV cache looks like, per TP rank."""

    model_id: str
    dtype: KVDtype
    num_layers: int
    num_kv_heads: int  # total across all TP ranks
    head_size: int
    block_size: int
    tp_rank: int = 0
    tp_size: int = 1
    memory_layout: MemoryLayout = MemoryLayout.NHD

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_size", "block_size", "tp_size"):
            if getattr(self, name) <= 0:
                raise LayoutError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise LayoutError(f"tp_rank {self.tp_rank} outside [0, {self.tp_size})")
        if self.num_kv_heads % self.tp_size and self.tp_size % self.num_kv_heads:
            raise LayoutError(
                f"{self.num_kv_heads} KV heads cannot be split over tp_size {self.tp_size}"
            )
        # Enums may arrive as strings from msgpack or YAML.
        object.__setattr__(self, "dtype", KVDtype(self.dtype))
        object.__setattr__(self, "memory_layout", MemoryLayout(self.memory_layout))

    # --- derived -----------------------------------------------------------------------------

    @property
    def heads_per_rank(self) -> int:
        """KV heads this rank holds (heads are replicated when tp_size > num_kv_heads)."""
        return max(1, self.num_kv_heads // self.tp_size)

    @property
    def head_range(self) -> tuple[int, int]:
        """The [start, end) global KV-head range this rank holds."""
        if self.tp_size <= self.num_kv_heads:
            start = self.tp_rank * self.heads_per_rank
        else:  # replicated heads: several ranks hold the same head
            start = self.tp_rank * self.num_kv_heads // self.tp_size
        return start, start + self.heads_per_rank

    def token_bytes(self, num_heads: int | None = None) -> int:
        """Bytes of K and V for one token over all layers and ``num_heads`` heads."""
        heads = self.heads_per_rank if num_heads is None else num_heads
        return 2 * self.num_layers * heads * self.head_size * self.dtype.itemsize

    def chunk_bytes(self, chunk_tokens: int) -> int:
        """Payload bytes of one packed chunk of ``chunk_tokens`` tokens on this rank."""
        return chunk_tokens * self.token_bytes()

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["dtype"] = self.dtype.value
        d["memory_layout"] = self.memory_layout.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> KVLayout:
        try:
            return cls(**d)  # type: ignore[arg-type]
        except TypeError as exc:
            raise LayoutError(f"bad layout {d!r}: {exc}") from exc

    # --- fingerprints ------------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        """Full compatibility fingerprint (hex, 16 chars)."""
        return _digest(self.to_dict())

    @property
    def chunk_fingerprint(self) -> str:
        """Fingerprint of what determines packed chunk bytes (hex, 16 chars)."""
        start, end = self.head_range
        return _digest(
            {
                "format": CHUNK_FORMAT_VERSION,
                "model_id": self.model_id,
                "dtype": self.dtype.value,
                "num_layers": self.num_layers,
                "num_kv_heads": self.num_kv_heads,
                "head_size": self.head_size,
                "heads": [start, end],
            }
        )


def _digest(fields: dict[str, object]) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()[:16]
