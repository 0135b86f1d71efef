"""``ucx``: UCX directly through ucxx's core (synchronous) API, host memory.

Data path: one UCX context and worker per transport. Peers exchange worker
addresses in the handshake (``pdx.transport.handshake``) and create endpoints
straight from them with UCX error handling off (the listener API runs over TCP
at a fraction of the speed; error handling off lets UCX use shared memory and
``cma``). Bytes move by tagged messages directly out of / into the registered
region, one message per run of ops contiguous on both sides (the data path is
``pdx.transport.ucx_engine``, the wire format ``pdx.transport.ucx_wire``):

* WRITE: a header (the ops' offsets in the peer's region, sizes, checksums),
  then the runs; the peer receives straight into its region, verifies the
  checksums it was given and acks once per batch listing the bad chunks
  (CORRUPT). Ops are DONE at the ack.
* READ: a header; the peer sends the runs, then an ack. We take each message as
  it arrives (probe, then receive straight into the region), so no receive is
  ever posted that a cancel could not take back: a cancelled or timed-out READ
  waits only for receives already under way (bounded), and later messages of
  that batch are drained into scratch memory. Ops are DONE (or CORRUPT) as their
  bytes land, so a peer dying mid-batch leaves the delivered ops DONE.

Who drives the worker (``_drive`` lock): ``post`` sends at once when the worker
is free (else it queues a command); the *UCX thread* does everything else: it
sleeps in epoll on the worker's event fd and an eventfd for commands (connect,
drop a peer, cancel), so an idle transport costs no CPU. (Driving the worker
from the thread that waits was measured slower here: the dedicated thread
wakes straight from epoll, the waiter had to hand the worker back and forth.) Since UCX error handling is off, dead peers
are detected by the side channel (heartbeats, closure): their in-flight ops end
FAILED and the endpoint closes.

Buffers: the region is the caller's; headers, acks and scratch buffers are ours
and live until their request completes.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import random
import select
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

from pdx.config import TransportConfig
from pdx.errors import BackendUnavailable, ConnectError, TransportError, WireError
from pdx.transport import ucx_env
from pdx.transport.base import (
    BatchHandle,
    ChunkOp,
    DebugCorrupter,
    MemoryKind,
    MemoryRegion,
    OpKind,
    OpStatus,
    PeerId,
    TransferHandle,
    Transport,
    check_ops,
    region_view,
)
from pdx.transport.handshake import Message, PeerConnection, SideChannel, SideChannelPeers
from pdx.transport.ucx_engine import UcxEngine, _Batch, _Group, _Peer, _stop
from pdx.transport.ucx_rma import Mapping, Rma, rma
from pdx.transport.ucx_wire import ID_BITS, OPS_PER_HDR

log = logging.getLogger("pdx.transport.ucx")

#: longest a cancel waits for a READ's receives already under way before dropping the peer.
STOP_WAIT_S = 2.0
#: epoll timeout of the idle UCX thread (it is woken by events; this only bounds shutdown).
IDLE_WAIT_S = 1.0
_INSTALL = "pip install 'pdx[ucx]'"


def load_ucxx() -> tuple[Any, Any]:
    """``(libucxx, Array)`` from ucxx's core API; ``BackendUnavailable`` with the install command."""
    ucx_env.prepare()  # before UCX loads: see pdx.transport.ucx_env
    try:
        from ucxx._lib import libucxx
        from ucxx._lib.arr import Array
    except ImportError as exc:
        raise BackendUnavailable(f"transport 'ucx' is unavailable ({exc}); install it with: {_INSTALL}") from exc
    return libucxx, Array


def make_worker(lib: Any) -> tuple[Any, Any]:
    """A UCX context (tag matching, RMA, wakeup) and a worker in blocking progress mode."""
    ctx = lib.UCXContext(config_dict={"WARN_UNUSED_ENV_VARS": "n"},
                         feature_flags=(lib.Feature.TAG, lib.Feature.RMA, lib.Feature.WAKEUP))
    worker = lib.UCXWorker(ctx)
    worker.init_blocking_progress_mode()
    return ctx, worker


