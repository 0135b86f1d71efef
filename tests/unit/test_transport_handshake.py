"""The side channel in one process: handshake, secrets, mismatches, garbage, heartbeats, hooks."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import replace

import pytest

from pdx.config import TransportConfig
from pdx.errors import AuthError, ConnectError, PeerIncompatible, TransportError
from pdx.transport.base import WIRE_VERSION
from pdx.transport.framing import encode_frame, parse_address, recv_frame, send_frame
from pdx.transport.handshake import PeerConnection, SideChannel

CFG = TransportConfig(heartbeat_s=0.1, connect_timeout_s=3.0)


class Channels:
    def __init__(self) -> None:
        self.made: list[SideChannel] = []
        self.dead: list[tuple[str, str]] = []

    def __call__(self, cfg: TransportConfig = CFG, fp: str = "fp", backend: str = "tcp", **kw: object) -> SideChannel:
        kw.setdefault("on_peer_dead", lambda p, r: self.dead.append((p.peer_id, r)))
        side = SideChannel(cfg, fp, backend, **kw)  # type: ignore[arg-type]
        self.made.append(side)
        return side


@pytest.fixture
def make() -> Iterator[Channels]:
    ch = Channels()
    yield ch
    for side in ch.made:
        side.close()


def wait_until(cond: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def test_handshake_exchanges_metadata_both_ways(make: Channels) -> None:
    server = make(meta={"agent": b"\x00meta"})
    server.region_nbytes = 4096
    addr = server.listen()
    client = make(meta=lambda: {"worker": "w1"})
    client.region_nbytes = 100
    client.listen()
    peer = client.connect(addr)
    assert peer.meta == {"agent": b"\x00meta"}
    assert (peer.info.address, peer.info.region_nbytes, peer.info.wire_version) == (addr, 4096, WIRE_VERSION)
    assert peer.info.peer_id == server.peer_id
    assert wait_until(lambda: len(server.peers()) == 1)
    back = server.peers()[0]
    assert back.meta == {"worker": "w1"} and back.info.region_nbytes == 100
    assert back.info.address == client.address  # the advertised listen address
    assert client.connect(addr) is peer  # idempotent per address


def test_requests_messages_and_futures(make: Channels) -> None:
    server = make()
    got: list[dict[str, object]] = []
    server.on("echo", lambda p, b: {"echo": b})
    server.on("note", lambda p, b: got.append(b))

    def later(p: PeerConnection, b: dict[str, object]) -> Future[dict[str, object]]:
        fut: Future[dict[str, object]] = Future()
        threading.Timer(0.05, lambda: fut.set_result({"late": True})).start()
        return fut

    def boom(p: PeerConnection, b: dict[str, object]) -> None:
        raise ValueError("nope")

    server.on("later", later)
    server.on("boom", boom)
    peer = make().connect(server.listen())
    assert peer.request("echo", {"x": [1, b"2"]}) == {"echo": {"x": [1, b"2"]}}
    assert peer.request("later") == {"late": True}
    with pytest.raises(TransportError, match="ValueError: nope"):
        peer.request("boom")
    with pytest.raises(TransportError, match="no handler for 'missing'"):
        peer.request("missing")
    peer.send("note", {"n": 1})
    assert wait_until(lambda: got == [{"n": 1}])


def test_fingerprint_and_backend_mismatch_fail_on_both_sides(make: Channels, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pdx.transport")
    addr = make(fp="fp-A").listen()
    with pytest.raises(PeerIncompatible, match="this side has 'fp-B', the peer has 'fp-A'"):
        make(fp="fp-B").connect(addr)
    assert wait_until(lambda: "this side has 'fp-A', the peer has 'fp-B'" in caplog.text)
    with pytest.raises(PeerIncompatible, match="this side uses 'shm', the peer uses 'tcp'"):
        make(fp="fp-A", backend="shm").connect(addr)


def test_version_mismatch_shows_both_versions(make: Channels, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pdx.transport")
    addr = make().listen()
    host, port = parse_address(addr)
    with socket.create_connection((host, port), timeout=3) as s:  # a client from the future
        send_frame(s, {"t": "hello", "v": WIRE_VERSION + 1, "fp": "fp", "backend": "tcp", "id": "future",
                       "addr": "", "nonce": b"n" * 16, "auth": False})
        s.settimeout(3)
        hello = recv_frame(s)
        assert hello["t"] == "hello" and hello["v"] == WIRE_VERSION
        assert s.recv(1) == b""  # then the server hangs up
    assert wait_until(lambda: f"this side speaks {WIRE_VERSION}, the peer speaks {WIRE_VERSION + 1}"
                      in caplog.text)


@pytest.mark.parametrize(("server_secret", "client_secret", "error"), [
    ("s3cret", "s3cret", None),
    ("s3cret", "wrong", "failed the shared-secret challenge"),
    ("s3cret", "", "requires a shared secret"),
    ("", "s3cret", "the peer has none"),
])
def test_shared_secret(make: Channels, server_secret: str, client_secret: str, error: str | None) -> None:
    server = make(replace(CFG, secret=server_secret))
    addr = server.listen()
    client = make(replace(CFG, secret=client_secret))
    if error is None:
        assert client.connect(addr).alive
    else:
        with pytest.raises(AuthError, match=error):
            client.connect(addr)
        assert server.peers() == []


def test_garbage_and_silence_drop_only_that_connection(make: Channels) -> None:
    server = make(replace(CFG, connect_timeout_s=0.5))
    addr = server.listen()
    host, port = parse_address(addr)
    silent = socket.create_connection((host, port))  # never says anything
    for junk in [b"\xff\xff\xff\xff" + b"x" * 10, b"\x00\x00\x00\x03abc", encode_frame({"t": "what"})]:
        with socket.create_connection((host, port), timeout=3) as s:
            s.sendall(junk)
            s.settimeout(3)
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
    assert make().connect(addr).alive  # still serving
    silent.settimeout(3)
    assert silent.recv(1) == b""  # dropped after connect_timeout_s
    silent.close()


def test_closing_a_peer_fails_pending_requests_and_runs_the_hook(make: Channels) -> None:
    server = make()
    release = threading.Event()
    server.on("slow", lambda p, b: Future())  # never answered
    client = make()
    peer = client.connect(server.listen())
    fut = peer.request_async("slow")
    assert wait_until(lambda: len(server.peers()) == 1)
    server.peers()[0].close("test says bye")
    with pytest.raises(ConnectError, match="test says bye"):
        fut.result(timeout=5)
    assert wait_until(lambda: any("test says bye" in r for _, r in make.dead))
    assert not peer.alive and client.peers() == []
    with pytest.raises(ConnectError, match="gone"):
        peer.request("slow")
    release.set()


def test_silent_peer_is_declared_dead_by_heartbeats(make: Channels) -> None:
    server = make(replace(CFG, heartbeat_s=0.05))
    addr = server.listen()
    client = make(replace(CFG, heartbeat_s=60.0))  # pings far too rarely: looks hung
    client.connect(addr)
    assert wait_until(lambda: any("no heartbeat" in r for _, r in make.dead), timeout=5)
    assert server.peers() == []


def test_on_peer_hook_can_refuse(make: Channels) -> None:
    def refuse(peer: PeerConnection) -> None:
        raise ValueError("not today")

    addr = make(on_peer=refuse).listen()
    with pytest.raises(ConnectError, match="not today"):
        make().connect(addr)


def test_streams_attach_with_the_peer_token(make: Channels) -> None:
    server = make()
    got: list[tuple[str, dict[str, object], bytes]] = []

    def on_stream(peer: PeerConnection, sock: socket.socket, body: dict[str, object]) -> None:
        with sock:
            got.append((peer.peer_id, body, sock.recv(5)))

    server.on_stream("data", on_stream)
    client = make()
    peer = client.connect(server.listen())
    with peer.open_stream("data", {"lane": 1}) as s:
        s.sendall(b"hello")
    assert wait_until(lambda: got == [(client.peer_id, {"lane": 1}, b"hello")])
    with pytest.raises(ConnectError, match="no stream handler"):
        peer.open_stream("other")


def test_connect_errors_are_connect_errors(make: Channels) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(ConnectError, match="cannot reach"):
        make().connect(f"127.0.0.1:{port}")
    with pytest.raises(ConnectError, match="expected an address"):
        make().connect("nonsense")
