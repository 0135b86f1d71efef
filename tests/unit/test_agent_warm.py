"""Warm peer links: the agent opens its links with the peers it will fetch from as soon as it learns
of them, in the background, keeps them up and opens them again after a peer restarts.

The ``Warmer`` runs for real against a ``Links`` whose hello/connect is replaced by the test (the
two-agent version is ``tests/integration/test_agent_warm.py``); the tcp data streams that
``Transport.prepare`` opens are real sockets. Tests wait on events and states, never on timing."""

from __future__ import annotations

import os
import threading
import time
import types
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from pdx.agent.context import AgentContext
from pdx.agent.jobs import JobTable
from pdx.agent.links import Links, PeerLink
from pdx.agent.metrics import AgentMetrics
from pdx.agent.peers import PeerService, warm_targets
from pdx.agent.protocol import Op
from pdx.config import AgentConfig, TransportConfig
from pdx.errors import AgentUnavailable
from pdx.transport.base import ChunkOp, MemoryKind, MemoryRegion, OpKind, OpStatus, SessionCred
from pdx.transport.handshake import session_handle
from pdx.transport.tcp import TcpTransport

A, B, C = "tcp://127.0.0.1:7001", "tcp://127.0.0.1:7002", "tcp://127.0.0.1:7003"
WAIT_S = 10.0


class FakeTransport:
    name = "fake"

    def __init__(self) -> None:
        self.prepared: list[str] = []
        self.unbound: set[bytes] = set()  # sessions whose transport connection was replaced

    def prepare(self, peer: Any, timeout: float | None = None) -> bool:
        self.prepared.append(peer)
        return True

    def session_bound(self, peer: Any, handle: bytes) -> bool:
        return handle not in self.unbound


class FakeClient:
    """A link's control client: ``ping`` answers, or raises once ``down`` is set."""

    def __init__(self) -> None:
        self.down = False
        self.pings = threading.Semaphore(0)

    def call(self, op: Op, args: Any = None, timeout: float | None = None) -> Any:
        assert op is Op.PING
        self.pings.release()
        if self.down:
            raise AgentUnavailable("no reply")
        return {}

    def close(self) -> None:
        pass


class TestLinks(Links):
    """``Links`` whose hello and transport connect are the test's: ``gate[address]`` (an event)
    holds a dial until set; ``refuse`` makes dials fail; every dial is counted and announced."""

    __test__ = False

    def __init__(self, ctx: AgentContext) -> None:
        super().__init__(ctx)
        self.dials: dict[str, int] = {}
        self.dialed = threading.Condition()
        self.gate: dict[str, threading.Event] = {}
        self.refuse: set[str] = set()
        self.clients: dict[str, FakeClient] = {}

    def link(self, address: str, timeout: float) -> PeerLink:
        gate = self.gate.get(address)
        if gate is not None:
            assert gate.wait(WAIT_S)
        try:
            if address in self.refuse:
                raise AgentUnavailable(f"{address} does not answer")
            client = self.clients[address] = FakeClient()
            now = time.monotonic()
            link = PeerLink(address, client, f"agent@{address}", f"peer@{address}", address,  # type: ignore[arg-type]
                            created=now, used=now, session_handle=os.urandom(16))
            with self._links_lock:
                self._links[address] = link
            return link
        finally:
            with self.dialed:
                self.dials[address] = self.dials.get(address, 0) + 1
                self.dialed.notify_all()

    def wait_dials(self, address: str, n: int) -> None:
        with self.dialed:
            assert self.dialed.wait_for(lambda: self.dials.get(address, 0) >= n, WAIT_S), self.dials


def context(transport: Any = None, **tcfg: Any) -> AgentContext:
    cfg = AgentConfig(role="decode", transport=TransportConfig(**tcfg))
    return AgentContext(config=cfg, agent_id="decode-0", instance="i", secret="", metrics=AgentMetrics(),
                        jobs=JobTable(60.0, 10), transfers=ThreadPoolExecutor(1), control=ThreadPoolExecutor(1),
                        transport=transport, peer_address=C)


@pytest.fixture
def links() -> Iterator[TestLinks]:
    lk = TestLinks(context(FakeTransport(), warm_probe_s=3600.0))
    yield lk
    lk.close()


def wait_warm(lk: Links, n: int) -> None:
    """Until ``n`` links are warm (checked after each of the warmer's attempts)."""
    assert lk.warmer is not None
    assert lk.warmer.wait_for(lambda: lk.warm_count() >= n, WAIT_S)


