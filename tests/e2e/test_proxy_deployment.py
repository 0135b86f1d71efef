"""The local deployment that ``pdx up`` runs, end to end: the official ``openai`` client talks
to pdx-proxy, which pairs a prefill and a decode vLLM worker (each under its pdx-agent).

Answers must equal, text and token ids, those of a plain vLLM server on the same model;
a second request with the same long prefix must be served from cache: vLLM's own prefix
cache (on, as in ``pdx up``) or pdx's, each counted by its own metric. Last, the decode
engine is killed with SIGKILL: every request after that still succeeds (a prefill worker
serves it whole), the agent restarts the engine and reaps its shared memory, and the pool
that survived the crash serves the next repeat.
"""

from __future__ import annotations

import os
import signal
import time
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


LOCAL_HITS = "vllm:prefix_cache_hits_total"  # vLLM's own prefix cache
PDX_HITS = "vllm:external_prefix_cache_hits_total"  # tokens PdxConnector loaded from pdx


def _hits(dep: Deployment, name: str = PDX_HITS) -> dict[str, float]:
    return {worker: Metrics.fetch(f"{w.url}/metrics").value(name) for worker, w in dep.workers.items()}


def _both_tiers(dep: Deployment) -> float:
    return sum(_hits(dep, LOCAL_HITS).values()) + sum(_hits(dep, PDX_HITS).values())


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
    hits_before = _both_tiers(deployment)
    assert _complete(pdx, second) == _complete(plain, second)
    proxy_after = Metrics.fetch(f"{deployment.url}/metrics")
    hits_after = _both_tiers(deployment)

    cached_chunks = (proxy_after.value("pdx_proxy_routed_cached_chunks_total")
                     - proxy_before.value("pdx_proxy_routed_cached_chunks_total"))
    assert cached_chunks >= 5, "the proxy did not route the repeated prefix to a worker holding it"
    # the prefill worker finds the prefix in vLLM's prefix cache, the decode worker in its own
    # prefix cache or (what it lacks) in pdx: computed tokens are what neither tier held
    assert hits_after - hits_before >= cached_chunks * CHUNK_TOKENS, (hits_before, hits_after)


def test_the_proxy_refuses_clients_without_the_key(deployment: Deployment) -> None:
    stranger = openai.OpenAI(base_url=f"{deployment.url}/v1", api_key="none", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        stranger.completions.create(model="tiny", prompt="hello", max_tokens=1)


def test_logs_are_kept(deployment: Deployment) -> None:
    assert (Path(deployment.workdir) / "proxy.log").is_file()
    assert deployment.run_root is not None and any(deployment.run_root.glob("*/data/logs/engine-*.log"))


def _engine_psm(engine: Any) -> set[str]:
    """The psm_* shared-memory segments the engine's process tree maps now."""
    from pdx.agent.shm_reaper import _mapped_shm, _tree_pids

    pid = int(engine.engine_status()["pid"])
    return {n for p in _tree_pids(pid) for n in _mapped_shm(p, Path("/dev/shm")) if n.startswith("psm_")}


def _wait(cond: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"waited {timeout_s:.0f}s for {what}"
        time.sleep(0.5)


def test_decode_engine_killed_every_later_request_succeeds(deployment: Deployment,
                                                           clients: tuple[Any, Any]) -> None:
    """Must run last in this module: it kills the decode engine (its agent restarts it)."""
    pdx, plain = clients
    decode = deployment.workers["decode-0"]
    context = paragraph(seed=305, num_words=900)
    repeat = f"{context}\nQ: who?\nA:"
    want = _complete(plain, repeat)
    assert _complete(pdx, repeat) == want  # the decode agent's pool now holds the prompt
    segments = _engine_psm(decode)
    old_pid = int(decode.engine_status()["pid"])
    os.kill(old_pid, signal.SIGKILL)

    prompts = [paragraph(seed=400 + i, num_words=60 + 20 * (i % 5)) for i in range(30)]
    got, statuses = [], []
    for i, prompt in enumerate(prompts):  # one at a time: none is in flight at the kill
        try:
            got.append(_stream(pdx, prompt) if i % 3 == 2 else _complete(pdx, prompt)[0])
            statuses.append(200)
        except openai.APIError as exc:
            statuses.append(getattr(exc, "status_code", None) or -1)
    assert statuses == [200] * len(prompts), statuses
    for prompt, text in list(zip(prompts, got, strict=True))[::5]:
        assert text == _complete(plain, prompt)[0]
    proxy = Metrics.fetch(f"{deployment.url}/metrics")
    assert proxy.value("pdx_proxy_degraded_total", missing="decode") >= 1

    # the agent restarts the engine and removes the shared memory the killed one left
    _wait(lambda: decode.engine_status().get("state") == "running"
          and int(decode.engine_status().get("pid", 0)) not in (0, old_pid), 180, "engine restarted")
    import httpx

    def routable() -> bool:
        doc = httpx.get(f"{deployment.url}/admin/workers", timeout=5,
                        headers={"Authorization": f"Bearer {deployment.admin_key}"}).json()
        return any(w["id"] == "decode-0" and w["state"] == "healthy" for w in doc["workers"])

    _wait(routable, 240, "the restarted decode worker back in the proxy's pool")
    # its vLLM prefix cache is empty, its agent's pool survived: the repeat comes from pdx
    local0, pdx0 = _hits(deployment, LOCAL_HITS)["decode-0"], _hits(deployment)["decode-0"]
    assert _complete(pdx, repeat) == want
    local1, pdx1 = _hits(deployment, LOCAL_HITS)["decode-0"], _hits(deployment)["decode-0"]
    assert pdx1 - pdx0 >= 5 * CHUNK_TOKENS and local1 == local0, (local0, local1, pdx0, pdx1)
    # once more: now vLLM's own prefix cache (the first tier) holds its full blocks, and pdx loads
    # at most the stored tail after them (less than a chunk), never the blocks vLLM has
    assert _complete(pdx, repeat) == want
    local2, pdx2 = _hits(deployment, LOCAL_HITS)["decode-0"], _hits(deployment)["decode-0"]
    assert local2 - local1 >= 5 * CHUNK_TOKENS and 0 <= pdx2 - pdx1 < CHUNK_TOKENS, (local1, local2, pdx1, pdx2)
    # the killed engine's shared memory (vLLM's psm_* queues) was removed by its agent
    assert segments and not any(Path("/dev/shm", n).exists() for n in segments), segments
