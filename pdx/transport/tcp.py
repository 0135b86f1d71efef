"""``tcp``: the fallback transport that works everywhere.

Data path: per peer, ``connections_per_peer`` *lanes*; a lane is one worker
thread that owns one data stream (a TCP connection attached to the peer's
listener via ``PeerConnection.open_stream``). A batch's ops are spread over the
lanes; each lane sends one header frame describing its ops and then the payloads
back to back, so many chunks cost one round trip:

* WRITE: ``{"t": "w", "ops": [[remote_offset, nbytes, checksum|None], ...]}``
  then the bytes (``sendmsg`` of memoryview slices of the region);
  the peer ``recv_into``s each op straight into its own region at
  ``remote_offset``, verifies the checksums it was given and answers
  ``{"t": "ack", "bad": [indices]}`` (bad = CORRUPT). Ops are DONE at the ack.
* READ: ``{"t": "r", "ops": [[remote_offset, nbytes], ...]}``; the peer answers
  ``{"t": "d"}`` then the bytes, which land by ``recv_into`` in our region at each
  op's ``local_offset``; each op is DONE (or CORRUPT, checked against
  ``ChunkOp.checksum``) as soon as its bytes are in, so a peer that dies
  mid-batch leaves the delivered ops DONE and the rest FAILED.

The side that dialed the peer opens streams itself; the side that accepted asks
the dialer to dial back (``tcp.dial`` request) so both sides can post. Headers
are control frames (bounded); payload sizes are checked against the registered
regions before any byte is read, and a stream that breaks the protocol is
dropped without touching the other streams. Data sockets are blocking (see
``pdx.transport.sockio``); they are bounded by the batch deadline, cancel and
the side channel's heartbeats, which shut the socket down to unblock the thread.

Threads: ``post`` queues to the lanes and returns. A caller that ``wait``s on a
batch no lane has started yet, with one lane per peer, does the socket work
itself (bounded by its deadline through kernel socket timeouts): that saves two
thread hand-offs, which matter on a busy 2-core host.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future

from pdx.checksum import checksum
from pdx.config import TransportConfig
from pdx.errors import ConnectError, TransportError, WireError
from pdx.transport.base import (
    BatchHandle,
    ChunkOp,
    DebugCorrupter,
    MemoryRegion,
    OpKind,
    OpStatus,
    PeerId,
    TransferHandle,
    Transport,
    check_ops,
    region_view,
)
from pdx.transport.handshake import (
    Message,
    PeerConnection,
    SideChannel,
    SideChannelPeers,
    recv_frame,
    send_frame,
)
from pdx.transport.sockio import NEVER, arm, disarm, recv_into, send_views, shutdown

log = logging.getLogger("pdx.transport.tcp")

#: ops described by one header frame (keeps headers far below the control frame limit).
OPS_PER_HEADER = 4096


#: ``_Lane.current`` while ``_Lane.open`` dials the lane's stream.
_OPENING: BatchHandle = BatchHandle([], 1.0)


class _Lane:
    """One worker thread and its data stream to one peer (initiator side)."""

    def __init__(self, owner: TcpTransport, peer: PeerConnection, index: int) -> None:
        self.owner = owner
        self.peer = peer
        self.index = index
        self.sock: socket.socket | None = None
        self.current: BatchHandle | None = None
        self.io = False  # True while bytes of ``current`` move through the region
        self.dead: str | None = None
        self._queue: collections.deque[tuple[BatchHandle, OpKind, list[int]]] = collections.deque()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"pdx-tcp-lane-{peer.peer_id}-{index}",
                                        daemon=True)
        self._thread.start()

    def open(self, timeout: float) -> bool:
        """Open this lane's data stream now (on the calling thread, while the lane is idle) so that
        its first batch finds it connected. True when the stream is open."""
        with self._cond:
            if self.dead is not None:
                return False
            if self.sock is not None:
                return True
            if self.current is not None or self._queue:
                return False  # a batch is being served: it opens the stream itself
            self.current = _OPENING  # keeps the lane thread and ``steal`` off the stream meanwhile
        sock: socket.socket | None = None
        try:
            sock = self.owner._open_stream(self.peer, timeout)
        except (OSError, TransportError) as exc:
            log.debug("opening a data stream to %s: %s", self.peer.peer_id, exc)
        with self._cond:
            if self.dead is None and sock is not None:
                self.sock, sock = sock, None
            self.current = None
            self._cond.notify_all()
            ok = self.sock is not None
        if sock is not None:  # the lane died meanwhile
            sock.close()
        return ok

    def submit(self, handle: BatchHandle, kind: OpKind, idxs: list[int]) -> None:
        with self._cond:
            if self.dead is None:
                self._queue.append((handle, kind, idxs))
                self._cond.notify_all()
                return
        for i in idxs:
            handle.complete(i, OpStatus.FAILED, self.dead)

    def kill(self, reason: str) -> None:
        with self._cond:
            if self.dead is not None:
                return
            self.dead = reason
            items = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        shutdown(self.sock)
        for handle, _, idxs in items:
            for i in idxs:
                handle.complete(i, OpStatus.FAILED, reason)

    def abort(self, handle: BatchHandle) -> None:
        """Stop working on ``handle`` (cancel/timeout): drop the stream if it carries it.

        Returns once this lane no longer touches the region for ``handle`` (bounded);
        a lane still dialing will notice ``handle.stopped`` before any I/O.
        """
        with self._cond:
            if self.current is not handle or not self.io:
                return
            shutdown(self.sock)
            self._cond.wait_for(lambda: self.current is not handle, timeout=2.0)

    def steal(self, handle: BatchHandle, deadline: float) -> None:
        """Do ``handle``'s queued work on the calling (waiting) thread if this lane is idle
        and connected: saves two thread hand-offs. Socket calls are bounded by ``deadline``."""
        if deadline - time.monotonic() < 0.001:
            return  # no time to do anything: leave it to the worker
        with self._cond:
            if self.current is not None or self.dead is not None or self.sock is None:
                return
            mine = [item for item in self._queue if item[0] is handle]
            if not mine:
                return
            for item in mine:
                self._queue.remove(item)
            self.current = handle
        try:
            for _, kind, idxs in mine:
                self._execute(handle, kind, idxs, deadline)
        finally:
            self._release()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _release(self) -> None:
        with self._cond:
            self.current = None
            self.io = False
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while (not self._queue or self.current is not None) and self.dead is None:
                    self._cond.wait()
                if self.dead is not None:
                    break
                handle, kind, idxs = self._queue.popleft()
                if handle.stopped:
                    continue
                self.current = handle
            try:
                self._execute(handle, kind, idxs, NEVER)
            finally:
                self._release()
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _execute(self, handle: BatchHandle, kind: OpKind, idxs: list[int], deadline: float) -> None:
        """Move ``idxs`` of ``handle`` (``current`` is ``handle``); failures become op statuses."""
        sock = self.sock
        try:
            if sock is None:
                sock = self.sock = self.owner._open_stream(self.peer)
            with self._cond:
                if handle.stopped:
                    return
                self.io = True
            if kind is OpKind.WRITE:
                self._write(sock, handle, idxs, deadline)
            else:
                self._read(sock, handle, idxs, deadline)
            if deadline != NEVER:
                disarm(sock)
        except (OSError, TransportError) as exc:
            # past the waiter's deadline the waiter marks the rest TIMEOUT; after a cancel, CANCELLED
            if not handle.stopped and time.monotonic() < deadline:
                reason = self.dead or f"stream to {self.peer.peer_id} broke: {exc}"
                for i in idxs:
                    handle.complete(i, OpStatus.FAILED, reason)
            if sock is not None:
                sock.close()
            self.sock = None

    def _write(self, sock: socket.socket, handle: BatchHandle, idxs: list[int], deadline: float) -> None:
        view = self.owner._view
        for start in range(0, len(idxs), OPS_PER_HEADER):
            part = idxs[start:start + OPS_PER_HEADER]
            ops = [handle.ops[i] for i in part]
            arm(sock, deadline)
            send_frame(sock, {"t": "w", "s": self.owner._sessions.get(self.peer.peer_id, b""),
                              "ops": [[op.remote_offset, op.nbytes, op.checksum] for op in ops]})
            send_views(sock, [view[op.local_offset:op.local_offset + op.nbytes] for op in ops], deadline)
            arm(sock, deadline)
            ack = recv_frame(sock)
            if ack["t"] == "err":
                for i in part:
                    handle.complete(i, OpStatus.FAILED, f"peer refused the write: {ack.get('reason')}")
                continue
            if ack["t"] != "ack":
                raise WireError(f"expected ack, got {ack['t']!r}")
            bad = set(ack.get("bad") or ())
            for j, i in enumerate(part):
                if j in bad:
                    handle.complete(i, OpStatus.CORRUPT, "the receiver's checksum did not match")
                else:
                    handle.complete(i, OpStatus.DONE)

    def _read(self, sock: socket.socket, handle: BatchHandle, idxs: list[int], deadline: float) -> None:
        view = self.owner._view
        verify = self.owner.config.verify_checksums
        corrupter = self.owner._corrupter
        for start in range(0, len(idxs), OPS_PER_HEADER):
            part = idxs[start:start + OPS_PER_HEADER]
            ops = [handle.ops[i] for i in part]
            arm(sock, deadline)
            send_frame(sock, {"t": "r", "s": self.owner._sessions.get(self.peer.peer_id, b""),
                              "ops": [[op.remote_offset, op.nbytes] for op in ops]})
            arm(sock, deadline)
            head = recv_frame(sock)
            if head["t"] == "err":
                for i in part:
                    handle.complete(i, OpStatus.FAILED, f"peer refused the read: {head.get('reason')}")
                continue
            if head["t"] != "d":
                raise WireError(f"expected data, got {head['t']!r}")
            for i, op in zip(part, ops):
                dst = view[op.local_offset:op.local_offset + op.nbytes]
                recv_into(sock, dst, deadline)
                corrupter.maybe_corrupt(dst)
                if verify and op.checksum is not None and checksum(dst) != op.checksum:
                    handle.complete(i, OpStatus.CORRUPT, "checksum mismatch after the read")
                else:
                    handle.complete(i, OpStatus.DONE)


class TcpTransport(SideChannelPeers, Transport):
    """TCP backend. Thread-safe; ``post`` returns at once (lanes do the I/O)."""

    name = "tcp"
    debug_corrupt = True
    connect_needs_region = False
    enforces_grants = True

    def __init__(self, config: TransportConfig, fingerprint: str) -> None:
        super().__init__(config, fingerprint)
        self._side = SideChannel(config, fingerprint, self.name, on_peer_dead=self._peer_dead)
        self._side.on_stream("tcp", self._on_stream)
        self._side.on("tcp.dial", self._on_dial)
        self._region: MemoryRegion | None = None
        self._view = memoryview(bytearray(0))
        self._corrupter = DebugCorrupter(config.debug_corrupt_every)
        self._lock = threading.Lock()
        self._lanes: dict[PeerId, list[_Lane]] = {}
        self._serving: dict[PeerId, set[socket.socket]] = collections.defaultdict(set)
        self._tickets: dict[bytes, Future[socket.socket]] = {}
        self._sessions: dict[PeerId, bytes] = {}
        self._denied_logged: set[tuple[PeerId, str]] = set()
        self._closed = False

    # -- Transport --
    def register(self, region: MemoryRegion) -> None:
        if self._region is not None:
            raise TransportError("a region is already registered")
        self._view = region_view(region)
        self._region = region
        self._side.region_nbytes = region.nbytes

    def set_session(self, peer: PeerId, session: bytes) -> None:
        self._sessions[peer] = session

    def prepare(self, peer: PeerId, timeout: float | None = None) -> bool:
        """Open the data streams to ``peer`` (one per lane) before its first batch needs them."""
        if self._region is None or self._closed:
            return False
        try:
            conn = self._side.get(peer)
        except ConnectError:
            return False
        limit = self.config.connect_timeout_s if timeout is None else timeout
        return all([lane.open(limit) for lane in self._lanes_for(conn)])

    def post(self, peer: PeerId, kind: OpKind, ops: Sequence[ChunkOp]) -> TransferHandle:
        handle = BatchHandle(ops, self.config.transfer_timeout_s,
                             on_stop=functools.partial(self._abort, peer),
                             on_wait=functools.partial(self._help, peer))
        if self._region is None or self._closed:
            handle.fail_all(OpStatus.FAILED, "transport closed" if self._closed else "no region registered")
            return handle
        try:
            conn = self._side.get(peer)
        except ConnectError as exc:
            handle.fail_all(OpStatus.FAILED, str(exc))
            return handle
        bad = check_ops(handle.ops, self._region.nbytes, conn.info.region_nbytes)
        for i, reason in bad.items():
            handle.complete(i, OpStatus.FAILED, reason)
        good = [i for i in range(len(handle.ops)) if i not in bad]
        if not good:
            return handle
        lanes = self._lanes_for(conn)
        if len(lanes) == 1:
            lanes[0].submit(handle, OpKind(kind), good)
            return handle
        # spread by bytes: each op goes to the lane with the fewest bytes so far
        loads = [0] * len(lanes)
        parts: list[list[int]] = [[] for _ in lanes]
        for i in good:
            j = loads.index(min(loads))
            parts[j].append(i)
            loads[j] += handle.ops[i].nbytes
        for lane, part in zip(lanes, parts):
            if part:
                lane.submit(handle, OpKind(kind), part)
        return handle

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._side.close()  # peers die -> _peer_dead kills lanes and serving streams
        with self._lock:
            lanes = [lane for ls in self._lanes.values() for lane in ls]
            self._lanes.clear()
            serving = [s for ss in self._serving.values() for s in ss]
        for lane in lanes:
            lane.kill("transport closed")
        for s in serving:
            shutdown(s)
        for lane in lanes:
            lane.join(2.0)
        self._region = None
        view, self._view = self._view, memoryview(bytearray(0))
        try:
            view.release()  # so the caller can close its shared memory
        except BufferError:
            pass

    # -- lanes --
    def _lanes_for(self, conn: PeerConnection) -> list[_Lane]:
        """The lanes of ``conn``. Lanes belong to one connection: their streams are served under the
        sessions bound to it, so lanes left from a connection that was replaced (both agents dialled
        each other at once, or the peer reconnected) are killed and opened anew on ``conn``."""
        stale: list[_Lane] = []
        with self._lock:
            lanes = self._lanes.get(conn.peer_id)
            if lanes is not None and lanes[0].peer is not conn:
                stale, lanes = lanes, None
            if lanes is None:
                n = max(1, self.config.connections_per_peer)
                lanes = self._lanes[conn.peer_id] = [_Lane(self, conn, i) for i in range(n)]
        for lane in stale:
            lane.kill(f"the connection to peer {conn.peer_id} was replaced")
        return lanes

    def _help(self, peer: PeerId, handle: BatchHandle, deadline: float) -> None:
        with self._lock:
            lanes = list(self._lanes.get(peer, ()))
        if len(lanes) == 1:  # with several lanes the workers already run in parallel
            lanes[0].steal(handle, deadline)

    def _abort(self, peer: PeerId, handle: BatchHandle, status: OpStatus) -> None:
        with self._lock:
            lanes = list(self._lanes.get(peer, ()))
        for lane in lanes:
            lane.abort(handle)

    def _peer_dead(self, conn: PeerConnection, reason: str) -> None:
        try:  # a replaced connection's death: the peer is still here on a new one
            replaced = self._side.get(conn.peer_id) is not conn
        except ConnectError:
            replaced = False
        with self._lock:
            lanes = self._lanes.get(conn.peer_id, [])
            if lanes and lanes[0].peer is conn:
                del self._lanes[conn.peer_id]
            else:
                lanes = []  # none, or the new connection's
            # the streams this side serves for the peer: the new connection's, when it was replaced
            serving = set() if replaced else self._serving.pop(conn.peer_id, set())
        for lane in lanes:
            lane.kill(f"peer {conn.peer_id} gone: {reason}")
        for s in serving:
            shutdown(s)

    def _open_stream(self, conn: PeerConnection, timeout: float | None = None) -> socket.socket:
        """A stream on which we initiate and ``conn`` serves (called by a lane thread, or by
        ``prepare`` while the lane is idle)."""
        if conn.outgoing:
            return conn.open_stream("tcp", {"role": "serve"}, timeout=timeout)
        # the peer dialed us: ask it to dial back, then take the stream it opens
        ticket = os.urandom(12)
        fut: Future[socket.socket] = Future()
        with self._lock:
            self._tickets[ticket] = fut
        try:
            limit = self.config.connect_timeout_s if timeout is None else timeout
            conn.request("tcp.dial", {"ticket": ticket}, timeout=limit)
            return fut.result(timeout=limit)
        except TimeoutError:
            raise ConnectError(f"peer {conn.peer_id} did not dial back within "
                               f"{self.config.connect_timeout_s:g}s") from None
        finally:
            with self._lock:
                self._tickets.pop(ticket, None)

    # -- side-channel hooks --
    def _on_dial(self, conn: PeerConnection, body: Message) -> Message:
        ticket = body.get("ticket")
        if not isinstance(ticket, bytes):
            raise WireError("tcp.dial needs a ticket")

        def dial() -> None:
            try:
                sock = conn.open_stream("tcp", {"role": "initiate", "ticket": ticket})
            except TransportError as exc:
                log.warning("dial-back to %s failed: %s", conn.peer_id, exc)
                return
            self._serve(conn, sock)

        threading.Thread(target=dial, name=f"pdx-tcp-dialback-{conn.peer_id}", daemon=True).start()
        return {}

    def _on_stream(self, conn: PeerConnection, sock: socket.socket, body: Message) -> None:
        if body.get("role") == "initiate":
            with self._lock:
                fut = self._tickets.get(body.get("ticket"))  # type: ignore[arg-type]
            if fut is None or fut.done():
                sock.close()
                return
            fut.set_result(sock)
            return
        self._serve(conn, sock)

    # -- serving (the peer initiates on this stream) --
    def _serve(self, conn: PeerConnection, sock: socket.socket) -> None:
        """Serve the peer's headers until the stream closes; runs on its own thread."""
        cap = self.config.max_streams_per_peer
        with self._lock:
            over = len(self._serving[conn.peer_id]) >= cap
            refuse = self._closed or not conn.alive or over
            if not refuse:
                self._serving[conn.peer_id].add(sock)
        if refuse:
            sock.close()
            if over:
                self._denied("data_stream", conn, f"more than {cap} data streams")
            return
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        idle_s = self.config.stream_idle_s
        last = time.monotonic()
        try:
            # A peer that stops mid-frame must not hold this thread for ever: kernel timeouts on
            # each recv/send (the socket stays blocking, so MSG_WAITALL keeps working).
            arm(sock, last + self.config.transfer_timeout_s)
            while conn.alive and not self._closed:
                if not poller.poll(500):
                    if time.monotonic() - last > idle_s:
                        raise TransportError(f"idle for more than {idle_s:g}s")
                    continue
                head = recv_frame(sock)
                last = time.monotonic()
                if head["t"] == "w":
                    self._serve_write(conn, sock, head)
                elif head["t"] == "r":
                    self._serve_read(conn, sock, head)
                else:
                    raise WireError(f"unexpected frame {head['t']!r} on a data stream")
        except (OSError, TransportError) as exc:
            if conn.alive and not self._closed:
                log.info("data stream from %s closed: %s", conn.peer_id, exc)
        finally:
            with self._lock:
                self._serving.get(conn.peer_id, set()).discard(sock)
            sock.close()

    def _ranges(self, head: Message, width: int) -> list[list[int]]:
        ops = head.get("ops")
        if not isinstance(ops, list):
            raise WireError("data header without ops")
        size = self._region.nbytes if self._region is not None else 0
        for op in ops:
            if (not isinstance(op, list) or len(op) != width or not isinstance(op[0], int)
                    or not isinstance(op[1], int) or op[0] < 0 or op[1] < 0 or op[0] + op[1] > size):
                raise WireError(f"data header op {op!r} is malformed or outside the region ({size} bytes)")
        return ops

    def _denied(self, op: str, conn: PeerConnection, why: str) -> None:
        with self._lock:
            first = (conn.peer_id, op) not in self._denied_logged
            if first and len(self._denied_logged) < 4096:
                self._denied_logged.add((conn.peer_id, op))
        if first:  # every refusal is counted (on_denied); each peer's kind logged once
            log.warning("refused a %s from %s: %s", op, conn.peer_id, why)
        if self.on_denied is not None:
            self.on_denied(op)

    def _check(self, conn: PeerConnection, head: Message, write: bool, ops: list[list[int]]) -> str:
        """Empty when the agent's guard lets the peer's session touch these ranges (no guard: all)."""
        if self.guard is None:
            return ""
        # the header names a session by its handle; only sessions bound to this connection (by
        # its handshake or ``bind``, proving the session key) count: a handle seen on the wire
        # is worth nothing on another connection
        handle = head.get("s")
        token = conn.sessions.get(handle, b"") if isinstance(handle, bytes) else b""
        return self.guard(token, write, ops)

    def _serve_write(self, conn: PeerConnection, sock: socket.socket, head: Message) -> None:
        ops = self._ranges(head, 3)
        why = self._check(conn, head, True, ops)
        if why:  # the bytes that follow are not read: the stream closes after the refusal
            send_frame(sock, {"t": "err", "reason": f"write refused: {why}"})
            raise TransportError(f"write refused: {why}")
        view = self._view
        verify = self.config.verify_checksums
        bad = []
        for j, (off, n, cks) in enumerate(ops):
            dst = view[off:off + n]
            recv_into(sock, dst)
            self._corrupter.maybe_corrupt(dst)
            if verify and cks is not None and checksum(dst) != cks:
                bad.append(j)
        send_frame(sock, {"t": "ack", "bad": bad})

    def _serve_read(self, conn: PeerConnection, sock: socket.socket, head: Message) -> None:
        ops = self._ranges(head, 2)
        why = self._check(conn, head, False, ops)
        if why:
            send_frame(sock, {"t": "err", "reason": f"read refused: {why}"})
            return
        view = self._view
        send_frame(sock, {"t": "d"})
        send_views(sock, [view[off:off + n] for off, n in ops])
