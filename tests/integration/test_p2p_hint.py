"""Peer-to-peer reuse over real agents and a real proxy: agent A holds a prompt's chunks and
announces them; the proxy sends the request to the worker of agent B with a hint naming A; B's agent
fetches from A over the peer plane as the connector would (a fetch job pinned for the load), and
counts the tokens as loaded from a peer. An agent that is not registered with the proxy is not a
peer B may fetch from, hint or not. (The engines are stand-ins: real vLLM is in tests/e2e/test_p2p.py.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pdx.config import CacheAwareConfig, PeerReuseConfig
from pdx.deploy.agent_engine import Metrics
from pdx.deploy.process import AgentProcess
from pdx.keys import chunk_keys
from pdx.layout import KVDtype, KVLayout
from pdx.scheduler.tokenizer import ByteTokenizer
from pdx.store.pool import attach
from proxy.testing import Cluster, wait_until

CT = 16
MODEL = "standin-model"
PROMPT = "".join(chr(97 + i % 26) * CT for i in range(10)) + "tail"  # 10 full chunks of byte tokens
HELD = 6
LAYOUT = KVLayout("p2p-standin", KVDtype.FP32, num_layers=2, num_kv_heads=2, head_size=32, block_size=16)


def _agent(tmp_path: Path, name: str, engine_url: str = "", proxy_url: str = "") -> AgentProcess:
    cfg: dict[str, Any] = {"role": "prefill", "store": {"chunk_tokens": CT, "l1": {"capacity": "8MiB"}},
                           "engine": {"url": engine_url}}
    if proxy_url:
        cfg["registration"] = {"proxy_url": proxy_url, "heartbeat_s": 0.2, "models": [MODEL]}
    return AgentProcess(tmp_path, cfg, name=name).start()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[dict[str, Any]]:
    cfg = CacheAwareConfig(chunk_tokens=CT, tokenizer="configured")  # ByteTokenizer stands in for it
    agents: list[AgentProcess] = []
    with Cluster(2, 1, policy="round_robin", cache_aware=cfg, tokenizer=ByteTokenizer(), models=[MODEL],
                 p2p=PeerReuseConfig(fetch_fixed_ms=0.0)) as c:
        try:
            # B is the agent of p0 (round_robin's first pick), A the holder, of p1
            b = _agent(tmp_path, "b", c.prefill[0].url, c.url)
            a = _agent(tmp_path, "a", c.prefill[1].url, c.url)
            outsider = _agent(tmp_path, "x")  # runs, holds the chunks too, but is not of this deployment
            agents += [b, a, outsider]
            yield {"cluster": c, "a": a, "b": b, "x": outsider}
        finally:
            for ag in agents:
                ag.stop()


def _hold(agent: AgentProcess, keys: list[bytes]) -> None:
    """Write ``keys`` as chunks into ``agent``'s pool, as its engine's connector would."""
    with agent.client(10.0) as cl:
        reg = cl.register_engine(LAYOUT)
        pool = attach(reg.shm_name)
        try:
            res = cl.reserve(keys, reg.chunk_bytes)
            for i, r in enumerate(res):
                assert r.id, r.error
                pool.array(r.offset, r.nbytes)[:] = i + 1
            assert all(o.ok for o in cl.commit([r.id for r in res], CT, timeout=30))
        finally:
            pool.close()


def test_b_fetches_from_a_on_the_proxys_hint(world: dict[str, Any]) -> None:
    c, a, b, outsider = world["cluster"], world["a"], world["b"], world["x"]
    with b.client(10.0) as cl:
        fp = cl.register_engine(LAYOUT).chunk_fingerprint
    keys = list(chunk_keys(list(PROMPT.encode()), fp, CT))
    assert len(keys) == 10
    _hold(a, keys[:HELD])
    _hold(outsider, keys)

    def announced() -> bool:
        ws = httpx.get(c.url + "/admin/workers", timeout=5).json()["workers"]
        # B's announcement must carry its engine's chunk fingerprint too: its key space is the prompt's
        b_space = any(w.announcement is not None and w.announcement.agent_id == "b"
                      and w.announcement.chunk_fingerprint == fp for w in c.server.registry.all())
        return any(w["agent_id"] == "a" and w["held_chunks"] == HELD for w in ws) and b_space

    wait_until(announced, timeout=20, what="A's announcement with its chunks")

    r = httpx.post(c.url + "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2}, timeout=20)
    assert r.status_code == 200, r.text
    (p,) = c.prefill[0].received  # B's worker
    hint = p.body["kv_transfer_params"]["pdx"]["hint"]
    assert hint == {"agent": a.peer_address, "chunks": HELD, "agent_id": "a"}
    assert c.metric("pdx_proxy_peer_hints_total", decision="fetch") == 1

    # B's agent does what its connector does with the hint: a fetch pinned for the load
    with b.client(30.0) as cl:
        job = cl.fetch(hint["agent"], keys[: hint["chunks"]], "load:req-1", deadline_s=20, pin=True)
        info = cl.wait(job, 30)
        assert info.ok, info.error
        assert [ch.status.value for ch in info.chunks] == ["done"] * HELD
        cl.release("load:req-1")
    m = Metrics.fetch(b.http_url + "/metrics")
    assert m.value("pdx_agent_loaded_tokens_total", source="peer") == HELD * CT
    assert m.value("pdx_agent_loaded_tokens_total", source="pd") == 0
    # A granted them to B's session only, and B's release let them go
    def a_leases() -> int:
        with a.client(5.0) as cl:
            return int(cl.stats()["pool"]["leases"])

    wait_until(lambda: a_leases() == 0, timeout=10, what="A's pins released")

    # the outsider holds every chunk, but B does not fetch from an agent outside the deployment
    with b.client(30.0) as cl:
        job = cl.fetch(outsider.peer_address, keys[HELD:], "load:req-2", deadline_s=10, pin=True)
        info = cl.wait(job, 20)
    assert not info.ok and "not a known agent" in info.error
    m = Metrics.fetch(b.http_url + "/metrics")
    assert m.value("pdx_agent_unknown_peer_fetches_total") == 1
    assert m.value("pdx_agent_loaded_tokens_total", source="peer") == HELD * CT
