"""vLLM's Llama with one addition: it records itself as this process's model (``handle.record``).

Imported by vLLM's model registry only when the blend handle is switched on (``handle.register``).
The constructor keeps vLLM's own signature (keyword-only ``vllm_config`` and ``prefix``): vLLM
inspects it to tell current model classes from old-style ones.
"""

from __future__ import annotations

from typing import Any

from vllm.model_executor.models.llama import LlamaForCausalLM

from pdx.connector.blend.handle import record


class HandleLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config: Any, prefix: str = "", **kwargs: Any) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        record(self)
