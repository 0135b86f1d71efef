"""One conformance suite for every transport backend available on this host.

Each backend is exercised across two processes on loopback: this test process
runs one transport; peers run ``transport_peer.py`` (spawned, driven by JSON lines
over a pipe; chunk bytes only ever move through the transport). A backend whose
library is missing, or ``cuda_ipc`` without CUDA, is skipped with the exact reason.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgpack
import pytest
from transport_peer import CudaMemory, HostMemory, make_memory

from pdx.config import TransportConfig
from pdx.errors import AuthError, BackendUnavailable, PeerIncompatible, TransferTimeout
from pdx.transport import TRANSPORTS, create, handshake, ucx_env
from pdx.transport.base import (
    WIRE_VERSION,
    BatchResult,
    ChunkOp,
    OpKind,
    OpStatus,
    PeerId,
    TransferState,
    Transport,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

PEER_SCRIPT = Path(__file__).with_name("transport_peer.py")
REPO = Path(__file__).resolve().parents[2]
KiB, MiB = 1 << 10, 1 << 20
BIG = 256 * MiB
FINGERPRINT = "conformance-fp"
CONFIG = TransportConfig(heartbeat_s=0.75, connect_timeout_s=15.0, transfer_timeout_s=60.0)


def _config_json(cfg: TransportConfig) -> str:
    return json.dumps({k: getattr(cfg, k) for k in cfg.__dataclass_fields__})


class Peer:
    """A transport peer process (see transport_peer.py). Stopped by PID in ``close``."""

    def __init__(self, backend: str, nbytes: int, log_dir: Path, memory: str,
                 config: TransportConfig = CONFIG, fingerprint: str = FINGERPRINT) -> None:
        self.log_path = log_dir / f"peer-{backend}-{time.monotonic_ns()}.log"
        env = ucx_env.child_env(PYTHONPATH=str(REPO))
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-u", str(PEER_SCRIPT), "--backend", backend, "--nbytes", str(nbytes),
                 "--config", _config_json(config), "--fingerprint", fingerprint, "--memory", memory],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO, env=env)
        self._lines: queue.Queue[str] = queue.Queue()
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()
        hello = self._next(90.0)
        self.addr: str = hello["addr"]
        self.shm: str = hello.get("shm", "")

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put("")

    def _next(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"peer silent for {timeout}s; log:\n{self.log()}") from None
        if not line:
            raise AssertionError(f"peer exited (rc={self.proc.poll()}); log:\n{self.log()}")
        return json.loads(line)  # type: ignore[no-any-return]

    def call(self, timeout: float = 120.0, **msg: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        reply = self._next(timeout)
        assert "error" not in reply, reply["error"]
        return reply

    def fill(self, off: int, n: int, seed: int) -> None:
        self.call(cmd="fill", off=off, n=n, seed=seed)

    def checksums(self, ranges: list[tuple[int, int]]) -> list[int]:
        return list(self.call(cmd="checksum", ranges=[list(r) for r in ranges])["checksums"])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.signal(signal.SIGCONT)
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(15)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
        self._pump_thread.join(10)
        if self.proc.stdout is not None and not self._pump_thread.is_alive():
            self.proc.stdout.close()
        if self.shm and Path("/dev/shm", self.shm).exists() and self.proc.returncode != 0:
            Path("/dev/shm", self.shm).unlink(missing_ok=True)


@dataclass
class Ctx:
    backend: str
    memory: str
    log_dir: Path
    local: Transport
    mem: HostMemory | CudaMemory
    a: Peer
    b: Peer
    pa: PeerId
    pb: PeerId

    def transport(self, **overrides: Any) -> Transport:
        """Another local transport (caller closes it)."""
        fingerprint = overrides.pop("fingerprint", FINGERPRINT)
        return create(self.backend, replace(CONFIG, **overrides), fingerprint)

    def peer(self, nbytes: int, **kw: Any) -> Peer:
        return Peer(self.backend, nbytes, self.log_dir, self.memory, **kw)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@pytest.fixture(scope="module", params=TRANSPORTS.names())
def ctx(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctx]:
    backend = request.param
    try:
        TRANSPORTS.get(backend)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    memory = "host"
    if backend == "cuda_ipc":
        if not _cuda_available():
            pytest.skip("cuda_ipc moves GPU memory: no CUDA device here (torch.cuda.is_available() is False)")
        memory = "cuda"
    log_dir = tmp_path_factory.mktemp(f"transport-{backend}")
    mem = make_memory(memory, BIG + MiB)
    local = create(backend, CONFIG, FINGERPRINT)
    peers: list[Peer] = []
    try:
        local.register(mem.region)
        local.listen()
        peers.append(Peer(backend, BIG + MiB, log_dir, memory))
        peers.append(Peer(backend, 64 * MiB, log_dir, memory))
        pa = local.connect(peers[0].addr).peer_id
        pb = local.connect(peers[1].addr).peer_id
        yield Ctx(backend, memory, log_dir, local, mem, peers[0], peers[1], pa, pb)
    finally:
        local.close()
        for p in peers:
            p.close()
        mem.close()


def run(t: Transport, peer: PeerId, kind: OpKind, ops: list[ChunkOp], timeout: float = 60.0) -> BatchResult:
    return t.post(peer, kind, ops).wait(timeout)


def local_cks(ctx: Ctx, ranges: list[tuple[int, int]]) -> list[int]:
    return [ctx.mem.checksum(o, n) for o, n in ranges]


def transfer_and_check(ctx: Ctx, kind: OpKind, ops: list[tuple[int, int, int]], seed: int,
                       peer: Peer | None = None, pid: PeerId | None = None) -> None:
    """Fill the source side, move ``ops`` (local_offset, remote_offset, nbytes), compare checksums."""
    peer, pid = peer or ctx.a, pid or ctx.pa
    remote = [(ro, n) for _, ro, n in ops]
    local = [(lo, n) for lo, _, n in ops]
    if kind is OpKind.READ:
        for k, (ro, n) in enumerate(remote):
            peer.fill(ro, n, seed + k)
        want = peer.checksums(remote)
    else:
        for k, (lo, n) in enumerate(local):
            ctx.mem.fill(lo, n, seed + k)
        want = local_cks(ctx, local)
    res = run(ctx.local, pid, kind, [ChunkOp(lo, ro, n, c) for (lo, ro, n), c in zip(ops, want)])
    assert res.status == [OpStatus.DONE] * len(ops), res.errors
    assert res.nbytes == sum(n for _, _, n in ops)
    got = local_cks(ctx, local) if kind is OpKind.READ else peer.checksums(remote)
    assert got == want


KINDS = [pytest.param(OpKind.READ, id="read"), pytest.param(OpKind.WRITE, id="write")]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [0, 1, 4097, MiB])
def test_sizes(ctx: Ctx, kind: OpKind, size: int) -> None:
    transfer_and_check(ctx, kind, [(3, 4099, size)], seed=size * 7 + len(kind.value))


@pytest.mark.parametrize("kind", KINDS)
def test_256mib_in_one_op(ctx: Ctx, kind: OpKind) -> None:
    transfer_and_check(ctx, kind, [(0, MiB, BIG)], seed=11 if kind is OpKind.READ else 12)


@pytest.mark.parametrize("kind", KINDS)
def test_256_chunks_of_256kib_in_one_batch(ctx: Ctx, kind: OpKind) -> None:
    chunk = 256 * KiB
    # local chunks in order, remote ones reversed with a gap: catches offset mix-ups
    ops = [(i * chunk, (255 - i) * (chunk + 4 * KiB), chunk) for i in range(256)]
    transfer_and_check(ctx, kind, ops, seed=1000 if kind is OpKind.READ else 2000)


def test_concurrent_transfers_to_two_peers(ctx: Ctx) -> None:
    chunk = 256 * KiB
    ops_a = [(i * chunk, i * chunk, chunk) for i in range(64)]
    ops_b = [(32 * MiB + i * chunk, i * chunk, chunk) for i in range(64)]
    for k, (_, ro, n) in enumerate(ops_a):
        ctx.a.fill(ro, n, 300 + k)
    for k, (lo, _, n) in enumerate(ops_b):
        ctx.mem.fill(lo, n, 400 + k)
    want_a = ctx.a.checksums([(ro, n) for _, ro, n in ops_a])
    want_b = local_cks(ctx, [(lo, n) for lo, _, n in ops_b])
    ha = ctx.local.post(ctx.pa, OpKind.READ, [ChunkOp(*o, c) for o, c in zip(ops_a, want_a)])
    hb = ctx.local.post(ctx.pb, OpKind.WRITE, [ChunkOp(*o, c) for o, c in zip(ops_b, want_b)])
    ra, rb = ha.wait(60), hb.wait(60)
    assert ra.ok and rb.ok, (ra.errors, rb.errors)
    assert local_cks(ctx, [(lo, n) for lo, _, n in ops_a]) == want_a
    assert ctx.b.checksums([(ro, n) for _, ro, n in ops_b]) == want_b


def test_checksum_mismatch_reported_per_chunk(ctx: Ctx) -> None:
    ops = [(i * 64 * KiB, i * 64 * KiB, 64 * KiB) for i in range(8)]
    for k, (_, ro, n) in enumerate(ops):
        ctx.a.fill(ro, n, 500 + k)
    cks = ctx.a.checksums([(ro, n) for _, ro, n in ops])
    cks[2] ^= 1
    cks[5] ^= 1
    res = run(ctx.local, ctx.pa, OpKind.READ, [ChunkOp(*o, c) for o, c in zip(ops, cks)])
    want = [OpStatus.CORRUPT if i in (2, 5) else OpStatus.DONE for i in range(8)]
    assert res.status == want, res.errors
    assert set(res.errors) == {2, 5}


def test_debug_corrupt_every_flips_received_chunks(ctx: Ctx) -> None:
    if not TRANSPORTS.get(ctx.backend).debug_corrupt:
        pytest.skip(f"{ctx.backend} does not implement config.debug_corrupt_every")
    t = ctx.transport(debug_corrupt_every=3)
    try:
        t.register(ctx.mem.region)
        pid = t.connect(ctx.a.addr).peer_id
        ops = [(i * 64 * KiB, i * 64 * KiB, 64 * KiB) for i in range(9)]
        for k, (_, ro, n) in enumerate(ops):
            ctx.a.fill(ro, n, 600 + k)
        cks = ctx.a.checksums([(ro, n) for _, ro, n in ops])
        res = run(t, pid, OpKind.READ, [ChunkOp(*o, c) for o, c in zip(ops, cks)])
        assert res.status.count(OpStatus.CORRUPT) == 3, res.status
        assert res.status.count(OpStatus.DONE) == 6, res.status
    finally:
        t.close()


def test_debug_corrupt_every_on_the_receiving_peer_shows_in_writes(ctx: Ctx) -> None:
    if not TRANSPORTS.get(ctx.backend).debug_corrupt:
        pytest.skip(f"{ctx.backend} does not implement config.debug_corrupt_every")
    peer = ctx.peer(4 * MiB, config=replace(CONFIG, debug_corrupt_every=2))
    try:
        pid = ctx.local.connect(peer.addr).peer_id
        ops = [(i * 64 * KiB, i * 64 * KiB, 64 * KiB) for i in range(6)]
        for k, (lo, _, n) in enumerate(ops):
            ctx.mem.fill(lo, n, 650 + k)
        cks = local_cks(ctx, [(lo, n) for lo, _, n in ops])
        res = run(ctx.local, pid, OpKind.WRITE, [ChunkOp(*o, c) for o, c in zip(ops, cks)])
        assert res.status.count(OpStatus.CORRUPT) == 3, res.status
        assert res.status.count(OpStatus.DONE) == 3, res.status
        landed = peer.checksums([(ro, n) for _, ro, n in ops])
        assert [g == w for g, w in zip(landed, cks)] == [s is OpStatus.DONE for s in res.status]
    finally:
        peer.close()


def test_ops_outside_a_region_fail_alone(ctx: Ctx) -> None:
    peer_size = 64 * MiB
    ops = [ChunkOp(0, 0, KiB), ChunkOp(0, peer_size - 10, KiB), ChunkOp(KiB, KiB, KiB)]
    res = run(ctx.local, ctx.pb, OpKind.READ, ops)
    assert res.status == [OpStatus.DONE, OpStatus.FAILED, OpStatus.DONE], res.errors
    assert "beyond" in res.errors[1]


def test_fingerprint_mismatch_names_both_values(ctx: Ctx) -> None:
    t = ctx.transport(fingerprint="another-layout")
    try:
        t.register(ctx.mem.region)
        with pytest.raises(PeerIncompatible) as err:
            t.connect(ctx.a.addr)
    finally:
        t.close()
    assert "another-layout" in str(err.value) and FINGERPRINT in str(err.value)
    _wait_for(lambda: "another-layout" in ctx.a.log() and "PeerIncompatible" in ctx.a.log(),
              "the peer logs the rejection with both fingerprints")


def test_version_mismatch_names_both_values(ctx: Ctx, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handshake, "WIRE_VERSION", WIRE_VERSION + 41)
    t = ctx.transport()
    try:
        t.register(ctx.mem.region)
        with pytest.raises(PeerIncompatible) as err:
            t.connect(ctx.a.addr)
    finally:
        t.close()
    msg = str(err.value)
    assert f"speaks {WIRE_VERSION + 41}" in msg and f"speaks {WIRE_VERSION}" in msg
    _wait_for(lambda: f"speaks {WIRE_VERSION + 41}" in ctx.a.log(), "the peer logs the version mismatch")


def _garbage(addr: str) -> None:
    host, port = handshake.parse_address(addr)
    payloads = [
        os.urandom(4096),
        struct.pack(">I", 0xFFFFFFF0) + b"x" * 64,  # absurd frame length
        struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1",  # not msgpack
        handshake.encode_frame({"t": "attach", "token": b"0" * 16, "k": "tcp"}),  # unknown token
        handshake.encode_frame({"t": "hello", "v": "x", "nonce": 3}),  # malformed hello
        msgpack.packb([1, 2, 3]),
        b"",  # connect and hang up
    ]
    for data in payloads:
        with socket.create_connection((host, port), timeout=5) as s:
            try:
                s.sendall(data)
                s.settimeout(2)
                s.recv(64)
            except OSError:
                pass


def test_garbage_on_the_port_drops_only_that_connection(ctx: Ctx) -> None:
    ops = [(i * MiB, i * MiB, MiB) for i in range(64)]
    for k, (_, ro, n) in enumerate(ops):
        ctx.a.fill(ro, n, 700 + k)
    cks = ctx.a.checksums([(ro, n) for _, ro, n in ops])
    handle = ctx.local.post(ctx.pa, OpKind.READ, [ChunkOp(*o, c) for o, c in zip(ops, cks)])
    junk = threading.Thread(target=_garbage, args=(ctx.a.addr,))
    junk.start()
    res = handle.wait(60)
    junk.join(60)
    assert res.ok, res.errors
    # the listener still serves new peers, and the old connection still works
    t = ctx.transport()
    try:
        t.register(ctx.mem.region)
        assert t.connect(ctx.a.addr).peer_id == ctx.pa
    finally:
        t.close()
    transfer_and_check(ctx, OpKind.READ, [(0, 0, MiB)], seed=701)


def test_timeout_on_a_stalled_peer(ctx: Ctx) -> None:
    ops = [ChunkOp(i * MiB, i * MiB, MiB) for i in range(256)]
    ctx.a.signal(signal.SIGSTOP)
    try:
        res = ctx.local.post(ctx.pa, OpKind.READ, ops).wait(0.001)
        handle = ctx.local.post(ctx.pa, OpKind.READ, ops)
        with pytest.raises(TransferTimeout):
            handle.wait(0.001, raise_on_timeout=True)
    finally:
        ctx.a.signal(signal.SIGCONT)
    assert set(res.status) <= {OpStatus.DONE, OpStatus.TIMEOUT}
    assert OpStatus.TIMEOUT in res.status
    assert all("within" in res.errors[i] for i, s in enumerate(res.status) if s is OpStatus.TIMEOUT)
    transfer_and_check(ctx, OpKind.READ, [(0, 0, MiB)], seed=801)  # the peer is usable again


def test_cancel(ctx: Ctx) -> None:
    handle = ctx.local.post(ctx.pa, OpKind.READ, [ChunkOp(i * MiB, i * MiB, MiB) for i in range(256)])
    handle.cancel()
    handle.cancel()
    assert handle.poll() is TransferState.DONE  # cancel returns with every op final
    res = handle.wait(0)
    # ops not yet started end CANCELLED; a one-sided transfer already in flight may land (DONE)
    assert set(res.status) <= {OpStatus.DONE, OpStatus.CANCELLED}
    assert all(res.errors[i] == "cancelled" for i in res.failed())
    transfer_and_check(ctx, OpKind.WRITE, [(0, 0, MiB)], seed=901)


def test_post_from_the_accepting_side(ctx: Ctx) -> None:
    """The peer reuses the connection we opened (idempotent connect) and posts on it."""
    local_addr = ctx.local.listen()
    pid = ctx.a.call(cmd="connect", addr=local_addr)["peer_id"]
    assert pid in ctx.a.call(cmd="peers")["peers"]
    ctx.a.fill(0, MiB, 1001)
    (want,) = ctx.a.checksums([(0, MiB)])
    # peer WRITEs its [0, 1MiB) into our [5MiB, 6MiB)
    res = ctx.a.call(cmd="post", peer=pid, kind="write", ops=[[0, 5 * MiB, MiB, want]], timeout=60)
    assert res["status"] == ["done"], res
    assert local_cks(ctx, [(5 * MiB, MiB)]) == [want]
    # peer READs our [8MiB, 9MiB) into its [2MiB, 3MiB)
    ctx.mem.fill(8 * MiB, MiB, 1002)
    (want2,) = local_cks(ctx, [(8 * MiB, MiB)])
    res = ctx.a.call(cmd="post", peer=pid, kind="read", ops=[[2 * MiB, 8 * MiB, MiB, want2]], timeout=60)
    assert res["status"] == ["done"], res
    assert ctx.a.checksums([(2 * MiB, MiB)]) == [want2]


@pytest.mark.parametrize("kind", KINDS)
def test_peer_killed_mid_transfer(ctx: Ctx, kind: OpKind) -> None:
    peer = ctx.peer(128 * MiB)
    try:
        pid = ctx.local.connect(peer.addr).peer_id
        ops = [ChunkOp(i * MiB, i * MiB, MiB) for i in range(128)]
        handle = ctx.local.post(pid, kind, ops)
        peer.signal(signal.SIGKILL)
        res = handle.wait(45)
        # never a hang, never a timeout: the death is noticed long before the deadline
        assert set(res.status) <= {OpStatus.DONE, OpStatus.FAILED}, res.status
        assert all(res.errors[i] for i in res.failed())
        _wait_for(lambda: pid not in [p.peer_id for p in ctx.local.peers()], "the dead peer is dropped")
        after = ctx.local.post(pid, kind, ops[:1]).wait(10)
        assert after.status == [OpStatus.FAILED]
    finally:
        peer.close()


def test_hung_peer_is_detected_by_heartbeats(ctx: Ctx) -> None:
    peer = ctx.peer(16 * MiB)
    try:
        pid = ctx.local.connect(peer.addr).peer_id
        peer.signal(signal.SIGSTOP)
        res = ctx.local.post(pid, OpKind.READ, [ChunkOp(i * MiB, i * MiB, MiB) for i in range(16)]).wait(45)
        assert set(res.status) <= {OpStatus.DONE, OpStatus.FAILED}, res.status
        _wait_for(lambda: pid not in [p.peer_id for p in ctx.local.peers()], "the hung peer is dropped")
        assert ctx.local.post(pid, OpKind.READ, [ChunkOp(0, 0, 1)]).wait(10).status == [OpStatus.FAILED]
    finally:
        peer.signal(signal.SIGKILL)
        peer.close()


def test_shared_secret_challenge(ctx: Ctx) -> None:
    peer = ctx.peer(4 * MiB, config=replace(CONFIG, secret="open sesame"))
    good, wrong, none = (ctx.transport(secret="open sesame"), ctx.transport(secret="guess"),
                         ctx.transport())
    try:
        for t in (good, wrong, none):
            t.register(ctx.mem.region)
        pid = good.connect(peer.addr).peer_id
        peer.fill(0, MiB, 1100)
        (want,) = peer.checksums([(0, MiB)])
        assert good.post(pid, OpKind.READ, [ChunkOp(0, 0, MiB, want)]).wait(60).ok
        with pytest.raises(AuthError, match="challenge"):
            wrong.connect(peer.addr)
        with pytest.raises(AuthError, match="requires a shared secret"):
            none.connect(peer.addr)
    finally:
        for t in (good, wrong, none):
            t.close()
        peer.close()


def _wait_for(cond: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting until {what}")
