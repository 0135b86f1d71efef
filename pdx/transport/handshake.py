"""Peer handshake, heartbeats and the side channel shared by every transport backend.

Every backend builds one ``SideChannel``: it listens on ``config.host:config.port``,
dials peers, and runs the same handshake so that version, fingerprint and secret
checks and dead-peer detection behave identically whatever moves the data.

Wire: frames of a 4-byte big-endian length then one msgpack map with a ``"t"``
(type) key; control frames are at most ``CONTROL_FRAME_MAX`` bytes. A connection
that sends an oversized or undecodable frame is dropped (and logged); others are
unaffected. Nothing is pickled. The keys ``t``, ``v`` and ``fp`` of the hello are
frozen across wire versions so that any two versions can tell each other apart.

Handshake (C dials, S accepts)::

    C -> S  hello {v, fp, backend, id, addr, nonce_c, auth}
    S -> C  hello {v, fp, backend, id, addr, nonce_s, auth, mac_s}   (sent even on mismatch)
            both sides: version/fingerprint/backend mismatch -> PeerIncompatible (both values)
            auth flags differ or a MAC is wrong -> AuthError
    C -> S  meta  {mac_c, nbytes, meta, token}
    S -> C  meta  {nbytes, meta, token}                     (after S's ``on_peer`` hook ran)
    C -> S  ready                                           (after C's ``on_peer`` hook ran)

    mac_s = HMAC-SHA256(secret, "S" | nonce_c | nonce_s), mac_c = HMAC(secret, "C" | nonce_s | nonce_c)

After the handshake the connection carries ``ping`` (every ``heartbeat_s`` both
ways), ``req``/``rep`` (request/response for backends: "serve this READ"),
``msg`` (one-way notifications: "batch landed") and ``bye``. A peer is dead when
its connection closes or resets, or when nothing arrived for ``HEARTBEAT_MISSES``
heartbeats (a hung or stopped process); then pending requests fail with
``ConnectError`` and the backend's ``on_peer_dead`` hook fails its in-flight ops.

Extra streams (the tcp data plane): ``PeerConnection.open_stream`` dials the
peer's listener with an ``attach`` frame carrying the per-peer token issued in
the handshake; the peer's ``on_stream`` handler takes ownership of the socket.

Threads: one accept thread, one reader thread per peer, one heartbeat thread.
Handlers and hooks run on those threads and must not block for long (hand long
work to your own thread; a request handler may return a ``Future``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, ClassVar

from pdx.config import TransportConfig
from pdx.errors import AuthError, ConnectError, PeerIncompatible, TransportError, WireError
from pdx.transport.base import WIRE_VERSION, PeerId, PeerInfo, SessionCred
from pdx.transport.framing import (
    CONTROL_FRAME_MAX,
    Message,
    decode_body,
    encode_frame,
    error_from_frame,
    meta_of,
    need,
    parse_address,
    recv_exact_into,
    recv_frame,
    send_frame,
)
from pdx.transport.peer import HEARTBEAT_MISSES, PeerConnection, RequestHandler, StreamHandler

__all__ = [
    "CONTROL_FRAME_MAX", "HEARTBEAT_MISSES", "WIRE_VERSION", "Message", "PeerConnection", "SideChannel",
    "decode_body", "encode_frame", "parse_address", "recv_exact_into", "recv_frame", "send_frame",
]

log = logging.getLogger("pdx.transport")

#: at most this many connections may be in the handshake at once; more are closed.
MAX_PENDING_HANDSHAKES = 64
#: sessions bound to one connection at most (the oldest is unbound first).
MAX_SESSIONS_PER_CONNECTION = 64


def _shutdown_quietly(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


# --- the challenge and the identities: one handshake for the agents' peer socket and the transports ----
#
# Both places where two agents meet (the ZMQ ``peer_hello`` of ``pdx.agent.peers`` and the side
# channel below) run this one challenge-response: each side sends a fresh nonce, the answering
# side proves the secret with ``server_proof`` and the dialing side with ``client_proof``, both
# checked with ``proof_ok``. ``peer_hello`` adds the agents' identities: each agent has an Ed25519
# key pair (``Identity``), publishes the public key with its registration, and signs the
# ``hello_transcript`` (both nonces, its agent id and address), so an agent that holds the secret
# still cannot speak as another registered agent.


def mac(secret: str | bytes, label: bytes, a: bytes, b: bytes) -> bytes:
    """HMAC-SHA256 of ``label | a | b`` under the secret (or a session key)."""
    key = secret.encode() if isinstance(secret, str) else secret
    return hmac.new(key, label + a + b, hashlib.sha256).digest()


def server_proof(secret: str | bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """What the answering side sends to prove it holds the secret (or the session key)."""
    return mac(secret, b"S", client_nonce, server_nonce)


def client_proof(secret: str | bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """What the dialing side sends to prove it holds the secret (or the session key)."""
    return mac(secret, b"C", server_nonce, client_nonce)


def _framed(*parts: bytes) -> bytes:
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def session_key(secret: str, client_nonce: bytes, server_nonce: bytes, token: bytes) -> bytes:
    """The per-session key both agents derive at the end of ``peer_hello``: HMAC of both hello
    nonces and the session token under the deployment secret. It never crosses the wire; the
    transport's data connections prove it (``session_proof``) instead of running their own
    challenge. Without a secret (loopback only) it is derived from the token alone."""
    return hmac.new(secret.encode(), _framed(b"pdx-session-key-v1", client_nonce, server_nonce, token),
                    hashlib.sha256).digest()


def session_handle(token: bytes) -> bytes:
    """The public name of a session on the transport's wire (not the token: it cannot be used as one)."""
    return hashlib.sha256(_framed(b"pdx-session-handle-v1", token)).digest()[:16]


