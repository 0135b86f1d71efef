"""The daemon's local ops, in process (real store, real control socket, no engine)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdx.agent.client import AgentClient
from pdx.agent.server import AgentServer
from pdx.agent.types import JobState
from pdx.checksum import checksum
from pdx.config import AgentConfig, load_config
from pdx.errors import AgentError, ErrorCode, LayoutError, NotRegistered
from pdx.layout import KVDtype, KVLayout
from pdx.store.pool import attach

LAYOUT = KVLayout("unit", KVDtype.FP32, num_layers=1, num_kv_heads=1, head_size=32, block_size=16)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[AgentServer, AgentClient]]:
    cfg = load_config(AgentConfig, data={"name": "u", "data_dir": str(tmp_path), "http": {"enabled": False},
                                         "store": {"l1": {"capacity": "256KiB"}}})
    server = AgentServer(cfg)
    server.start()
    client = AgentClient(server.control_address, 10.0)
    yield server, client
    client.close()
    server.stop()


def test_nothing_before_registration(agent: tuple[AgentServer, AgentClient]) -> None:
    _s, c = agent
    assert c.ping()["registered"] is False
    with pytest.raises(NotRegistered):
        c.lookup([b"k" * 16])


def test_register_twice_same_pool_other_layout_refused(agent: tuple[AgentServer, AgentClient]) -> None:
    _s, c = agent
    first = c.register_engine(LAYOUT)
    again = c.register_engine(LAYOUT)
    assert first.created and not again.created and again.shm_name == first.shm_name
    assert first.chunk_bytes == LAYOUT.chunk_bytes(256) and first.peer_address.startswith("tcp://127.0.0.1:")
    other = KVLayout("unit", KVDtype.FP32, num_layers=1, num_kv_heads=1, head_size=32, block_size=32)
    with pytest.raises(LayoutError, match="block_size: pool has 16, engine has 32"):
        c.register_engine(other)


def test_write_commit_verify_and_capacity(agent: tuple[AgentServer, AgentClient]) -> None:
    s, c = agent
    reg = c.register_engine(LAYOUT)
    pool = attach(reg.shm_name)
    try:
        keys = [os.urandom(16) for _ in range(reg.slab_count + 1)]
        res = c.reserve(keys, reg.chunk_bytes)
        assert all(r.id for r in res[:-1]) and res[-1].id == 0 and res[-1].code is ErrorCode.CAPACITY
        sums = []
        for r in res[:-1]:
            view = pool.view(r.offset, r.nbytes)
            view[:] = os.urandom(r.nbytes)
            sums.append(checksum(view))
            view.release()
        sums[0] ^= 1  # the writer claims another checksum: the chunk is dropped
        errors = c.commit([r.id for r in res[:-1]], reg.chunk_tokens, sums)
        assert errors[0].code is ErrorCode.INTEGRITY and all(e.ok for e in errors[1:])
        look = c.lookup(keys)
        assert look.prefix_chunks == 0 and look.tiers[1] == "l1"
        # a probe (candidate tail keys) gets the same answer; the store's lookup metrics skip it
        assert s.store is not None
        counted = s.store.metrics.value("pdx_store_requests_total", {"op": "lookup", "result": "partial"})
        assert c.lookup(keys, probe=True).tiers == look.tiers
        assert s.store.metrics.value("pdx_store_requests_total", {"op": "lookup", "result": "partial"}) == counted
        pins = c.pin(keys[1:3], owner="o")
        assert [checksum(pool.view(p.offset, p.nbytes)) for p in pins] == sums[1:3]
        assert c.release("o") == 2
    finally:
        pool.close()


def test_jobs_unknown_and_wait_timeout(agent: tuple[AgentServer, AgentClient]) -> None:
    s, c = agent
    c.register_engine(LAYOUT)
    with pytest.raises(AgentError, match="unknown job"):
        c.job_status(999)
    job = c.fetch("tcp://127.0.0.1:9", [os.urandom(16)], "r", deadline_s=2.0)
    early = c.wait(job, 0.05)  # the reply comes back at the wait's timeout, job still running
    assert early.state in (JobState.QUEUED, JobState.RUNNING, JobState.DONE)
    final = c.wait(job, 10)
    assert final.state is JobState.DONE and not final.ok
    s.drain(5)
    with pytest.raises(AgentError, match="shutting down"):
        c.fetch("tcp://127.0.0.1:9", [os.urandom(16)], "r2")
