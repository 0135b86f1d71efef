"""The data path of the ``ucx`` backend: everything that runs with the worker in hand.

``UcxEngine`` is the half of ``pdx.transport.ucx.UcxTransport`` that makes UCX calls: one
round of work (``_step``: queued commands, progress, arrived READ messages, completed
requests), the initiator side (headers, sends, probing and receiving READ data, acks),
the serving side (a peer's headers: receive its WRITE into the region, send what it
READs) and endpoints. Every method here runs with the transport's ``_drive`` lock
held, on the UCX thread or on a thread that drives the worker while it waits; the
state it touches (``_watch``, ``_live``, peers' batches) is only touched that way.
Wire format: ``pdx.transport.ucx_wire``.
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pdx.checksum import checksum
from pdx.config import TransportConfig
from pdx.errors import WireError
from pdx.transport.base import BatchHandle, DebugCorrupter, MemoryRegion, OpKind, OpStatus
from pdx.transport.handshake import PeerConnection
from pdx.transport.ucx_rma import Pending, RemoteKey, Rma
from pdx.transport.ucx_wire import (
    ACK_MAX,
    ACK_OP,
    BATCH_MASK,
    HDR_MAX,
    K_ACK,
    K_DATA,
    K_HDR,
    K_RDATA,
    PEER_MASK,
    coalesce,
    op_of,
    pack_msg,
    parse_header,
    tag,
    unpack_msg,
)

log = logging.getLogger("pdx.transport.ucx")

#: one RMA get moves at most this much.
RMA_PIECE = 64 << 20


def _stop() -> None:
    """Sentinel command: stop the UCX thread."""


@dataclass(eq=False)
class _Peer:
    conn: PeerConnection
    uid: int
    address: bytes
    nbytes: int
    ep: Any = None
    rkey_msg: tuple[bytes, int] | None = None  # (packed rkey, region address) from the handshake
    rkey: RemoteKey | None = None  # its region, for our RMA gets (when it pulls from us too)
    pulls: bool = False  # it can get from our region: we WRITE by pull
    hdr_buf: np.ndarray | None = None
    dead: str | None = None
    batches: set[_Batch] = field(default_factory=set)  # ours, in flight
    reads: list[_Batch] = field(default_factory=list)  # ours, with messages still to take


@dataclass(eq=False)
class _Batch:
    handle: BatchHandle
    peer: _Peer
    kind: OpKind
    idxs: list[int]  # op indices this part carries (non-empty ops), in header order
    seq: int = 0
    ack_buf: np.ndarray | None = None
    runs: list[tuple[int, int, int, int]] = field(default_factory=list)  # see coalesce()
    waiting: set[int] = field(default_factory=set)  # runs not received yet (READ)
    msgs_left: int = 0  # messages of this READ still to take (runs + ack)
    inflight: int = 0  # receives into the region under way (READ)
    recvs: _Group | None = None  # those receives (READ)
    acked: bool = False
    stopped: bool = False
    over: bool = False


@dataclass(eq=False)
class _Group:
    """Requests watched in order: ``cbs[k](reqs[k])`` runs once ``reqs[k]`` and every earlier
    one completed; ``done()`` once all did and the group is ``sealed``. ``keep`` holds buffers
    UCX uses until then. Checking in order keeps a batch of N requests O(N), not O(N^2)."""

    peer: _Peer
    reqs: list[Any] = field(default_factory=list)
    cbs: list[Callable[[Any], None] | None] = field(default_factory=list)
    keep: list[Any] = field(default_factory=list)
    done: Callable[[], None] | None = None
    sealed: bool = True
    cursor: int = 0

    def add(self, req: Any, cb: Callable[[Any], None] | None = None, keep: Any = None) -> None:
        self.reqs.append(req)
        self.cbs.append(cb)
        if keep is not None:
            self.keep.append(keep)

class _RmaReq:
    """UCP RMA requests watched like a ucxx request (``completed``, ``check_error``)."""

    def __init__(self, pending: list[Pending], error: Exception | None = None) -> None:
        self.pending = pending
        self.error = error

    @property
    def completed(self) -> bool:
        return all([p.done() for p in self.pending])

    def check_error(self) -> None:
        if self.error is not None:
            raise self.error
        bad = [p.status for p in self.pending if not p.ok]
        if bad:
            raise WireError(f"UCX RMA failed with status {bad[0]}")


class UcxEngine:
    """UCX-side state and work of a ``UcxTransport`` (see the module docstring)."""

    config: TransportConfig
    _lib: Any
    _Array: Any
    _uid: int
    _seq: int
    _cond: threading.Condition
    _cmds: collections.deque[Callable[[], None]]
    _worker: Any
    _live: list[_Peer]
    _watch: list[_Group]
    _corrupter: DebugCorrupter
    _region: MemoryRegion | None
    _view: memoryview | None
    _arr: np.ndarray | None
    _rma: Rma | None
    _rma_waiting: int

    def _step(self, commands: bool = True) -> tuple[bool, bool]:
        """One round of UCX work (hold ``_drive``): commands, progress, arrivals, completions.

        Returns ``(running, busy)``: False once told to stop; busy if anything happened.
        Only the UCX thread runs commands (one of them stops it)."""
        running = self._run_cmds() if commands else True
        worker = self._worker
        while worker.progress_once():
            pass
        busy = self._probe_reads()
        busy = self._check() or busy or self._rma_waiting > 0  # RMA completions raise no event
        with self._cond:
            busy = busy or bool(self._cmds)
        return running, busy

    def _run_cmds(self) -> bool:
        while True:
            with self._cond:
                if not self._cmds:
                    return True
                fn = self._cmds.popleft()
            if fn is _stop:
                return False
            try:
                fn()
            except Exception:
                log.exception("a UCX command failed")

    def _check(self) -> bool:
        """Run callbacks of completed requests; True if any completed."""
        took = False
        for g in list(self._watch):
            while g.cursor < len(g.reqs) and g.reqs[g.cursor].completed:
                cb, req = g.cbs[g.cursor], g.reqs[g.cursor]
                g.cursor += 1
                took = True
                if cb is not None:
                    try:
                        cb(req)
                    except Exception:
                        log.exception("a UCX completion callback failed")
            if g.sealed and g.cursor == len(g.reqs) and g in self._watch:
                self._watch.remove(g)
                if g.done is not None:
                    try:
                        g.done()
                    except Exception:
                        log.exception("a UCX completion callback failed")
        return took

    def _on(self, req: Any, p: _Peer, cb: Callable[[Any], None] | None = None, keep: Any = None) -> None:
        """Call ``cb(req)`` on the UCX thread once ``req`` completed; ``keep`` lives until then."""
        g = _Group(p)
        g.add(req, cb, keep)
        self._watch.append(g)

    def _group(self, p: _Peer, done: Callable[[], None] | None = None, sealed: bool = True) -> _Group:
        g = _Group(p, done=done, sealed=sealed)
        self._watch.append(g)
        return g

    def _send(self, p: _Peer, buf: np.ndarray, t: int, group: _Group | None = None) -> None:
        req = p.ep.tag_send(self._Array(buf), self._lib.UCXXTag(t))
        if group is None:
            self._on(req, p, keep=buf)
        else:
            group.add(req, keep=buf)

    # -- initiator side (UCX thread) --
    def _start_all(self, parts: list[_Batch]) -> None:
        for b in parts:
            self._start(b)

    def _start(self, b: _Batch) -> None:
        p, h, ops = b.peer, b.handle, b.handle.ops
        if h.stopped:
            return  # cancelled or timed out before it started: the handle marks the ops
        if p.dead is not None or p.ep is None:
            for i in b.idxs:
                h.complete(i, OpStatus.FAILED, f"peer {p.conn.peer_id} gone: {p.dead}")
            return
        p.batches.add(b)
        b.seq = self._seq
        self._seq = (self._seq + 1) & 0xFFFFFF
        b.runs = coalesce([ops[i] for i in b.idxs])
        write = b.kind is OpKind.WRITE
        if write and p.pulls and self._rma is not None:
            self._start_pull(b)
            return
        if write:
            b.ack_buf = np.empty(ACK_MAX, dtype=np.uint8)
            ack = p.ep.tag_recv(self._Array(b.ack_buf), self._lib.UCXXTag(tag(K_ACK, p.uid, b.seq)))
            self._on(ack, p, functools.partial(self._acked, b), keep=b.ack_buf)
        else:
            b.waiting = set(range(len(b.runs)))
            b.msgs_left = len(b.runs) + 1
            b.recvs = self._group(p, sealed=False)
            p.reads.append(b)
        self._send(p, pack_msg({"k": "w" if write else "r", "b": b.seq,
                                "ops": [[ops[i].remote_offset, ops[i].nbytes, ops[i].checksum] for i in b.idxs],
                                "runs": [r[1] for r in b.runs]}), tag(K_HDR, self._uid))
        if write:
            arr = self._arr
            assert arr is not None
            sends = self._group(p)
            for r, (_, _, off, n) in enumerate(b.runs):
                self._send(p, arr[off:off + n], tag(K_DATA, self._uid, b.seq, r), sends)

    def _start_pull(self, b: _Batch) -> None:
        """WRITE by RMA: one header names the runs in our region; the peer gets them straight
        into its own (``_serve_pull``), verifies and acks. No data message, no rendezvous."""
        p, ops = b.peer, b.handle.ops
        b.ack_buf = np.empty(ACK_MAX, dtype=np.uint8)
        ack = p.ep.tag_recv(self._Array(b.ack_buf), self._lib.UCXXTag(tag(K_ACK, p.uid, b.seq)))
        self._on(ack, p, functools.partial(self._acked, b), keep=b.ack_buf)
        self._send(p, pack_msg({"k": "P", "b": b.seq,
                                "ops": [[ops[i].remote_offset, ops[i].nbytes, ops[i].checksum] for i in b.idxs],
                                "runs": [r[1] for r in b.runs], "src": [r[2] for r in b.runs]}),
                   tag(K_HDR, self._uid))

    def _serve_pull(self, p: _Peer, seq: int, ops: list[list[Any]], runs: list[tuple[int, int]],
                    src: Any) -> None:
        """A peer's pull header: get each run from its region into ours, then verify and ack."""
        rma, key = self._rma, p.rkey
        if (rma is None or key is None or not isinstance(src, list) or len(src) != len(runs)
                or not all(isinstance(x, int) for x in src)):
            raise WireError("pull header without a usable rkey or with malformed sources")
        assert self._arr is not None
        base, ep = self._arr.ctypes.data, int(p.ep.handle)
        moves = []
        for (first, count), off in zip(runs, src):
            n = sum(op[1] for op in ops[first:first + count])
            if off < 0 or off + n > key.nbytes:
                raise WireError(f"pull source [{off}, {off + n}) outside the peer's region ({key.nbytes} bytes)")
            moves.append((base + ops[first][0], n, off))
        pending: list[Pending] = []
        error: Exception | None = None
        try:
            for i in range(0, len(moves)):
                local, n, off = moves[i]
                for k in range(0, n, RMA_PIECE):
                    pending.append(rma.get(ep, local + k, min(RMA_PIECE, n - k), key, off + k))
            pending.append(rma.flush(ep))
        except Exception as exc:  # those started still complete (cancelled); the batch fails
            error = exc
            for q in pending:
                q.cancel(int(self._worker.handle))
        req = _RmaReq(pending, error)
        while self._worker.progress_once():
            pass
        if req.completed:  # cma: the bytes moved inside the calls
            self._pulled(p, seq, ops, req)
        else:  # completions raise no worker event: the UCX thread polls while any is pending
            self._rma_waiting += 1
            self._on(req, p, functools.partial(self._pulled, p, seq, ops, waited=True))

    def _pulled(self, p: _Peer, seq: int, ops: list[list[Any]], req: Any, waited: bool = False) -> None:
        if waited:
            self._rma_waiting -= 1
        if p.dead is not None:
            return
        try:
            req.check_error()
        except Exception as exc:
            self._send(p, pack_msg({"err": f"RMA get failed: {exc}"}), tag(K_ACK, self._uid, seq))
            return
        self._send(p, pack_msg({"bad": self._verify(ops)}), tag(K_ACK, self._uid, seq))

    def _verify(self, ops: list[list[Any]]) -> list[int]:
        """Indices of the ops (offset, nbytes, checksum) in our region whose checksum fails."""
        assert self._view is not None
        bad = []
        for j, (off, n, cks) in enumerate(ops):
            dst = self._view[off:off + n]
            self._corrupter.maybe_corrupt(dst)
            if self.config.verify_checksums and cks is not None and checksum(dst) != cks:
                bad.append(j)
        return bad

    def _probe_reads(self) -> bool:
        """Take the messages that arrived for our READs; True if any was taken."""
        took = False
        for p in self._live:
            for b in list(p.reads):
                while b.msgs_left > 0:
                    probe = self._worker.tag_probe(self._lib.UCXXTag(tag(K_RDATA, p.uid, b.seq)),
                                                   self._lib.UCXXTagMask(BATCH_MASK), True)
                    if not probe.matched:
                        break
                    took = True
                    b.msgs_left -= 1
                    try:
                        self._take(b, probe)
                    except Exception as exc:  # never let one message stop the UCX thread
                        log.exception("taking a message of batch %d from %s failed", b.seq, p.conn.peer_id)
                        for i in b.idxs:
                            b.handle.complete(i, OpStatus.FAILED, f"receive failed: {exc}")
                        b.waiting.clear()
                if b.msgs_left <= 0:
                    p.reads.remove(b)
                    if b.recvs is not None:
                        b.recvs.sealed = True
        return took

    def _take(self, b: _Batch, probe: Any) -> None:
        """Receive one probed message of READ ``b``: into the region, the ack buffer or scratch."""
        p, j, n = b.peer, op_of(probe.sender_tag.value), probe.length
        if b.stopped:
            self._drain(p, probe)
        elif j == ACK_OP:
            if n > ACK_MAX:
                self._drain(p, probe)
                self._acked(b, None, f"ack of {n} bytes exceeds {ACK_MAX}")
                return
            b.ack_buf = np.empty(ACK_MAX, dtype=np.uint8)
            req = self._worker.tag_recv_with_handle(self._Array(b.ack_buf[:n]), probe)
            self._on(req, p, functools.partial(self._acked, b), keep=b.ack_buf)
        elif j not in b.waiting:
            self._drain(p, probe)
            log.warning("peer %s sent message %d of batch %d twice or out of range", p.conn.peer_id, j, b.seq)
        else:
            b.waiting.discard(j)
            first, count, off, size = b.runs[j]
            idxs = b.idxs[first:first + count]
            if n != size:
                self._drain(p, probe)
                for i in idxs:
                    b.handle.complete(i, OpStatus.FAILED, f"the peer sent {n} bytes for {size}")
                self._maybe_over(b)
                return
            assert self._arr is not None
            b.inflight += 1
            req = self._worker.tag_recv_with_handle(self._Array(self._arr[off:off + n]), probe)
            assert b.recvs is not None
            b.recvs.add(req, functools.partial(self._read_done, b, idxs))

    def _drain(self, p: _Peer, probe: Any) -> None:
        scratch = np.empty(max(1, probe.length), dtype=np.uint8)
        req = self._worker.tag_recv_with_handle(self._Array(scratch[:probe.length]), probe)
        self._on(req, p, keep=scratch)

    def _read_done(self, b: _Batch, idxs: list[int], req: Any) -> None:
        b.inflight -= 1
        try:
            req.check_error()
        except Exception as exc:
            if not b.stopped:
                for i in idxs:
                    b.handle.complete(i, OpStatus.FAILED, b.peer.dead or f"UCX receive failed: {exc}")
        else:
            for i in idxs:
                self._landed(b.handle, i)
        self._maybe_over(b)

    def _landed(self, h: BatchHandle, i: int) -> None:
        """A READ op's bytes are in: debug corruption, then the checksum it carries."""
        op = h.ops[i]
        assert self._view is not None
        dst = self._view[op.local_offset:op.local_offset + op.nbytes]
        self._corrupter.maybe_corrupt(dst)
        if self.config.verify_checksums and op.checksum is not None and checksum(dst) != op.checksum:
            h.complete(i, OpStatus.CORRUPT, "checksum mismatch after the read")
        else:
            h.complete(i, OpStatus.DONE)

    def _acked(self, b: _Batch, req: Any, error: str = "") -> None:
        b.acked = True
        msg: dict[str, Any] = {}
        try:
            if error:
                raise WireError(error)
            req.check_error()
            assert b.ack_buf is not None
            msg = unpack_msg(b.ack_buf)
        except Exception as exc:
            msg = {"err": b.peer.dead or f"no valid ack from the peer: {exc}"}
        if msg.get("err"):
            if not b.stopped:
                for i in b.idxs:
                    b.handle.complete(i, OpStatus.FAILED, f"the peer failed the batch: {msg['err']}")
            b.waiting.clear()
            b.msgs_left = 0
        elif b.kind is OpKind.WRITE:
            bad = set(msg.get("bad") or ())
            for j, i in enumerate(b.idxs):
                if j in bad:
                    b.handle.complete(i, OpStatus.CORRUPT, "the receiver's checksum did not match")
                else:
                    b.handle.complete(i, OpStatus.DONE)
        self._maybe_over(b)

    def _maybe_over(self, b: _Batch) -> None:
        """Retire ``b`` once nothing of it touches the region and its outcome is known."""
        if b.over:
            return
        if b.kind is OpKind.READ:
            if b.inflight or (not b.stopped and (b.waiting or not b.acked)):
                return
        elif not b.acked:
            return
        b.over = True
        b.peer.batches.discard(b)
        self._notify()

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # -- serving side (UCX thread) --
    def _post_hdr(self, p: _Peer) -> None:
        if p.hdr_buf is None:
            p.hdr_buf = np.empty(HDR_MAX, dtype=np.uint8)
        req = p.ep.tag_recv(self._Array(p.hdr_buf), self._lib.UCXXTag(tag(K_HDR, p.uid)),
                            self._lib.UCXXTagMask(PEER_MASK))
        self._on(req, p, functools.partial(self._on_hdr, p))

    def _on_hdr(self, p: _Peer, req: Any) -> None:
        if p.dead is not None:
            return
        try:
            req.check_error()
            assert p.hdr_buf is not None
            head = unpack_msg(p.hdr_buf)
            kind, seq, ops, runs = parse_header(head, self._region.nbytes if self._region else 0)
            if kind == "P":
                self._serve_pull(p, seq, ops, runs, head.get("src"))
        except Exception as exc:
            log.warning("peer %s sent a bad ucx header; dropping it: %s", p.conn.peer_id, exc)
            self._drop_peer(p, f"protocol error: {exc}")
            p.conn.close(f"protocol error: {exc}")
            return
        self._post_hdr(p)
        if kind == "P":
            return
        arr = self._arr
        assert arr is not None
        if kind == "r":
            sends = self._group(p)
            for r, (first, count) in enumerate(runs):
                off = ops[first][0]
                n = sum(op[1] for op in ops[first:first + count])
                self._send(p, arr[off:off + n], tag(K_RDATA, self._uid, seq, r), sends)
            self._send(p, pack_msg({}), tag(K_RDATA, self._uid, seq, ACK_OP), sends)
            return
        bad: list[int] = []
        failed: list[int] = []

        def got(first: int, count: int, r: Any) -> None:
            try:
                r.check_error()
            except Exception:
                failed.extend(range(first, first + count))
                return
            assert self._view is not None
            for j in range(first, first + count):
                off, n, cks = ops[j]
                dst = self._view[off:off + n]
                self._corrupter.maybe_corrupt(dst)
                if self.config.verify_checksums and cks is not None and checksum(dst) != cks:
                    bad.append(j)

        def done() -> None:
            if p.dead is None:
                reply = {"err": f"{len(failed)} receives failed"} if failed else {"bad": bad}
                self._send(p, pack_msg(reply), tag(K_ACK, self._uid, seq))

        recvs = self._group(p, done)
        for r, (first, count) in enumerate(runs):
            off = ops[first][0]
            n = sum(op[1] for op in ops[first:first + count])
            req = p.ep.tag_recv(self._Array(arr[off:off + n]), self._lib.UCXXTag(tag(K_DATA, p.uid, seq, r)))
            recvs.add(req, functools.partial(got, first, count))

    # -- peers (UCX thread) --
    def _add_peer(self, p: _Peer) -> None:
        addr = self._lib.UCXAddress.create_from_buffer(p.address)
        p.ep = self._worker.create_endpoint_from_worker_address(addr, False)
        if p.rkey_msg is not None and self._rma is not None:
            try:
                p.rkey = self._rma.unpack(int(p.ep.handle), p.rkey_msg[0], p.rkey_msg[1], p.nbytes)
            except Exception as exc:  # the tag path still works
                log.warning("peer %s: cannot unpack its rkey, using tagged messages: %s", p.conn.peer_id, exc)
        self._post_hdr(p)
        self._live.append(p)

    def _drop_peer(self, p: _Peer, reason: str) -> None:
        """Fail the peer's batches, forget its requests and close its endpoint."""
        if p.dead is None:
            p.dead = reason
        for b in list(p.batches):
            b.handle.fail_all(OpStatus.FAILED, f"peer {p.conn.peer_id} gone: {p.dead}")
            b.inflight = 0
            b.over = True
        p.batches.clear()
        p.reads.clear()
        if p in self._live:
            self._live.remove(p)
        dropped = [g for g in self._watch if g.peer is p]
        self._rma_waiting -= sum(1 for g in dropped for r in g.reqs[g.cursor:] if isinstance(r, _RmaReq))
        self._watch = [g for g in self._watch if g.peer is not p]
        if p.rkey is not None and self._rma is not None:
            key, p.rkey = p.rkey, None
            self._rma.destroy(key)
        if p.ep is not None:
            ep, p.ep = p.ep, None
            try:
                ep.close()
            except Exception as exc:
                log.debug("closing the endpoint of %s failed: %s", p.conn.peer_id, exc)
        self._notify()
