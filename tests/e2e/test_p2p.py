"""Peer-to-peer reuse on real vLLM: a worker serves a prompt whose prefix only another agent holds;
on the proxy's hint (``kv_transfer_params.pdx.hint``) its agent fetches those chunks from that agent
over the peer plane, and the greedy output equals plain vLLM's. A hint naming a dead agent is a
recompute, never wrong text."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from conftest_connector import CHUNK_TOKENS, MAX_TOKENS, PdxStack

from pdx.engine.vllm import free_port

pytestmark = pytest.mark.e2e

HITS = "vllm:external_prefix_cache_hits_total"
LOADED = "pdx_agent_loaded_tokens_total"
PREFIX_CHUNKS = 8


def _hint(agent: str, chunks: int) -> dict[str, Any]:
    return {"pdx": {"v": 2, "hint": {"agent": agent, "chunks": chunks, "agent_id": "holder"}}}


def test_worker_b_fetches_the_prefix_only_a_holds(stack: PdxStack, prompts: dict[str, list[int]],
                                                  references: dict[str, list[int]],
                                                  complete: Callable[..., dict[str, Any]]) -> None:
    a, b = stack.use("prefill", "decode")  # two workers, two agents; b's store starts without the prompt
    ids = prompts["p2p"]
    prefix = ids[: PREFIX_CHUNKS * CHUNK_TOKENS + 60]

    # A serves a request whose prompt is the prefix: it computes and stores its chunks
    complete(a, prefix, max_tokens=1)
    a_leases = a.pool()["leases"]

    # B serves the whole prompt with the proxy's hint naming A's agent
    b_vllm, b_agent = b.vllm_metrics(), b.agent_metrics()
    out = complete(b, ids, MAX_TOKENS, kv_transfer_params=_hint(a.agent.peer_address, PREFIX_CHUNKS))
    assert out["choices"][0]["token_ids"] == references["p2p"]  # greedy output of plain vLLM

    b_vllm2, b_agent2 = b.vllm_metrics(), b.agent_metrics()
    fetched = b_agent2.value(LOADED, source="peer") - b_agent.value(LOADED, source="peer")
    assert fetched == PREFIX_CHUNKS * CHUNK_TOKENS  # the prefix came from A over the peer plane
    assert b_agent2.value(LOADED, source="pd") == b_agent.value(LOADED, source="pd")  # not a P/D fetch
    assert b_vllm2.value(HITS) - b_vllm.value(HITS) == PREFIX_CHUNKS * CHUNK_TOKENS
    assert a.pool()["leases"] == a_leases  # B's fetch let A's pins go


def test_a_hint_naming_a_dead_agent_is_recomputed(stack: PdxStack, prompts: dict[str, list[int]],
                                                  references: dict[str, list[int]],
                                                  complete: Callable[..., dict[str, Any]]) -> None:
    (b,) = stack.use("decode")
    ids = prompts["p2p_dead_peer"]
    before = b.agent_metrics()
    out = complete(b, ids, MAX_TOKENS, kv_transfer_params=_hint(f"tcp://127.0.0.1:{free_port()}", PREFIX_CHUNKS))
    assert out["choices"][0]["token_ids"] == references["p2p_dead_peer"]
    after = b.agent_metrics()
    # the fetch failed and nothing was loaded: vLLM recomputed the prompt (vLLM's own counter,
    # external_prefix_cache_hits, counts the offered tokens at scheduling, failed loads included)
    failed = "pdx_agent_transfer_jobs_total"
    assert after.value(failed, kind="fetch", result="failed") == before.value(failed, kind="fetch", result="failed") + 1
    for source in ("peer", "l1", "shared"):
        assert after.value(LOADED, source=source) == before.value(LOADED, source=source)
