"""Leases: pins expire on their own, ``release(request)`` drops them, and expiries are counted."""

from __future__ import annotations

import os
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdx.agent.client import AgentClient
from pdx.deploy.process import AgentProcess
from pdx.layout import KVDtype, KVLayout

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

LAYOUT = KVLayout("lease-test", KVDtype.FP32, num_layers=1, num_kv_heads=1, head_size=32, block_size=16)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[AgentProcess, AgentClient]]:
    cfg = {"store": {"l1": {"capacity": "4MiB"}}, "leases": {"sweep_s": 0.05, "max_s": 5.0}}
    proc = AgentProcess(tmp_path, cfg, name="lease")
    proc.start()
    client = proc.client()
    try:
        reg = client.register_engine(LAYOUT)
        keys = [os.urandom(16) for _ in range(4)]
        res = client.reserve(keys, reg.chunk_bytes)
        assert all(o.ok for o in client.commit([r.id for r in res], reg.chunk_tokens))
        proc.info["keys"] = keys
        yield proc, client
    finally:
        client.close()
        proc.stop()


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def leases(client: AgentClient) -> int:
    return int(client.stats()["pool"]["leases"])


def test_pins_expire_and_are_counted(agent: tuple[AgentProcess, AgentClient]) -> None:
    proc, client = agent
    keys = proc.info["keys"]
    pins = client.pin(keys, owner="req-expire", lease_s=0.3)
    assert all(p.found and 0 < p.expires_in_s <= 0.3 for p in pins)
    assert leases(client) == 4
    deadline = time.monotonic() + 10
    while leases(client) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leases(client) == 0
    assert metric(proc.http_url, "pdx_store_expired_leases_total") >= 4
    assert client.release("req-expire") == 0  # nothing left to release


def test_release_and_unpin_drop_pins(agent: tuple[AgentProcess, AgentClient]) -> None:
    proc, client = agent
    keys = proc.info["keys"]
    pins = client.pin(keys, owner="req-a", lease_s=60)
    assert all(p.expires_in_s <= 5.0 for p in pins)  # capped at leases.max_s
    other = client.pin(keys[:1], owner="req-b", lease_s=60)
    assert leases(client) == 5
    assert metric(proc.http_url, "pdx_agent_leases_active") == 5
    assert client.release("req-a") == 4
    assert leases(client) == 1
    assert client.unpin([other[0].lease_id]) == 1
    assert client.unpin([other[0].lease_id]) == 0  # idempotent
    assert leases(client) == 0
    assert metric(proc.http_url, "pdx_agent_leases_active") == 0
    assert metric(proc.http_url, "pdx_agent_leases_released_total") == 5


def test_missing_keys_are_not_pinned(agent: tuple[AgentProcess, AgentClient]) -> None:
    proc, client = agent
    keys = [*proc.info["keys"][:2], os.urandom(16), proc.info["keys"][2]]
    pins = client.pin(keys, owner="req-m")
    assert [p.found for p in pins] == [True, True, False, False]  # the leading run only
    assert client.release("req-m") == 2
