"""Hostile peers against real ``pdx-agent`` processes on loopback.

A *rogue* peer holds the deployment secret (it completes the challenge) and then tries every op
beyond its grants: reading or writing pool bytes it was not granted (control plane and the tcp
data plane), unpinning/aborting/committing/releasing other sessions' or the engine's ids,
planting chunks under keys the agent did not ask for, exhausting the pool. An *outsider*
without the secret tries every op. A bounded hypothesis fuzz throws valid-looking peer
requests at the peer socket. After each: the agent still serves an honest peer bit-exact,
loses no committed chunk, and counted the refusals (``pdx_agent_peer_denied_total``).

With ``PDX_ADVERSARIAL_REPORT=path`` the tallies (cases tried / refused per surface) are written
there as JSON.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdx.agent.client import AgentClient
from pdx.agent.protocol import Op
from pdx.agent.types import ChunkStatus
from pdx.checksum import checksum
from pdx.config import TransportConfig
from pdx.deploy.process import AgentProcess
from pdx.errors import AuthError, ErrorCode, PdxError, PeerDenied, WireError
from pdx.layout import KVDtype, KVLayout
from pdx.store.pool import AttachedPool, attach
from pdx.transport import create
from pdx.transport.base import WIRE_VERSION, ChunkOp, MemoryKind, MemoryRegion, OpKind, OpStatus, SessionCred
from pdx.transport.framing import recv_frame, send_frame
from pdx.transport.handshake import bind_proof, client_proof, session_handle, session_key

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SECRET = "adversarial-deployment-secret"
LAYOUT = KVLayout("adversarial", KVDtype.FP32, num_layers=2, num_kv_heads=2, head_size=64, block_size=16)
TALLY: dict[str, Counter[str]] = {}
MAX_STREAMS = 4


def tally(surface: str, refused: bool) -> None:
    c = TALLY.setdefault(surface, Counter())
    c["tried"] += 1
    c["refused"] += int(refused)


def agent_config(**transport: Any) -> dict[str, Any]:
    return {
        "store": {"chunk_tokens": 256, "l1": {"capacity": "16MiB", "reservation_timeout_s": 30}},
        "transport": {"backend": "tcp", "secret": SECRET, "heartbeat_s": 0.5, "connect_timeout_s": 5.0,
                      "transfer_timeout_s": 10.0, "max_streams_per_peer": MAX_STREAMS, **transport},
        "control": {"request_timeout_s": 5.0, "workers": 2},
        "leases": {"sweep_s": 0.1},
    }


class Side:
    def __init__(self, proc: AgentProcess) -> None:
        self.proc = proc
        self.client = AgentClient(proc.control_address, 10.0)
        self.reg = self.client.register_engine(LAYOUT)
        self.pool: AttachedPool = attach(self.reg.shm_name)

    def write(self, keys: list[bytes], seed: int) -> list[int]:
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

    def metric(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(self.proc.http_url + "/metrics", timeout=5) as r:
            text = r.read().decode()
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        pat = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" ([0-9.e+]+)"
        m = re.search(pat, text)
        return float(m.group(1)) if m else 0.0

    def close(self) -> None:
        self.pool.close()
        self.client.close()


class Rogue:
    """A peer that holds the secret: a real session on the victim's peer socket, and a tcp transport."""

    def __init__(self, victim: Side, secret: str = SECRET, lanes: int = 1) -> None:
        self.client = AgentClient(victim.proc.peer_address, 5.0)
        nonce = os.urandom(16)
        args: dict[str, Any] = {"agent_id": "rogue", "chunk_fingerprint": victim.reg.chunk_fingerprint,
                                "nonce": nonce}
        ch = self.client.call(Op.PEER_HELLO, args)
        args.update(server_nonce=ch.challenge, proof=client_proof(secret, nonce, ch.challenge))
        self.hello = self.client.call(Op.PEER_HELLO, args)
        self.client.auth = self.hello.token
        self.region = bytearray(4 * 1024 * 1024)
        self.transport = create("tcp", TransportConfig(backend="tcp", secret=secret, heartbeat_s=0.5,
                                                       transfer_timeout_s=5.0, connections_per_peer=lanes),
                                victim.reg.chunk_fingerprint)
        self.transport.register(MemoryRegion(len(self.region), MemoryKind.HOST, self.region))
        # the transport connection rides on the session: it proves the key both sides derived
        self.cred = SessionCred(session_handle(self.hello.token),
                                session_key(secret, nonce, ch.challenge, self.hello.token))
        self.peer = self.transport.connect(self.hello.transport_address, timeout=5.0, session=self.cred).peer_id
        self.transport.set_session(self.peer, self.cred.handle)

    def call(self, op: Op, args: dict[str, Any]) -> Any:
        return self.client.call(op, args, 5.0)

    def move(self, kind: OpKind, remote_offset: int, nbytes: int) -> OpStatus:
        h = self.transport.post(self.peer, kind, [ChunkOp(0, remote_offset, nbytes)])
        return h.wait(timeout=10.0).status[0]

    def close(self) -> None:
        self.transport.close()
        self.client.close()


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Side, Side]]:
    base = tmp_path_factory.mktemp("adversarial")
    v = AgentProcess(base, agent_config(), name="victim")
    h = AgentProcess(base, agent_config(), name="honest")
    sides: list[Side] = []
    try:
        v.start()
        h.start()
        sides = [Side(v), Side(h)]
        yield sides[0], sides[1]
    finally:
        for s in sides:
            s.close()
        v.stop()
        h.stop()
        if os.environ.get("PDX_ADVERSARIAL_REPORT"):
            Path(os.environ["PDX_ADVERSARIAL_REPORT"]).write_text(
                json.dumps({k: dict(c) for k, c in TALLY.items()}, indent=1, sort_keys=True))


