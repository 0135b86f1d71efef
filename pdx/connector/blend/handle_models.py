"""vLLM's Llama with one addition: it records itself as this process's model (``handle.record``).

Imported by vLLM's model registry only when the blend handle is switched on (``handle.register``).
"""

from __future__ import annotations

from typing import Any

from vllm.model_executor.models.llama import LlamaForCausalLM

from pdx.connector.blend.handle import record


class HandleLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        record(self)
