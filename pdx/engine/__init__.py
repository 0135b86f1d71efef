"""Inference engines pdx runs next to: command lines, environments and process handles.

``pdx.engine.vllm`` launches vLLM's OpenAI server on this CPU build (or a GPU one) with
the settings it needs; it imports no engine library itself.
"""
