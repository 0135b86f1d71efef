"""The fetch and send jobs (``pdx.agent.transfers``) against a fake context: two real in-process
stores, a fake transport that copies between their pools, and a fake peer client."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from pdx.agent.context import AgentContext, commit_chunks
from pdx.agent.jobs import JobTable
from pdx.agent.links import PeerLink
from pdx.agent.metrics import AgentMetrics
from pdx.agent.protocol import ARGS, Op
from pdx.agent.transfers import Transfers
from pdx.agent.types import ChunkStatus, JobKind, JobState, PinInfo, ReserveRow
from pdx.checksum import checksum
from pdx.config import AgentConfig, L1Config, StoreConfig
from pdx.errors import PeerDenied
from pdx.keys import ChunkKey
from pdx.store.store import ChunkStore
from pdx.transport.base import BatchHandle, ChunkOp, OpKind, OpStatus

SLAB = 64 * 1024
FP = "fp-transfers"


def store() -> ChunkStore:
    cfg = StoreConfig(chunk_tokens=16, l1=L1Config(capacity=8 * SLAB, lease_s=30.0, reservation_timeout_s=30.0))
    return ChunkStore(cfg, SLAB, FP)


def key(i: int) -> ChunkKey:
    return ChunkKey(i.to_bytes(16, "little"))


def put(s: ChunkStore, k: ChunkKey, seed: int) -> int:
    data = np.random.default_rng(seed).integers(0, 256, SLAB, dtype=np.uint8).tobytes()
    s.put(k, data)
    return checksum(memoryview(data))


class FakeTransport:
    """Moves bytes between the local and the remote pool at once; ``corrupt`` flips a byte on READ."""

    name = "fake"

    def __init__(self, local: ChunkStore, remote: ChunkStore) -> None:
        self.local, self.remote = local, remote
        self.corrupt = False
        self.posted = 0

    def post(self, peer: Any, kind: OpKind, ops: Sequence[ChunkOp]) -> BatchHandle:
        self.posted += 1
        h = BatchHandle(ops, 5.0)
        for i, op in enumerate(ops):
            src = self.remote.pool.view(op.remote_offset, op.nbytes)
            dst = self.local.pool.view(op.local_offset, op.nbytes)
            if kind is OpKind.READ:
                dst[:] = src
                if self.corrupt:
                    dst[0] ^= 0xFF
            else:
                src[:] = dst
            h.complete(i, OpStatus.DONE)
        return h


class FakePeer:
    """The peer's side of the control calls, on the remote store."""

    def __init__(self, remote: ChunkStore) -> None:
        self.remote = remote
        self.address = "tcp://127.0.0.1:1"
        self.auth = b"token"
        self.calls: list[tuple[Op, Any]] = []
        self.refuse: set[Op] = set()
        self.expected: set[bytes] = set()

    def call(self, op: Op, args: Any, timeout: float | None = None) -> Any:
        """Answers with the same reply types as a real peer (the transfer jobs read nothing else)."""
        assert isinstance(args, ARGS[op])  # the jobs speak the schema
        self.calls.append((op, args))
        if op in self.refuse:
            raise PeerDenied(f"{op.value}: refused by the fake peer")
        if op is Op.PEER_PIN:
            pins = self.remote.pin([ChunkKey(k) for k in args.keys], owner=args.owner)
            return [PinInfo(p.lease_id, k, p.offset, p.nbytes, p.checksum, p.num_tokens, 30.0) if p else
                    PinInfo(0, k) for k, p in zip(args.keys, pins)]
        if op is Op.PEER_RELEASE:
            return self.remote.release_owner(args.owner)
        if op is Op.PEER_RESERVE:
            out = []
            for k in args.keys:
                r = self.remote.reserve(ChunkKey(k), SLAB)
                out.append(ReserveRow(r.id, r.offset, r.nbytes))
            return out
        if op is Op.PEER_COMMIT:
            return commit_chunks(self.remote, args.ids, args.checksums, args.num_tokens)
        if op is Op.PEER_ABORT:
            return len(args.ids)
        raise AssertionError(op)


class FakeLinks:
    def __init__(self, peer: FakePeer) -> None:
        self.peer = peer
        self.dialed = 0
        self.dropped: list[str] = []

    def link(self, address: str, timeout: float) -> PeerLink:
        self.dialed += 1
        return PeerLink(address, self.peer, "remote", "peer-1", "127.0.0.1:2")  # type: ignore[arg-type]

    def drop_link(self, address: str) -> None:
        self.dropped.append(address)


