"""Random weights for the embedded Llama model, written as ``config.json`` + safetensors.

Called by ``pdx.model.build`` inside the build lock; blocking (a second for ``tiny``,
a few seconds for ``small``). Needs ``torch``, ``transformers`` and ``safetensors``.

Every tensor is drawn from numpy's PCG64 generator seeded with ``(spec.seed, crc32(name))``,
so the bytes depend only on the spec and the tensor's name, not on torch's RNG, the
order of parameters or the library versions. The scheme keeps greedy output lively:

* embeddings and projections are ``N(0, spec.init_std)`` (0.02, transformers' Llama init),
  norms are ones: the statistics of a real model at initialisation, which is what the
  CacheBlend fidelity figures are measured on (build version 2; version 1 used
  ``1/sqrt(fan_in)`` projections with sharpened query/key, a regime no real model is in);
* the ``lm_head`` rows of the special tokens are zero, so greedy decoding (almost) never
  stops early on EOS and ``max_tokens`` tokens come back.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from pdx.model.spec import ModelSpec

WEIGHTS_FILE = "model.safetensors"


def llama_config(spec: ModelSpec, vocab_size: int, special_ids: dict[str, int]) -> Any:
    """The ``transformers.LlamaConfig`` for ``spec`` (float32, untied embeddings)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=spec.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        tie_word_embeddings=False,
        bos_token_id=special_ids["bos"],
        eos_token_id=special_ids["eos"],
        pad_token_id=special_ids["pad"],
        dtype="float32",
        architectures=["LlamaForCausalLM"],
    )


def _shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of ``LlamaForCausalLM(config)``, without allocating them."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def _tensor(spec: ModelSpec, name: str, shape: tuple[int, ...], special: list[int]) -> np.ndarray:
    if name.endswith("norm.weight"):
        return np.ones(shape, dtype=np.float32)
    rng = np.random.Generator(np.random.PCG64([spec.seed, zlib.crc32(name.encode())]))
    out = rng.standard_normal(shape, dtype=np.float32)
    out *= np.float32(spec.init_std)
    if name == "lm_head.weight":
        out[special, :] = 0.0
    return out


def save(spec: ModelSpec, folder: Path, vocab_size: int, special_ids: dict[str, int]) -> int:
    """Write ``config.json``, ``generation_config.json`` and the weights; return the parameter count."""
    import torch
    from safetensors.torch import save_file

    config = llama_config(spec, vocab_size, special_ids)
    shapes = _shapes(config)
    special = sorted(set(special_ids.values()))
    tensors = {name: torch.from_numpy(_tensor(spec, name, shape, special))
               for name, shape in sorted(shapes.items())}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    config.save_pretrained(str(folder))
    (folder / "generation_config.json").write_text(json.dumps({
        "bos_token_id": special_ids["bos"], "eos_token_id": special_ids["eos"],
        "pad_token_id": special_ids["pad"],
    }, indent=2, sort_keys=True) + "\n")
    return sum(int(np.prod(s)) for s in shapes.values())
