"""The reference everything else is compared with: plain vLLM on CPU, the tiny model, greedy.

If these fail, the P/D and reuse tests cannot mean anything: they rely on greedy output
being a deterministic function of the prompt, and on token ids coming back in responses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from pdx.engine.vllm import VllmServer

pytestmark = pytest.mark.e2e

PROMPT_TOKENS = 1500
MAX_TOKENS = 32


def test_greedy_output_is_deterministic(plain_server: VllmServer, make_prompt: Callable[..., Any],
                                        complete: Callable[..., dict[str, Any]]) -> None:
    prompt = make_prompt(PROMPT_TOKENS, seed=1)
    ids = prompt.token_ids[:PROMPT_TOKENS]

    first = complete(plain_server, ids, MAX_TOKENS)
    # Second time the prompt's blocks come from vLLM's own prefix cache: same tokens expected.
    second = complete(plain_server, ids, MAX_TOKENS)

    for out in (first, second):
        choice = out["choices"][0]
        assert out["usage"]["prompt_tokens"] == PROMPT_TOKENS
        assert out["usage"]["completion_tokens"] == MAX_TOKENS
        assert choice["finish_reason"] == "length"
        assert len(choice["token_ids"]) == MAX_TOKENS
        assert choice["prompt_token_ids"] == ids
        # No connector on this server: no transfer params in the response.
        assert out.get("kv_transfer_params") is None
    assert first["choices"][0]["token_ids"] == second["choices"][0]["token_ids"]
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    # Random weights still give varied text, not one token repeated.
    assert len(set(first["choices"][0]["token_ids"])) > MAX_TOKENS // 4


def test_text_prompt_matches_token_prompt(plain_server: VllmServer, make_prompt: Callable[..., Any],
                                          complete: Callable[..., dict[str, Any]]) -> None:
    """The server's tokenizer and ours agree, so tests may send either form."""
    prompt = make_prompt(300, seed=2)
    by_text = complete(plain_server, prompt.text, 8)
    by_ids = complete(plain_server, prompt.token_ids, 8)
    assert by_text["choices"][0]["prompt_token_ids"] == prompt.token_ids
    assert by_text["choices"][0]["token_ids"] == by_ids["choices"][0]["token_ids"]


def test_different_prompts_give_different_outputs(plain_server: VllmServer, make_prompt: Callable[..., Any],
                                                  complete: Callable[..., dict[str, Any]]) -> None:
    """Other tokens early in the prompt change the continuation: the output depends on context, so
    wrong KV blocks would show up as a different output. (With the realistic N(0, 0.02) init the
    random model's attention is nearly uniform, so one changed token no longer moves greedy output:
    a whole early span is changed.)"""
    ids = make_prompt(PROMPT_TOKENS, seed=3).token_ids[:PROMPT_TOKENS]
    changed = list(ids)
    for i in range(5, PROMPT_TOKENS // 2):
        changed[i] = (changed[i] + 1) % 1000 + 10  # stay clear of the special tokens 0-2
    a = complete(plain_server, ids, MAX_TOKENS)["choices"][0]["token_ids"]
    b = complete(plain_server, changed, MAX_TOKENS)["choices"][0]["token_ids"]
    assert a != b


def test_chat_completions_use_the_chat_template(plain_server: VllmServer) -> None:
    body = {"model": plain_server.model_name, "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": 8, "temperature": 0.0, "return_token_ids": True}
    resp = httpx.post(f"{plain_server.url}/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["usage"]["completion_tokens"] == 8
    assert len(out["choices"][0]["token_ids"]) == 8
    assert out["prompt_token_ids"][0] == 0  # the template starts with BOS (id 0)


def test_metrics_endpoint_reports_prefix_cache(plain_server: VllmServer) -> None:
    """The counters the reuse tests read exist on a server without a connector."""
    text = httpx.get(f"{plain_server.url}/metrics", timeout=30).text
    assert "vllm:prefix_cache_queries_total" in text
    assert "vllm:prefix_cache_hits_total" in text
