"""Baseline for ``transfer_nixl_<size>``: a bare NIXL agent WRITE between two processes.

No pdx code: two NIXL agents with the same fast settings the ``nixl`` backend uses
(no progress thread, UCX backend with error handling off); the target process
(this module run with ``--target``) publishes its agent metadata and buffer
address over its stdout; each timed WRITE is one descriptor of ``size`` bytes:
``initialize_xfer`` + ``transfer`` + poll until DONE + release. Both buffers are
prefaulted POSIX shared memory, like the pool pdx registers (``--memory anon``
for private memory instead).

``Session`` keeps the pair of processes up so a bench can interleave baseline and
pdx repeats; ``measure`` is one session, one warm-up, the median of ``repeats``.
Imported lazily by ``bench/transfer.py``. Everything here blocks.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import struct
import subprocess
import sys
import time
from typing import IO, Any

import numpy as np

from pdx.transport import ucx_env

#: longest wait for the target process and for one transfer.
TIMEOUT_S = 60.0
_LEN = struct.Struct("<Q")


def _agent(name: str) -> Any:
    ucx_env.prepare()  # the same UCX environment as pdx's own nixl backend
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except ImportError:
        from nixl_cu12._api import nixl_agent, nixl_agent_config
    logging.getLogger("nixl").setLevel(logging.WARNING)
    agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=False, backends=[]))
    agent.create_backend("UCX", {"ucx_error_handling_mode": "none"})
    return agent


class Buffer:
    """``nbytes`` of prefaulted memory: POSIX shared memory (``shm``) or private (``anon``)."""

    def __init__(self, nbytes: int, memory: str = "shm", fill: int = 0) -> None:
        self.shm: Any = None
        if memory == "shm":
            from multiprocessing import shared_memory

            self.shm = shared_memory.SharedMemory(create=True, size=max(1, nbytes))
            self.array = np.ndarray((max(1, nbytes),), dtype=np.uint8, buffer=self.shm.buf)
        else:
            self.array = np.empty(max(1, nbytes), dtype=np.uint8)
        self.array[:] = fill  # touch every page
        self.address = int(self.array.ctypes.data)

    def close(self) -> None:
        del self.array
        if self.shm is not None:
            self.shm.close()
            self.shm.unlink()


def send_blob(out: IO[bytes], data: bytes) -> None:
    out.write(_LEN.pack(len(data)) + data)
    out.flush()


def recv_blob(inp: IO[bytes]) -> bytes:
    head = inp.read(_LEN.size)
    if len(head) < _LEN.size:
        raise EOFError("the other process went away")
    return inp.read(_LEN.unpack(head)[0])


def _target(nbytes: int, memory: str) -> None:
    """The passive side: registers its buffer, publishes it, waits until stdin closes."""
    agent = _agent("raw-nixl-target")
    buf = Buffer(nbytes, memory)
    agent.register_memory([(buf.address, max(1, nbytes), 0, "")], "DRAM")
    out, inp = sys.stdout.buffer, sys.stdin.buffer
    send_blob(out, agent.get_agent_metadata())
    send_blob(out, buf.address.to_bytes(8, "little"))
    agent.add_remote_agent(recv_blob(inp))
    inp.read()  # until the initiator closes our stdin
    buf.close()


class Session:
    """An initiator agent here and a target process; ``once(size)`` times one WRITE."""

    def __init__(self, nbytes: int, memory: str = "shm") -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.raw_nixl", "--target", str(nbytes),
                                      "--memory", memory], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self.agent = _agent("raw-nixl-initiator")
            self.buf = Buffer(nbytes, memory, fill=1)
            self.agent.register_memory([(self.buf.address, max(1, nbytes), 0, "")], "DRAM")
            md = recv_blob(self.proc.stdout)
            self.remote = int.from_bytes(recv_blob(self.proc.stdout), "little")
            send_blob(self.proc.stdin, self.agent.get_agent_metadata())
            self.peer = self.agent.add_remote_agent(md)
        except BaseException:
            self.close()
            raise

    def once(self, size: int) -> float:
        """Seconds for one WRITE of ``size`` bytes (raises if NIXL reports an error)."""
        a = self.agent
        t0 = time.perf_counter()
        local = a.get_xfer_descs([(self.buf.address, size, 0)], "DRAM")
        remote = a.get_xfer_descs([(self.remote, size, 0)], "DRAM")
        h = a.initialize_xfer("WRITE", local, remote, self.peer, b"")
        state = a.transfer(h)
        while state == "PROC":
            if time.perf_counter() - t0 > TIMEOUT_S:
                raise TimeoutError("a NIXL transfer did not finish")
            state = a.check_xfer_state(h)
        h.release()
        if state != "DONE":
            raise RuntimeError(f"NIXL transfer ended {state}")
        return time.perf_counter() - t0

    def close(self) -> None:
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
    """Median GB/s (1e9 B/s) of ``repeats`` WRITEs of ``size`` bytes to another process."""
    with Session(size, memory) as s:
        s.once(size)
        return size / statistics.median(s.once(size) for _ in range(repeats)) / 1e9


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="bare NIXL WRITE bandwidth between two processes")
    ap.add_argument("--target", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--memory", choices=["shm", "anon"], default="shm")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    if args.target is not None:
        _target(args.target, args.memory)
    else:
        for n in (1 << 20, 16 << 20, 64 << 20, 256 << 20):
            print(f"{n >> 20} MiB: {measure(n, args.repeats, args.memory):.2f} GB/s")
