"""P/D on real vLLM: a prefill engine computes the prompt's KV, a decode engine loads it through
the two agents and generates; the text equals a plain vLLM server's, token for token."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from conftest_connector import CHUNK_TOKENS, MAX_TOKENS, PdxStack

pytestmark = pytest.mark.e2e


def test_decode_loads_the_prefill_kv_and_matches_plain_vllm(
        stack: PdxStack, prompts: dict[str, list[int]], references: dict[str, list[int]],
        complete: Callable[..., dict[str, Any]]) -> None:
    prefill, decode = stack.use("prefill", "decode")
    ids = prompts["pd"]
    d_vllm, d_agent = decode.vllm_metrics(), decode.agent_metrics()
    p_leases = prefill.pool()["leases"]

    # 1. prefill: one token, and the params the decode side needs
    first = complete(prefill, ids, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
    assert first["choices"][0]["token_ids"] == references["pd"][:1]
    params = first["kv_transfer_params"]
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    remote = params["pdx"]
    # every prompt token but the last (decode computes it to sample): the full chunks, then the tail
    assert len(ids) % CHUNK_TOKENS > 1
    chunks = len(ids) // CHUNK_TOKENS + 1
    assert remote["num_tokens"] == len(ids) - 1
    assert len(remote["keys"]) == chunks
    assert remote["agent"] == prefill.agent.peer_address
    assert prefill.pool()["leases"] >= p_leases + chunks  # kept for the decode side

    # 2. decode with those params
    out = complete(decode, ids, max_tokens=MAX_TOKENS, kv_transfer_params=params)
    assert out["choices"][0]["token_ids"] == references["pd"]

    # 3. the KV came over the transfer, not from a recompute
    d_vllm2, d_agent2 = decode.vllm_metrics(), decode.agent_metrics()
    loaded = (d_vllm2.value("vllm:external_prefix_cache_hits_total")
              - d_vllm.value("vllm:external_prefix_cache_hits_total"))
    assert loaded == len(ids) - 1
    fetched = (d_agent2.value("pdx_agent_transfer_chunks_total", kind="fetch", status="done")
               - d_agent.value("pdx_agent_transfer_chunks_total", kind="fetch", status="done"))
    assert fetched == chunks
    moved = (d_agent2.value("pdx_agent_transfer_bytes_total", kind="fetch")
             - d_agent.value("pdx_agent_transfer_bytes_total", kind="fetch"))
    assert moved >= (len(ids) - 1) * 1024  # tiny model: 1 KiB of KV per token
    # the decode side's fetch released the prefill side's pins
    assert prefill.pool()["leases"] == p_leases


def test_layerwise_prefill_streams_every_layer_and_decode_matches_plain_vllm(
        stack: PdxStack, prompts: dict[str, list[int]], references: dict[str, list[int]],
        complete: Callable[..., dict[str, Any]]) -> None:
    """Layer-wise P/D: the prefill request names the decode agent; its connector pushes each layer as
    vLLM's ``save_kv_layer`` reports it, the decode agent stages it, and decode's fetch commits the
    staged chunks (re-hashed) instead of pulling them; the text is plain vLLM's."""
    prefill, decode = stack.use("prefill", "decode")
    ids = prompts["pd_layerwise"]
    push0, stage0 = prefill.status()["push"], decode.status()["push"]
    d_agent = decode.agent_metrics()
    target = {"do_remote_decode": True, "pdx": {"v": 2, "push": {"agent": decode.agent.peer_address}}}
    first = complete(prefill, ids, max_tokens=1, kv_transfer_params=target)
    assert first["choices"][0]["token_ids"] == references["pd_layerwise"][:1]
    params = first["kv_transfer_params"]
    chunks = len(params["pdx"]["keys"])
    out = complete(decode, ids, max_tokens=MAX_TOKENS, kv_transfer_params=params)
    assert out["choices"][0]["token_ids"] == references["pd_layerwise"]
    push, stage = prefill.status()["push"], decode.status()["push"]
    layers = int(prefill.status()["layout"]["num_layers"])
    assert push["sealed"] > push0["sealed"] and push["failed"] == push0["failed"]
    assert push["layers"] - push0["layers"] >= layers
    assert stage["staged_taken"] - stage0["staged_taken"] == chunks  # every chunk came staged
    d_agent2 = decode.agent_metrics()
    fetched = (d_agent2.value("pdx_agent_transfer_chunks_total", kind="fetch", status="done")
               - d_agent.value("pdx_agent_transfer_chunks_total", kind="fetch", status="done"))
    assert fetched == chunks
