"""Prefix reuse on real vLLM (kv_both, vLLM's own prefix cache off): a repeated prompt loads its
KV from pdx's store, from L1, after it spilled to disk and Redis, and after the engine crashed;
every token but its last (its whole chunks and its stored tail), and an extended prompt loads the
earlier prompt's tail too."""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest_connector import CHUNK_TOKENS, MAX_TOKENS, PdxStack

from pdx.deploy.agent_engine import AgentEngine, Metrics

pytestmark = pytest.mark.e2e

HITS = "vllm:external_prefix_cache_hits_total"


def _loaded(engine: AgentEngine, before: Metrics) -> float:
    return engine.vllm_metrics().value(HITS) - before.value(HITS)


def _tier_hits(m: Metrics, tier: str) -> float:
    return m.value("pdx_store_hits_total", tier=tier, op="get")


def test_second_request_loads_from_the_store(stack: PdxStack, prompts: dict[str, list[int]],
                                             references: dict[str, list[int]],
                                             complete: Callable[..., dict[str, Any]]) -> None:
    (both,) = stack.use("both")
    ids = prompts["reuse"]
    full = (len(ids) - 1) // CHUNK_TOKENS * CHUNK_TOKENS
    assert (len(ids) - 1) % CHUNK_TOKENS  # the prompt ends in a tail

    before = both.vllm_metrics()
    out1 = complete(both, ids, MAX_TOKENS)
    assert out1["choices"][0]["token_ids"] == references["reuse"]
    assert _loaded(both, before) == 0  # first time: computed, then stored

    before, agent_before = both.vllm_metrics(), both.agent_metrics()
    out2 = complete(both, ids, MAX_TOKENS)
    assert out2["choices"][0]["token_ids"] == references["reuse"]
    assert _loaded(both, before) == len(ids) - 1  # the whole chunks, then the tail
    assert _tier_hits(both.agent_metrics(), "l1") - _tier_hits(agent_before, "l1") == full // CHUNK_TOKENS + 1


def test_whole_chunk_prompt_loads_all_but_its_last_token(stack: PdxStack, prompts: dict[str, list[int]],
                                                         references: dict[str, list[int]],
                                                         complete: Callable[..., dict[str, Any]]) -> None:
    # 12 whole chunks: the last one is loaded in part, and vLLM computes only the last prompt token.
    (both,) = stack.use("both")
    ids = prompts["reuse_whole_chunks"]
    assert len(ids) % CHUNK_TOKENS == 0
    assert complete(both, ids, MAX_TOKENS)["choices"][0]["token_ids"] == references["reuse_whole_chunks"]
    before = both.vllm_metrics()
    out = complete(both, ids, MAX_TOKENS)
    assert out["choices"][0]["token_ids"] == references["reuse_whole_chunks"]
    assert _loaded(both, before) == len(ids) - 1


def test_tenants_with_the_same_prompt_never_share_kv(stack: PdxStack, prompts: dict[str, list[int]],
                                                     references: dict[str, list[int]],
                                                     complete: Callable[..., dict[str, Any]]) -> None:
    # vLLM's per-request cache_salt (the proxy sets "tenant:<salt>" per API key) is part of every
    # chunk key: tenant B's identical prompt finds nothing of tenant A's, and each repeat finds its own.
    (both,) = stack.use("both")
    ids = prompts["tenants"]
    full = len(ids) - 1  # whole chunks and tail

    def loaded_by(salt: str) -> float:
        before = both.vllm_metrics()
        out = complete(both, ids, MAX_TOKENS, cache_salt=salt)
        assert out["choices"][0]["token_ids"] == references["tenants"]  # greedy output of plain vLLM
        return _loaded(both, before)

    assert loaded_by("tenant:a") == 0  # computed, then stored under tenant A's keys
    assert loaded_by("tenant:a") == full > 0  # A's repeat loads them
    assert loaded_by("tenant:b") == 0  # B's identical prompt loads nothing from pdx
    assert loaded_by("tenant:b") == full  # B's repeat loads B's own


