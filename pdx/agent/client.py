"""``AgentClient``: how the connector, tests, benches and peer agents talk to an agent.

Every call has a timeout (``timeout_s`` by default) and raises ``AgentUnavailable``
when no reply came in time; an error reply raises the same ``pdx.errors`` class
the agent raised (``ReservationError``, ``LayoutError``...). Calls never hang.

Reconnect: each call borrows a ZMQ DEALER socket from a small pool. A socket
whose call timed out is closed, never reused, so a late reply or a queued
request from before an agent restart cannot confuse a later call. ZMQ itself
reconnects every ``RECONNECT_IVL_MS`` to a restarted agent, and ``IMMEDIATE``
keeps requests out of a dead connection's queue, so the first call after the
agent is back succeeds (about ``RECONNECT_IVL_MS`` after it listens again). A
request sent in the instant the agent dies, before ZMQ noticed, is lost: that
call times out; callers treat ``AgentUnavailable`` as "ask again later".

Every reply names the agent's *instance*; when it changes (the agent restarted:
its pool is new, earlier reservations and pins are gone), ``instance`` changes,
``restarts_seen`` counts up and ``on_restart(new_instance)`` is called once
(after the reply is processed, on the calling thread) so the caller can
re-register and re-map the pool.

Thread-safety: safe to share between threads; concurrent calls use different
sockets. ``close()`` is idempotent.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import zmq

from pdx.agent.protocol import (
    DEFAULT_MAX_FRAME,
    CommitArgs,
    ExpectArgs,
    FetchArgs,
    IdsArgs,
    JobArgs,
    LookupArgs,
    Op,
    OwnerArgs,
    PinArgs,
    PushLayerArgs,
    PushOpenArgs,
    PushSealArgs,
    RegisterArgs,
    ReserveArgs,
    SendArgs,
    UnpinArgs,
    WaitArgs,
    decode_reply,
    encode_request,
)
from pdx.agent.types import (
    JobInfo,
    LookupInfo,
    Outcome,
    PingInfo,
    PinInfo,
    RegisterInfo,
    ReservationInfo,
    ReserveRow,
)
from pdx.errors import AgentUnavailable, WireError
from pdx.layout import KVLayout

log = logging.getLogger("pdx.agent.client")

RECONNECT_IVL_MS = 50
_NOBLOCK = int(zmq.NOBLOCK)
RECONNECT_IVL_MAX_MS = 250
#: default limit on register_engine (the first one creates the pool).
REGISTER_TIMEOUT_S = 60.0
#: idle sockets kept for reuse.
POOL_SIZE = 8


class AgentClient:
    """Client of one agent's control (or peer) socket at ``address`` (``ipc://`` or ``tcp://``)."""

    def __init__(self, address: str, timeout_s: float = 5.0, *, max_frame: int = DEFAULT_MAX_FRAME,
                 on_restart: Callable[[str], None] | None = None) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.max_frame = max_frame
        self.on_restart = on_restart
        #: sent with every request (a peer session token; empty on the local socket).
        self.auth = b""
        self.instance = ""
        self.restarts_seen = 0
        self._ctx = zmq.Context()
        self._free: list[zmq.Socket[bytes]] = []
        self._timeouts: weakref.WeakKeyDictionary[zmq.Socket[bytes], int] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._ids = itertools.count(int.from_bytes(os.urandom(4), "little") << 16)
        self._closed = False

    # --- plumbing ----------------------------------------------------------------------------

    def _socket(self) -> zmq.Socket[bytes]:
        with self._lock:
            if self._closed:
                raise AgentUnavailable(f"client of {self.address} is closed")
            if self._free:
                return self._free.pop()
        sock: zmq.Socket[bytes] = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_frame)
        try:
            sock.connect(self.address)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise AgentUnavailable(f"bad agent address {self.address!r}: {exc}") from exc
        return sock

    def _give_back(self, sock: zmq.Socket[bytes]) -> None:
        with self._lock:
            if not self._closed and len(self._free) < POOL_SIZE:
                self._free.append(sock)
                return
        sock.close(0)

    def call(self, op: Op, args: Any = None, timeout: float | None = None) -> Any:
        """Send one request (``args``: the op's Struct of ``pdx.agent.protocol``, or a mapping) and
        return its result, decoded strictly into the op's reply type (``REPLY_TYPES``).

        Blocks up to ``timeout`` (default ``timeout_s``). Raises ``AgentUnavailable``
        on timeout, the class of the reply's error code on an error reply, ``WireError`` when the
        request cannot be encoded or the reply does not match the op's schema.
        """
        limit = self.timeout_s if timeout is None else timeout
        deadline = time.monotonic() + limit
        rid = next(self._ids) & ((1 << 64) - 1)
        frame = encode_request(rid, op, args, self.auth)
        if len(frame) > self.max_frame:
            raise WireError(f"{op.value}: request of {len(frame)} bytes is over the limit of {self.max_frame}")
        sock = self._socket()
        ok = False
        try:
            reply = self._exchange(sock, rid, frame, deadline)
            ok = True
        finally:
            if ok:
                self._give_back(sock)
            else:
                sock.close(0)
        if reply is None:
            raise AgentUnavailable(f"no reply from the agent at {self.address} to {op.value} "
                                   f"within {limit:g}s")
        self._note_instance(reply.instance)
        if reply.error is not None:
            raise reply.error
        return reply.result(op)

    def _exchange(self, sock: zmq.Socket[bytes], rid: int, frame: bytes, deadline: float) -> Any:
        while True:
            try:
                sock.send(frame, _NOBLOCK)
                break
            except zmq.Again:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                sock.poll(max(1, int(left * 1000)), zmq.POLLOUT)
        # A blocking recv bounded by RCVTIMEO costs one system call less than poll + recv.
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                return None
            if self._timeouts.get(sock) != left_ms // 10:  # reset only when it moved by 10 ms or more
                sock.setsockopt(zmq.RCVTIMEO, left_ms)
                self._timeouts[sock] = left_ms // 10
            try:
                frame = sock.recv()
            except zmq.Again:
                return None
            try:
                reply = decode_reply(frame, self.max_frame)
            except WireError as exc:
                log.warning("agent at %s: ignoring a reply that does not decode: %s", self.address, exc)
                continue
            if reply.id == rid:
                return reply

    def _note_instance(self, instance: str) -> None:
        if not instance or instance == self.instance:
            return
        with self._lock:
            if instance == self.instance:
                return
            previous, self.instance = self.instance, instance
            if previous:
                self.restarts_seen += 1
        if previous and self.on_restart is not None:
            self.on_restart(instance)

    def close(self) -> None:
        """Close every socket and the context (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            free, self._free = self._free, []
        for sock in free:
            sock.close(0)
        self._ctx.term()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- typed calls -------------------------------------------------------------------------

    def ping(self, timeout: float | None = None) -> dict[str, Any]:
        """Agent id, instance, role, wire version, uptime (``PingInfo`` as a dict)."""
        info: PingInfo = self.call(Op.PING, timeout=timeout)
        return info.to_dict()

    def register_engine(self, layout: KVLayout | Mapping[str, Any], pid: int = 0,
                        engine_url: str = "", timeout: float | None = None) -> RegisterInfo:
        """Announce the engine's KV layout; creates the pool on first use. Raises
        ``LayoutError`` when the agent's pool was made for another layout.

        Creating the pool (mapping every page, registering it with the transport)
        can take seconds, so the default timeout is at least ``REGISTER_TIMEOUT_S``.
        """
        d = layout.to_dict() if isinstance(layout, KVLayout) else dict(layout)
        limit = timeout if timeout is not None else max(self.timeout_s, REGISTER_TIMEOUT_S)
        info: RegisterInfo = self.call(Op.REGISTER_ENGINE, RegisterArgs(cast("Any", d), pid or os.getpid(), engine_url), limit)
        return info

    def lookup(self, keys: Sequence[bytes], remote: bool = False, timeout: float | None = None,
               probe: bool = False) -> LookupInfo:
        """Which tier holds each key. ``probe``: candidate keys (tails), left out of the lookup metrics."""
        info: LookupInfo = self.call(Op.LOOKUP, LookupArgs(list(keys), remote, probe), timeout)
        return info

    def reserve(self, keys: Sequence[bytes], nbytes: int | Sequence[int],
                timeout: float | None = None) -> list[ReservationInfo]:
        """One slab per key; a key that got none has ``id == 0``, an error ``code`` and a message."""
        nb = nbytes if isinstance(nbytes, int) else list(nbytes)
        rows: list[ReserveRow] = self.call(Op.RESERVE, ReserveArgs(list(keys), nb), timeout)
        if len(rows) != len(keys):
            raise WireError(f"reserve: {len(rows)} rows for {len(keys)} keys")
        return [ReservationInfo(r.id, bytes(k), r.offset, r.nbytes, r.error, r.code) for k, r in zip(keys, rows)]

    def commit(self, ids: Sequence[int], num_tokens: int | Sequence[int], checksums: Sequence[int] = (),
               timeout: float | None = None) -> list[Outcome]:
        """Commit written slabs; returns one ``Outcome`` per id (``ok``: committed).

        The agent hashes each slab; with ``checksums`` (one per id) a mismatch
        drops the chunk and its outcome's code is ``INTEGRITY``; an expired
        reservation's is ``RESERVATION``.
        """
        nt = num_tokens if isinstance(num_tokens, int) else list(num_tokens)
        out: list[Outcome] = self.call(Op.COMMIT, CommitArgs(list(ids), nt, list(checksums)), timeout)
        return out

    def abort(self, ids: Sequence[int], timeout: float | None = None) -> int:
        return int(self.call(Op.ABORT, IdsArgs(list(ids)), timeout))

    def pin(self, keys: Sequence[bytes], owner: str, lease_s: float | None = None,
            timeout: float | None = None) -> list[PinInfo]:
        """Pin L1 chunks for ``owner`` (a request id); a missing key gives ``found == False``."""
        pins: list[PinInfo] = self.call(Op.PIN, PinArgs(list(keys), owner, lease_s or 0.0), timeout)
        return pins

    def unpin(self, lease_ids: Sequence[int], timeout: float | None = None) -> int:
        return int(self.call(Op.UNPIN, UnpinArgs(list(lease_ids)), timeout))

    def release(self, owner: str, timeout: float | None = None) -> int:
        """Drop every pin ``owner`` holds (a finished or aborted request); returns how many."""
        return int(self.call(Op.RELEASE, OwnerArgs(owner), timeout))

    def fetch(self, peer: str, keys: Sequence[bytes], request_id: str, deadline_s: float | None = None,
              remote_owner: str = "", pin: bool = True, timeout: float | None = None) -> int:
        """Start pulling ``keys`` from the agent whose peer address is ``peer``; returns a job id.

        The remote agent pins the keys for the transfer; ``remote_owner`` names pins
        it already holds for this request (the prefill side's) to drop once the job
        is over. With ``pin`` the fetched chunks stay pinned here for ``request_id``.
        """
        args = FetchArgs(peer, list(keys), request_id, deadline_s or 0.0, remote_owner, pin)
        return int(self.call(Op.FETCH, args, timeout))

    def send(self, peer: str, keys: Sequence[bytes], request_id: str, deadline_s: float | None = None,
             timeout: float | None = None) -> int:
        """Start pushing local ``keys`` into the peer's pool; returns a job id."""
        return int(self.call(Op.SEND, SendArgs(peer, list(keys), request_id, deadline_s or 0.0), timeout))

    def expect(self, keys: Sequence[bytes], request_id: str, deadline_s: float | None = None,
               timeout: float | None = None) -> int:
        """Let peers push ``keys`` into this agent (their ``send``) until ``deadline_s``; a peer may
        reserve nothing else here. ``release(request_id)`` withdraws them."""
        return int(self.call(Op.EXPECT, ExpectArgs(list(keys), request_id, deadline_s or 0.0), timeout))

    def push_open(self, peer: str, request_id: str, keys: Sequence[bytes], offsets: Sequence[int],
                  nbytes: Sequence[int], num_layers: int, deadline_s: float | None = None,
                  timeout: float | None = None) -> int:
        """Start streaming reserved slabs layer by layer to the decode agent at ``peer``, staged there
        for its fetch of ``request_id`` (``pdx.agent.push``); returns a push id (0: not started)."""
        args = PushOpenArgs(peer, request_id, list(keys), list(offsets), list(nbytes), num_layers, deadline_s or 0.0)
        return int(self.call(Op.PUSH_OPEN, args, timeout))

    def push_layer(self, push_id: int, layer: int, timeout: float | None = None) -> bool:
        """Layer ``layer`` of every slab of the push is written: send it."""
        return bool(self.call(Op.PUSH_LAYER, PushLayerArgs(push_id, layer), timeout))

    def push_seal(self, push_id: int, checksums: Sequence[int], num_tokens: Sequence[int],
                  timeout: float | None = None) -> bool:
        """Every layer was pushed and the chunks committed with ``checksums``: seal the stage."""
        return bool(self.call(Op.PUSH_SEAL, PushSealArgs(push_id, list(checksums), list(num_tokens)), timeout))

    def job_status(self, job_id: int, timeout: float | None = None) -> JobInfo:
        info: JobInfo = self.call(Op.JOB_STATUS, JobArgs(job_id), timeout)
        return info

    def wait(self, job_id: int, timeout_s: float) -> JobInfo:
        """Block until the job is done or ``timeout_s`` passed; returns its state either way."""
        info: JobInfo = self.call(Op.WAIT, WaitArgs(job_id, timeout_s), timeout_s + self.timeout_s)
        return info

    def cancel(self, job_id: int, timeout: float | None = None) -> bool:
        return bool(self.call(Op.CANCEL, JobArgs(job_id), timeout))

    def stats(self, timeout: float | None = None) -> dict[str, Any]:
        """The agent's status (the same document as HTTP ``/v1/status``)."""
        result: dict[str, Any] = self.call(Op.STATS, timeout=timeout)
        return result
