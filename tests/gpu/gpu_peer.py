"""A transport peer with a GPU region, in its own process (for tests/gpu/test_cuda_ipc.py).

Usage: ``python gpu_peer.py --backend cuda_ipc|nixl --nbytes N [--config JSON]``. The
region is ``cudaMalloc``ed through cuda-python (no CUDA build of torch needed). Prints
``{"addr": ...}`` then answers one JSON command per stdin line, like
tests/integration/transport_peer.py: ``fill``, ``checksum``, ``connect``, ``post``,
``peers``, ``quit``. Chunk bytes only move through the transport under test.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

import numpy as np

from pdx.checksum import checksum
from pdx.config import TransportConfig, from_dict
from pdx.transport import create
from pdx.transport.base import ChunkOp, MemoryKind, MemoryRegion, OpKind, PeerId, Transport
from pdx.transport.cuda_ipc import Cuda, load_cuda


class DeviceMemory:
    """``nbytes`` of GPU memory on device 0, filled and checked through the host."""

    def __init__(self, nbytes: int, device: int = 0) -> None:
        self.cuda = Cuda(load_cuda(), device)
        self.ptr = self.cuda.alloc(nbytes)
        self.cuda.call("cudaMemset", self.ptr, 0, max(1, nbytes))
        self.region = MemoryRegion(nbytes=nbytes, kind=MemoryKind.CUDA, ptr=self.ptr, device=device)

    def fill(self, off: int, n: int, seed: int) -> None:
        self.cuda.use()
        self.cuda.from_host(self.ptr + off, np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).data)

    def checksum(self, off: int, n: int) -> int:
        self.cuda.use()
        self.cuda.call("cudaDeviceSynchronize")
        return checksum(self.cuda.to_host(self.ptr + off, n))

    def close(self) -> None:
        self.cuda.use()
        self.cuda.free(self.ptr)


def run_command(t: Transport, mem: DeviceMemory, msg: dict[str, Any]) -> dict[str, Any]:
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
    ap = argparse.ArgumentParser(description="transport peer with a GPU region")
    ap.add_argument("--backend", required=True)
    ap.add_argument("--nbytes", type=int, required=True)
    ap.add_argument("--config", default="{}")
    ap.add_argument("--fingerprint", default="gpu-test")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s gpu-peer %(process)d %(name)s %(levelname)s %(message)s")
    mem = DeviceMemory(args.nbytes)
    t = create(args.backend, from_dict(TransportConfig, json.loads(args.config)), args.fingerprint)
    try:
        t.register(mem.region)
        print(json.dumps({"addr": t.listen()}), flush=True)
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
