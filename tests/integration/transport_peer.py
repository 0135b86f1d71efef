"""A transport peer in its own process, driven by the conformance suite and ``pdx-bench transfer``.

Usage: ``python transport_peer.py --backend tcp --nbytes N [--config JSON] [--fingerprint FP]
[--memory host|cuda]``. It registers a region (host memory in POSIX shm, or a CUDA
buffer), listens, prints one JSON line ``{"addr": ..., "shm": name}`` on stdout, then
answers one JSON command per stdin line with one JSON line:

* ``{"cmd": "fill", "off": O, "n": N, "seed": S}`` -> ``{"ok": true}`` (seeded random bytes)
* ``{"cmd": "checksum", "ranges": [[off, n], ...]}`` -> ``{"checksums": [...]}``
* ``{"cmd": "connect", "addr": A}`` -> ``{"peer_id": ...}``
* ``{"cmd": "post", "peer": P, "kind": "read"|"write", "ops": [[lo, ro, n, cks|null], ...],
  "timeout": T}`` -> ``{"status": [...], "errors": {...}}``
* ``{"cmd": "peers"}`` -> ``{"peers": [peer_id, ...]}``
* ``{"cmd": "quit"}`` (or end of stdin) -> closes everything and exits.

Failures are answered as ``{"error": "..."}``. Logs go to stderr. Only this control
text crosses the pipe; every byte of chunk data moves through the transport.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from pdx.checksum import checksum
from pdx.config import TransportConfig, from_dict
from pdx.transport import create
from pdx.transport.base import ChunkOp, MemoryKind, MemoryRegion, OpKind, PeerId, Transport


class HostMemory:
    """A region in POSIX shared memory (what the pool uses), usable by every host backend."""

    def __init__(self, nbytes: int) -> None:
        self.shm = shared_memory.SharedMemory(create=True, size=max(1, nbytes))
        buf = self.shm.buf
        assert buf is not None
        self.array: np.ndarray[Any, Any] = np.ndarray((nbytes,), dtype=np.uint8, buffer=buf)
        self.region = MemoryRegion(nbytes=nbytes, buffer=buf[:nbytes], name=self.shm.name)

    def fill(self, off: int, n: int, seed: int) -> None:
        self.array[off:off + n] = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)

    def checksum(self, off: int, n: int) -> int:
        return checksum(self.array[off:off + n].data)

    def close(self) -> None:
        del self.array
        self.region = MemoryRegion(0)
        try:
            self.shm.close()
        except BufferError:
            pass
        self.shm.unlink()


class CudaMemory:
    """A region in GPU memory (for cuda_ipc and GPU NIXL); bytes are checked on the host."""

    def __init__(self, nbytes: int) -> None:
        import torch

        self.torch = torch
        self.tensor = torch.zeros(max(1, nbytes), dtype=torch.uint8, device="cuda")
        self.region = MemoryRegion(nbytes=nbytes, kind=MemoryKind.CUDA, ptr=self.tensor.data_ptr(),
                                   device=self.tensor.device.index or 0)

    def fill(self, off: int, n: int, seed: int) -> None:
        data = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
        self.tensor[off:off + n].copy_(self.torch.from_numpy(data))
        self.torch.cuda.synchronize()

    def checksum(self, off: int, n: int) -> int:
        self.torch.cuda.synchronize()
        return checksum(self.tensor[off:off + n].cpu().numpy().data)

    def close(self) -> None:
        del self.tensor


def make_memory(kind: str, nbytes: int) -> HostMemory | CudaMemory:
    return CudaMemory(nbytes) if kind == "cuda" else HostMemory(nbytes)


def run_command(t: Transport, mem: HostMemory | CudaMemory, msg: dict[str, Any]) -> dict[str, Any]:
    cmd = msg.get("cmd")
    if cmd == "fill":
        mem.fill(msg["off"], msg["n"], msg["seed"])
        return {"ok": True}
    if cmd == "checksum":
        return {"checksums": [mem.checksum(o, n) for o, n in msg["ranges"]]}
    if cmd == "connect":
        return {"peer_id": t.connect(msg["addr"]).peer_id}
    if cmd == "post":
        ops = [ChunkOp(lo, ro, n, c) for lo, ro, n, c in msg["ops"]]
        res = t.post(PeerId(msg["peer"]), OpKind(msg["kind"]), ops).wait(msg.get("timeout"))
        return {"status": [s.value for s in res.status], "errors": {str(k): v for k, v in res.errors.items()}}
    if cmd == "peers":
        return {"peers": [p.peer_id for p in t.peers()]}
    raise ValueError(f"unknown command {cmd!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--backend", required=True)
    ap.add_argument("--nbytes", type=int, required=True)
    ap.add_argument("--config", default="{}", help="TransportConfig fields as JSON")
    ap.add_argument("--fingerprint", default="conformance")
    ap.add_argument("--memory", choices=["host", "cuda"], default="host")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s peer %(process)d %(name)s %(levelname)s %(message)s")
    config = from_dict(TransportConfig, json.loads(args.config))
    mem = make_memory(args.memory, args.nbytes)
    t = create(args.backend, config, args.fingerprint)
    try:
        t.register(mem.region)
        addr = t.listen()
        print(json.dumps({"addr": addr, "shm": getattr(mem.region, "name", "")}), flush=True)
        for line in sys.stdin:
            if not line.strip():
                continue
            msg = json.loads(line)
            if msg.get("cmd") == "quit":
                break
            try:
                reply = run_command(t, mem, msg)
            except Exception as exc:
                logging.exception("command %s failed", msg.get("cmd"))
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(reply), flush=True)
    finally:
        t.close()
        mem.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
