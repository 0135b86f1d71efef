"""``PeerConnection``: the side channel to one peer after the handshake.

Created only by ``pdx.transport.handshake.SideChannel``; see its module docstring
for the protocol. Carries heartbeats, request/response and one-way messages for
the backend, and opens extra streams (the tcp data plane). Thread-safe; one
reader thread per peer runs ``_reader``.
"""

from __future__ import annotations

import itertools
import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from pdx.errors import ConnectError, TransferTimeout, TransportError, WireError
from pdx.transport.base import PeerId, PeerInfo
from pdx.transport.framing import (
    Message,
    encode_frame,
    error_from_frame,
    parse_address,
    recv_frame,
    send_frame,
)

if TYPE_CHECKING:
    from pdx.transport.handshake import SideChannel

log = logging.getLogger("pdx.transport")

#: a peer silent for this many heartbeat intervals is declared dead.
HEARTBEAT_MISSES = 4

#: request handler: (peer, body) -> reply body, None (empty reply) or a Future of one.
RequestHandler = Callable[["PeerConnection", Message], "Message | Future[Message] | None"]
#: stream handler: (peer, socket, body); takes ownership of the socket.
StreamHandler = Callable[["PeerConnection", socket.socket, Message], None]


class PeerConnection:
    """The side channel to one peer after a successful handshake.

    Created by ``SideChannel``; backends keep a reference per peer. Thread-safe.
    ``meta`` is the backend metadata the peer sent (NIXL agent metadata, UCX
    worker address, shm name...). ``info.address`` is where the peer listens
    (empty when it does not).
    """

    def __init__(self, side: SideChannel, sock: socket.socket, info: PeerInfo,
                 meta: Message, their_token: bytes, our_token: bytes, outgoing: bool) -> None:
        self.side = side
        self.info = info
        self.meta = meta
        self.outgoing = outgoing
        self._sock = sock
        self._their_token = their_token
        self._our_token = our_token
        #: the nonces of this connection's handshake (ours, theirs): ``bind`` proofs cover them
        self.our_nonce = b""
        self.their_nonce = b""
        #: accepting side: the ``peer_hello`` sessions bound to this connection (handle -> session
        #: token); the data plane serves a request only within one of them
        self.sessions: dict[bytes, bytes] = {}
        #: dialing side: the handles of our sessions this connection was bound to
        self.presented: set[bytes] = set()
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._pending: dict[int, Future[Message]] = {}
        self._dialing: set[socket.socket] = set()
        self._ids = itertools.count(1)
        self._dead_reason: str | None = None
        self.last_rx = time.monotonic()

    @property
    def peer_id(self) -> PeerId:
        return self.info.peer_id

    def silent_for(self) -> float:
        """Seconds since the last frame arrived; 0 while unread frames are waiting (so a
        process that was paused, or starved of CPU, is not mistaken for a dead peer)."""
        try:
            if select.select([self._sock], [], [], 0)[0]:
                return 0.0
        except (OSError, ValueError):
            pass
        return time.monotonic() - self.last_rx

    @property
    def alive(self) -> bool:
        return self._dead_reason is None

    @property
    def dead_reason(self) -> str | None:
        return self._dead_reason

    def __repr__(self) -> str:
        state = "alive" if self.alive else f"dead: {self._dead_reason}"
        return f"<PeerConnection {self.info.peer_id} {self.info.address or '-'} {state}>"

    # -- sending --
    def _send(self, obj: Mapping[str, Any]) -> None:
        if not self.alive:
            raise ConnectError(f"peer {self.peer_id} is gone: {self._dead_reason}")
        data = encode_frame(obj)
        try:
            with self._send_lock:
                self._sock.sendall(data)
        except OSError as exc:
            reason = f"side channel send failed: {exc}"
            self.die(reason)
            raise ConnectError(f"peer {self.peer_id}: {reason}") from exc

    def send(self, kind: str, body: Message | None = None) -> None:
        """One-way message to the peer's ``on(kind)`` handler. Blocks only to write the frame."""
        self._send({"t": "msg", "k": kind, "b": body or {}})

    def request_async(self, kind: str, body: Message | None = None) -> Future[Message]:
        """Ask the peer's ``on(kind)`` handler; the Future resolves to its reply body, or
        fails with ``ConnectError`` (peer gone) or ``TransportError`` (handler failed)."""
        fut: Future[Message] = Future()
        with self._lock:
            if not self.alive:
                fut.set_exception(ConnectError(f"peer {self.peer_id} is gone: {self._dead_reason}"))
                return fut
            rid = next(self._ids)
            self._pending[rid] = fut
        try:
            self._send({"t": "req", "id": rid, "k": kind, "b": body or {}})
        except ConnectError as exc:
            with self._lock:
                self._pending.pop(rid, None)
            if not fut.done():
                fut.set_exception(exc)
        return fut

    def request(self, kind: str, body: Message | None = None, timeout: float | None = None) -> Message:
        """Blocking ``request_async``; ``TransferTimeout`` after ``timeout`` (default: connect_timeout_s)."""
        limit = self.side.config.connect_timeout_s if timeout is None else timeout
        fut = self.request_async(kind, body)
        try:
            return fut.result(timeout=limit)
        except TimeoutError:
            fut.cancel()
            raise TransferTimeout(f"peer {self.peer_id} did not answer {kind!r} within {limit:g}s") from None

    def open_stream(self, kind: str, body: Message | None = None, timeout: float | None = None) -> socket.socket:
        """Dial the peer's listener for an extra stream handed to its ``on_stream(kind)``.

        Returns a connected blocking socket (timeout None) that the caller owns.
        Raises ``ConnectError`` if the peer does not listen, refuses or is gone.
        """
        if not self.alive:
            raise ConnectError(f"peer {self.peer_id} is gone: {self._dead_reason}")
        if not self.info.address:
            raise ConnectError(f"peer {self.peer_id} does not listen; it must open streams to us")
        limit = self.side.config.connect_timeout_s if timeout is None else timeout
        host, port = parse_address(self.info.address)
        try:
            sock = socket.create_connection((host, port), timeout=limit)
        except OSError as exc:
            raise ConnectError(f"cannot open a {kind} stream to {self.info.address}: {exc}") from exc
        with self._lock:
            self._dialing.add(sock)  # die() shuts it down: a hung peer fails the dial at once
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            send_frame(sock, {"t": "attach", "token": self._their_token, "k": kind, "b": body or {}})
            reply = recv_frame(sock)
            if reply["t"] != "ok":
                raise error_from_frame(reply, f"{kind} stream to {self.info.address}")
            if not self.alive:
                raise ConnectError(f"peer {self.peer_id} is gone: {self._dead_reason}")
            sock.settimeout(None)
            return sock
        except (OSError, WireError) as exc:
            sock.close()
            reason = f": peer gone: {self._dead_reason}" if not self.alive else ""
            raise ConnectError(f"{kind} stream to {self.info.address} failed: {exc}{reason}") from exc
        except BaseException:
            sock.close()
            raise
        finally:
            with self._lock:
                self._dialing.discard(sock)

    def close(self, reason: str = "closed by this side") -> None:
        """Say goodbye and drop the peer (its in-flight ops fail). Idempotent."""
        if self.alive:
            try:
                with self._send_lock:
                    self._sock.settimeout(0.2)
                    self._sock.sendall(encode_frame({"t": "bye", "reason": reason}))
            except OSError:
                pass
        self.die(reason)

    def die(self, reason: str) -> None:
        """Mark the peer dead (once): fail pending requests, close, run ``on_peer_dead``."""
        with self._lock:
            if self._dead_reason is not None:
                return
            self._dead_reason = reason
            pending, self._pending = self._pending, {}
            dialing = list(self._dialing)
        for s in [self._sock, *dialing]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        err = ConnectError(f"peer {self.peer_id} is gone: {reason}")
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(err)
        self.side._forget(self, reason)

    # -- receiving (reader thread) --
    def _reader(self) -> None:
        hb = self.side.config.heartbeat_s
        limit = hb * HEARTBEAT_MISSES
        poller = select.poll()
        poller.register(self._sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        try:
            self._sock.settimeout(limit)
            while self.alive:
                ready = poller.poll(hb * 1000 / 2)
                if not ready:
                    silent = self.silent_for()
                    if silent > limit:
                        self.die(f"no heartbeat for {silent:.1f}s (peer hung or unreachable)")
                    continue
                msg = recv_frame(self._sock)
                self.last_rx = time.monotonic()
                self._dispatch(msg)
        except (OSError, ConnectError) as exc:
            self.die(f"side channel closed: {exc}")
        except WireError as exc:
            log.warning("peer %s sent a bad frame, dropping it: %s", self.peer_id, exc)
            self.die(f"protocol error: {exc}")
        finally:
            self._sock.close()

    def _dispatch(self, msg: Message) -> None:
        t = msg["t"]
        if t == "ping":
            return
        if t == "bye":
            self.die(f"peer closed: {msg.get('reason', '')}")
        elif t == "rep":
            with self._lock:
                fut = self._pending.pop(msg.get("id", -1), None)
            if fut is not None and not fut.done():
                if "e" in msg:
                    fut.set_exception(TransportError(f"peer {self.peer_id}: {msg['e']}"))
                else:
                    body = msg.get("b")
                    fut.set_result(body if isinstance(body, dict) else {})
        elif t in ("req", "msg"):
            self._handle(msg)
        else:
            raise WireError(f"unexpected frame type {t!r} on the side channel")

    def _handle(self, msg: Message) -> None:
        kind = msg.get("k")
        rid = msg.get("id") if msg["t"] == "req" else None
        raw = msg.get("b")
        body: Message = raw if isinstance(raw, dict) else {}
        handler = self.side._handlers.get(kind) if isinstance(kind, str) else None
        if handler is None:
            log.warning("peer %s sent %r, which has no handler", self.peer_id, kind)
            if rid is not None:
                self._reply(rid, None, f"no handler for {kind!r}")
            return
        try:
            out = handler(self, body)
        except Exception as exc:
            log.exception("handler for %r from peer %s failed", kind, self.peer_id)
            if rid is not None:
                self._reply(rid, None, f"{type(exc).__name__}: {exc}")
            return
        if rid is None:
            return
        if isinstance(out, Future):
            out.add_done_callback(lambda f: self._reply_future(rid, f))
        else:
            self._reply(rid, out or {}, None)

    def _reply_future(self, rid: int, fut: Future[Message]) -> None:
        exc = fut.exception()
        if exc is not None:
            self._reply(rid, None, f"{type(exc).__name__}: {exc}")
        else:
            self._reply(rid, fut.result() or {}, None)

    def _reply(self, rid: int, body: Message | None, error: str | None) -> None:
        frame: Message = {"t": "rep", "id": rid}
        if error is not None:
            frame["e"] = error
        else:
            frame["b"] = body or {}
        try:
            self._send(frame)
        except ConnectError:
            pass  # the peer is gone; die() already ran
