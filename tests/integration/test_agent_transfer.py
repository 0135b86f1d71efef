"""Two real ``pdx-agent`` processes on loopback exchanging chunks through each transport.

Everything goes through the control plane: a client registers a layout with each
agent, writes chunks into agent A's pool in place (as the connector does), and
asks agent B to fetch them (or A to send them). Bytes are checked in B's pool
against the checksums they were written with. Parametrized over every transport
available on this host (cuda_ipc needs a GPU and is left to tests/gpu).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pdx.agent.client import AgentClient
from pdx.agent.types import ChunkStatus, JobState
from pdx.checksum import checksum
from pdx.deploy.process import AgentProcess
from pdx.layout import KVDtype, KVLayout
from pdx.store.pool import AttachedPool, attach
from pdx.transport import TRANSPORTS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

LAYOUT = KVLayout("agent-test", KVDtype.FP32, num_layers=2, num_kv_heads=2, head_size=64, block_size=16)
BACKENDS = [n for n in TRANSPORTS.available() if n != "cuda_ipc"]


def agent_config(backend: str, **extra: object) -> dict[str, object]:
    cfg: dict[str, object] = {
        "store": {"chunk_tokens": 256, "l1": {"capacity": "32MiB"}},
        "transport": {"backend": backend, "heartbeat_s": 0.5, "connect_timeout_s": 10.0,
                      "transfer_timeout_s": 20.0},
        "control": {"request_timeout_s": 10.0, "workers": 2},
        "http": {"enabled": False},
    }
    cfg.update(extra)
    return cfg


class Side:
    """One agent and what the test holds of it (client, mapped pool)."""

    def __init__(self, proc: AgentProcess) -> None:
        self.proc = proc
        self.client = AgentClient(proc.control_address, 10.0)
        self.reg = self.client.register_engine(LAYOUT)
        self.pool: AttachedPool = attach(self.reg.shm_name)

    def write(self, keys: list[bytes], seed: int) -> list[int]:
        """Write random chunks for ``keys`` into the pool and commit them; returns their checksums."""
        rng = np.random.default_rng(seed)
        res = self.client.reserve(keys, self.reg.chunk_bytes)
        sums = []
        for r in res:
            assert r.id, r.error
            arr = self.pool.array(r.offset, r.nbytes)
            arr[:] = rng.integers(0, 256, r.nbytes, dtype=np.uint8)
            sums.append(checksum(memoryview(arr)))
            del arr
        assert all(o.ok for o in self.client.commit([r.id for r in res], self.reg.chunk_tokens, sums))
        return sums

    def leases(self) -> int:
        return int(self.client.stats()["pool"]["leases"])

    def close(self) -> None:
        self.pool.close()
        self.client.close()


@pytest.fixture(scope="module", params=BACKENDS)
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Side, Side]]:
    backend = request.param
    base = tmp_path_factory.mktemp(f"agents-{backend}")
    a = AgentProcess(base, agent_config(backend), name=f"a-{backend}")
    b = AgentProcess(base, agent_config(backend), name=f"b-{backend}")
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


def new_keys(n: int) -> list[bytes]:
    return [os.urandom(16) for _ in range(n)]


def wait_until(cond: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_fetch_moves_chunks_bit_exact(pair: tuple[Side, Side]) -> None:
    a, b = pair
    keys = new_keys(8)
    sums = a.write(keys, seed=1)
    job = b.client.fetch(a.proc.peer_address, keys, "req-fetch", deadline_s=20)
    info = b.client.wait(job, 30)
    assert info.state is JobState.DONE
    assert [c.status for c in info.chunks] == [ChunkStatus.DONE] * 8, info.error
    assert info.nbytes == 8 * b.reg.chunk_bytes
    for c, s in zip(info.chunks, sums):  # pinned for the request at these offsets
        assert c.lease_id and checksum(b.pool.view(c.offset, c.nbytes)) == s
    assert b.client.lookup(keys).prefix_chunks == 8
    assert b.client.release("req-fetch") == 8
    # the source's pins for the transfer are dropped once the job is over
    assert wait_until(lambda: a.leases() == 0)
    # a second fetch moves nothing: the chunks are already here
    again = b.client.wait(b.client.fetch(a.proc.peer_address, keys, "req-again"), 30)
    assert [c.status for c in again.chunks] == [ChunkStatus.PRESENT] * 8
    assert again.nbytes == 0
    b.client.release("req-again")


def test_fetch_releases_the_prefill_side_pins(pair: tuple[Side, Side]) -> None:
    a, b = pair
    keys = new_keys(4)
    a.write(keys, seed=2)
    pins = a.client.pin(keys, owner="pd:prefill-req", lease_s=60)
    assert all(p.found for p in pins)
    assert a.leases() == 4
    info = b.client.wait(b.client.fetch(a.proc.peer_address, keys, "decode-req",
                                        remote_owner="pd:prefill-req"), 30)
    assert info.ok, info
    assert wait_until(lambda: a.leases() == 0)
    b.client.release("decode-req")


def test_fetch_reports_missing_chunks_per_chunk(pair: tuple[Side, Side]) -> None:
    a, b = pair
    keys = new_keys(4)
    a.write(keys[:2], seed=3)
    info = b.client.wait(b.client.fetch(a.proc.peer_address, keys, "req-missing", pin=False), 30)
    assert [c.status for c in info.chunks] == [ChunkStatus.DONE] * 2 + [ChunkStatus.MISSING] * 2
    assert info.usable_prefix == 2 and not info.ok


def test_send_pushes_chunks_into_the_peer(pair: tuple[Side, Side]) -> None:
    a, b = pair
    keys = new_keys(6)
    sums = a.write(keys, seed=4)
    assert b.client.expect(keys, "req-send", deadline_s=30) == 6  # a push answers the receiver's request
    info = a.client.wait(a.client.send(b.proc.peer_address, keys, "req-send"), 30)
    assert [c.status for c in info.chunks] == [ChunkStatus.DONE] * 6, info.error
    pins = b.client.pin(keys, owner="check-send", lease_s=10)
    assert [checksum(b.pool.view(p.offset, p.nbytes)) for p in pins] == sums
    b.client.release("check-send")
    assert wait_until(lambda: a.leases() == 0)


def test_fetch_from_a_dead_peer_fails_within_its_deadline(pair: tuple[Side, Side]) -> None:
    _a, b = pair
    keys = new_keys(2)
    info = b.client.wait(b.client.fetch("tcp://127.0.0.1:9", keys, "req-dead", deadline_s=1.5), 30)
    assert info.state is JobState.DONE
    assert all(c.status in (ChunkStatus.FAILED, ChunkStatus.TIMEOUT) for c in info.chunks)
    assert info.error


def test_a_dead_peer_costs_one_control_timeout_not_the_whole_deadline(pair: tuple[Side, Side]) -> None:
    """The hello to a peer that never answers is bounded by control.request_timeout_s (5 s),
    so a fetch with a 120 s deadline still ends long before it (the wait below is 60 s)."""
    _a, b = pair
    info = b.client.wait(b.client.fetch("tcp://127.0.0.1:9", new_keys(2), "req-dead-long", deadline_s=120), 60)
    assert info.state is JobState.DONE
    assert all(c.status in (ChunkStatus.FAILED, ChunkStatus.TIMEOUT) for c in info.chunks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupted_chunks_are_dropped_not_served(backend: str, tmp_path: Path) -> None:
    """The receiving transport flips a byte in every chunk: commit's checksum catches each one."""
    a = AgentProcess(tmp_path, agent_config(backend), name="src")
    b = AgentProcess(tmp_path, agent_config(backend, transport={
        "backend": backend, "heartbeat_s": 0.5, "debug_corrupt_every": 1}), name="dst")
    sides: list[Side] = []
    try:
        a.start()
        b.start()
        sa, sb = Side(a), Side(b)
        sides = [sa, sb]
        keys = new_keys(3)
        sa.write(keys, seed=5)
        info = sb.client.wait(sb.client.fetch(a.peer_address, keys, "req-corrupt"), 30)
        assert [c.status for c in info.chunks] == [ChunkStatus.CORRUPT] * 3, info
        assert sb.client.lookup(keys).prefix_chunks == 0
    finally:
        for s in sides:
            s.close()
        a.stop()
        b.stop()