class World:
    def __init__(self) -> None:
        self.local, self.remote = store(), store()
        self.transport = FakeTransport(self.local, self.remote)
        self.peer = FakePeer(self.remote)
        self.links = FakeLinks(self.peer)
        self.jobs = JobTable(60.0, 100)
        self.ctx = AgentContext(
            config=AgentConfig(), agent_id="local", instance="i1", secret="", metrics=AgentMetrics(),
            jobs=self.jobs, transfers=ThreadPoolExecutor(2), control=ThreadPoolExecutor(1),
            store=self.local, transport=self.transport, layout=object(),  # type: ignore[arg-type]
        )
        self.denied: set[str] = set()
        self.transfers = Transfers(self.ctx, self.links, self.check)  # type: ignore[arg-type]

    def check(self, address: str) -> None:
        if address in self.denied:
            raise PeerDenied(f"{address} is not a known agent")

    def run(self, kind: JobKind, keys: list[ChunkKey], **kw: Any) -> Any:
        job = self.jobs.create(kind, "req", self.peer.address, list(keys), deadline=time.monotonic() + 30)
        self.transfers.submit(job, **kw).result(timeout=30)
        assert job.state is JobState.DONE
        return self.jobs.snapshot(job)

    def close(self) -> None:
        self.transfers.close()
        self.ctx.transfers.shutdown()
        self.ctx.control.shutdown()
        self.local.close()
        self.remote.close()


@pytest.fixture
def world() -> Iterator[World]:
    w = World()
    yield w
    w.close()


def test_fetch_moves_verifies_pins_and_releases(world: World) -> None:
    keys = [key(i) for i in range(4)]
    sums = [put(world.remote, k, i) for i, k in enumerate(keys[:3])]
    world.remote.pin(keys[:3], owner="pd:prefill")
    info = world.run(JobKind.FETCH, keys, remote_owner="pd:prefill")
    assert [c.status for c in info.chunks] == [ChunkStatus.DONE] * 3 + [ChunkStatus.MISSING]
    for c, s in zip(info.chunks, sums):
        assert c.lease_id and checksum(world.local.pool.view(c.offset, c.nbytes)) == s
    assert info.nbytes == 3 * SLAB
    world.ctx.control.submit(lambda: None).result(5)  # the releases ran
    released = [a.owner for op, a in world.peer.calls if op is Op.PEER_RELEASE]
    assert released[-1] == "pd:prefill" and released[0].startswith("fetch:local:i1:")
    assert world.remote.stats().leases == 0


def test_fetch_of_present_chunks_moves_nothing(world: World) -> None:
    keys = [key(i) for i in range(2)]
    for i, k in enumerate(keys):
        put(world.local, k, i)
    info = world.run(JobKind.FETCH, keys)
    assert [c.status for c in info.chunks] == [ChunkStatus.PRESENT] * 2
    assert world.links.dialed == 0 and world.transport.posted == 0


def test_corrupt_bytes_are_dropped_not_committed(world: World) -> None:
    keys = [key(i) for i in range(2)]
    for i, k in enumerate(keys):
        put(world.remote, k, i)
    world.transport.corrupt = True
    info = world.run(JobKind.FETCH, keys)
    assert [c.status for c in info.chunks] == [ChunkStatus.CORRUPT] * 2
    assert world.local.lookup(keys).prefix_chunks == 0


def test_an_unknown_peer_is_never_dialled(world: World) -> None:
    world.denied.add(world.peer.address)
    info = world.run(JobKind.FETCH, [key(1)])
    assert [c.status for c in info.chunks] == [ChunkStatus.FAILED]
    assert "PeerDenied" in info.error and world.links.dialed == 0
    assert world.links.dropped == []  # a refusal is not a dead link


def test_send_pushes_and_a_refusal_fails_each_chunk(world: World) -> None:
    keys = [key(i) for i in range(2)]
    sums = [put(world.local, k, i) for i, k in enumerate(keys)]
    info = world.run(JobKind.SEND, keys)
    assert [c.status for c in info.chunks] == [ChunkStatus.DONE] * 2
    pins = world.remote.pin(keys, owner="check")
    assert [checksum(world.remote.pool.view(p.offset, p.nbytes)) for p in pins if p] == sums
    world.peer.refuse.add(Op.PEER_RESERVE)
    more = [key(10)]
    put(world.local, more[0], 10)
    info = world.run(JobKind.SEND, more)
    assert [c.status for c in info.chunks] == [ChunkStatus.FAILED] and "PeerDenied" in info.error
    assert world.local.stats().leases == 0  # the send's own pins are dropped either way