def keys_(n: int) -> list[bytes]:
    return [os.urandom(16) for _ in range(n)]


def refused(fn: Any, surface: str, exc: type[BaseException] = PeerDenied) -> BaseException:
    with pytest.raises(exc) as info:
        fn()
    tally(surface, True)
    return info.value


def still_serves(victim: Side, honest: Side, kept: list[bytes], sums: list[int]) -> None:
    """The honest peer still fetches bit-exact, and no committed chunk of the victim was lost."""
    assert victim.client.lookup(kept).prefix_chunks == len(kept)
    rid = f"check-{os.urandom(4).hex()}"
    info = honest.client.wait(honest.client.fetch(victim.proc.peer_address, kept, rid, deadline_s=20), 30)
    assert [c.status for c in info.chunks] in ([ChunkStatus.DONE] * len(kept), [ChunkStatus.PRESENT] * len(kept))
    pins = honest.client.pin(kept, owner=rid + "-v", lease_s=10)
    assert [checksum(honest.pool.view(p.offset, p.nbytes)) for p in pins] == sums
    honest.client.release(rid + "-v")
    honest.client.release(rid)


def test_rogue_peer_with_the_secret_stays_within_its_grants(agents: tuple[Side, Side]) -> None:
    victim, honest = agents
    kept = keys_(4)
    sums = victim.write(kept, seed=1)
    local = victim.client.pin(kept, owner="pd:engine-req", lease_s=60)  # the engine's own pins
    own_res = victim.client.reserve(keys_(1), victim.reg.chunk_bytes)[0]  # the engine's reservation
    rogue = Rogue(victim)
    try:
        # control plane: other sessions' and the engine's ids
        refused(lambda: rogue.call(Op.PEER_UNPIN, {"lease_ids": [local[0].lease_id]}), "peer_ctrl")
        refused(lambda: rogue.call(Op.PEER_ABORT, {"ids": [own_res.id]}), "peer_ctrl")
        refused(lambda: rogue.call(Op.PEER_COMMIT, {"ids": [own_res.id], "checksums": [0], "num_tokens": 256}),
                "peer_ctrl")
        refused(lambda: rogue.call(Op.PEER_RELEASE, {"owner": "pd:engine-req"}), "peer_ctrl")
        refused(lambda: rogue.call(Op.PEER_RELEASE, {"owner": "some-local-request"}), "peer_ctrl")
        # planting: reserving (then writing and committing) keys the victim never asked for
        refused(lambda: rogue.call(Op.PEER_RESERVE, {"keys": keys_(2), "nbytes": victim.reg.chunk_bytes}),
                "peer_ctrl")
        refused(lambda: rogue.call(Op.PEER_RESERVE, {"keys": kept, "nbytes": victim.reg.chunk_bytes}),
                "peer_ctrl")
        # the data plane: nothing granted yet, so no range at all; then only what it pinned
        for kind, off in ((OpKind.READ, 0), (OpKind.READ, local[0].offset), (OpKind.WRITE, local[0].offset),
                          (OpKind.WRITE, own_res.offset), (OpKind.READ, own_res.offset)):
            st_ = rogue.move(kind, off, victim.reg.chunk_bytes)
            assert st_ is OpStatus.FAILED, (kind, off, st_)
            tally("tcp_data", True)
        rows = rogue.call(Op.PEER_PIN, {"keys": kept[:1], "owner": "mine", "lease_s": 30})
        lid, off, nb = rows[0].lease_id, rows[0].offset, rows[0].nbytes
        assert lid and rogue.move(OpKind.READ, off, nb) is OpStatus.DONE  # its grant works
        assert checksum(memoryview(rogue.region)[:nb]) == sums[0]
        assert rogue.move(OpKind.READ, off, nb + 1) is OpStatus.FAILED  # one byte past it does not
        assert rogue.move(OpKind.WRITE, off, nb) is OpStatus.FAILED  # a pin is read-only
        assert rogue.move(OpKind.READ, local[1].offset, nb) is OpStatus.FAILED
        tally("tcp_data", True)
        tally("tcp_data", True)
        tally("tcp_data", True)
        # a second session of the same rogue does not inherit the first one's grants or ids
        other = Rogue(victim)
        try:
            refused(lambda: other.call(Op.PEER_UNPIN, {"lease_ids": [lid]}), "peer_ctrl")
            refused(lambda: other.call(Op.PEER_RELEASE, {"owner": "mine"}), "peer_ctrl")
            assert other.move(OpKind.READ, off, nb) is OpStatus.FAILED
            tally("tcp_data", True)
        finally:
            other.close()
        assert rogue.call(Op.PEER_UNPIN, {"lease_ids": [lid]}) == 1  # its own id: fine
        assert rogue.move(OpKind.READ, off, nb) is OpStatus.FAILED  # and the grant is gone with it
        tally("tcp_data", True)
        # a forged or stale token is no session
        rogue.client.auth = os.urandom(16)
        refused(lambda: rogue.call(Op.PEER_PIN, {"keys": kept, "owner": "x"}), "peer_ctrl", AuthError)
        rogue.client.auth = rogue.hello.token
        # the engine's pins and reservation survived all of it
        assert victim.client.unpin([p.lease_id for p in local]) == len(local)
        assert victim.client.abort([own_res.id]) == 1
        assert victim.metric("pdx_agent_peer_denied_total", op="peer_unpin") >= 2
        assert victim.metric("pdx_agent_peer_denied_total", op="data_read") >= 3
        assert victim.metric("pdx_agent_peer_denied_total", op="data_write") >= 2
    finally:
        rogue.close()
    still_serves(victim, honest, kept, sums)


