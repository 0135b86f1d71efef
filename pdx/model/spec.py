"""What an embedded model is: a frozen spec, the presets, and the spec's hash.

The hash names the cache folder (``<data dir>/models/<name>-<hash>``), so any change to
the spec, or to ``BUILD_VERSION`` (bumped whenever the generator's output changes),
lands in a new folder instead of silently reusing old files.

Pure data; no heavy imports. Safe to import from anywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pdx.errors import ModelError

#: Bump when the bytes produced for an unchanged spec change (new init scheme, new corpus...).
BUILD_VERSION = 2

#: Head sizes the vLLM CPU attention backend accepts.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


@dataclass(frozen=True)
class ModelSpec:
    """A random-weight Llama-architecture model plus its locally trained tokenizer.

    ``vocab_size`` is the target of the tokenizer trainer; the model's vocabulary is the
    tokenizer's actual size (equal to the target for the presets, checked at build time).
    """

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int = 8192
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    seed: int = 0
    #: Standard deviation of every embedding and projection (``initializer_range`` of
    #: transformers' Llama): the statistics of a freshly initialised real model.
    init_std: float = 0.02
    #: Sentences of generated text the tokenizer is trained on.
    corpus_sentences: int = 20000

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ModelError(f"model name {self.name!r}: use letters, digits, '-' and '_'")
        for f in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                  "intermediate_size", "vocab_size", "max_position_embeddings", "corpus_sentences",
                  "init_std"):
            if getattr(self, f) <= 0:
                raise ModelError(f"model spec {self.name!r}: {f} must be positive")
        if self.num_heads % self.num_kv_heads:
            raise ModelError(f"model spec {self.name!r}: num_heads ({self.num_heads}) must be a "
                             f"multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim not in CPU_HEAD_SIZES:
            raise ModelError(f"model spec {self.name!r}: head_dim {self.head_dim} is not accepted by "
                             f"vLLM's CPU attention; use one of {CPU_HEAD_SIZES}")
        if self.vocab_size < 512:
            raise ModelError(f"model spec {self.name!r}: vocab_size must be at least 512 "
                             "(256 byte symbols + merges)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def spec_hash(self) -> str:
        """16 hex digits of sha256 over the spec and ``BUILD_VERSION``."""
        blob = json.dumps({"spec": self.to_dict(), "build_version": BUILD_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def folder_name(self) -> str:
        return f"{self.name}-{self.spec_hash()}"

    def num_params(self) -> int:
        """Parameter count of the model this spec builds (untied embeddings)."""
        h, kvd = self.hidden_size, self.num_kv_heads * self.head_dim
        qd = self.num_heads * self.head_dim
        attn = h * qd + 2 * h * kvd + qd * h
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        return self.num_layers * per_layer + 2 * self.vocab_size * h + h

    def kv_bytes_per_token(self, dtype_bytes: int = 4) -> int:
        """Bytes of K and V per token over all layers."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * dtype_bytes


PRESETS: dict[str, ModelSpec] = {
    # Correctness tests: builds in a few seconds, vLLM prefill is framework-bound.
    "tiny": ModelSpec(
        name="tiny", num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=32,
        intermediate_size=384, vocab_size=2048,
    ),
    # Benchmarks: ~110M parameters, prefill compute dominates TTFT on a CPU.
    "small": ModelSpec(
        name="small", num_layers=8, hidden_size=1024, num_heads=16, num_kv_heads=8, head_dim=64,
        intermediate_size=2816, vocab_size=4096,
    ),
}


def preset(name: str) -> ModelSpec:
    """The preset called ``name``; ``ModelError`` listing the presets otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
