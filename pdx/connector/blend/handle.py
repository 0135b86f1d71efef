"""The model handle: how the connector's worker half finds the model object vLLM loaded.

vLLM hands a connector its KV tensors, never the model. The blend pass needs the model's own
modules, so pdx ships a ``vllm.general_plugins`` entry point (``pyproject.toml``)::

    [project.entry-points."vllm.general_plugins"]
    pdx_blend = "pdx.connector.blend.handle:register"

vLLM calls ``register`` in each of its processes at start-up. It is opt-in: unless the engine's
environment has ``PDX_BLEND_HANDLE=1`` (set by whoever launches an engine that serves blend
requests) it returns at once, so every other vLLM process on the machine pays nothing and loads
no pdx code. (An environment variable, not pdx's config loader, because vLLM gives plugins no
other input.) When on, it registers, for the Llama architectures, a subclass of vLLM's own class
whose only addition is to record the instance here; ``loaded_model`` returns it to the worker half.
The record is per process (one model per vLLM worker) and weak: it never keeps a model alive.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any

from pdx.connector.blend.errors import BlendUnsupported

log = logging.getLogger(__name__)

ENV_SWITCH = "PDX_BLEND_HANDLE"
ARCHITECTURES = ("LlamaForCausalLM",)

# Per-process by nature: vLLM builds one model per worker process, and the plugin and the
# connector meet only through this module.
_models: list[weakref.ReferenceType[Any]] = []


def record(model: Any) -> None:
    """Remember ``model`` as this process's loaded model (the subclass calls it from ``__init__``)."""
    _models[:] = [weakref.ref(model)]


def loaded_model() -> Any:
    """The model vLLM loaded in this process; ``BlendUnsupported`` if the handle was not active."""
    model = _models[0]() if _models else None
    if model is None:
        raise BlendUnsupported(f"CacheBlend: no model handle in this vLLM process: start the engine with "
                               f"{ENV_SWITCH}=1 and pdx installed (the vllm.general_plugins entry point "
                               "pdx_blend), and a Llama-architecture model")
    return model


def register() -> None:
    """vLLM's plugin hook (see the module docstring). Idempotent; a no-op unless switched on."""
    if os.environ.get(ENV_SWITCH) != "1":
        return
    from vllm import ModelRegistry

    for arch in ARCHITECTURES:
        ModelRegistry.register_model(arch, "pdx.connector.blend.handle_models:HandleLlamaForCausalLM")
    log.info("pdx blend model handle registered for %s", ", ".join(ARCHITECTURES))