def test_a_rogue_cannot_exhaust_the_pool(agents: tuple[Side, Side]) -> None:
    victim, _honest = agents
    slabs = victim.reg.slab_count
    quota = slabs // 2
    many = keys_(slabs - 2)
    victim.write(many[: slabs - 4], seed=2)
    rogue = Rogue(victim)
    try:
        rows = rogue.call(Op.PEER_PIN, {"keys": many[: slabs - 4], "owner": "hog", "lease_s": 60})
        granted = sum(1 for r in rows if r.lease_id)
        assert granted == quota, (granted, quota)
        tally("quota", True)
        # pushes it was asked for still count against the same quota
        asked = keys_(8)
        victim.client.expect(asked, "push-req", deadline_s=30)
        res = rogue.call(Op.PEER_RESERVE, {"keys": asked, "nbytes": victim.reg.chunk_bytes})
        assert all(r.id == 0 and r.code is ErrorCode.CAPACITY for r in res), res
        tally("quota", True)
        # the engine can still reserve and commit
        fresh = keys_(2)
        victim.write(fresh, seed=3)
        assert victim.client.lookup(fresh).prefix_chunks == 2
        assert victim.metric("pdx_agent_peer_denied_total", op="peer_pin") >= 1
        assert rogue.call(Op.PEER_RELEASE, {"owner": "hog"}) == quota
        victim.client.release("push-req")
    finally:
        rogue.close()


def _raw_hello(address: str, fp: str, nonce: bytes, handle: bytes) -> tuple[socket.socket, dict[str, Any]]:
    """Open a transport connection by hand and send a hello that presents ``handle``."""
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5.0)
    send_frame(sock, {"t": "hello", "v": WIRE_VERSION, "fp": fp, "backend": "tcp", "id": "replayer",
                      "addr": "", "nonce": nonce, "auth": True, "sess": handle})
    return sock, recv_frame(sock)


