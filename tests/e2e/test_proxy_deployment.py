"""The local deployment that ``pdx up`` runs, end to end: the official ``openai`` client talks
to pdx-proxy, which pairs a prefill and a decode vLLM worker (each under its pdx-agent).

Answers must equal, text and token ids, those of a plain vLLM server on the same model;
a second request with the same long prefix must be served from pdx's cache (proxy and vLLM
metrics show it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pdx.config import from_dict
from pdx.deploy import DeployConfig, Deployment
from pdx.deploy.agent_engine import Metrics
from pdx.engine.vllm import VllmServer
from pdx.model import BuiltModel
from pdx.model.text import paragraph

openai = pytest.importorskip("openai")

MAX_TOKENS = 24
CHUNK_TOKENS = 128


@pytest.fixture(scope="module")
def deployment(tiny_model: BuiltModel, stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    stack.stop_all()  # at most two pdx engines at a time on this machine; the stack restarts lazily
    cfg = from_dict(DeployConfig, {
        "model": str(tiny_model.path), "served_model_name": "tiny", "chunk_tokens": CHUNK_TOKENS,
        "workdir": str(tmp_path_factory.mktemp("deploy")),
        "proxy": {"port": 0, "policy": "cache_aware"},
        "workers": [{"name": "prefill-0", "role": "prefill", "cpu_bind": "0", "store": {"l1": {"capacity": "64MiB"}}},
                    {"name": "decode-0", "role": "decode", "cpu_bind": "1", "store": {"l1": {"capacity": "64MiB"}}}],
    })
    cfg.validate()
    with Deployment(cfg, "e2e") as dep:
        dep.start()
        yield dep
    assert not dep.workers and dep.proxy_proc is None


@pytest.fixture(scope="module")
def clients(deployment: Deployment, plain_server: VllmServer) -> tuple[Any, Any]:
    """(through pdx, plain vLLM)"""
    return (openai.OpenAI(base_url=f"{deployment.url}/v1", api_key=deployment.api_key, max_retries=0, timeout=300),
            openai.OpenAI(base_url=f"{plain_server.url}/v1", api_key="none", max_retries=0, timeout=300))


def _complete(client: Any, prompt: str) -> tuple[str, list[int]]:
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                                    extra_body={"return_token_ids": True})
    return out.choices[0].text, list(out.choices[0].token_ids)


def _stream(client: Any, prompt: str) -> str:
    parts = [c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0, stream=True) if c.choices]
    return "".join(parts)


def _hits(dep: Deployment) -> dict[str, float]:
    return {name: Metrics.fetch(f"{w.url}/metrics").value("vllm:external_prefix_cache_hits_total")
            for name, w in dep.workers.items()}


def test_completions_equal_plain_vllm(clients: tuple[Any, Any]) -> None:
    pdx, plain = clients
    prompt = paragraph(seed=301, num_words=700)
    want_text, want_ids = _complete(plain, prompt)
    assert len(want_ids) == MAX_TOKENS
    assert _complete(pdx, prompt) == (want_text, want_ids)
    assert _stream(pdx, paragraph(seed=302, num_words=700)) == _stream(plain, paragraph(seed=302, num_words=700))


def test_chat_equals_plain_vllm(clients: tuple[Any, Any]) -> None:
    pdx, plain = clients
    messages = [{"role": "user", "content": paragraph(seed=303, num_words=600)}]

    def chat(client: Any, stream: bool) -> str:
        out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS,
                                             temperature=0.0, stream=stream)
        if not stream:
            return str(out.choices[0].message.content)
        return "".join(c.choices[0].delta.content or "" for c in out if c.choices)

    want = chat(plain, stream=False)
    assert want
    assert chat(pdx, stream=False) == want
    assert chat(pdx, stream=True) == want


def test_repeated_prefix_is_served_from_cache(deployment: Deployment, clients: tuple[Any, Any]) -> None:
    pdx, plain = clients
    context = paragraph(seed=304, num_words=1000)
    first, second = f"{context}\nQ: the first thing?\nA:", f"{context}\nQ: the last thing?\nA:"
    assert _complete(pdx, first) == _complete(plain, first)

    proxy_before = Metrics.fetch(f"{deployment.url}/metrics")
    hits_before = _hits(deployment)
    assert _complete(pdx, second) == _complete(plain, second)
    proxy_after = Metrics.fetch(f"{deployment.url}/metrics")
    hits_after = _hits(deployment)

    cached_chunks = (proxy_after.value("pdx_proxy_routed_cached_chunks_total")
                     - proxy_before.value("pdx_proxy_routed_cached_chunks_total"))
    assert cached_chunks >= 5, "the proxy did not route the repeated prefix to a worker holding it"
    loaded = sum(hits_after.values()) - sum(hits_before.values())
    assert loaded >= cached_chunks * CHUNK_TOKENS, (hits_before, hits_after)


def test_the_proxy_refuses_clients_without_the_key(deployment: Deployment) -> None:
    stranger = openai.OpenAI(base_url=f"{deployment.url}/v1", api_key="none", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        stranger.completions.create(model="tiny", prompt="hello", max_tokens=1)


def test_logs_are_kept(deployment: Deployment) -> None:
    assert (Path(deployment.workdir) / "proxy.log").is_file()
    assert deployment.run_root is not None and any(deployment.run_root.glob("*/data/logs/engine-*.log"))