def test_shared_secret_guards_the_peer_socket(tmp_path: Path) -> None:
    """Same secret: fetch works. Wrong or missing secret: the job fails and says why; a peer op
    without a session is refused."""
    from pdx.agent.protocol import Op
    from pdx.errors import AuthError

    def cfg(secret: str) -> dict[str, object]:
        return agent_config("tcp", transport={"backend": "tcp", "secret": secret, "heartbeat_s": 0.5})

    procs = [AgentProcess(tmp_path, cfg("s3cret"), name="sa"), AgentProcess(tmp_path, cfg("s3cret"), name="sb"),
             AgentProcess(tmp_path, cfg("other"), name="sc"), AgentProcess(tmp_path, cfg(""), name="sd")]
    sides: list[Side] = []
    try:
        for p in procs:
            p.start()
        sides = [Side(p) for p in procs]
        a, b, c, d = sides
        keys = new_keys(2)
        a.write(keys, seed=6)
        ok = b.client.wait(b.client.fetch(a.proc.peer_address, keys, "r-ok"), 30)
        assert ok.ok, ok.error
        for bad in (c, d):
            info = bad.client.wait(bad.client.fetch(a.proc.peer_address, keys, "r-bad", deadline_s=5), 30)
            assert all(ch.status is ChunkStatus.FAILED for ch in info.chunks)
            assert "AuthError" in info.error, info.error
        with AgentClient(a.proc.peer_address, 5.0) as raw, pytest.raises(AuthError, match="peer_hello"):
            raw.call(Op.PEER_PIN, {"keys": keys, "owner": "intruder"})
        assert a.client.stats()["pool"]["leases"] == 0
    finally:
        for s in sides:
            s.close()
        for p in procs:
            p.stop()


def test_a_peer_with_another_chunk_format_is_refused(tmp_path: Path) -> None:
    a = AgentProcess(tmp_path, agent_config("tcp"), name="fa")
    b = AgentProcess(tmp_path, agent_config("tcp"), name="fb")
    try:
        a.start()
        b.start()
        with a.client(10) as ca, b.client(10) as cb:
            ca.register_engine(LAYOUT)
            other = KVLayout("another-model", KVDtype.FP32, num_layers=2, num_kv_heads=2, head_size=64,
                             block_size=16)
            cb.register_engine(other)
            info = cb.wait(cb.fetch(a.peer_address, new_keys(2), "r-fp", deadline_s=5), 30)
            assert all(c.status is ChunkStatus.FAILED for c in info.chunks)
            assert "PeerIncompatible" in info.error and "chunk fingerprint" in info.error, info.error
    finally:
        a.stop()
        b.stop()