def bind_proof(key: bytes, acceptor_nonce: bytes, binder_nonce: bytes, handle: bytes) -> bytes:
    """What binds one more session to a live transport connection (``bind``): a MAC under the
    session key over both nonces of that connection's handshake (fresh per connection: a proof
    seen on one connection is worth nothing on another) and the session's handle."""
    return mac(key, b"B", _framed(acceptor_nonce, binder_nonce), handle)


def proof_ok(expected: bytes, got: object) -> bool:
    """Constant-time check of a proof of any type received from the wire."""
    return isinstance(got, bytes) and hmac.compare_digest(expected, got)


def hello_transcript(side: bytes, client_nonce: bytes, server_nonce: bytes, agent_id: str, address: str) -> bytes:
    """What an agent signs in ``peer_hello``: its side (``b"C"`` dialing, ``b"S"`` answering), both
    nonces (fresh per hello: no replay), and the identity it claims (agent id and peer address)."""
    return _framed(b"pdx-peer-hello-v1", side, client_nonce, server_nonce, agent_id.encode(), address.encode())


class Identity:
    """One agent's Ed25519 key pair, made at start (``public``: the raw public key, base64).
    The private key never leaves the process. Thread-safe."""

    def __init__(self) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        self._key = Ed25519PrivateKey.generate()
        raw = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.public = base64.b64encode(raw).decode("ascii")

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)


