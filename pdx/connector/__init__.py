"""``PdxConnector``: pdx inside vLLM (``kv_connector_module_path="pdx.connector.vllm"``).

The scheduler half (``scheduler``), the worker half (``worker``), the metadata between
them (``metadata``) and the ``kv_transfer_params`` schema (``params``) import no vLLM;
only ``pdx.connector.vllm`` does. See ``docs/connector.md``.
"""
