"""Baseline for ``transfer_ucx_<size>``: bare ucxx tagged send/receive between two processes.

No pdx code: ucxx's core API in blocking progress mode, worker addresses
exchanged over the receiver process's stdin/stdout (this module run with
``--receiver``), endpoints created from them with error handling off. Per timed
repeat the initiator sends ``size`` bytes with one tagged send and waits for the
receiver's small ack, sent once its receive into a preallocated buffer completed:
the time for the bytes to land, as the ``ucx`` backend reports it. Buffers are
prefaulted POSIX shared memory, like the pool pdx registers (``--memory anon``
for private memory instead).

``Session`` keeps the pair of processes up so a bench can interleave baseline and
pdx repeats; ``measure`` is one session, one warm-up, the median of ``repeats``.
Imported lazily by ``bench/transfer.py``. Everything here blocks.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

from bench.raw_nixl import Buffer, recv_blob, send_blob
from pdx.transport import ucx_env

#: longest wait for the receiver process and for one transfer.
TIMEOUT_S = 60.0


def _worker() -> tuple[Any, Any, Any, Any]:
    ucx_env.prepare()
    from ucxx._lib import libucxx as lib
    from ucxx._lib.arr import Array

    ctx = lib.UCXContext(config_dict={"WARN_UNUSED_ENV_VARS": "n"},
                         feature_flags=(lib.Feature.TAG, lib.Feature.WAKEUP))
    worker = lib.UCXWorker(ctx)
    worker.init_blocking_progress_mode()
    return lib, Array, ctx, worker


def _wait(worker: Any, reqs: list[Any]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not all(r.completed for r in reqs):
        if time.monotonic() > deadline:
            raise TimeoutError("a ucxx request did not complete")
        worker.progress_worker_event(100)
    for r in reqs:
        r.check_error()


def _receiver(nbytes: int, memory: str) -> None:
    """Receives sizes announced by tag 3, then the bytes (tag 1), acks each (tag 2)."""
    lib, Array, _ctx, worker = _worker()  # the context must outlive the worker
    out, inp = sys.stdout.buffer, sys.stdin.buffer
    send_blob(out, bytes(worker.address.tobytes()))
    ep = worker.create_endpoint_from_worker_address(lib.UCXAddress.create_from_buffer(recv_blob(inp)), False)
    buf = Buffer(nbytes, memory)
    size = np.zeros(1, dtype=np.uint64)
    ack = np.ones(8, dtype=np.uint8)
    while True:
        _wait(worker, [ep.tag_recv(Array(size), lib.UCXXTag(3))])
        n = int(size[0])
        if n == 0:
            break
        _wait(worker, [ep.tag_recv(Array(buf.array[:n]), lib.UCXXTag(1))])
        _wait(worker, [ep.tag_send(Array(ack), lib.UCXXTag(2))])
    buf.close()


class Session:
    """A ucxx worker here and a receiver process; ``once(size)`` times one send + ack."""

    def __init__(self, nbytes: int, memory: str = "shm") -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.raw_ucx", "--receiver", str(nbytes),
                                      "--memory", memory], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self.lib, self.Array, self.ctx, self.worker = _worker()
            addr = self.lib.UCXAddress.create_from_buffer(recv_blob(self.proc.stdout))
            send_blob(self.proc.stdin, bytes(self.worker.address.tobytes()))
            self.ep = self.worker.create_endpoint_from_worker_address(addr, False)
            self.buf = Buffer(nbytes, memory, fill=1)
            self.size = np.zeros(1, dtype=np.uint64)
            self.ack = np.zeros(8, dtype=np.uint8)
        except BaseException:
            self.close()
            raise

    def once(self, size: int) -> float:
        """Seconds for one send of ``size`` bytes (``size`` > 0) until the receiver's ack."""
        lib, Array, ep = self.lib, self.Array, self.ep
        t0 = time.perf_counter()
        self.size[0] = size
        ack = ep.tag_recv(Array(self.ack), lib.UCXXTag(2))
        _wait(self.worker, [ep.tag_send(Array(self.size), lib.UCXXTag(3)),
                            ep.tag_send(Array(self.buf.array[:size]), lib.UCXXTag(1)), ack])
        return time.perf_counter() - t0

    def close(self) -> None:
        if getattr(self, "ep", None) is not None:
            try:
                self.size[0] = 0
                _wait(self.worker, [self.ep.tag_send(self.Array(self.size), self.lib.UCXXTag(3))])
            except Exception:
                pass
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if getattr(self, "buf", None) is not None:
            self.buf.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def measure(size: int, repeats: int, memory: str = "shm") -> float:
    """Median GB/s (1e9 B/s) of ``repeats`` tagged sends of ``size`` bytes to another process."""
    with Session(size, memory) as s:
        s.once(size)
        return size / statistics.median(s.once(size) for _ in range(repeats)) / 1e9


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="bare ucxx tagged send bandwidth between two processes")
    ap.add_argument("--receiver", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--memory", choices=["shm", "anon"], default="shm")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    if args.receiver is not None:
        _receiver(args.receiver, args.memory)
    else:
        for n in (1 << 20, 16 << 20, 64 << 20, 256 << 20):
            print(f"{n >> 20} MiB: {measure(n, args.repeats, args.memory):.2f} GB/s")