def identity_ok(public: str, signature: bytes, data: bytes) -> bool:
    """True when ``signature`` is ``data`` signed by the key ``public`` (base64 raw Ed25519)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public, validate=True))
        key.verify(signature, data)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True



# --- the channel -------------------------------------------------------------------------------


class SideChannel:
    """Listener, dialer, handshake and heartbeats for one transport.

    Construct in the backend, set ``region_nbytes`` once memory is registered,
    register handlers with ``on``/``on_stream``, then ``listen()`` and/or
    ``connect()``. ``meta`` (a dict, or a callable returning one, evaluated per
    handshake) is sent to peers as this side's backend metadata.

    Hooks (run on handshake/reader/heartbeat threads; keep them short):
    ``on_peer(peer)`` runs once the handshake succeeded, before the peer is
    usable (raise to refuse it); ``on_peer_dead(peer, reason)`` runs once when
    a peer is gone, however that was noticed.
    """

    def __init__(self, config: TransportConfig, fingerprint: str, backend: str, *,
                 meta: Message | Callable[[], Message] | None = None,
                 on_peer: Callable[[PeerConnection], None] | None = None,
                 on_peer_dead: Callable[[PeerConnection, str], None] | None = None,
                 peer_id: str | None = None) -> None:
        self.config = config
        self.fingerprint = fingerprint
        self.backend = backend
        self.peer_id = PeerId(peer_id or f"{backend}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.region_nbytes = 0
        self.address = ""
        self._meta = meta
        self._on_peer = on_peer
        self._on_peer_dead = on_peer_dead
        self._handlers: dict[str, RequestHandler] = {}
        self._stream_handlers: dict[str, StreamHandler] = {}
        self._peers: dict[PeerId, PeerConnection] = {}
        self._by_token: dict[bytes, PeerConnection] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._handshakes = threading.BoundedSemaphore(MAX_PENDING_HANDSHAKES)
        self._heartbeat: threading.Thread | None = None
        self._connect_lock = threading.Lock()
        #: accepting side: ``handle -> (session key, session token)`` of a live ``peer_hello`` session,
        #: else ``None`` (set by the agent). When set, every connection must present a session.
        self.session_lookup: Callable[[bytes], tuple[bytes, bytes] | None] | None = None
        #: ``on_refused(op)``: called once per refused session (metrics; set by the agent)
        self.on_refused: Callable[[str], None] | None = None
        self._handlers["pdx.bind"] = self._on_bind

    # -- registration --
    def on(self, kind: str, handler: RequestHandler) -> None:
        """Handle ``request``/``send`` messages of ``kind`` from any peer."""
        self._handlers[kind] = handler

    def on_stream(self, kind: str, handler: StreamHandler) -> None:
        """Take over streams of ``kind`` that peers open with ``open_stream``."""
        self._stream_handlers[kind] = handler

    # -- peers --
    def peers(self) -> list[PeerConnection]:
        with self._lock:
            return [p for p in self._peers.values() if p.alive]

    def get(self, peer_id: str) -> PeerConnection:
        """The live connection to ``peer_id``; ``ConnectError`` if unknown or gone."""
        with self._lock:
            peer = self._peers.get(PeerId(peer_id))
        if peer is None or not peer.alive:
            raise ConnectError(f"no live peer {peer_id!r}")
        return peer

    def _forget(self, peer: PeerConnection, reason: str) -> None:
        with self._lock:
            if self._peers.get(peer.peer_id) is peer:
                del self._peers[peer.peer_id]
            self._by_token.pop(peer._our_token, None)
        log.info("peer %s gone: %s", peer.peer_id, reason)
        if self._on_peer_dead is not None:
            try:
                self._on_peer_dead(peer, reason)
            except Exception:
                log.exception("on_peer_dead hook failed for %s", peer.peer_id)

    def _add(self, peer: PeerConnection) -> None:
        with self._lock:
            old = self._peers.get(peer.peer_id)
            self._peers[peer.peer_id] = peer
            self._by_token[peer._our_token] = peer
        if old is not None and old is not peer:
            old.close("replaced by a new connection from the same peer")
        self._start(peer._reader, f"pdx-side-{peer.peer_id}")
        self._ensure_heartbeat()

    def _start(self, target: Callable[..., None], name: str, *args: Any) -> threading.Thread:
        th = threading.Thread(target=target, name=name, args=args, daemon=True)
        th.start()
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(th)
        return th

    def _hello(self, nonce: bytes) -> Message:
        return {"t": "hello", "v": WIRE_VERSION, "fp": self.fingerprint, "backend": self.backend,
                "id": str(self.peer_id), "addr": self.address, "nonce": nonce,
                "auth": bool(self.config.secret)}

    def _refused(self, op: str) -> None:
        if self.on_refused is not None:
            try:
                self.on_refused(op)
            except Exception:
                log.exception("on_refused hook failed")

    def _lookup(self, handle: object) -> tuple[bytes, bytes] | None:
        if self.session_lookup is None or not isinstance(handle, bytes):
            return None
        return self.session_lookup(handle)

    def _meta_frame(self, token: bytes) -> Message:
        meta = self._meta() if callable(self._meta) else (self._meta or {})
        return {"t": "meta", "nbytes": self.region_nbytes, "meta": meta, "token": token}

    def _check_compatible(self, h: Message, where: str) -> None:
        theirs_v, theirs_fp = h.get("v"), h.get("fp")
        if theirs_v != WIRE_VERSION:
            raise PeerIncompatible(f"{where}: wire version mismatch: this side speaks {WIRE_VERSION}, "
                                   f"the peer speaks {theirs_v}")
        if theirs_fp != self.fingerprint:
            raise PeerIncompatible(f"{where}: layout fingerprint mismatch: this side has "
                                   f"{self.fingerprint!r}, the peer has {theirs_fp!r}")
        if h.get("backend") != self.backend:
            raise PeerIncompatible(f"{where}: transport backend mismatch: this side uses "
                                   f"{self.backend!r}, the peer uses {h.get('backend')!r}")

    # -- dialing --
    def connect(self, address: str, timeout: float | None = None,
                session: SessionCred | None = None) -> PeerConnection:
        """Handshake with the peer listening at ``address``; returns its connection.

        ``session``: the ``peer_hello`` session to present (the handshake then proves its key
        instead of the secret's challenge; on a live connection it is bound with ``bind``).
        Idempotent: a live peer already known under that address is returned.
        Raises ``ConnectError``, ``PeerIncompatible`` or ``AuthError``; never hangs
        past ``timeout`` (default ``connect_timeout_s``) for the whole handshake.
        """
        if self._closed.is_set():
            raise ConnectError("transport is closed")
        limit = self.config.connect_timeout_s if timeout is None else timeout
        with self._connect_lock:
            for p in self.peers():
                if p.info.address == address:
                    if session is not None and session.handle not in p.presented:
                        self._bind(p, session, limit)
                    return p
            try:
                host, port = parse_address(address)
            except ValueError as exc:
                raise ConnectError(str(exc)) from None
            try:
                sock = socket.create_connection((host, port), timeout=limit)
            except OSError as exc:
                raise ConnectError(f"cannot reach peer at {address}: {exc}") from exc
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return self._client_handshake(sock, address, time.monotonic() + limit, session)
            except (AuthError, PeerIncompatible) as exc:
                code = "auth" if isinstance(exc, AuthError) else "incompatible"
                try:  # let the other side log the same reason
                    sock.settimeout(0.2)
                    send_frame(sock, {"t": "error", "code": code, "reason": str(exc)})
                except OSError:
                    pass
                sock.close()
                raise
            except TimeoutError as exc:
                sock.close()
                raise ConnectError(f"handshake with {address} timed out after {limit:g}s") from exc
            except (OSError, WireError) as exc:
                sock.close()
                raise ConnectError(f"handshake with {address} failed: {exc}") from exc
            except BaseException:
                sock.close()
                raise

    def _bind(self, peer: PeerConnection, session: SessionCred, timeout: float) -> None:
        """Bind one more session to a live connection (either side may have dialled it)."""
        proof = bind_proof(session.key, peer.their_nonce, peer.our_nonce, session.handle)
        try:
            rep = peer.request("pdx.bind", {"sess": session.handle, "mac": proof}, timeout)
        except TransportError as exc:
            raise ConnectError(f"binding a session to peer {peer.peer_id} failed: {exc}") from exc
        if rep.get("ok") is not True:
            raise AuthError(f"peer {peer.peer_id} refused the session: {rep.get('reason', '?')}")
        peer.presented.add(session.handle)

    def _on_bind(self, peer: PeerConnection, body: Message) -> Message:
        handle = body.get("sess")
        found = self._lookup(handle)
        if found is None or not proof_ok(bind_proof(found[0], peer.our_nonce, peer.their_nonce,
                                                    handle if isinstance(handle, bytes) else b""), body.get("mac")):
            self._refused("transport_bind")
            why = "no valid peer session" if found is None else "the session proof is wrong"
            log.warning("refused a session bind from peer %s: %s", peer.peer_id, why)
            return {"ok": False, "reason": why}
        assert isinstance(handle, bytes)
        if len(peer.sessions) >= MAX_SESSIONS_PER_CONNECTION:
            peer.sessions.pop(next(iter(peer.sessions)))
        peer.sessions[handle] = found[1]
        return {"ok": True}

    def _client_handshake(self, sock: socket.socket, address: str, deadline: float,
                          session: SessionCred | None = None) -> PeerConnection:
        def left() -> float:
            t = deadline - time.monotonic()
            if t <= 0:
                raise TimeoutError("handshake deadline passed")
            return t

        nonce = os.urandom(16)
        sock.settimeout(left())
        hello = self._hello(nonce)
        if session is not None:
            hello["sess"] = session.handle
        send_frame(sock, hello)
        sock.settimeout(left())
        h = recv_frame(sock)
        if h["t"] == "error":
            raise error_from_frame(h, f"peer at {address}")
        if h["t"] != "hello":
            raise WireError(f"expected hello, got {h['t']!r}")
        where = f"peer {h.get('id')} at {address}"
        self._check_compatible(h, where)
        their_nonce = need(h, "nonce", bytes)
        secret = self.config.secret
        if bool(h.get("auth")) != bool(secret):
            raise AuthError(f"{where}: " + ("the peer requires a shared secret and none is configured here"
                                            if h.get("auth") else
                                            "a shared secret is configured here but the peer has none"))
        # the peer took our session: both sides prove its key (no second challenge on the secret)
        key: str | bytes = session.key if session is not None and h.get("sess") is True else secret
        if key and not proof_ok(server_proof(key, nonce, their_nonce), need(h, "mac", bytes)):
            raise AuthError(f"{where}: the peer failed the " + ("session" if key is not secret else
                                                                "shared-secret") + " challenge")
        our_token = os.urandom(16)
        meta = self._meta_frame(our_token)
        if key:
            meta["mac"] = client_proof(key, nonce, their_nonce)
        sock.settimeout(left())
        send_frame(sock, meta)
        sock.settimeout(left())
        m = recv_frame(sock)
        if m["t"] == "error":
            raise error_from_frame(m, where)
        if m["t"] != "meta":
            raise WireError(f"expected meta, got {m['t']!r}")
        info = PeerInfo(peer_id=PeerId(need(h, "id", str)), address=address, wire_version=h["v"],
                        fingerprint=h["fp"], backend=h["backend"], region_nbytes=need(m, "nbytes", int))
        peer = PeerConnection(self, sock, info, meta_of(m), need(m, "token", bytes),
                              our_token, outgoing=True)
        peer.our_nonce, peer.their_nonce = nonce, their_nonce
        if key is not secret and session is not None:
            peer.presented.add(session.handle)
        self._add(peer)
        try:
            if self._on_peer is not None:
                self._on_peer(peer)
            peer._send({"t": "ready"})
        except BaseException:
            peer.close("refused by this side's backend")
            raise
        if not peer.alive:
            raise ConnectError(f"{where}: connection lost during the handshake: {peer.dead_reason}")
        log.info("connected to peer %s at %s (%s)", info.peer_id, address, self.backend)
        return peer

    # -- accepting --
    def listen(self) -> str:
        """Bind ``config.host:config.port`` and accept peers in a thread; returns ``host:port``."""
        if self._listener is not None:
            return self.address
        sock = socket.socket(socket.AF_INET6 if ":" in self.config.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.config.host, self.config.port))
        except OSError as exc:
            sock.close()
            raise ConnectError(f"cannot listen on {self.config.host}:{self.config.port}: {exc}") from exc
        sock.listen(128)
        sock.settimeout(0.25)
        self._listener = sock
        host, port = sock.getsockname()[:2]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._start(self._accept_loop, f"pdx-accept-{self.backend}")
        return self.address

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closed.is_set():
            try:
                conn, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._closed.is_set():
                    return
                time.sleep(0.05)
                continue
            if not self._handshakes.acquire(blocking=False):
                log.warning("too many pending handshakes; dropping a connection from %s", addr)
                conn.close()
                continue
            self._start(self._serve, "pdx-handshake", conn, addr)

    def _serve(self, conn: socket.socket, addr: Any) -> None:
        """First frame decides: ``hello`` (a peer) or ``attach`` (a stream of a known peer)."""
        where = f"connection from {addr[0]}:{addr[1]}"
        then: Callable[[], None] | None = None
        # One deadline for the whole handshake: a client that dribbles bytes slower than the
        # per-recv timeout would otherwise hold this thread (and a handshake slot) for ever.
        timer = threading.Timer(self.config.connect_timeout_s, _shutdown_quietly, (conn,))
        timer.daemon = True
        timer.start()
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(self.config.connect_timeout_s)
            first = recv_frame(conn)
            if first["t"] == "attach":
                then = self._attach(conn, first, where)
            elif first["t"] == "hello":
                then = self._server_handshake(conn, first, where)._reader
            else:
                raise WireError(f"expected hello or attach, got {first['t']!r}")
        except Exception as exc:  # whatever went wrong, only this connection is dropped
            level = logging.INFO if isinstance(exc, (OSError, ConnectError)) else logging.WARNING
            log.log(level, "rejected %s: %s: %s", where, type(exc).__name__, exc)
            conn.close()
        finally:
            timer.cancel()
            self._handshakes.release()
        if then is not None:
            then()

    def _server_handshake(self, conn: socket.socket, h: Message, where: str) -> PeerConnection:
        deadline = time.monotonic() + self.config.connect_timeout_s
        their_nonce = need(h, "nonce", bytes)
        nonce = os.urandom(16)
        secret = self.config.secret
        where = f"peer {h.get('id')!s} ({where})"
        hello = self._hello(nonce)
        # With a session table (an agent's transport) the connection rides on the dialer's
        # ``peer_hello`` session: both sides prove its key, and nothing else is accepted.
        handle = h.get("sess")
        found = self._lookup(handle)
        if self.session_lookup is not None and found is None and h.get("v") == WIRE_VERSION:
            self._refused("transport_hello")
            why = ("no peer session presented: say peer_hello first" if handle is None
                   else "unknown or expired peer session")
            send_frame(conn, {"t": "error", "code": "auth", "reason": why})
            raise AuthError(f"{where}: {why}")
        key: str | bytes = found[0] if found is not None else secret
        if found is not None:
            hello["sess"] = True
        if key:
            hello["mac"] = server_proof(key, their_nonce, nonce)
        send_frame(conn, hello)  # sent even on a mismatch, so the peer can show our values
        self._check_compatible(h, where)
        if bool(h.get("auth")) != bool(secret):
            raise AuthError(f"{where}: " + ("a shared secret is configured here but the peer has none"
                                            if secret else "the peer expects a shared secret; none here"))
        conn.settimeout(max(0.01, deadline - time.monotonic()))
        m = recv_frame(conn)
        if m["t"] == "error":
            raise error_from_frame(m, where)
        if m["t"] != "meta":
            raise WireError(f"expected meta, got {m['t']!r}")
        if key and not proof_ok(client_proof(key, their_nonce, nonce), m.get("mac")):
            what = "session" if found is not None else "shared-secret"
            if found is not None:
                self._refused("transport_hello")
            send_frame(conn, {"t": "error", "code": "auth", "reason": f"{what} challenge failed"})
            raise AuthError(f"{where}: the peer failed the {what} challenge")
        addr = h["addr"] if isinstance(h.get("addr"), str) else ""
        info = PeerInfo(peer_id=PeerId(need(h, "id", str)), address=addr, wire_version=h["v"],
                        fingerprint=h["fp"], backend=h["backend"], region_nbytes=need(m, "nbytes", int))
        our_token = os.urandom(16)
        peer = PeerConnection(self, conn, info, meta_of(m), need(m, "token", bytes),
                              our_token, outgoing=False)
        peer.our_nonce, peer.their_nonce = nonce, their_nonce
        if found is not None:
            assert isinstance(handle, bytes)
            peer.sessions[handle] = found[1]
        with self._lock:
            self._by_token[our_token] = peer  # streams may attach before "ready"
        try:
            if self._on_peer is not None:
                self._on_peer(peer)
        except Exception as exc:
            with self._lock:
                self._by_token.pop(our_token, None)
            send_frame(conn, {"t": "error", "code": "rejected", "reason": f"{type(exc).__name__}: {exc}"})
            raise
        send_frame(conn, self._meta_frame(our_token))
        conn.settimeout(max(0.01, deadline - time.monotonic()))
        r = recv_frame(conn)
        if r["t"] != "ready":
            raise WireError(f"expected ready, got {r['t']!r}")
        peer.last_rx = time.monotonic()
        with self._lock:
            old = self._peers.get(peer.peer_id)
            self._peers[peer.peer_id] = peer
        if old is not None and old is not peer:
            old.close("replaced by a new connection from the same peer")
        self._ensure_heartbeat()
        log.info("accepted peer %s (%s, listens at %s)", info.peer_id, self.backend, addr or "-")
        return peer

    def _attach(self, conn: socket.socket, msg: Message, where: str) -> Callable[[], None] | None:
        token, kind = msg.get("token"), msg.get("k")
        with self._lock:
            peer = self._by_token.get(token) if isinstance(token, bytes) else None
        handler = self._stream_handlers.get(kind) if isinstance(kind, str) else None
        if peer is None or not peer.alive or handler is None:
            reason = "unknown token" if peer is None else f"no stream handler for {kind!r}"
            try:
                send_frame(conn, {"t": "error", "code": "rejected", "reason": reason})
            except OSError:
                pass
            conn.close()
            log.warning("rejected a stream from %s: %s", where, reason)
            return None
        send_frame(conn, {"t": "ok"})
        conn.settimeout(None)
        raw = msg.get("b")
        body: Message = raw if isinstance(raw, dict) else {}

        def run() -> None:
            handler(peer, conn, body)
        return run

    # -- heartbeats --
    def _ensure_heartbeat(self) -> None:
        with self._lock:
            if self._heartbeat is not None and self._heartbeat.is_alive():
                return
            self._heartbeat = self._start(self._heartbeat_loop, f"pdx-heartbeat-{self.backend}")

    def _heartbeat_loop(self) -> None:
        hb = self.config.heartbeat_s
        while not self._closed.wait(hb):
            for peer in self.peers():
                try:
                    peer._send({"t": "ping"})
                except ConnectError:
                    continue
                silent = peer.silent_for()
                if silent > hb * HEARTBEAT_MISSES:
                    peer.die(f"no heartbeat for {silent:.1f}s (peer hung or unreachable)")

    # -- shutdown --
    def close(self) -> None:
        """Say goodbye to every peer, stop listening and join the threads (bounded). Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            peers = list(self._peers.values())
        for peer in peers:
            peer.close("transport closed")
        deadline = time.monotonic() + 2.0
        for th in self._threads:
            if th is not threading.current_thread():
                th.join(max(0.0, deadline - time.monotonic()))


class SideChannelPeers:
    """``listen``/``connect``/``peers`` of a ``Transport`` whose peer sessions are those of its
    ``SideChannel`` (``self._side``). Mixed in before ``Transport``."""

    _side: SideChannel
    #: connecting needs a registered region (the handshake carries what the peer must map)
    connect_needs_region: ClassVar[bool] = True

    def listen(self) -> str:
        return self._side.listen()

    def connect(self, address: str, timeout: float | None = None,
                session: SessionCred | None = None) -> PeerInfo:
        if self.connect_needs_region and getattr(self, "_region", None) is None:
            raise TransportError("register a region before connecting")
        return self._side.connect(address, timeout, session).info

    def accept_sessions(self, lookup: Callable[[bytes], tuple[bytes, bytes] | None],
                        on_refused: Callable[[str], None] | None = None) -> None:
        self._side.session_lookup = lookup
        self._side.on_refused = on_refused

    def peers(self) -> list[PeerInfo]:
        return [p.info for p in self._side.peers()]

    def session_bound(self, peer: PeerId, handle: bytes) -> bool:
        try:
            return handle in self._side.get(peer).presented
        except ConnectError:
            return True  # no live connection: the next post or probe finds the peer gone