def test_wanted_peers_are_linked_and_prepared_before_any_fetch(links: TestLinks) -> None:
    links.want([A, B, C])  # C is this agent's own address: never dialled
    links.wait_dials(A, 1)
    links.wait_dials(B, 1)
    transport = links.ctx.transport
    assert isinstance(transport, FakeTransport) and links.warmer is not None
    assert links.warmer.wait_for(lambda: len(transport.prepared) == 2, WAIT_S)
    assert links.warm_count() == 2
    assert sorted(transport.prepared) == [f"peer@{A}", f"peer@{B}"] and C not in links.dials
    # the fetch path finds the link ready: no second dial
    assert links.get(A) is not None and links.dials == {A: 1, B: 1}


def test_nothing_is_dialled_before_the_transport_is_up() -> None:
    ctx = context(None, warm_probe_s=3600.0)
    lk = TestLinks(ctx)
    try:
        lk.want([A])
        assert lk.warmer is not None
        lk.warmer._tick(0.0)  # no engine registered yet: the tick waits and dials nothing
        assert lk.dials == {}
        ctx.transport = FakeTransport()  # type: ignore[assignment]
        lk.want([A, B])  # the next change wakes the warmer
        lk.wait_dials(A, 1)
        wait_warm(lk, 2)
    finally:
        lk.close()


def test_a_dead_peer_does_not_hold_up_the_others_and_is_retried(links: TestLinks) -> None:
    hung = links.gate[A] = threading.Event()  # A's hello hangs (a dead peer answers nothing)
    links.refuse.add(B)  # B refuses at once
    links.want([A, B, "tcp://127.0.0.1:7004"])
    links.wait_dials("tcp://127.0.0.1:7004", 1)  # warmed while A's dial still hangs
    links.wait_dials(B, 2)  # B was tried again after its back-off
    assert links.warmer is not None and links.warmer.failures >= 2
    assert links.get(B) is None and links.get(A) is None
    hung.set()
    wait_warm(links, 2)


def test_a_restarted_peer_is_warmed_again() -> None:
    lk = TestLinks(context(FakeTransport(), warm_probe_s=0.05))
    try:
        lk.want([A])
        lk.wait_dials(A, 1)
        first = lk.clients[A]
        assert first.pings.acquire(timeout=WAIT_S)  # the warm link's peer is probed
        first.down = True  # it stops answering (a restart drops the link the same way)
        lk.wait_dials(A, 2)
        assert lk.get(A) is not None and lk.get(A).client is lk.clients[A] is not first  # type: ignore[union-attr]
    finally:
        lk.close()


def test_a_link_whose_connection_was_replaced_is_opened_again() -> None:
    """Two agents that dial each other at once keep one transport connection, the winner's: the
    loser's session is not on it and the peer would refuse its data ops. The probe sees that and
    the warmer opens the link again (a new session, bound to the live connection)."""
    transport = FakeTransport()
    lk = TestLinks(context(transport, warm_probe_s=0.05))
    try:
        lk.want([A])
        lk.wait_dials(A, 1)
        first = lk.get(A)
        assert first is not None and lk.bound(first)
        transport.unbound.add(first.session_handle)
        assert not lk.bound(first)
        lk.wait_dials(A, 2)
        again = lk.get(A)
        assert again is not None and again is not first and lk.bound(again)
    finally:
        lk.close()


def test_warming_off_dials_nothing() -> None:
    lk = TestLinks(context(FakeTransport(), warm_links=False, peers=[A]))
    try:
        lk.want([B])
        assert lk.warmer is None and lk.warm_count() == 0 and lk.dials == {}
    finally:
        lk.close()


def test_configured_peers_are_warmed_without_a_proxy() -> None:
    lk = TestLinks(context(FakeTransport(), warm_probe_s=3600.0, peers=[A]))
    try:
        lk.wait_dials(A, 1)
        lk.want([B])  # the proxy's list adds to transport.peers, never replaces it
        wait_warm(lk, 2)
    finally:
        lk.close()


def test_only_agents_that_serve_are_warmed() -> None:
    listed = [("d1", B, "k", "decode"), ("b1", A, "k", "both"), ("p1", "tcp://p:1", "k", "prefill"),
              ("me", C, "k", "prefill"), ("old", "tcp://o:1", "k")]
    # a decode agent warms prefill agents first, then the others that serve; never itself
    assert warm_targets("decode", C, listed) == ["tcp://p:1", A, "tcp://o:1"]
    assert warm_targets("both", B, listed) == ["tcp://p:1", C, A, "tcp://o:1"]
    assert warm_targets("prefill", "x", listed) == []  # the decode side pulls: a prefill agent dials nobody