def test_data_connections_ride_on_the_session(agents: tuple[Side, Side]) -> None:
    """A transport connection to an agent must prove a live peer_hello session's key: no session,
    a session handle without its key, a proof replayed from another connection (handshake or bind),
    a stolen token or another session's handle in a data header: all refused and counted; the
    session's own connection reads its grant bit-exact."""
    victim, honest = agents
    kept = keys_(2)
    sums = victim.write(kept, seed=31)
    address = str(victim.client.stats()["transport"]["address"])
    fp = victim.reg.chunk_fingerprint
    hello0 = victim.metric("pdx_agent_peer_denied_total", op="transport_hello")
    # the secret alone no longer opens a transport connection to an agent
    t = create("tcp", TransportConfig(backend="tcp", secret=SECRET, connect_timeout_s=3.0), fp)
    t.register(MemoryRegion(1 << 20, MemoryKind.HOST, bytearray(1 << 20)))
    try:
        refused(lambda: t.connect(address, timeout=3.0), "transport_session", AuthError)
        # a real session's handle (it crosses the wire) without the session's key
        a = Rogue(victim)
        forged = SessionCred(a.cred.handle, os.urandom(32))
        refused(lambda: t.connect(address, timeout=3.0, session=forged), "transport_session", AuthError)
    finally:
        t.close()
    b = Rogue(victim)
    try:
        rows = a.call(Op.PEER_PIN, {"keys": kept, "owner": "mine", "lease_s": 30})
        assert all(r.lease_id for r in rows)
        assert a.move(OpKind.READ, rows[0].offset, rows[0].nbytes) is OpStatus.DONE
        assert checksum(memoryview(a.region)[:rows[0].nbytes]) == sums[0]
        # a handshake proof replayed on a new connection: the server's nonce is fresh, so it fails
        nonce = os.urandom(16)
        s1, h1 = _raw_hello(address, fp, nonce, a.cred.handle)
        s2, h2 = _raw_hello(address, fp, nonce, a.cred.handle)
        try:
            assert h1.get("sess") is True and h1["nonce"] != h2["nonce"]
            send_frame(s1, {"t": "meta", "nbytes": 0, "meta": {}, "token": os.urandom(16),
                            "mac": client_proof(a.cred.key, nonce, h1["nonce"])})
            assert recv_frame(s1)["t"] == "meta"  # the genuine proof is accepted
            send_frame(s2, {"t": "meta", "nbytes": 0, "meta": {}, "token": os.urandom(16),
                            "mac": client_proof(a.cred.key, nonce, h1["nonce"])})
            reply = recv_frame(s2)
            assert reply["t"] == "error" and reply.get("code") == "auth", reply
            tally("transport_session", True)
        finally:
            s1.close()
            s2.close()
        # a bind proof made for a's connection, replayed on b's connection
        conn_a = a.transport._side.get(a.peer)  # type: ignore[attr-defined]
        conn_b = b.transport._side.get(b.peer)  # type: ignore[attr-defined]
        stolen = bind_proof(a.cred.key, conn_a.their_nonce, conn_a.our_nonce, a.cred.handle)
        rep = conn_b.request("pdx.bind", {"sess": a.cred.handle, "mac": stolen}, 5.0)
        assert rep.get("ok") is False, rep
        tally("transport_session", True)
        # b names a's session in its data headers: by its handle, then by its stolen raw token
        for credential in (a.cred.handle, a.hello.token):
            b.transport.set_session(b.peer, credential)
            assert b.move(OpKind.READ, rows[0].offset, rows[0].nbytes) is not OpStatus.DONE
            tally("transport_session", True)
        # a's own connection is unaffected
        assert a.move(OpKind.READ, rows[1].offset, rows[1].nbytes) is OpStatus.DONE
        assert checksum(memoryview(a.region)[:rows[1].nbytes]) == sums[1]
        assert victim.metric("pdx_agent_peer_denied_total", op="transport_hello") >= hello0 + 2
        assert victim.metric("pdx_agent_peer_denied_total", op="transport_bind") >= 1
        assert victim.metric("pdx_agent_peer_denied_total", op="data_read") >= 2
        a.call(Op.PEER_RELEASE, {"owner": "mine"})
    finally:
        a.close()
        b.close()
    still_serves(victim, honest, kept, sums)


