"""Reuse across instances on real vLLM: two engines share a Mooncake Store (and Redis, second case).

A prompt is prefilled on engine A; the same prompt then goes to engine B, whose L1
never held it: B loads its KV from the shared tier. Greedy output equals plain
vLLM's; B's vLLM counts the tokens as loaded (external prefix cache hits) and B's
agent counts the hits in that tier. In the second case the Mooncake master is
gone (killed mid-run): B's Mooncake lookups are misses within their own budget,
and Redis, next in the tier list, serves the chunks. Engines: kv_both, one core
each, vLLM's own prefix cache off, both tiers ``write: all`` so a chunk is shared
as soon as it is computed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest_connector import CHUNK_TOKENS, ENGINE_START_TIMEOUT_S, MAX_TOKENS, PdxStack, RedisServer

from bench.servers import MooncakeMaster
from pdx.deploy.agent_engine import AgentEngine, Metrics
from pdx.model import BuiltModel

pytestmark = [pytest.mark.e2e, pytest.mark.mooncake, pytest.mark.redis]

HITS = "vllm:external_prefix_cache_hits_total"


class Fleet:
    def __init__(self, a: AgentEngine, b: AgentEngine, master: MooncakeMaster) -> None:
        self.a, self.b, self.master = a, b, master


@pytest.fixture(scope="module")
def fleet(stack: PdxStack, tiny_model: BuiltModel,
          redis_server: Callable[[], RedisServer | None]) -> Iterator[Fleet]:
    try:
        import mooncake.store  # noqa: F401  (needs libibverbs.so.1: ./dev installs libibverbs1)
    except ImportError as exc:
        pytest.skip(f"Mooncake is not installed ({exc}); ./dev installs pdx[mooncake] and libibverbs1")
    redis = redis_server()
    if redis is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    stack.use()  # stop the other engines: two vLLM servers at a time
    root = Path(tempfile.mkdtemp(prefix="pdx-fleet-"))
    master = MooncakeMaster(root)
    master.start()
    tiers = [
        {"type": "mooncake", "master": master.master, "metadata_server": master.metadata_server,
         "global_segment_size": "64MiB", "local_buffer_size": "32MiB", "write": "all", "retry_after_s": 30.0},
        {"type": "redis", "url": redis.url, "write": "all", "key_prefix": f"pdx-fleet-{os.getpid()}:"},
    ]
    engines: list[AgentEngine] = []
    try:
        for name, core in (("fleet_a", "0"), ("fleet_b", "1")):
            engine = AgentEngine(name, tiny_model.path, "both", root, cpu_bind=core, served_model_name="tiny",
                                 store={"chunk_tokens": CHUNK_TOKENS, "l1": {"capacity": "32MiB"}, "tiers": tiers},
                                 vllm={"kv_cache_gib": 1, "max_model_len": 4096})
            engines.append(engine.start(ENGINE_START_TIMEOUT_S))
        yield Fleet(engines[0], engines[1], master)
    finally:
        for engine in engines:
            engine.stop()
        master.stop()
        if os.environ.get("PDX_KEEP_E2E_LOGS") != "1":
            shutil.rmtree(root, ignore_errors=True)


def _tier_hits(m: Metrics, tier: str) -> float:
    return m.value("pdx_store_hits_total", tier=tier, op="get")


def _written(engine: AgentEngine, tier: str, before: float, timeout_s: float = 30.0) -> None:
    """Wait (bounded) until ``engine``'s write-behind into ``tier`` grew past ``before`` and settled."""
    deadline = time.monotonic() + timeout_s
    last = before
    while True:
        now = engine.agent_metrics().value("pdx_store_bytes_in_total", tier=tier)
        if now > before and now == last:
            return
        assert time.monotonic() < deadline, f"{engine.name} did not write its chunks to {tier}"
        last = now
        time.sleep(0.3)  # polling the agent's counter; no timing is asserted


def _serve_on_b(fleet: Fleet, ids: list[int], reference: list[int], tier: str,
                complete: Callable[..., dict[str, Any]]) -> None:
    full = (len(ids) - 1) // CHUNK_TOKENS * CHUNK_TOKENS
    a, b = fleet.a, fleet.b
    written_before = a.agent_metrics().value("pdx_store_bytes_in_total", tier=tier)
    out_a = complete(a, ids, MAX_TOKENS)
    assert out_a["choices"][0]["token_ids"] == reference
    _written(a, tier, written_before)  # A's write-behind reached the shared tier

    before, agent_before = b.vllm_metrics(), b.agent_metrics()
    out_b = complete(b, ids, MAX_TOKENS)
    assert out_b["choices"][0]["token_ids"] == reference  # token for token, as plain vLLM
    assert b.vllm_metrics().value(HITS) - before.value(HITS) == full  # loaded, not computed
    hits = _tier_hits(b.agent_metrics(), tier) - _tier_hits(agent_before, tier)
    assert hits == full // CHUNK_TOKENS, (tier, hits)


def test_b_reuses_what_a_computed_through_mooncake(fleet: Fleet, prompts: dict[str, list[int]],
                                                   references: dict[str, list[int]],
                                                   complete: Callable[..., dict[str, Any]]) -> None:
    _serve_on_b(fleet, prompts["shared_mooncake"], references["shared_mooncake"], "mooncake", complete)



def test_b_reuses_through_redis_when_the_mooncake_master_is_gone(
        fleet: Fleet, prompts: dict[str, list[int]], references: dict[str, list[int]],
        complete: Callable[..., dict[str, Any]]) -> None:
    fleet.master.stop(kill=True)
    _serve_on_b(fleet, prompts["shared_redis"], references["shared_redis"], "redis", complete)