def test_a_link_says_hello_again_before_the_peer_lets_its_session_lapse() -> None:
    from pdx.agent.trust import SESSION_IDLE_S, SESSION_MAX_S

    link = PeerLink("a", None, "p", "id", "t", created=100.0, used=100.0)  # type: ignore[arg-type]
    assert not link.stale(101.0)
    assert link.stale(100.0 + SESSION_IDLE_S / 2 + 1)  # unused for long: the peer may have forgotten it
    link.used = 100.0 + SESSION_MAX_S
    assert link.stale(100.0 + SESSION_MAX_S)  # close to the token's absolute limit


def test_loaded_tokens_count_each_source(world: World) -> None:
    """``pdx_agent_loaded_tokens_total{source}``: a P/D fetch (it names the prefill's hand-off owner)
    is ``pd``, a fetch on the proxy's hint is ``peer``, chunks already here are ``l1``."""
    TOKENS = 16  # the store's chunk_tokens: put() commits full chunks

    def loaded(source: str) -> float:
        return world.ctx.metrics.value("pdx_agent_loaded_tokens_total", {"source": source})

    pd_keys, hint_keys = [key(10 + i) for i in range(2)], [key(20 + i) for i in range(3)]
    for i, k in enumerate([*pd_keys, *hint_keys]):
        put(world.remote, k, i)
    world.run(JobKind.FETCH, pd_keys, remote_owner="pd:prefill")
    assert loaded("pd") == 2 * TOKENS and loaded("peer") == 0
    world.run(JobKind.FETCH, hint_keys)
    assert loaded("peer") == 3 * TOKENS and loaded("pd") == 2 * TOKENS
    world.run(JobKind.FETCH, hint_keys)  # now here: nothing moves
    assert loaded("l1") == 3 * TOKENS and loaded("peer") == 3 * TOKENS
    world.run(JobKind.FETCH, [key(30)], pin=False)  # not an engine's load (a prefetch): not counted
    assert loaded("peer") == 3 * TOKENS


def test_a_fetch_records_its_stages_and_logs_them_at_debug(world: World,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    keys = [key(i) for i in range(3)]
    for i, k in enumerate(keys):
        put(world.remote, k, i)
    job = world.jobs.create(JobKind.FETCH, "req", world.peer.address, list(keys), deadline=time.monotonic() + 30)
    with caplog.at_level(logging.DEBUG, logger="pdx.agent.peers"):
        world.transfers.submit(job).result(timeout=30)
    assert [c.status for c in world.jobs.snapshot(job).chunks] == [ChunkStatus.DONE] * 3
    names = [name for name, _t in job.marks]
    assert names == ["queued", "link", "peer_pin", "reserve", "post", "move", "verify_tail", "results", "finished"]
    stages = job.stages_ms()
    assert list(stages) == names and all(v >= 0 for v in stages.values())
    assert any(f"fetch job {job.id} stages (ms): queued=" in r.getMessage() for r in caplog.records)



@pytest.mark.parametrize(("floor", "groups"), [(1, 4), (4, 2)])  # the floor wins over the group count
def test_a_large_fetch_moves_in_a_few_groups_each_verified(world: World, monkeypatch: pytest.MonkeyPatch,
                                                             floor: int, groups: int) -> None:
    import pdx.agent.transfers as transfers_mod

    monkeypatch.setattr(transfers_mod, "PIPELINE_BYTES", floor * SLAB)
    monkeypatch.setattr(transfers_mod, "PIPELINE_GROUPS", 4)
    keys = [key(i) for i in range(8)]
    sums = [put(world.remote, k, i) for i, k in enumerate(keys)]
    info = world.run(JobKind.FETCH, keys)
    assert [c.status for c in info.chunks] == [ChunkStatus.DONE] * 8
    assert world.transport.posted == groups
    for c, s in zip(info.chunks, sums):
        assert checksum(world.local.pool.view(c.offset, c.nbytes)) == s
