"""CacheBlend through ``PdxConnector`` on real vLLM (one ``kv_both`` engine with the model handle on
and vLLM's own prefix cache ON, under its pdx-agent).

Prompts (``conftest_connector.BLEND_PROMPTS``): a 32-token anchor, documents A (200 tokens), B (160),
C (150), questions. Two requests store documents A and B as segments (``"store": true``); blended
requests then use them elsewhere:

* ``[anchor][B][A][q]`` at ``r = 1`` gives exactly plain vLLM's greedy output (r = 1 is exact);
* ``[anchor][A][B][q2]`` at ``r = 0.15`` runs through the blend path (the engine log shows the
  blend, vLLM counts the region as external hits) and returns text; a later *exact* request with the
  same prompt gives plain vLLM's greedy output and vLLM's prefix cache serves it only the exact
  prefix it shares with a storing request, never a block of the blended request;
* a request naming a segment never stored is computed exactly (plain vLLM's output).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest_connector import BLEND_PARTS, BLEND_PROMPTS, MAX_TOKENS, PdxStack

from pdx.deploy.agent_engine import AgentEngine

pytestmark = pytest.mark.e2e

EXT_HITS = "vllm:external_prefix_cache_hits_total"
LOCAL_HITS = "vllm:prefix_cache_hits_total"
BS = 128  # vLLM's block size on CPU (its prefix cache matches whole blocks)


def _spans(name: str) -> list[list[int]]:
    """Token spans of the documents of prompt ``name`` (every part but the first and the last)."""
    parts = BLEND_PROMPTS[name]
    out, at = [], BLEND_PARTS[parts[0]][0]
    for part in parts[1:-1]:
        n = BLEND_PARTS[part][0]
        out.append([at, at + n])
        at += n
    return out


def _blend(name: str, **options: Any) -> dict[str, Any]:
    return {"kv_transfer_params": {"pdx": {"blend": {"segments": _spans(name), **options}}}}


def _blends_logged(engine: AgentEngine) -> int:
    return engine.engine_log_text().count(": blended ")


def _blend_tokens_metric(engine: AgentEngine, at_least: float, timeout_s: float = 10.0) -> float:
    """``pdx_blend_tokens_total`` once it reaches ``at_least`` (vLLM's stat loop exports it a step
    later than the response), or its value at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        v = engine.vllm_metrics().value("pdx_blend_tokens_total")
        if v >= at_least or time.monotonic() > deadline:
            return v
        time.sleep(0.1)


@pytest.fixture(scope="module")
def blend_engine(stack: PdxStack, prompts: dict[str, list[int]], references: dict[str, list[int]],
                 complete: Callable[..., dict[str, Any]]) -> AgentEngine:
    """The engine, with documents A and B stored as segments after the anchor."""
    (engine,) = stack.use("blend")
    for name in ("blend_store_a", "blend_store_b"):
        before = engine.pool()["chunks"]
        out = complete(engine, prompts[name], MAX_TOKENS, **_blend(name, store=True))
        assert out["choices"][0]["token_ids"] == references[name]  # a storing request is exact
        doc = BLEND_PROMPTS[name][1]
        pieces = -(-BLEND_PARTS[doc][0] // 128)
        assert engine.pool()["chunks"] - before >= pieces  # its segment's pieces (and exact chunks)
    return engine


def test_r1_over_reordered_segments_is_plain_vllm(blend_engine: AgentEngine, prompts: dict[str, list[int]],
                                                  references: dict[str, list[int]],
                                                  complete: Callable[..., dict[str, Any]]) -> None:
    ids = prompts["blend_x"]
    region_end = _spans("blend_x")[-1][1]
    m0, logged = blend_engine.vllm_metrics(), _blends_logged(blend_engine)
    out = complete(blend_engine, ids, MAX_TOKENS, **_blend("blend_x", recompute_ratio=1.0))
    assert out["choices"][0]["token_ids"] == references["blend_x"]
    m1 = blend_engine.vllm_metrics()
    local = m1.value(LOCAL_HITS) - m0.value(LOCAL_HITS)
    # vLLM's prefix cache gives the whole blocks of [anchor][B] that the storing request computed
    # (exact); pdx blends the rest of the region.
    assert local == (32 + 160) // BS * BS
    assert m1.value(EXT_HITS) - m0.value(EXT_HITS) == region_end - local
    assert _blends_logged(blend_engine) == logged + 1


def test_approximate_blend_never_reaches_exact_requests(blend_engine: AgentEngine,
                                                         prompts: dict[str, list[int]],
                                                         references: dict[str, list[int]],
                                                         complete: Callable[..., dict[str, Any]]) -> None:
    ids = prompts["blend_y"]
    region_end = _spans("blend_y")[-1][1]
    exact_prefix = (32 + 200) // BS * BS  # shared with the request that stored document A
    m0, logged = blend_engine.vllm_metrics(), _blends_logged(blend_engine)
    blended0 = m0.value("pdx_blend_tokens_total")
    out = complete(blend_engine, ids, MAX_TOKENS, **_blend("blend_y", recompute_ratio=0.15))
    assert len(out["choices"][0]["token_ids"]) == MAX_TOKENS and out["choices"][0]["text"]
    m1 = blend_engine.vllm_metrics()
    assert _blends_logged(blend_engine) == logged + 1
    assert m1.value(LOCAL_HITS) - m0.value(LOCAL_HITS) == exact_prefix
    assert m1.value(EXT_HITS) - m0.value(EXT_HITS) == region_end - exact_prefix
    assert _blend_tokens_metric(blend_engine, blended0 + region_end - exact_prefix) == \
        blended0 + region_end - exact_prefix

    # The same prompt, asked exactly: plain vLLM's output, and no block of the blended request.
    out = complete(blend_engine, ids, MAX_TOKENS)
    assert out["choices"][0]["token_ids"] == references["blend_y"]
    m2 = blend_engine.vllm_metrics()
    assert m2.value(LOCAL_HITS) - m1.value(LOCAL_HITS) == exact_prefix
    assert m2.value(EXT_HITS) - m1.value(EXT_HITS) == 0  # nothing blended was stored in pdx either
    assert m2.value("pdx_blend_tokens_total") == blended0 + region_end - exact_prefix
    assert _blends_logged(blend_engine) == logged + 1


def test_missing_segment_is_computed_exactly(blend_engine: AgentEngine, prompts: dict[str, list[int]],
                                             references: dict[str, list[int]],
                                             complete: Callable[..., dict[str, Any]]) -> None:
    logged = _blends_logged(blend_engine)
    out = complete(blend_engine, prompts["blend_z"], MAX_TOKENS, **_blend("blend_z", recompute_ratio=0.15))
    assert out["choices"][0]["token_ids"] == references["blend_z"]
    assert _blends_logged(blend_engine) == logged
    assert "segment pieces stored; not blending" in blend_engine.engine_log_text()
