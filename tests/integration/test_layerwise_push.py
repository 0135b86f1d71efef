"""Layer-wise P/D between two real agents (tcp): the prefill side pushes each layer of its
reserved chunks as it is written, the decode side's fetch of that request takes the staged chunks,
re-hashed against the prefill side's checksums; a damaged or unsealed stage falls back to the
ordinary fetch, and nothing staged is ever visible to lookups before that fetch commits it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from pdx.agent.client import AgentClient
from pdx.agent.types import ChunkStatus, JobState
from pdx.checksum import checksum
from pdx.deploy.process import AgentProcess
from pdx.layout import KVDtype, KVLayout
from pdx.store.pool import AttachedPool, attach

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

LAYERS = 4
LAYOUT = KVLayout("layerwise-test", KVDtype.FP32, num_layers=LAYERS, num_kv_heads=2, head_size=64, block_size=16)


def agent_config() -> dict[str, object]:
    return {
        "store": {"chunk_tokens": 64, "l1": {"capacity": "16MiB"}},
        "transport": {"backend": "tcp", "heartbeat_s": 0.5, "connect_timeout_s": 10.0, "transfer_timeout_s": 20.0},
        "control": {"request_timeout_s": 10.0, "workers": 2},
        "http": {"enabled": False},
    }


class Side:
    def __init__(self, proc: AgentProcess) -> None:
        self.proc = proc
        self.client = AgentClient(proc.control_address, 10.0)
        self.reg = self.client.register_engine(LAYOUT)
        self.pool: AttachedPool = attach(self.reg.shm_name)

    def status(self) -> dict[str, int]:
        doc: dict[str, int] = self.client.stats()["push"]
        return doc

    def close(self) -> None:
        self.pool.close()
        self.client.close()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Side, Side]]:
    base = tmp_path_factory.mktemp("layerwise")
    a = AgentProcess(base, agent_config(), name="prefill")
    b = AgentProcess(base, agent_config(), name="decode")
    sides: list[Side] = []
    try:
        a.start()
        b.start()
        sides = [Side(a), Side(b)]
        yield sides[0], sides[1]
    finally:
        for s in sides:
            s.close()
        a.stop()
        b.stop()


def push_layers(a: Side, b: Side, request: str, n: int, seed: int, keep: bool,
                bad_checksum: bool = False) -> tuple[list[bytes], list[bytes]]:
    """Reserve ``n`` chunks on ``a``, write and push them layer by layer to ``b``, seal; commit them
    on ``a`` too when ``keep`` (else abort: only the staged copy exists). Returns keys and payloads."""
    rng = np.random.default_rng(seed)
    keys = [os.urandom(16) for _ in range(n)]
    res = a.client.reserve(keys, a.reg.chunk_bytes)
    assert all(r.id for r in res)
    push = a.client.push_open(b.proc.peer_address, request, keys, [r.offset for r in res],
                              [r.nbytes for r in res], LAYERS, deadline_s=20)
    assert push
    per = a.reg.chunk_bytes // LAYERS
    payloads = [rng.integers(0, 256, a.reg.chunk_bytes, dtype=np.uint8) for _ in keys]
    for layer in range(LAYERS):
        for r, p in zip(res, payloads):
            a.pool.array(r.offset + layer * per, per)[:] = p[layer * per:(layer + 1) * per]
        assert a.client.push_layer(push, layer)
    sums = [checksum(memoryview(p)) for p in payloads]
    if keep:
        assert all(o.ok for o in a.client.commit([r.id for r in res], a.reg.chunk_tokens, sums))
    else:
        a.client.abort([r.id for r in res])
    seal = [s ^ 1 for s in sums] if bad_checksum else sums
    sealed = a.status()["sealed"]
    assert a.client.push_seal(push, seal, [a.reg.chunk_tokens] * n)
    assert wait_until(lambda: a.status()["sealed"] > sealed)  # the decode side holds the sealed stage
    return keys, [p.tobytes() for p in payloads]


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_staged_layers_are_taken_by_the_fetch_of_that_request(pair: tuple[Side, Side]) -> None:
    a, b = pair
    keys, payloads = push_layers(a, b, "req-lw-1", 5, seed=1, keep=False)  # only the staged copy exists
    assert b.client.lookup(keys).prefix_chunks == 0  # staged is not stored
    job = b.client.fetch(a.proc.peer_address, keys, "load:lw-1", deadline_s=20, remote_owner="pd:req-lw-1")
    info = b.client.wait(job, 30)
    assert info.state is JobState.DONE
    assert [c.status for c in info.chunks] == [ChunkStatus.DONE] * 5, info.error
    for c, p in zip(info.chunks, payloads):
        assert c.lease_id and b.pool.view(c.offset, c.nbytes).tobytes() == p
    assert b.client.lookup(keys).prefix_chunks == 5
    assert a.status()["layers"] >= LAYERS and a.status()["sealed"] >= 1
    assert b.status()["staged_taken"] >= 5
    b.client.release("load:lw-1")


def test_a_stage_is_only_for_the_request_that_names_it(pair: tuple[Side, Side]) -> None:
    a, b = pair
    keys, _ = push_layers(a, b, "req-lw-2", 2, seed=2, keep=False)
    job = b.client.fetch(a.proc.peer_address, keys, "load:other", deadline_s=10, remote_owner="pd:req-other")
    info = b.client.wait(job, 20)
    assert not any(c.status.usable for c in info.chunks)  # a's copies were aborted, the stage is not this one's
    assert b.client.lookup(keys).prefix_chunks == 0


def test_a_damaged_stage_is_refused_and_the_fetch_pulls_instead(pair: tuple[Side, Side]) -> None:
    a, b = pair
    keys, payloads = push_layers(a, b, "req-lw-3", 3, seed=3, keep=True, bad_checksum=True)
    job = b.client.fetch(a.proc.peer_address, keys, "load:lw-3", deadline_s=20, remote_owner="pd:req-lw-3")
    info = b.client.wait(job, 30)
    assert [c.status for c in info.chunks] == [ChunkStatus.DONE] * 3, info.error
    for c, p in zip(info.chunks, payloads):  # the bytes of the ordinary fetch, bit-exact
        assert b.pool.view(c.offset, c.nbytes).tobytes() == p
    b.client.release("load:lw-3")


def test_without_a_stage_the_fetch_is_the_ordinary_one(pair: tuple[Side, Side], tmp_path: Path) -> None:
    a, b = pair
    keys = [os.urandom(16) for _ in range(2)]
    res = a.client.reserve(keys, a.reg.chunk_bytes)
    sums = []
    for r in res:
        arr = a.pool.array(r.offset, r.nbytes)
        arr[:] = 7
        sums.append(checksum(memoryview(arr)))
    assert all(o.ok for o in a.client.commit([r.id for r in res], a.reg.chunk_tokens, sums))
    job = b.client.fetch(a.proc.peer_address, keys, "load:lw-4", deadline_s=20, remote_owner="pd:req-lw-4")
    info = b.client.wait(job, 30)
    assert [c.status for c in info.chunks] == [ChunkStatus.DONE] * 2, info.error
    b.client.release("load:lw-4")


def test_the_decode_side_releases_the_prefill_side_pins_of_a_staged_request(pair: tuple[Side, Side]) -> None:
    a, b = pair
    keys, payloads = push_layers(a, b, "req-lw-5", 3, seed=5, keep=True)
    leases = int(a.client.stats()["pool"]["leases"])
    assert all(p.lease_id for p in a.client.pin(keys, owner="pd:req-lw-5", lease_s=120))  # the hand-off pins
    assert int(a.client.stats()["pool"]["leases"]) == leases + 3
    job = b.client.fetch(a.proc.peer_address, keys, "load:lw-5", deadline_s=20, remote_owner="pd:req-lw-5")
    info = b.client.wait(job, 30)
    assert [c.status for c in info.chunks] == [ChunkStatus.DONE] * 3, info.error
    for c, p in zip(info.chunks, payloads):
        assert b.pool.view(c.offset, c.nbytes).tobytes() == p
    # only the agent the chunks were pushed to may release them, and it does, off the fetch's path
    assert wait_until(lambda: int(a.client.stats()["pool"]["leases"]) == leases)
    b.client.release("load:lw-5")
