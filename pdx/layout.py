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
    """How the engine stores paged KV for one layer: the logical shape of the tensor it
    registers and where K and V of one token sit in it (``pdx.kernels.detect_layout``
    derives it; ``docs/kernels.md`` cites the vLLM code each one comes from).

    Shapes use the KV heads of this rank. The kernels follow the tensor's strides, so
    only the logical order below matters, not the physical one.

    ``NHD``: ``[2, num_blocks, block_size, kv_heads, head_size]`` (flash-attn style, K then V).
    ``HND``: ``[2, num_blocks, kv_heads, block_size, head_size]``.
    ``KV_CONCAT``: ``[num_blocks, kv_heads, block_size, 2*head_size]``, K in the first half of
    the last dimension and V in the second (vLLM's GPU backends: FLASH_ATTN, TRITON_ATTN, ...).
    ``CPU_VEC``: vLLM's CPU_ATTN backend with the ``vec``/``vec16`` ISA: registered as
    ``[num_blocks, kv_heads, block_size, 2*head_size]``, but each (block, head) page of
    ``2*block_size*head_size`` elements holds K transposed (``[head_size, block_size]``)
    followed by V (``[block_size, head_size]``).
    ``CPU_AMX``: vLLM's CPU_ATTN backend with the ``amx`` ISA (bf16): same registered shape,
    K and V packed in AMX tiles inside each page.
    """

    NHD = "nhd"
    HND = "hnd"
    KV_CONCAT = "kv_concat"
    CPU_VEC = "cpu_vec"
    CPU_AMX = "cpu_amx"


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
        return self.chunk_fingerprint_for_heads(*self.head_range)

    def chunk_fingerprint_for_heads(self, start: int, end: int) -> str:
        """``chunk_fingerprint`` of a chunk holding the global KV heads ``[start, end)``.

        Used for chunks packed with a head subset (``pdx.kernels.pack(..., heads=...)``).
        """
        if not 0 <= start < end <= self.num_kv_heads:
            raise LayoutError(f"head range [{start}, {end}) outside [0, {self.num_kv_heads})")
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
