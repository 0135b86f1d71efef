"""Two real pdx-agents share a Mooncake tier: what agent A's engine committed, agent B serves.

No vLLM here (tests/e2e/test_shared_tiers.py has that): A's "engine" writes chunks
into A's pool and commits them; A writes them through to Mooncake; B, whose pool
never held them, finds them with a remote lookup and pins them (promoted from
Mooncake, checksums verified), byte for byte what A's engine wrote.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pdx.agent.client import AgentClient
from pdx.deploy.process import AgentProcess
from pdx.layout import KVDtype, KVLayout
from pdx.store import attach

pytestmark = [pytest.mark.integration, pytest.mark.mooncake, pytest.mark.timeout(180)]

LAYOUT = KVLayout("shared-tier-test", KVDtype.FP32, num_layers=1, num_kv_heads=1, head_size=32, block_size=16)


@pytest.fixture
def agents(tmp_path: Path, mooncake_master: Any) -> Iterator[list[tuple[AgentProcess, AgentClient]]]:
    tier = {"type": "mooncake", "master": mooncake_master.master, "metadata_server": mooncake_master.metadata_server,
            "global_segment_size": "32MiB", "local_buffer_size": "16MiB", "write": "all"}
    out: list[tuple[AgentProcess, AgentClient]] = []
    try:
        for name in ("fleet-a", "fleet-b"):
            proc = AgentProcess(tmp_path / name, {"store": {"l1": {"capacity": "4MiB"}, "tiers": [tier]}}, name=name)
            proc.start()
            out.append((proc, proc.client()))
        yield out
    finally:
        for proc, client in out:
            client.close()
            proc.stop()


def test_b_pins_what_a_committed(agents: list[tuple[AgentProcess, AgentClient]]) -> None:
    (_a_proc, a), (_b_proc, b) = agents
    reg_a, reg_b = a.register_engine(LAYOUT), b.register_engine(LAYOUT)
    keys = [os.urandom(16) for _ in range(4)]
    payloads = [os.urandom(reg_a.chunk_bytes) for _ in keys]
    pool_a = attach(reg_a.shm_name)
    try:
        res = a.reserve(keys, reg_a.chunk_bytes)
        for r, data in zip(res, payloads):
            with pool_a.view(r.offset, r.nbytes) as v:
                v[:] = data
        assert all(o.ok for o in a.commit([r.id for r in res], reg_a.chunk_tokens))
    finally:
        pool_a.close()
    # A's write-behind reaches the shared tier; B sees the chunks as soon as it is there.
    deadline = time.monotonic() + 30
    while (info := b.lookup(keys, remote=True)).prefix_chunks < 4:
        assert time.monotonic() < deadline, f"B never saw A's chunks: {info}"
        time.sleep(0.05)  # polling B's lookup state; no timing is asserted
    assert set(info.tiers) == {"mooncake"}
    assert b.lookup(keys).prefix_chunks == 0  # not in B's pool: only the shared tier has them
    pins = b.pin(keys, owner="req-b")
    assert all(p.found for p in pins)
    pool_b = attach(reg_b.shm_name)
    try:
        for p, data in zip(pins, payloads):
            with pool_b.view(p.offset, p.nbytes) as v:
                assert bytes(v) == data
    finally:
        pool_b.close()
    assert b.release("req-b") == 4
    health = b.stats()["tiers"]["mooncake"]
    assert health["enabled"] is True and health["reachable"] is True