def test_streams_per_peer_are_capped(agents: tuple[Side, Side]) -> None:
    """A peer opening more data streams than ``max_streams_per_peer`` gets the extra ones closed."""
    victim, honest = agents
    kept = keys_(MAX_STREAMS + 2)
    sums = victim.write(kept, seed=8)
    rogue = Rogue(victim, lanes=MAX_STREAMS + 2)
    try:
        rows = rogue.call(Op.PEER_PIN, {"keys": kept, "owner": "wide", "lease_s": 30})
        nb = victim.reg.chunk_bytes
        ops = [ChunkOp(i * nb, r.offset, r.nbytes) for i, r in enumerate(rows) if r.lease_id]
        assert len(ops) == len(kept) and len(rogue.region) >= len(ops) * nb
        res = rogue.transport.post(rogue.peer, OpKind.READ, ops).wait(timeout=20.0)
        done = sum(s is OpStatus.DONE for s in res.status)
        assert done <= MAX_STREAMS and done < len(ops), res.status
        tally("tcp_streams", True)
        assert victim.metric("pdx_agent_peer_denied_total", op="data_stream") >= 1
        rogue.call(Op.PEER_RELEASE, {"owner": "wide"})
    finally:
        rogue.close()
    still_serves(victim, honest, kept[:2], sums[:2])


def test_pushes_land_only_for_keys_the_receiver_asked_for(agents: tuple[Side, Side]) -> None:
    victim, honest = agents
    keys = keys_(3)
    sums = honest.write(keys, seed=4)
    info = honest.client.wait(honest.client.send(victim.proc.peer_address, keys, "unasked"), 30)
    assert all(c.status is ChunkStatus.FAILED for c in info.chunks) and "PeerDenied" in info.error, info
    assert victim.client.lookup(keys).prefix_chunks == 0
    tally("push", True)
    victim.client.expect(keys, "asked", deadline_s=30)
    info = honest.client.wait(honest.client.send(victim.proc.peer_address, keys, "asked"), 30)
    assert [c.status for c in info.chunks] == [ChunkStatus.DONE] * 3, info
    still_serves(honest, victim, keys, sums)
    # once fulfilled, the same keys cannot be pushed again
    victim.client.release("asked")
    rogue = Rogue(victim)
    try:
        refused(lambda: rogue.call(Op.PEER_RESERVE, {"keys": keys, "nbytes": victim.reg.chunk_bytes}), "push")
    finally:
        rogue.close()


def test_staged_pushes_never_reach_the_store_by_the_peer(agents: tuple[Side, Side]) -> None:
    """Layer-wise P/D staging: the rogue may write its staged slabs (a layer's range inside one), but
    neither commit them itself nor write past them, and nothing staged is visible to lookups."""
    victim, _honest = agents
    keys = keys_(2)
    rogue = Rogue(victim)
    try:
        rows = rogue.call(Op.PEER_STAGE, {"request_id": "rogue-req", "keys": keys,
                                          "nbytes": [victim.reg.chunk_bytes] * 2})
        assert all(r.id for r in rows)
        half = victim.reg.chunk_bytes // 2
        assert rogue.move(OpKind.WRITE, rows[0].offset + half, half) is OpStatus.DONE  # the second layer
        assert rogue.move(OpKind.WRITE, rows[0].offset + half, half + 1) is not OpStatus.DONE
        tally("data_write", True)
        refused(lambda: rogue.call(Op.PEER_COMMIT, {"ids": [r.id for r in rows], "checksums": [0, 0],
                                                    "num_tokens": victim.reg.chunk_tokens}), "stage_commit")
        assert rogue.call(Op.PEER_STAGED, {"request_id": "rogue-req", "ids": [r.id for r in rows],
                                           "checksums": [1, 2], "num_tokens": [1, 1]}) == 2
        assert victim.client.lookup(keys).prefix_chunks == 0
    finally:
        rogue.close()


