"""BatchHandle, op range checks, region views and the debug corrupter (helpers every backend uses)."""

from __future__ import annotations

import threading
from multiprocessing import shared_memory

import numpy as np
import pytest

from pdx.errors import TransferTimeout
from pdx.transport.base import (
    BatchHandle,
    ChunkOp,
    DebugCorrupter,
    MemoryKind,
    MemoryRegion,
    OpStatus,
    TransferState,
    check_ops,
    region_view,
)

OPS = [ChunkOp(0, 0, 10), ChunkOp(10, 10, 20), ChunkOp(30, 30, 30)]


def test_completion_first_outcome_wins() -> None:
    h = BatchHandle(OPS, default_timeout=5)
    assert h.poll() is TransferState.PENDING
    assert h.complete(0, OpStatus.DONE)
    assert not h.complete(0, OpStatus.FAILED, "late")
    h.complete(1, OpStatus.CORRUPT, "bad bytes")
    threading.Timer(0.05, lambda: h.complete(2, OpStatus.DONE)).start()
    res = h.wait()
    assert res.status == [OpStatus.DONE, OpStatus.CORRUPT, OpStatus.DONE]
    assert res.errors == {1: "bad bytes"} and res.nbytes == 40 and not res.ok and res.failed() == [1]
    assert h.poll() is TransferState.DONE


def test_timeout_stops_once_and_marks_the_rest() -> None:
    stops: list[OpStatus] = []
    h = BatchHandle(OPS, default_timeout=5, on_stop=lambda hh, st: stops.append(st))
    h.complete(0, OpStatus.DONE)
    res = h.wait(0.01)
    assert res.status == [OpStatus.DONE, OpStatus.TIMEOUT, OpStatus.TIMEOUT]
    assert "within 0.01s" in res.errors[1]
    assert stops == [OpStatus.TIMEOUT] and h.stopped
    h.cancel()  # already final: no second stop
    assert stops == [OpStatus.TIMEOUT]


def test_raise_on_timeout_and_cancel() -> None:
    h = BatchHandle(OPS, default_timeout=5)
    with pytest.raises(TransferTimeout, match="3 ops"):
        h.wait(0, raise_on_timeout=True)
    c = BatchHandle(OPS, default_timeout=5)
    c.cancel()
    c.cancel()
    assert c.wait(0).status == [OpStatus.CANCELLED] * 3


def test_fail_all_and_empty_batch() -> None:
    h = BatchHandle(OPS, default_timeout=5)
    h.complete(2, OpStatus.DONE)
    assert h.fail_all(OpStatus.FAILED, "peer gone") == 2
    assert h.wait(0).errors == {0: "peer gone", 1: "peer gone"}
    assert BatchHandle([], default_timeout=5).wait(0).ok


def test_check_ops() -> None:
    ops = [ChunkOp(0, 0, 100), ChunkOp(950, 0, 100), ChunkOp(0, 450, 100), ChunkOp(-1, 0, 1)]
    bad = check_ops(ops, local_nbytes=1000, remote_nbytes=500)
    assert sorted(bad) == [1, 2, 3]
    assert "local range" in bad[1] and "peer's region" in bad[2] and "negative" in bad[3]


def test_region_view() -> None:
    arr = np.zeros((4, 8), dtype=np.float32)
    view = region_view(MemoryRegion(nbytes=100, buffer=arr))
    assert view.nbytes == 100 and view.format == "B"
    view[0] = 7
    assert arr.view(np.uint8)[0, 0] == 7
    with pytest.raises(ValueError, match="writable"):
        region_view(MemoryRegion(nbytes=4, buffer=b"abcd"))
    with pytest.raises(ValueError, match="fewer than"):
        region_view(MemoryRegion(nbytes=1000, buffer=arr))
    with pytest.raises(ValueError, match="host region"):
        region_view(MemoryRegion(nbytes=4, kind=MemoryKind.CUDA, ptr=1))
    shm = shared_memory.SharedMemory(create=True, size=64)
    try:
        v = region_view(MemoryRegion(nbytes=64, buffer=shm.buf, name=shm.name))
        assert v.nbytes == 64
        v.release()
    finally:
        shm.close()
        shm.unlink()


def test_debug_corrupter_flips_every_nth() -> None:
    c = DebugCorrupter(3)
    bufs = [bytearray(8) for _ in range(7)]
    flipped = [c.maybe_corrupt(memoryview(b)) for b in bufs]
    assert flipped == [False, False, True, False, False, True, False]
    assert bufs[2][4] == 0xFF and sum(bufs[0]) == 0
    assert not DebugCorrupter(0).maybe_corrupt(memoryview(bytearray(4)))


def test_on_wait_runs_on_the_waiting_thread_before_blocking() -> None:
    seen: list[tuple[str, bool]] = []

    def help_out(h: BatchHandle, deadline: float) -> None:
        seen.append((threading.current_thread().name, deadline > 0))
        for i in range(len(h.ops)):
            h.complete(i, OpStatus.DONE)

    h = BatchHandle(OPS, default_timeout=5, on_wait=help_out)
    assert h.wait(1).ok
    assert seen == [(threading.current_thread().name, True)]
    h.wait(1)  # already finished: not called again
    assert len(seen) == 1