@pytest.mark.redis
def test_reuse_after_spilling_to_disk_and_redis(stack: PdxStack, prompts: dict[str, list[int]],
                                                references: dict[str, list[int]],
                                                complete: Callable[..., dict[str, Any]]) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server): no Redis tier to spill to")
    (both,) = stack.use("both")
    ids = prompts["spill_a"]
    full = (len(ids) - 1) // CHUNK_TOKENS * CHUNK_TOKENS
    assert complete(both, ids, MAX_TOKENS)["choices"][0]["token_ids"] == references["spill_a"]
    # Two more prompts of 11 chunks each: the 16-slab L1 evicts spill_a's chunks (written behind to
    # disk and Redis), and the small disk tier then drops the oldest of them again.
    for name in ("spill_b", "spill_c"):
        assert complete(both, prompts[name], MAX_TOKENS)["choices"][0]["token_ids"] == references[name]
    _settle_writes(both)

    before, agent_before = both.vllm_metrics(), both.agent_metrics()
    out = complete(both, ids, MAX_TOKENS)
    assert out["choices"][0]["token_ids"] == references["spill_a"]
    # The tail is probed in L1 and the disk tier only: loaded when it is still on disk.
    loaded = _loaded(both, before)
    assert loaded in (full, len(ids) - 1), loaded
    agent_after = both.agent_metrics()
    from_disk = _tier_hits(agent_after, "disk") - _tier_hits(agent_before, "disk")
    from_redis = _tier_hits(agent_after, "redis") - _tier_hits(agent_before, "redis")
    assert from_disk > 0 and from_redis > 0, (from_disk, from_redis)
    assert from_disk + from_redis + _tier_hits(agent_after, "l1") - _tier_hits(agent_before, "l1") \
        == full // CHUNK_TOKENS + (loaded > full)


def _settle_writes(engine: AgentEngine, timeout_s: float = 10.0) -> None:
    """Wait until the write-behind queues stop growing the lower tiers (no timing asserted)."""
    deadline = time.monotonic() + timeout_s
    last = -1.0
    while time.monotonic() < deadline:
        m = engine.agent_metrics()
        now = m.value("pdx_store_bytes_in_total", tier="disk") + m.value("pdx_store_bytes_in_total", tier="redis")
        if now == last:
            return
        last = now
        time.sleep(0.3)


def test_engine_crash_keeps_the_cache(stack: PdxStack, prompts: dict[str, list[int]],
                                      references: dict[str, list[int]],
                                      complete: Callable[..., dict[str, Any]]) -> None:
    (both,) = stack.use("both")
    ids = prompts["crash"]
    full = len(ids) - 1  # whole chunks and tail
    assert complete(both, ids, MAX_TOKENS)["choices"][0]["token_ids"] == references["crash"]
    chunks_before = both.pool()["chunks"]
    status = both.engine_status()
    old_pid, restarts = int(status["pid"]), int(status["restarts"])

    os.kill(old_pid, signal.SIGKILL)  # the vLLM server dies; its agent and pool do not
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = both.engine_status()
        if status.get("state") == "running" and int(status.get("pid", 0)) not in (0, old_pid):
            break
        time.sleep(0.2)
    assert int(status["restarts"]) == restarts + 1 and int(status["pid"]) != old_pid
    both.wait_ready()
    assert both.pool()["chunks"] == chunks_before  # nothing was lost with the engine

    before = both.vllm_metrics()  # a new process: its counters start again
    out = complete(both, ids, MAX_TOKENS)
    assert out["choices"][0]["token_ids"] == references["crash"]
    assert _loaded(both, before) == full


def test_repeated_and_extended_prompts_load_stored_tails(stack: PdxStack, prompts: dict[str, list[int]],
                                                         references: dict[str, list[int]],
                                                         complete: Callable[..., dict[str, Any]]) -> None:
    # 700 tokens: 5 whole chunks and a tail of 59 (the last token is never stored). The extended
    # prompt (700 + 400 tokens) begins with it: it loads those 5 chunks and the earlier prompt's tail,
    # computes the rest, and its own repeat then loads all but its last token.
    (both,) = stack.use("both")
    ids, longer = prompts["tails"], prompts["tails_extended"]
    assert longer[:len(ids)] == ids and (len(ids) - 1) % CHUNK_TOKENS and len(longer) // CHUNK_TOKENS > len(ids) // CHUNK_TOKENS

    def loaded_by(tokens: list[int], name: str) -> float:
        before = both.vllm_metrics()
        out = complete(both, tokens, MAX_TOKENS)
        assert out["choices"][0]["token_ids"] == references[name]  # greedy output of plain vLLM
        return _loaded(both, before)

    assert loaded_by(ids, "tails") == 0
    assert loaded_by(ids, "tails") == len(ids) - 1
    assert loaded_by(longer, "tails_extended") == len(ids) - 1
    assert loaded_by(longer, "tails_extended") == len(longer) - 1
