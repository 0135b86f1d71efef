"""Warm peer links between two real ``pdx-agent`` processes (tcp, with a deployment secret).

The decode agent knows the prefill agent from ``transport.peers``: once both have a pool, its link
(signed hello, transport connection, data stream) is up before any fetch, the first fetch uses it
and opens no other, and after the prefill agent restarts the link is opened again by itself.
Waits are on the agents' state (``stats``: ``warm_links``, the transport's peers), never on timing.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pdx.agent.client import AgentClient
from pdx.agent.types import ChunkStatus
from pdx.deploy.process import AgentProcess
from pdx.engine.vllm import free_port
from pdx.layout import KVDtype, KVLayout
from pdx.store.pool import attach

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

LAYOUT = KVLayout("warm-test", KVDtype.FP32, num_layers=2, num_kv_heads=2, head_size=64, block_size=16)
WAIT_S = 30.0


def until(cond: Callable[[], Any], what: str) -> Any:
    """Poll an agent's state until ``cond()`` is truthy (bounded)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"not reached within {WAIT_S:g}s: {what}")


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[dict[str, Any]]:
    secret = tmp_path / "secret"
    secret.write_text(secrets.token_hex(32) + "\n")
    secret.chmod(0o600)
    port = free_port("127.0.0.1")
    transport = {"backend": "tcp", "secret_file": str(secret), "heartbeat_s": 0.5, "warm_probe_s": 0.5}
    base = {"store": {"chunk_tokens": 256, "l1": {"capacity": "16MiB"}}, "http": {"enabled": False},
            "control": {"request_timeout_s": 5.0}}
    pcfg = {**base, "role": "prefill", "transport": transport, "control": {**base["control"], "peer_port": port}}
    prefill = AgentProcess(tmp_path, pcfg, name="prefill").start()
    decode = AgentProcess(tmp_path, {**base, "role": "decode",
                                     "transport": {**transport, "peers": [prefill.peer_address]}},
                          name="decode").start()
    procs = {"prefill": prefill, "decode": decode}
    try:
        yield procs
    finally:
        for p in procs.values():
            p.stop()


def register(proc: AgentProcess) -> AgentClient:
    client = proc.client(10.0)
    client.register_engine(LAYOUT)
    return client


def write(client: AgentClient, keys: list[bytes]) -> None:
    reg = client.register_engine(LAYOUT)
    pool = attach(reg.shm_name)
    try:
        res = client.reserve(keys, reg.chunk_bytes)
        for r in res:
            pool.array(r.offset, r.nbytes)[:] = np.frombuffer(os.urandom(r.nbytes), dtype=np.uint8)
        assert all(o.ok for o in client.commit([r.id for r in res], reg.chunk_tokens))
    finally:
        pool.close()


def test_the_link_is_up_before_the_first_fetch_and_again_after_a_restart(agents: dict[str, Any]) -> None:
    prefill, decode = agents["prefill"], agents["decode"]
    cp = register(prefill)
    cd = register(decode)
    try:
        # before any fetch: the session, the transport connection and its data stream are up
        stats = until(lambda: (s := cd.stats())["warm_links"] == 1 and s, "decode's link warm")
        (link,) = stats["peers"]
        assert link["address"] == prefill.peer_address and link["agent_id"] == "prefill"
        assert len(stats["transport"]["peers"]) == 1
        # the prefill side sees the connection and the data stream the decode side opened
        assert len(cp.stats()["transport"]["peers"]) == 1

        keys = [os.urandom(16) for _ in range(3)]
        write(cp, keys)
        info = cd.wait(cd.fetch(prefill.peer_address, keys, "req-1", deadline_s=20), 20)
        assert [c.status for c in info.chunks] == [ChunkStatus.DONE] * 3
        after = cd.stats()
        assert after["peers"] == [link]  # the fetch used the warm link: no new session
        assert after["transport"]["peers"] == stats["transport"]["peers"]

        # the prefill agent restarts (same peer socket, new instance, new transport address)
        old_transport = link["transport_address"]
        prefill.stop()
        prefill.start()
        cp.close()
        cp = register(prefill)
        fresh = until(lambda: [lk for lk in cd.stats()["peers"] if lk["transport_address"] != old_transport],
                      "decode's link warmed again after the restart")
        assert fresh[0]["address"] == prefill.peer_address
        until(lambda: cd.stats()["warm_links"] == 1, "one warm link")
        keys = [os.urandom(16) for _ in range(2)]
        write(cp, keys)
        info = cd.wait(cd.fetch(prefill.peer_address, keys, "req-2", deadline_s=20), 20)
        assert [c.status for c in info.chunks] == [ChunkStatus.DONE] * 2
    finally:
        cp.close()
        cd.close()


def test_two_agents_that_warm_each_other_both_fetch_at_once(tmp_path: Path) -> None:
    """Two agents that both serve and know each other (``transport.peers``) warm their links at the
    same moment: each dials the other, and one of the two transport connections replaces the other.
    Whichever survives, every link must carry its session on it: each agent's first fetch from the
    other succeeds (a link whose connection was replaced is opened again, not refused)."""
    secret = tmp_path / "secret"
    secret.write_text(secrets.token_hex(32) + "\n")
    secret.chmod(0o600)
    ports = {"x": free_port("127.0.0.1"), "y": free_port("127.0.0.1")}
    base = {"store": {"chunk_tokens": 256, "l1": {"capacity": "16MiB"}}, "http": {"enabled": False}}
    procs: dict[str, AgentProcess] = {}
    clients: dict[str, AgentClient] = {}
    try:
        for name, other in (("x", "y"), ("y", "x")):
            transport = {"backend": "tcp", "secret_file": str(secret), "heartbeat_s": 0.5, "warm_probe_s": 0.5,
                         "peers": [f"tcp://127.0.0.1:{ports[other]}"]}
            cfg = {**base, "role": "both", "transport": transport,
                   "control": {"request_timeout_s": 5.0, "peer_port": ports[name]}}
            procs[name] = AgentProcess(tmp_path, cfg, name=name).start()
        for name in ("x", "y"):  # both pools come up together: both warm at once
            clients[name] = register(procs[name])
        for name in ("x", "y"):
            until(lambda c=clients[name]: c.stats()["warm_links"] == 1, f"{name}'s link warm")
        keys = {name: [os.urandom(16) for _ in range(2)] for name in ("x", "y")}
        for name in ("x", "y"):
            write(clients[name], keys[name])
        for me, other in (("x", "y"), ("y", "x")):
            c = clients[me]
            info = c.wait(c.fetch(procs[other].peer_address, keys[other], f"req-{me}", deadline_s=20), 20)
            assert [ch.status for ch in info.chunks] == [ChunkStatus.DONE] * 2, info
    finally:
        for c in clients.values():
            c.close()
        for p in procs.values():
            p.stop()
