"""GPU memory between two processes: ``cuda_ipc`` (real CUDA IPC) and ``nixl`` on VRAM.

This process holds one transport with a ``cudaMalloc``ed region; a peer process
(gpu_peer.py) holds another. Chunk bytes only move through the transport; both
sides check them with xxh3 checksums of the device bytes. Without an NVIDIA
driver/GPU every test is skipped with the exact reason.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pdx.config import TransportConfig
from pdx.errors import BackendUnavailable
from pdx.transport import TRANSPORTS, create, ucx_env
from pdx.transport.base import ChunkOp, OpKind, OpStatus, PeerId, Transport
from pdx.transport.cuda_ipc import load_cuda

sys.path.insert(0, str(Path(__file__).parent))
from gpu_peer import DeviceMemory

try:
    load_cuda()
    _NO_GPU = ""
except BackendUnavailable as exc:
    _NO_GPU = str(exc)

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300), pytest.mark.skipif(bool(_NO_GPU), reason=_NO_GPU)]

REPO = Path(__file__).resolve().parents[2]
PEER = Path(__file__).with_name("gpu_peer.py")
KiB, MiB = 1 << 10, 1 << 20
NBYTES = 96 * MiB
CONFIG = TransportConfig(heartbeat_s=0.5, connect_timeout_s=30.0, transfer_timeout_s=60.0)


class Peer:
    """gpu_peer.py in its own process; stopped by PID in ``close``."""

    def __init__(self, backend: str, nbytes: int, log_path: Path) -> None:
        self.log_path = log_path
        cfg = json.dumps({k: getattr(CONFIG, k) for k in CONFIG.__dataclass_fields__})
        env = ucx_env.child_env(PYTHONPATH=str(REPO))
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-u", str(PEER), "--backend", backend, "--nbytes", str(nbytes), "--config", cfg],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO, env=env)
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.addr: str = self._next(120.0)["addr"]

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put("")

    def _next(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"gpu peer silent for {timeout}s:\n{self.log_path.read_text()}") from None
        if not line:
            raise AssertionError(f"gpu peer exited ({self.proc.poll()}):\n{self.log_path.read_text()}")
        return json.loads(line)  # type: ignore[no-any-return]

    def call(self, **msg: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        reply = self._next(120.0)
        assert "error" not in reply, reply["error"]
        return reply

    def checksums(self, ranges: list[tuple[int, int]]) -> list[int]:
        return list(self.call(cmd="checksum", ranges=[list(r) for r in ranges])["checksums"])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)


class Side:
    def __init__(self, t: Transport, mem: DeviceMemory, peer: Peer, pid: PeerId) -> None:
        self.t, self.mem, self.peer, self.pid = t, mem, peer, pid


@pytest.fixture(scope="module", params=["cuda_ipc", "nixl"])
def side(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Side]:
    backend = request.param
    try:
        TRANSPORTS.get(backend)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    mem = DeviceMemory(NBYTES)
    t = create(backend, CONFIG, "gpu-test")
    peer = None
    try:
        t.register(mem.region)
        t.listen()
        peer = Peer(backend, NBYTES, tmp_path_factory.mktemp(backend) / "peer.log")
        yield Side(t, mem, peer, t.connect(peer.addr).peer_id)
    finally:
        t.close()
        if peer is not None:
            peer.close()
        mem.close()


def _move(s: Side, kind: OpKind, ops: list[tuple[int, int, int]], seed: int) -> None:
    """Fill the source side, move ``ops`` with checksums, compare checksums on both sides."""
    if kind is OpKind.READ:
        for k, (_, ro, n) in enumerate(ops):
            s.peer.call(cmd="fill", off=ro, n=n, seed=seed + k)
        want = s.peer.checksums([(ro, n) for _, ro, n in ops])
    else:
        for k, (lo, _, n) in enumerate(ops):
            s.mem.fill(lo, n, seed + k)
        want = [s.mem.checksum(lo, n) for lo, _, n in ops]
    res = s.t.post(s.pid, kind, [ChunkOp(lo, ro, n, c) for (lo, ro, n), c in zip(ops, want)]).wait(60)
    assert res.ok, res.errors
    got = ([s.mem.checksum(lo, n) for lo, _, n in ops] if kind is OpKind.READ
           else s.peer.checksums([(ro, n) for _, ro, n in ops]))
    assert got == want


@pytest.mark.parametrize("kind", [OpKind.READ, OpKind.WRITE], ids=["read", "write"])
@pytest.mark.parametrize("size", [1, 4097, MiB, 64 * MiB])
def test_sizes(side: Side, kind: OpKind, size: int) -> None:
    _move(side, kind, [(3, 4099, size)], seed=size + len(kind.value))


@pytest.mark.parametrize("kind", [OpKind.READ, OpKind.WRITE], ids=["read", "write"])
def test_256_scattered_chunks_in_one_batch(side: Side, kind: OpKind) -> None:
    chunk = 256 * KiB
    _move(side, kind, [(i * chunk, (255 - i) * (chunk + 4 * KiB), chunk) for i in range(256)], seed=77)


def test_checksum_mismatch_is_reported_per_chunk(side: Side) -> None:
    ops = [(i * 64 * KiB, i * 64 * KiB, 64 * KiB) for i in range(6)]
    for k, (_, ro, n) in enumerate(ops):
        side.peer.call(cmd="fill", off=ro, n=n, seed=900 + k)
    cks = side.peer.checksums([(ro, n) for _, ro, n in ops])
    cks[4] ^= 1
    res = side.t.post(side.pid, OpKind.READ, [ChunkOp(*o, c) for o, c in zip(ops, cks)]).wait(60)
    assert res.status == [OpStatus.DONE] * 4 + [OpStatus.CORRUPT, OpStatus.DONE], res.errors


def test_a_killed_peer_fails_its_ops_and_is_dropped(side: Side, tmp_path: Path) -> None:
    backend = side.t.name
    peer = Peer(backend, 16 * MiB, tmp_path / "victim.log")
    try:
        pid = side.t.connect(peer.addr).peer_id
        os.kill(peer.proc.pid, signal.SIGKILL)
        peer.proc.wait(30)
        deadline = time.monotonic() + 20
        while pid in [p.peer_id for p in side.t.peers()]:
            assert time.monotonic() < deadline, "the dead peer was not dropped"
            time.sleep(0.05)
        res = side.t.post(pid, OpKind.WRITE, [ChunkOp(0, 0, MiB)]).wait(10)
        assert res.status == [OpStatus.FAILED]
    finally:
        peer.close()