def test_outsider_without_the_secret_gets_nothing(agents: tuple[Side, Side], tmp_path: Path) -> None:
    victim, honest = agents
    kept = keys_(2)
    sums = victim.write(kept, seed=5)
    with AgentClient(victim.proc.peer_address, 5.0) as c:
        nonce = os.urandom(16)
        ch = c.call(Op.PEER_HELLO, {"agent_id": "outsider", "nonce": nonce})
        assert ch.challenge and not ch.token
        refused(lambda: c.call(Op.PEER_HELLO, {"agent_id": "outsider", "nonce": nonce,
                                               "server_nonce": ch.challenge, "proof": os.urandom(32)}),
                "outsider", AuthError)
        ops: dict[Op, dict[str, Any]] = {
            Op.PEER_PIN: {"keys": kept, "owner": "o"}, Op.PEER_UNPIN: {"lease_ids": [1]},
            Op.PEER_RELEASE: {"owner": "o"}, Op.PEER_RESERVE: {"keys": kept, "nbytes": 1},
            Op.PEER_COMMIT: {"ids": [1], "checksums": [1], "num_tokens": 1}, Op.PEER_ABORT: {"ids": [1]}}
        for op, args in ops.items():
            for token in (b"", os.urandom(16)):
                c.auth = token
                refused(lambda op=op, args=args: c.call(op, args), "outsider", AuthError)
        # local ops are not served on the peer socket at all
        for op in (Op.RESERVE, Op.COMMIT, Op.RELEASE, Op.FETCH, Op.STATS):
            refused(lambda op=op: c.call(op, {}), "outsider", WireError)
    # the transport handshake needs the secret too
    for secret in ("", "wrong"):
        t = create("tcp", TransportConfig(backend="tcp", secret=secret, connect_timeout_s=3.0),
                   victim.reg.chunk_fingerprint)
        t.register(MemoryRegion(1 << 20, MemoryKind.HOST, bytearray(1 << 20)))
        try:
            refused(lambda t=t: t.connect(str(victim.client.stats()["transport"]["address"]), timeout=3.0),
                    "outsider", PdxError)
        finally:
            t.close()
    # an agent with another secret cannot fetch
    other = AgentProcess(tmp_path, agent_config(secret="not-the-secret"), name="outsider")
    try:
        other.start()
        o = Side(other)
        info = o.client.wait(o.client.fetch(victim.proc.peer_address, kept, "steal", deadline_s=5), 30)
        assert all(c.status is ChunkStatus.FAILED for c in info.chunks) and "AuthError" in info.error
        tally("outsider", True)
        o.close()
    finally:
        other.stop()
    still_serves(victim, honest, kept, sums)


def test_a_rogue_outside_the_schema_gets_named_field_errors(agents: tuple[Side, Side]) -> None:
    """A peer holding a session sends requests outside the wire schema's bounds: each is a
    ``WireError`` naming the field, nothing is pinned or reserved, the agent keeps serving."""
    victim, honest = agents
    kept = keys_(2)
    sums = victim.write(kept, seed=11)
    rogue = Rogue(victim)
    try:
        before = victim.client.stats()["pool"]
        cases: list[tuple[Op, dict[str, Any], str]] = [
            (Op.PEER_PIN, {"keys": kept, "owner": "o", "lease_s": 1e12}, "$.lease_s"),
            (Op.PEER_PIN, {"keys": kept, "owner": "o", "lease_s": float("inf")}, "$.lease_s"),
            (Op.PEER_PIN, {"keys": [kept[0][:15]], "owner": "o"}, "$.keys[0]"),
            (Op.PEER_PIN, {"keys": kept, "owner": ""}, "$.owner"),
            (Op.PEER_PIN, {"keys": kept, "owner": "o", "grant_all": True}, "grant_all"),
            (Op.PEER_UNPIN, {"lease_ids": [1] * 65537}, "$.lease_ids"),
            (Op.PEER_UNPIN, {"lease_ids": [-1]}, "$.lease_ids[0]"),
            (Op.PEER_RESERVE, {"keys": kept, "nbytes": "all"}, "$.nbytes"),
            (Op.PEER_COMMIT, {"ids": [1], "checksums": [1]}, "num_tokens"),
            (Op.PEER_RELEASE, {"owner": "x" * 2000}, "$.owner"),
            (Op.PEER_HELLO, {"nonce": b"n" * 300}, "$.nonce"),
        ]
        for op, args, field in cases:
            err = refused(lambda op=op, args=args: rogue.call(op, args), "peer_schema", WireError)
            assert field in str(err), (op, err)
        after = victim.client.stats()["pool"]
        assert (after["pinned_slabs"], after["reserved_slabs"]) == (before["pinned_slabs"], before["reserved_slabs"])
        still_serves(victim, honest, kept, sums)
    finally:
        rogue.close()


