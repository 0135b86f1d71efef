"""pdx: KV-cache transport and store for disaggregated LLM serving.

Importing ``pdx`` imports no optional backend (nixl, ucxx, redis, triton, vllm).
"""

__version__ = "0.1.0"