def test_the_proxy_list_updates_known_peers_and_warms_them(links: TestLinks) -> None:
    svc = PeerService(links.ctx, ping=lambda _a: None)
    svc.warm = links.want
    svc.listed([("prefill-0", A, "", "prefill"), ("decode-1", B, "", "decode")])
    assert svc.known.knows(A) and svc.known.knows(B)
    links.wait_dials(A, 1)
    wait_warm(links, 1)
    assert B not in links.dials


def _tcp(nbytes: int) -> tuple[TcpTransport, bytearray]:
    buf = bytearray(nbytes)
    t = TcpTransport(TransportConfig(), "fp-warm")
    t.register(MemoryRegion(nbytes, MemoryKind.HOST, memoryview(buf), name="warm"))
    t.listen()
    return t, buf


def test_tcp_prepare_opens_the_data_stream_before_the_first_batch() -> None:
    a, abuf = _tcp(1 << 16)
    b, bbuf = _tcp(1 << 16)
    try:
        peer = a.connect(b.listen(), timeout=5.0)
        assert a._lanes == {}  # nothing opened yet: the first batch would dial
        assert a.prepare(peer.peer_id, 5.0)
        (lane,) = a._lanes[peer.peer_id]
        assert lane.sock is not None and lane.current is None
        assert a.prepare(peer.peer_id, 5.0)  # idempotent: the same stream
        assert a._lanes[peer.peer_id][0].sock is lane.sock
        bbuf[:4096] = np.arange(4096, dtype=np.uint8).tobytes()
        res = a.post(peer.peer_id, OpKind.READ, [ChunkOp(0, 0, 4096)]).wait(5.0)
        assert res.status == [OpStatus.DONE] and abuf[:4096] == bbuf[:4096]
        assert a._lanes[peer.peer_id][0].sock is lane.sock  # the batch used the prepared stream
        assert not a.prepare("nobody", 1.0)
    finally:
        a.close()
        b.close()


def test_tcp_lanes_belong_to_one_connection() -> None:
    """Lanes left from a replaced connection (both agents dialled each other at once, as warm links
    make likely) are killed and opened anew on the current one: their streams are served under the
    old connection's sessions, which the peer no longer accepts. The old connection's late death
    leaves the new lanes alone."""
    a, _ = _tcp(1 << 16)
    old = types.SimpleNamespace(peer_id="peer-b")
    new = types.SimpleNamespace(peer_id="peer-b")
    try:
        (first,) = a._lanes_for(old)  # type: ignore[arg-type]
        assert a._lanes_for(old) == [first]  # type: ignore[arg-type]
        (second,) = a._lanes_for(new)  # type: ignore[arg-type]
        assert second is not first and second.peer is new
        assert first.dead is not None and "replaced" in first.dead
        a._peer_dead(old, "replaced by a new connection from the same peer")  # type: ignore[arg-type]
        assert a._lanes["peer-b"] == [second] and second.dead is None
        a._peer_dead(new, "gone")  # type: ignore[arg-type]
        assert "peer-b" not in a._lanes and second.dead is not None
    finally:
        a.close()


def test_tcp_session_bound_follows_the_live_connection() -> None:
    """A session presented on one connection is not carried by the one that replaces it (as when two
    agents dial each other at once and the peer's dial wins): ``session_bound`` says so, and
    connecting again with the session binds it to the live connection (what ``Links`` does when
    ``bound`` is false)."""
    a, _ = _tcp(1 << 16)
    b, _ = _tcp(1 << 16)
    token = os.urandom(16)
    cred = SessionCred(session_handle(token), os.urandom(32))
    b.accept_sessions(lambda h: (cred.key, token) if h == cred.handle else None)
    try:
        b_addr = b.listen()
        info = a.connect(b_addr, timeout=5.0, session=cred)
        assert a.session_bound(info.peer_id, cred.handle)
        assert not a.session_bound(info.peer_id, b"another-session!")
        a._side.get(info.peer_id).close("test: the connection goes")
        assert a.session_bound(info.peer_id, cred.handle)  # no live connection: nothing to rebind
        deadline = time.monotonic() + 5.0
        while b.peers():  # b saw the goodbye
            assert time.monotonic() < deadline, "b never noticed the closed connection"
            time.sleep(0.01)
        b.connect(a.listen(), timeout=5.0)  # now the peer dials: a's live connection is b's
        while not a.peers():  # a finished accepting it
            assert time.monotonic() < deadline, "a never accepted b's connection"
            time.sleep(0.01)
        assert a._side.get(info.peer_id).outgoing is False
        assert not a.session_bound(info.peer_id, cred.handle)
        a.connect(b_addr, timeout=5.0, session=cred)  # binds the session to the live connection
        assert a._side.get(info.peer_id).outgoing is False  # no new dial
        assert a.session_bound(info.peer_id, cred.handle)
    finally:
        a.close()
        b.close()