class UcxTransport(SideChannelPeers, UcxEngine, Transport):
    """ucxx backend. Thread-safe; ``post`` returns at once (the UCX thread moves the bytes)."""

    name = "ucx"
    debug_corrupt = True

    def __init__(self, config: TransportConfig, fingerprint: str) -> None:
        super().__init__(config, fingerprint)
        self._lib, self._Array = load_ucxx()
        self._uid = random.getrandbits(ID_BITS)
        self._seq = 0
        self._cond = threading.Condition()
        self._drive = threading.Lock()  # held by whichever thread makes UCX calls
        self._efd = -1
        self._cmds: collections.deque[Callable[[], None]] = collections.deque()
        self._peers: dict[PeerId, _Peer] = {}
        self._live: list[_Peer] = []  # the UCX thread's own list of connected peers
        self._worker: Any = None
        self._watch: list[_Group] = []
        self._corrupter = DebugCorrupter(config.debug_corrupt_every)
        self._region: MemoryRegion | None = None
        self._view: memoryview | None = None
        self._arr: np.ndarray | None = None
        self._ctx: Any = None
        self._rma: Rma | None = None
        self._rma_waiting = 0
        self._mapping: Mapping | None = None
        if os.environ.get("PDX_UCX_RMA", "1") != "0":  # 0: tagged messages only (for comparison)
            try:
                self._rma = rma()
            except BackendUnavailable as exc:
                log.info("ucx: one-sided RMA unavailable, using tagged messages: %s", exc)
        self._closed = False
        self._broken = ""  # why the UCX thread stopped, once it did
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        started: Future[bytes] = Future()
        self._thread = threading.Thread(target=self._run, args=(started,), name="pdx-ucx", daemon=True)
        self._thread.start()
        try:
            self._address = started.result(timeout=30)
        except Exception as exc:
            os.close(self._wake)
            raise BackendUnavailable(f"transport 'ucx': cannot start a UCX worker: "
                                     f"{type(exc).__name__}: {exc}") from exc
        self._side = SideChannel(config, fingerprint, self.name, meta=self._meta,
                                 on_peer=self._on_peer, on_peer_dead=self._on_peer_dead)

    # -- Transport --
    def register(self, region: MemoryRegion) -> None:
        if self._region is not None:
            raise TransportError("a region is already registered")
        if region.kind is not MemoryKind.HOST:
            raise TransportError("the ucx backend moves host memory; use nixl or cuda_ipc for GPU memory")
        self._view = region_view(region)
        self._arr = np.frombuffer(self._view, dtype=np.uint8)
        if self._rma is not None and region.nbytes:
            rma_lib, addr = self._rma, self._arr.ctypes.data
            try:
                self._mapping = self._call(lambda: rma_lib.map(int(self._ctx.handle), addr, region.nbytes),
                                           self.config.connect_timeout_s)
            except Exception as exc:  # peers then use tagged messages into this region
                log.warning("ucx: cannot register the region for RMA, using tagged messages: %s", exc)
        self._region = region
        self._side.region_nbytes = region.nbytes

    def post(self, peer: PeerId, kind: OpKind, ops: Sequence[ChunkOp]) -> TransferHandle:
        kind = OpKind(kind)
        handle = BatchHandle(ops, self.config.transfer_timeout_s, on_stop=self._on_stop)
        if self._region is None or self._closed or self._broken:
            handle.fail_all(OpStatus.FAILED, self._broken or ("transport closed" if self._closed
                                                              else "no region registered"))
            return handle
        with self._cond:
            p = self._peers.get(peer)
        if p is None or p.dead is not None:
            handle.fail_all(OpStatus.FAILED, f"no live peer {peer!r}" + (f": {p.dead}" if p else ""))
            return handle
        bad = check_ops(handle.ops, self._region.nbytes, p.nbytes)
        for i, reason in bad.items():
            handle.complete(i, OpStatus.FAILED, reason)
        idxs = []
        for i, op in enumerate(handle.ops):
            if i in bad:
                continue
            if op.nbytes == 0 and kind is OpKind.READ:
                self._landed(handle, i)
            elif op.nbytes == 0:
                handle.complete(i, OpStatus.DONE)
            else:
                idxs.append(i)
        parts = [_Batch(handle, p, kind, idxs[s:s + OPS_PER_HDR]) for s in range(0, len(idxs), OPS_PER_HDR)]
        if not parts:
            return handle
        # the UCX thread is asleep: post from here rather than wake it (one handoff less)
        if self._drive.acquire(blocking=False):
            try:
                if self._worker is not None and not self._broken:
                    self._start_all(parts)
                    parts = []
                    # no arm/kick needed: anything pending leaves the worker's fd readable,
                    # which wakes the UCX thread (or the thread that waits drives it)
                    while self._worker.progress_once():
                        pass
            finally:
                self._drive.release()
        if parts:
            self._submit(functools.partial(self._start_all, parts))
        return handle

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
        self._side.close()  # peers die -> their batches fail
        self._submit(None)
        self._thread.join(10.0)
        os.close(self._wake)
        self._mapping = None  # unmapped by the UCX thread on its way out
        self._arr = None
        if self._view is not None:
            try:
                self._view.release()  # so the caller can close its shared memory
            except BufferError:
                pass
            self._view = None
        self._region = None

    # -- commands to the UCX thread --
    def _submit(self, fn: Callable[[], Any] | None) -> None:
        """Run ``fn`` on the UCX thread (None: stop it)."""
        with self._cond:
            self._cmds.append(fn if fn is not None else _stop)
            self._cond.notify_all()
        os.eventfd_write(self._wake, 1)

    def _call(self, fn: Callable[[], Any], timeout: float) -> Any:
        """Run ``fn`` on the UCX thread and return its result (``ConnectError`` after ``timeout``)."""
        fut: Future[Any] = Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)
        self._submit(run)
        try:
            return fut.result(timeout)
        except TimeoutError:
            raise ConnectError(f"the UCX thread did not answer within {timeout:g}s") from None

    # -- the UCX thread --
    def _run(self, started: Future[bytes]) -> None:
        try:
            ctx, worker = make_worker(self._lib)
            started.set_result(bytes(worker.address.tobytes()))
        except BaseException as exc:
            started.set_exception(exc)
            return
        self._worker = worker
        self._ctx = ctx
        self._efd = worker.epoll_file_descriptor
        poller = select.epoll()
        poller.register(self._efd, select.EPOLLIN)
        poller.register(self._wake, select.EPOLLIN)
        running = True
        try:
            while running:
                with self._drive:
                    running, busy = self._step()
                    armed = running and not busy and worker.arm()
                if armed:
                    for fd, _ in poller.poll(IDLE_WAIT_S):
                        if fd == self._wake:
                            try:
                                os.eventfd_read(self._wake)
                            except BlockingIOError:
                                pass
        except Exception as exc:
            log.exception("the UCX thread failed")
            self._broken = f"the UCX thread failed: {type(exc).__name__}: {exc}"
        finally:
            self._broken = self._broken or "transport closed"
            poller.close()
            for p in list(self._live):
                self._drop_peer(p, "transport closed")
            self._watch.clear()
            if self._mapping is not None and self._rma is not None:
                self._rma.unmap(int(ctx.handle), self._mapping)
            self._worker = None
            self._ctx = None
            del worker, ctx

    # -- cancel / timeout --
    def _on_stop(self, handle: BatchHandle, status: OpStatus) -> None:
        """Cancel/timeout. A WRITE's sends only read our memory: nothing to wait for. A READ
        takes no more messages into the region; receives under way finish (bounded wait,
        else the peer is dropped) so that no byte lands after this returns."""
        if self._closed:
            return
        found: Future[list[_Batch]] = Future()

        def mark() -> None:
            parts = []
            for p in self._live:
                for b in p.batches:
                    if b.handle is handle:
                        b.stopped = True
                        if b.inflight:
                            parts.append(b)
            found.set_result(parts)
        self._submit(mark)
        try:
            parts = found.result(STOP_WAIT_S)
        except TimeoutError:
            return
        if not parts:
            return
        with self._cond:
            done = self._cond.wait_for(lambda: all(b.inflight == 0 for b in parts), timeout=STOP_WAIT_S)
        if not done:
            peer = parts[0].peer
            reason = f"receives of a {status.value} READ did not finish within {STOP_WAIT_S:g}s"
            log.warning("peer %s: %s; dropping the peer", peer.conn.peer_id, reason)
            try:
                self._call(functools.partial(self._drop_peer, peer, reason), STOP_WAIT_S)
            except ConnectError:
                pass
            peer.conn.close(reason)

    # -- side-channel hooks --
    def _meta(self) -> Message:
        meta: Message = {"addr": self._address, "uid": self._uid}
        if self._mapping is not None:  # the peer may then put/get our region one-sidedly
            meta["rkey"] = self._mapping.rkey
            meta["raddr"] = self._mapping.address
            meta["pull"] = True  # we serve pull headers (we get from the peer's region)
        return meta

    def _on_peer(self, conn: PeerConnection) -> None:
        addr, uid = conn.meta.get("addr"), conn.meta.get("uid")
        if not isinstance(addr, bytes) or not isinstance(uid, int):
            raise WireError("the peer's ucx metadata is malformed")
        p = _Peer(conn, uid, addr, conn.info.region_nbytes)
        rkey, raddr = conn.meta.get("rkey"), conn.meta.get("raddr")
        if rkey is not None or raddr is not None:
            if not isinstance(rkey, bytes) or not isinstance(raddr, int) or raddr <= 0 or len(rkey) > 4096:
                raise WireError("the peer's ucx rkey is malformed")
            p.rkey_msg = (rkey, raddr)
        # it gets from our region only if it has our rkey (and a region of its own to get into)
        p.pulls = bool(conn.meta.get("pull")) and self._mapping is not None
        with self._cond:
            old = self._peers.get(conn.peer_id)
            clash = [q for q in self._peers.values() if q.uid == uid and q is not old]
        if clash:
            raise ConnectError(f"peer {conn.peer_id} drew the same ucx id as {clash[0].conn.peer_id}; retry")
        if old is not None:
            self._call(functools.partial(self._drop_peer, old, "replaced by a new connection"),
                       self.config.connect_timeout_s)
        self._call(functools.partial(self._add_peer, p), self.config.connect_timeout_s)
        with self._cond:
            self._peers[conn.peer_id] = p

    def _on_peer_dead(self, conn: PeerConnection, reason: str) -> None:
        with self._cond:
            p = self._peers.get(conn.peer_id)
            if p is None or p.conn is not conn:
                return
            del self._peers[conn.peer_id]
            p.dead = reason
        if self._thread.is_alive():
            self._submit(functools.partial(self._drop_peer, p, reason))