def test_fetches_go_only_to_known_agents(agents: tuple[Side, Side], tmp_path: Path) -> None:
    """An agent with a configured peer list dials nobody else; unknown addresses are a miss, counted."""
    victim, honest = agents
    kept = keys_(2)
    victim.write(kept, seed=6)
    strict = AgentProcess(tmp_path, agent_config(peers=[honest.proc.peer_address]), name="strict")
    try:
        strict.start()
        s = Side(strict)
        for addr in (victim.proc.peer_address, "tcp://10.255.255.1:5555"):
            info = s.client.wait(s.client.fetch(addr, kept, "r", deadline_s=5), 30)
            assert all(c.status is ChunkStatus.FAILED for c in info.chunks) and "PeerDenied" in info.error
            tally("unknown_agent", True)
        assert s.metric("pdx_agent_unknown_peer_fetches_total") == 2
        s.close()
    finally:
        strict.stop()


def _frame(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


_FUZZ_ROGUE: Rogue | None = None
_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True),
                    st.binary(max_size=40), st.text(max_size=20))
_value = st.recursive(_scalar, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(
    st.text(max_size=8), inner, max_size=5), max_leaves=20)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(op=st.sampled_from([o for o in Op if o.value.startswith("peer_")]),
       args=st.dictionaries(st.sampled_from(["keys", "owner", "lease_s", "lease_ids", "ids", "nbytes",
                                             "checksums", "num_tokens", "nonce", "proof", "agent_id",
                                             "address", "server_nonce", "extra"]), _value, max_size=5))
def test_fuzz_peer_socket_with_a_session(agents: tuple[Side, Side], op: Op, args: dict[str, Any]) -> None:
    """Typed-looking garbage from a peer holding a session: an error reply or a granted result,
    never a crash, never a lost chunk."""
    victim, _honest = agents
    global _FUZZ_ROGUE
    if _FUZZ_ROGUE is None:
        _FUZZ_ROGUE = Rogue(victim)
    try:
        _FUZZ_ROGUE.call(op, args)
        tally("fuzz_peer_socket", False)
    except (WireError, AuthError, PdxError):
        tally("fuzz_peer_socket", True)
    assert victim.client.ping()["agent_id"]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(frames=st.lists(st.one_of(st.binary(max_size=64), _value.map(_frame)), min_size=1, max_size=3))
def test_fuzz_transport_listener(agents: tuple[Side, Side], frames: list[bytes]) -> None:
    """Random bytes and random msgpack frames at the transport's handshake listener: the connection
    is dropped, the agent keeps serving."""
    victim, _honest = agents
    host, port = str(victim.client.stats()["transport"]["address"]).rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.settimeout(5)
        try:
            for f in frames:
                s.sendall(f)
            s.shutdown(socket.SHUT_WR)
            s.recv(4096)
        except OSError:
            pass
    tally("fuzz_transport", True)
    assert victim.client.ping()["agent_id"]


def test_after_the_fuzz_the_agent_still_serves(agents: tuple[Side, Side]) -> None:
    global _FUZZ_ROGUE
    victim, honest = agents
    if _FUZZ_ROGUE is not None:
        _FUZZ_ROGUE.close()
        _FUZZ_ROGUE = None
    kept = keys_(3)
    sums = victim.write(kept, seed=7)
    still_serves(victim, honest, kept, sums)


def test_off_loopback_without_a_secret_the_agent_refuses_to_start(tmp_path: Path) -> None:
    cfg = agent_config(secret="", host="0.0.0.0")
    proc = AgentProcess(tmp_path, cfg, name="open")
    with pytest.raises(PdxError, match="not a loopback address, and no deployment secret"):
        proc.start(timeout_s=20)
    leaky = tmp_path / "leaky-secret"
    leaky.write_text(SECRET)
    leaky.chmod(0o644)
    proc = AgentProcess(tmp_path, agent_config(secret="", secret_file=str(leaky)), name="leaky")
    with pytest.raises(PdxError, match="readable by group or others"):
        proc.start(timeout_s=20)


def test_the_secret_file_authenticates_like_the_secret(agents: tuple[Side, Side], tmp_path: Path) -> None:
    victim, _honest = agents
    kept = keys_(2)
    sums = victim.write(kept, seed=9)
    f = tmp_path / "deployment.secret"
    f.write_text(SECRET + "\n")
    f.chmod(0o600)
    proc = AgentProcess(tmp_path, agent_config(secret="", secret_file=str(f)), name="filed")
    try:
        proc.start()
        s = Side(proc)
        info = s.client.wait(s.client.fetch(victim.proc.peer_address, kept, "r", deadline_s=20), 30)
        assert info.ok, info.error
        pins = s.client.pin(kept, owner="check", lease_s=10)
        assert [checksum(s.pool.view(p.offset, p.nbytes)) for p in pins] == sums
        s.client.release("check")
        s.client.release("r")
        s.close()
    finally:
        proc.stop()


