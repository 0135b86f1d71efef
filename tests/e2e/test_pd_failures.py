"""P/D when something is wrong: corrupted bytes in the transfer, kv_transfer_params that point at
a dead agent or carry another fingerprint. Each time: the problem is logged, vLLM recomputes
what could not be loaded, the output still equals plain vLLM's, and nothing hangs."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import pytest
from conftest_connector import MAX_TOKENS, PdxStack

from pdx.deploy.agent_engine import AgentEngine
from pdx.engine.vllm import free_port

pytestmark = pytest.mark.e2e

HITS = "vllm:external_prefix_cache_hits_total"


def _prefill(prefill: AgentEngine, ids: list[int], complete: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    out = complete(prefill, ids, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
    params: dict[str, Any] = out["kv_transfer_params"]
    assert params["pdx"]["num_tokens"] == len(ids) - 1  # full chunks and the tail
    return params


def _new_log(engine: AgentEngine, start: int) -> str:
    return engine.engine_log_text()[start:]


def test_dead_prefill_agent_means_recompute(stack: PdxStack, prompts: dict[str, list[int]],
                                            references: dict[str, list[int]],
                                            complete: Callable[..., dict[str, Any]]) -> None:
    prefill, decode = stack.use("prefill", "decode")
    ids = prompts["dead_agent"]
    params = copy.deepcopy(_prefill(prefill, ids, complete))
    dead = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    params["pdx"]["agent"] = dead
    log_start = len(decode.engine_log_text())
    before = decode.agent_metrics()

    out = complete(decode, ids, MAX_TOKENS, kv_transfer_params=params)

    assert out["choices"][0]["token_ids"] == references["dead_agent"]
    chunks = "pdx_agent_transfer_chunks_total"
    after = decode.agent_metrics()
    assert after.value(chunks, kind="fetch", status="done") == before.value(chunks, kind="fetch", status="done")
    log = _new_log(decode, log_start)
    n = len(params["pdx"]["keys"])  # 11 full chunks and the tail
    assert re.search(rf"{n} of {n} chunks not loaded from {re.escape(dead)}; vLLM recomputes", log), log[-3000:]


def test_wrong_fingerprint_is_refused(stack: PdxStack, prompts: dict[str, list[int]],
                                      references: dict[str, list[int]],
                                      complete: Callable[..., dict[str, Any]]) -> None:
    prefill, decode = stack.use("prefill", "decode")
    ids = prompts["wrong_fingerprint"]
    params = copy.deepcopy(_prefill(prefill, ids, complete))
    real = params["pdx"]["fingerprint"]
    params["pdx"]["fingerprint"] = "0123456789abcdef"
    log_start = len(decode.engine_log_text())
    before, agent_before = decode.vllm_metrics(), decode.agent_metrics()

    out = complete(decode, ids, MAX_TOKENS, kv_transfer_params=params)

    assert out["choices"][0]["token_ids"] == references["wrong_fingerprint"]
    assert decode.vllm_metrics().value(HITS) == before.value(HITS)
    fetches = "pdx_agent_transfer_jobs_total"
    assert decode.agent_metrics().value(fetches, kind="fetch") == agent_before.value(fetches, kind="fetch")
    log = _new_log(decode, log_start)
    assert "chunk fingerprint '0123456789abcdef' differs from this engine's" in log, log[-3000:]
    assert real in log and "recomputing" in log


def test_corrupted_transfer_is_caught_and_recomputed(stack: PdxStack, prompts: dict[str, list[int]],
                                                     references: dict[str, list[int]],
                                                     complete: Callable[..., dict[str, Any]]) -> None:
    # The "both" engine's agent flips a byte in every 3rd chunk it receives (transport test hook).
    prefill, both = stack.use("prefill", "both")
    ids = prompts["integrity"]
    params = _prefill(prefill, ids, complete)
    log_start = len(both.engine_log_text())
    before, agent_before = both.vllm_metrics(), both.agent_metrics()

    out = complete(both, ids, MAX_TOKENS, kv_transfer_params=params)

    assert out["choices"][0]["token_ids"] == references["integrity"]
    agent = both.agent_metrics()
    chunks = "pdx_agent_transfer_chunks_total"
    corrupt = agent.value(chunks, kind="fetch", status="corrupt") - agent_before.value(chunks, kind="fetch",
                                                                                      status="corrupt")
    done = agent.value(chunks, kind="fetch", status="done") - agent_before.value(chunks, kind="fetch", status="done")
    assert corrupt >= 1 and done + corrupt == len(params["pdx"]["keys"])
    loaded = both.vllm_metrics().value(HITS) - before.value(HITS)
    # counted at scheduling; the corrupt part was then reported and recomputed
    assert loaded == params["pdx"]["num_tokens"] == len(ids) - 1
    log = _new_log(both, log_start)
    assert re.search(r"chunks not loaded from tcp://[0-9.:]+; vLLM recomputes \d+ blocks", log), log[-3000:]
