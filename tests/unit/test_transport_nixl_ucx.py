"""The nixl, ucx and cuda_ipc backends: wire helpers, planning, and quick in-process round trips.

The round trips use two real transports of the same backend in this process (real NIXL
agents, real UCX workers) over loopback; the two-process behaviour (kills, stalls,
garbage) is the conformance suite's job (tests/integration/test_transport_conformance.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from multiprocessing import shared_memory
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdx.checksum import checksum
from pdx.config import TransportConfig
from pdx.errors import BackendUnavailable, WireError
from pdx.transport import TRANSPORTS, create
from pdx.transport.base import ChunkOp, MemoryKind, MemoryRegion, OpKind, OpStatus, PeerId, Transport
from pdx.transport.cuda_ipc import NO_CUDA, _runs
from pdx.transport.ucx_wire import (
    ACK_OP,
    BATCH_MASK,
    K_DATA,
    K_HDR,
    OPS_PER_HDR,
    PEER_MASK,
    RUN_MAX,
    coalesce,
    op_of,
    pack_msg,
    parse_header,
    tag,
    unpack_msg,
)

KiB, MiB = 1 << 10, 1 << 20
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")


# --- ucx wire format -----------------------------------------------------------------------------


def test_tags_keep_kind_sender_batch_and_op_apart() -> None:
    t = tag(K_DATA, 0xABCDEF, 0x123456, 0x7FF)
    assert op_of(t) == 0x7FF
    assert t & BATCH_MASK == tag(K_DATA, 0xABCDEF, 0x123456)
    assert t & PEER_MASK == tag(K_DATA, 0xABCDEF)  # one peer's messages of one kind
    assert tag(K_HDR, 1, 5, 5) & PEER_MASK != tag(K_HDR, 2, 5, 5) & PEER_MASK
    assert tag(K_DATA, 1, 2, 3) != tag(K_DATA, 1, 3, 2) != tag(K_DATA, 2, 2, 3)
    assert tag(K_DATA, 5, (1 << 24) + 7, 1) == tag(K_DATA, 5, 7, 1)  # batch numbers wrap
    assert OPS_PER_HDR < ACK_OP


def test_coalesce_merges_only_runs_contiguous_on_both_sides() -> None:
    ops = [ChunkOp(0, 100, 10), ChunkOp(10, 110, 10), ChunkOp(20, 500, 10), ChunkOp(30, 510, 5),
           ChunkOp(100, 515, 5)]
    assert coalesce(ops) == [(0, 2, 0, 20), (2, 2, 20, 15), (4, 1, 100, 5)]
    big = [ChunkOp(i * (RUN_MAX // 2), i * (RUN_MAX // 2), RUN_MAX // 2) for i in range(5)]
    assert [r[1] for r in coalesce(big)] == [2, 2, 1]
    assert coalesce([ChunkOp(0, 0, 3 * RUN_MAX)]) == [(0, 1, 0, 3 * RUN_MAX)]


def test_header_round_trip_and_checks() -> None:
    head = {"k": "w", "b": 9, "ops": [[0, 10, 5], [10, 6, None], [100, 4, 1]], "runs": [2, 1]}
    assert parse_header(unpack_msg(pack_msg(head)), 104) == ("w", 9, head["ops"], [(0, 2), (2, 1)])
    bad = [
        ({**head, "k": "x"}, "wrong type"),
        ({**head, "ops": [[0, 10, 5], [10, 6, None], [100, 5, 1]], "runs": [2, 1]}, "outside"),
        ({**head, "ops": [[-1, 10, None]], "runs": [1]}, "outside"),
        ({**head, "ops": [[0, 0, None]], "runs": [1]}, "outside"),
        ({**head, "ops": [[0, 10, "x"]], "runs": [1]}, "malformed"),
        ({**head, "runs": [1, 1, 1, 1]}, "does not fit"),
        ({**head, "runs": [1]}, "cover"),
        ({**head, "runs": [1, 2]}, "not contiguous"),
        ({**head, "runs": None}, "wrong type"),
    ]
    for h, words in bad:
        with pytest.raises(WireError, match=words):
            parse_header(h, 104)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_garbage_control_messages_raise_wire_error_only(data: bytes) -> None:
    try:
        msg = unpack_msg(np.frombuffer(data, dtype=np.uint8))
    except WireError:
        return
    try:
        parse_header(msg, 1 << 20)
    except WireError:
        pass


def test_cuda_copies_coalesce_contiguous_runs() -> None:
    ops = [ChunkOp(0, 0, 4), ChunkOp(4, 4, 4), ChunkOp(8, 100, 4), ChunkOp(50, 50, 0)]
    assert _runs(ops, [0, 1, 2, 3]) == [(0, 0, 8), (8, 100, 4)]


def test_cuda_ipc_without_a_gpu_says_why() -> None:
    try:
        from pdx.transport.cuda_ipc import load_cuda

        load_cuda()
    except BackendUnavailable:
        pass
    else:
        pytest.skip("this host has a GPU")
    with pytest.raises(BackendUnavailable, match=NO_CUDA):
        create("cuda_ipc", TransportConfig(), "fp")


# --- in-process round trips ----------------------------------------------------------------------


class Shm:
    def __init__(self, nbytes: int) -> None:
        self.shm = shared_memory.SharedMemory(create=True, size=nbytes)
        self.array: Any = np.ndarray((nbytes,), dtype=np.uint8, buffer=self.shm.buf)
        self.array[:] = 0
        self.region = MemoryRegion(nbytes=nbytes, buffer=self.shm.buf)

    def fill(self, off: int, n: int, seed: int) -> int:
        self.array[off:off + n] = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
        return checksum(self.array[off:off + n].data)

    def cks(self, off: int, n: int) -> int:
        return checksum(self.array[off:off + n].data)

    def close(self) -> None:
        del self.array
        self.region = MemoryRegion(0)
        try:
            self.shm.close()
        except BufferError:
            pass
        self.shm.unlink()


class Pair:
    def __init__(self, backend: str, nbytes: int, **cfg: Any) -> None:
        config = TransportConfig(heartbeat_s=0.5, connect_timeout_s=10.0, transfer_timeout_s=30.0, **cfg)
        self.a, self.b = create(backend, config, "fp"), create(backend, config, "fp")
        self.ma, self.mb = Shm(nbytes), Shm(nbytes)
        self.a.register(self.ma.region)
        self.b.register(self.mb.region)
        self.pid = self.a.connect(self.b.listen()).peer_id

    def close(self) -> None:
        for t in (self.a, self.b):
            t.close()
        self.ma.close()
        self.mb.close()


def _available(name: str) -> bool:
    try:
        TRANSPORTS.get(name)
    except BackendUnavailable:
        return False
    return True


@pytest.fixture(scope="module", params=[n for n in ("nixl", "ucx") if _available(n)])
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    p = Pair(request.param, 72 * MiB)
    yield p
    p.close()


def test_write_then_read_back_many_small_and_empty_ops(pair: Pair) -> None:
    # more ops than one ucx header holds, and zero-byte ops mixed in
    n = OPS_PER_HDR + 300
    ops = [ChunkOp(i * 1024, (n - 1 - i) * 1024 + 7, 0 if i % 97 == 0 else 1000) for i in range(n)]
    want = [pair.ma.fill(op.local_offset, op.nbytes, i) for i, op in enumerate(ops)]
    res = pair.a.post(pair.pid, OpKind.WRITE, [ChunkOp(o.local_offset, o.remote_offset, o.nbytes, c)
                                               for o, c in zip(ops, want)]).wait(30)
    assert res.ok, list(res.errors.items())[:3]
    assert [pair.mb.cks(o.remote_offset, o.nbytes) for o in ops] == want
    back = [ChunkOp(32 * MiB + o.local_offset, o.remote_offset, o.nbytes, c) for o, c in zip(ops, want)]
    res = pair.a.post(pair.pid, OpKind.READ, back).wait(30)
    assert res.ok and res.nbytes == sum(o.nbytes for o in ops)
    assert [pair.ma.cks(o.local_offset, o.nbytes) for o in back] == want


def test_an_op_larger_than_one_nixl_job_is_split_and_rejoined(pair: Pair) -> None:
    size = 70 * MiB  # > JOB_BYTES (64 MiB) and > RUN_MAX
    want = pair.mb.fill(MiB, size, 5)
    res = pair.a.post(pair.pid, OpKind.READ, [ChunkOp(0, MiB, size, want)]).wait(30)
    assert res.status == [OpStatus.DONE], res.errors
    assert pair.ma.cks(0, size) == want


def test_posting_from_the_accepting_side(pair: Pair) -> None:
    (info,) = pair.b.peers()
    want = pair.mb.fill(0, MiB, 8)
    assert pair.b.post(info.peer_id, OpKind.WRITE, [ChunkOp(0, 5 * MiB, MiB, want)]).wait(30).ok
    assert pair.ma.cks(5 * MiB, MiB) == want


def test_unknown_peer_and_bad_ranges_fail_alone(pair: Pair) -> None:
    assert pair.a.post(PeerId("nobody"), OpKind.READ, [ChunkOp(0, 0, 1)]).wait(5).status == [OpStatus.FAILED]
    res = pair.a.post(pair.pid, OpKind.READ, [ChunkOp(0, 72 * MiB - 1, 2), ChunkOp(0, 0, 2)]).wait(10)
    assert res.status == [OpStatus.FAILED, OpStatus.DONE]
    assert "beyond" in res.errors[0]


def test_cancel_and_timeout_end_ops_without_failures(pair: Pair) -> None:
    ops = [ChunkOp(i * MiB, i * MiB, MiB) for i in range(64)]
    h = pair.a.post(pair.pid, OpKind.READ, ops)
    h.cancel()
    assert set(h.wait(10).status) <= {OpStatus.DONE, OpStatus.CANCELLED}
    res = pair.a.post(pair.pid, OpKind.WRITE, ops).wait(0)
    assert set(res.status) <= {OpStatus.DONE, OpStatus.TIMEOUT}
    assert pair.a.post(pair.pid, OpKind.READ, ops[:1]).wait(10).ok  # still usable


def test_receiver_side_checksums_and_debug_corruption() -> None:
    backends = [n for n in ("nixl", "ucx") if _available(n)]
    if not backends:
        pytest.skip("neither nixl nor ucx is installed")
    for backend in backends:
        p = Pair(backend, 4 * MiB, debug_corrupt_every=2)
        try:
            ops = [ChunkOp(i * 64 * KiB, i * 64 * KiB, 64 * KiB) for i in range(6)]
            cks = [p.ma.fill(o.local_offset, o.nbytes, i) for i, o in enumerate(ops)]
            res = p.a.post(p.pid, OpKind.WRITE, [ChunkOp(o.local_offset, o.remote_offset, o.nbytes, c)
                                                 for o, c in zip(ops, cks)]).wait(10)
            # b flips every 2nd chunk it receives and reports them; a flips every 2nd it reads
            assert res.status.count(OpStatus.CORRUPT) == 3, (backend, res.status)
            res = p.a.post(p.pid, OpKind.READ, [ChunkOp(o.local_offset, o.remote_offset, o.nbytes)
                                                for o in ops]).wait(10)
            assert res.ok  # no checksums given: nothing to verify
        finally:
            p.close()


def test_regions_must_match_the_backend() -> None:
    for backend in [n for n in ("nixl", "ucx") if _available(n)]:
        t: Transport = create(backend, TransportConfig(), "fp")
        try:
            if backend == "ucx":
                with pytest.raises(Exception, match="host memory"):
                    t.register(MemoryRegion(nbytes=10, kind=MemoryKind.CUDA, ptr=1))
            with pytest.raises(ValueError):
                t.register(MemoryRegion(nbytes=10, buffer=bytes(10)))  # read-only
        finally:
            t.close()