def _start_proxy(tmp_path: Path) -> tuple[Any, str]:
    import subprocess
    import sys

    cfg = tmp_path / "proxy.yaml"
    cfg.write_text("port: 0\nmodels: [m]\nhealth_interval_s: 0.2\n")
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg), "--log-level",
                             "WARNING"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={k: v for k, v in os.environ.items() if not k.startswith("PDX__")})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("pdx-proxy: serving on "):
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"the proxy did not start: {line!r}")
    return proc, line.split()[-1]


def test_a_secret_holder_cannot_speak_as_a_registered_agent(tmp_path: Path) -> None:
    """Real agents registered with a real pdx-proxy publish their keys; a rogue that holds the secret
    and claims a registered agent's name (and address) is refused at hello and counted, while the
    registered agents still meet each other (both signatures check) and move bytes bit-exact."""
    proxy, url = _start_proxy(tmp_path)
    procs: list[AgentProcess] = []
    sides: list[Side] = []
    try:
        for name, port in (("victim", 8301), ("honest", 8302)):
            cfg = agent_config()
            cfg["registration"] = {"proxy_url": url, "heartbeat_s": 0.2, "timeout_s": 2.0}
            cfg["engine"] = {"url": f"http://127.0.0.1:{port}"}
            p = AgentProcess(tmp_path, cfg, name=name)
            procs.append(p)
            p.start()
            sides.append(Side(p))
        victim, honest = sides
        kept = keys_(2)
        sums = victim.write(kept, seed=21)
        # each agent knows the other's published key once a register reply listed it
        deadline = time.monotonic() + 20
        while not ("honest" in victim.client.stats().get("registered_peers", [])
                   and "victim" in honest.client.stats().get("registered_peers", [])):
            assert time.monotonic() < deadline, "the proxy's register replies never listed both agents"
            time.sleep(0.1)
        # the honest agent fetches once the proxy listed the victim to it
        deadline = time.monotonic() + 20
        while True:
            rid = f"id-{os.urandom(4).hex()}"
            info = honest.client.wait(honest.client.fetch(victim.proc.peer_address, kept, rid, deadline_s=10), 15)
            if info.ok:
                break
            assert time.monotonic() < deadline, info
            time.sleep(0.2)
        pins = honest.client.pin(kept, owner=rid + "-v", lease_s=10)
        assert [checksum(honest.pool.view(p.offset, p.nbytes)) for p in pins] == sums
        # and the victim knows the honest agent (and so its key) once it can fetch from it
        back = keys_(1)
        honest.write(back, seed=22)
        while True:
            rid = f"id-{os.urandom(4).hex()}"
            info = victim.client.wait(victim.client.fetch(honest.proc.peer_address, back, rid, deadline_s=10), 15)
            if info.ok:
                break
            assert time.monotonic() < deadline, info
            time.sleep(0.2)
        assert victim.metric("pdx_agent_peer_denied_total", op="peer_hello") == 0
        # a rogue holding the secret claims to be the honest agent, from its address and from its own
        for address in (honest.proc.peer_address, "tcp://127.0.0.1:1"):
            with AgentClient(victim.proc.peer_address, 5.0) as c:
                nonce = os.urandom(16)
                args: dict[str, Any] = {"agent_id": "honest", "address": address,
                                        "chunk_fingerprint": victim.reg.chunk_fingerprint, "nonce": nonce}
                ch = c.call(Op.PEER_HELLO, args)
                args.update(server_nonce=ch.challenge, proof=client_proof(SECRET, nonce, ch.challenge),
                            signature=os.urandom(64))
                refused(lambda c=c, args=args: c.call(Op.PEER_HELLO, args), "identity", PeerDenied)
        assert victim.metric("pdx_agent_peer_denied_total", op="peer_hello") == 2
        # the honest agent is unaffected
        still = honest.client.wait(honest.client.fetch(victim.proc.peer_address, kept, "id-after",
                                                       deadline_s=10), 15)
        assert [c.status for c in still.chunks] in ([ChunkStatus.DONE] * 2, [ChunkStatus.PRESENT] * 2)
    finally:
        for s in sides:
            s.close()
        for p in procs:
            p.stop()
        proxy.terminate()
        proxy.wait(10)
