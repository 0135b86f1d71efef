"""``nixl``: NIXL agents over the UCX backend (host memory here, GPU memory where CUDA exists).

Data path: one NIXL agent per transport, its whole region registered once.
The handshake (``pdx.transport.handshake``) carries the agent metadata, the
region's base address, device and memory kind (plain msgpack fields: NIXL's own
descriptor serialisation pickles, so it is not used); each side loads the
other's metadata (``add_remote_agent``) before the peer is usable, so both
sides can post. A batch becomes as few NIXL transfers as possible: every op is
one descriptor (ops over ``JOB_BYTES`` are split), descriptors are grouped into
*jobs* of up to ``JOB_BYTES`` and each job is one ``initialize_xfer`` +
``transfer``. Jobs bound the granularity of cancel, timeout and partial results
(a peer that dies mid-batch leaves the finished jobs' ops DONE).

Settings: no NIXL progress thread (it busy-spins) and UCX error handling off
(``ucx_error_handling_mode: none``), which lets UCX use ``cma`` and shared
memory on one host (there ``transfer`` copies synchronously, GIL released).
Who drives NIXL: the thread that waits for a batch runs its queued jobs itself
(no thread handoff on the post-then-wait path); an executor thread takes jobs
nobody claimed within ``GRACE_S`` (or at once when ``poll`` is called), polls
transfers an asynchronous backend (RDMA, GPU) left in progress, and when idle
lets the agent progress every ``IDLE_PROGRESS_S`` for UCX transports that need
target-side progress. Since UCX does not detect dead peers in this mode, the
side channel's heartbeats and socket closure do: the peer's in-flight ops end
FAILED within a few heartbeats.

Receiver side: WRITE ops carrying a checksum are verified by the receiver, asked
over the side channel with one request per batch (never per chunk); its reply
names the chunks that do not match (CORRUPT). A receiver that applies
``debug_corrupt_every`` asks (in its handshake metadata) for a one-way message
per landed batch; otherwise a WRITE costs no message at all, since the agents
tell each other about landed chunks on their own control plane. READ ops
carrying a checksum are verified here once they landed.

Threads: ``post`` only queues (never blocks on I/O). All agent calls hold one
lock (the agent is created without thread synchronisation of its own).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from pdx.checksum import checksum
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
    TransferState,
    Transport,
    check_ops,
    region_view,
)
from pdx.transport.handshake import Message, PeerConnection, SideChannel, SideChannelPeers
from pdx.transport.nixl_jobs import NixlJobs, _Batch, _describe, _Job, _Peer

log = logging.getLogger("pdx.transport.nixl")

#: longest a cancel waits for a running NIXL transfer to stop touching the ops' memory.
STOP_WAIT_S = 10.0
#: ops per "landed" side-channel message (keeps frames far below the control frame limit).
OPS_PER_MESSAGE = 8192

_UCX_PARAMS = {"ucx_error_handling_mode": "none"}
_INSTALL = "pip install 'pdx[nixl]' && pip install --no-deps nixl==1.5.1"


def load_nixl() -> Any:
    """The NIXL Python API module (``nixl._api``, else ``nixl_cu12._api``).

    Raises ``BackendUnavailable`` with the install command when neither imports.
    """
    ucx_env.prepare()  # before UCX loads: see pdx.transport.ucx_env
    errors = []
    for name in ("nixl._api", "nixl_cu12._api"):
        try:
            module = __import__(name, fromlist=["nixl_agent"])
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
            continue
        nixl_log = logging.getLogger("nixl")
        if nixl_log.level < logging.WARNING:
            nixl_log.setLevel(logging.WARNING)  # its INFO lines go to stdout
        return module
    raise BackendUnavailable(f"transport 'nixl' is unavailable ({'; '.join(errors)}); "
                             f"install it with: {_INSTALL}")


def make_agent(api: Any, name: str) -> Any:
    """A NIXL agent with the fast, stable settings: no progress thread, UCX without error handling."""
    agent = api.nixl_agent(name, api.nixl_agent_config(enable_prog_thread=False, backends=[]))
    agent.create_backend("UCX", dict(_UCX_PARAMS))
    return agent

class _Handle(BatchHandle):
    """A batch handle whose ``wait`` runs the batch's queued jobs itself (``on_wait``) and
    whose ``poll`` wakes the executor, so a batch nobody waits for starts at once."""

    def __init__(self, owner: NixlTransport, ops: Sequence[ChunkOp], default_timeout: float) -> None:
        super().__init__(ops, default_timeout, on_stop=owner._on_stop, on_wait=owner._help)
        self._owner = owner

    def poll(self) -> TransferState:
        state = super().poll()
        if state is TransferState.PENDING:
            self._owner._kick()
        return state


class NixlTransport(SideChannelPeers, NixlJobs, Transport):
    """NIXL backend. Thread-safe; ``post`` returns at once (the executor thread moves the bytes)."""

    name = "nixl"
    debug_corrupt = True

    def __init__(self, config: TransportConfig, fingerprint: str) -> None:
        super().__init__(config, fingerprint)
        self._api = load_nixl()
        self._side = SideChannel(config, fingerprint, self.name, meta=self._meta,
                                 on_peer=self._on_peer, on_peer_dead=self._on_peer_dead)
        self._side.on("nixl.landed", self._on_landed)
        self._agent_name = str(self._side.peer_id)
        try:
            self._agent = make_agent(self._api, self._agent_name)
        except Exception as exc:  # NIXL raises its own types (or RuntimeError) on a broken install
            raise BackendUnavailable(f"transport 'nixl': cannot create a NIXL agent with the UCX "
                                     f"backend: {type(exc).__name__}: {exc}") from exc
        self._alock = threading.RLock()  # every agent call
        self._cond = threading.Condition()  # queue, batches, peers
        self._queue: list[_Job] = []
        self._adopt: list[_Job] = []  # in progress, started by a waiting thread
        self._batches: dict[int, _Batch] = {}
        self._peers: dict[PeerId, _Peer] = {}
        self._corrupter = DebugCorrupter(config.debug_corrupt_every)
        self._region: MemoryRegion | None = None
        self._reg: Any = None
        self._base = 0
        self._mem = "DRAM"
        self._view: memoryview | None = None
        self._cuda: Any = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="pdx-nixl-xfer", daemon=True)
        self._thread.start()

    # -- Transport --
    def register(self, region: MemoryRegion) -> None:
        if self._region is not None:
            raise TransportError("a region is already registered")
        if region.kind is MemoryKind.HOST:
            view = region_view(region)
            arr = np.frombuffer(view, dtype=np.uint8)
            base, mem = int(arr.ctypes.data), "DRAM"
            del arr
            self._view = view
        else:
            if not region.ptr:
                raise ValueError("a CUDA region needs its device pointer in MemoryRegion.ptr")
            from pdx.transport.cuda_ipc import Cuda, load_cuda

            self._cuda = Cuda(load_cuda(), int(region.device))  # checksums of GPU chunks
            base, mem = int(region.ptr), "VRAM"
        if region.nbytes > 0:
            try:
                with self._alock:
                    self._reg = self._agent.register_memory(
                        [(base, region.nbytes, int(region.device), "")], mem)
            except Exception as exc:
                raise TransportError(f"NIXL could not register {region.nbytes} bytes of "
                                     f"{mem}: {type(exc).__name__}: {exc}") from exc
        self._base, self._mem, self._region = base, mem, region
        self._side.region_nbytes = region.nbytes

    def post(self, peer: PeerId, kind: OpKind, ops: Sequence[ChunkOp]) -> TransferHandle:
        kind = OpKind(kind)
        handle = _Handle(self, ops, self.config.transfer_timeout_s)
        if self._region is None or self._closed:
            handle.fail_all(OpStatus.FAILED, "transport closed" if self._closed else "no region registered")
            return handle
        with self._cond:
            p = self._peers.get(peer)
        if p is None or p.dead is not None:
            handle.fail_all(OpStatus.FAILED, f"no live peer {peer!r}" + (f": {p.dead}" if p else ""))
            return handle
        bad = check_ops(handle.ops, self._region.nbytes, p.nbytes)
        for i, reason in bad.items():
            handle.complete(i, OpStatus.FAILED, reason)
        batch = _Batch(handle, p, kind, [0] * len(handle.ops))
        jobs = self._plan(batch, [i for i in range(len(handle.ops)) if i not in bad])
        if not jobs:
            return handle
        now = time.monotonic()
        for job in jobs:
            job.queued = now
        with self._cond:
            if p.dead is not None or self._closed:
                handle.fail_all(OpStatus.FAILED, p.dead or "transport closed")
                return handle
            self._batches[id(handle)] = batch
            self._queue.extend(jobs)
            # no notify: the thread that waits runs the jobs (see _Handle); the executor
            # takes those nobody claims on its next round (poll() wakes it at once)
        return handle

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            queued, self._queue = self._queue, []
            self._cond.notify_all()
        for job in queued:
            job.batch.handle.fail_all(OpStatus.FAILED, "transport closed")
        self._side.close()  # peers die -> their batches fail
        self._thread.join(STOP_WAIT_S)
        with self._cond:
            batches = list(self._batches.values())
            self._batches.clear()
            peers = list(self._peers.values())
            self._peers.clear()
        for b in batches:
            b.handle.fail_all(OpStatus.FAILED, "transport closed")
        with self._alock:
            for p in peers:
                self._forget_agent(p.agent)
            if self._reg is not None:
                try:
                    self._agent.deregister_memory(self._reg)
                except Exception as exc:
                    log.warning("NIXL deregistration failed: %s", exc)
                self._reg = None
        if self._view is not None:
            try:
                self._view.release()  # so the caller can close its shared memory
            except BufferError:
                pass
            self._view = None
        self._region = None
    def _finish_op(self, batch: _Batch, i: int) -> None:
        """An op's bytes are in place: READs are verified here, WRITEs by the receiver."""
        op = batch.handle.ops[i]
        if batch.kind is OpKind.WRITE:
            if op.checksum is None or op.nbytes == 0:
                batch.handle.complete(i, OpStatus.DONE)
            return  # completed by the receiver's reply in _notify_landed
        if self._received(op.local_offset, op.nbytes, op.checksum):
            batch.handle.complete(i, OpStatus.DONE)
        else:
            batch.handle.complete(i, OpStatus.CORRUPT, "checksum mismatch after the read")

    def _received(self, off: int, n: int, cks: int | None) -> bool:
        """Bytes landed at our ``[off, off+n)``: debug corruption, then their checksum if given
        (and ``verify_checksums``). True when they match. Host or GPU region."""
        verify = self.config.verify_checksums and cks is not None
        if self._view is not None:
            dst = self._view[off:off + n]
            self._corrupter.maybe_corrupt(dst)
            return not verify or checksum(dst) == cks
        cuda = self._cuda
        if cuda is None:
            return True
        cuda.use()
        if n and self._corrupter.maybe_corrupt(memoryview(bytearray(1))):  # counts device chunks too
            cuda.flip_byte(self._base + off + n // 2)
        return not verify or checksum(cuda.to_host(self._base + off, n)) == cks

    # -- receiver notification (one message per batch) --
    def _notify_landed(self, batch: _Batch) -> None:
        """Tell the receiver which ranges landed; ops with checksums wait for its verdict."""
        h, conn = batch.handle, batch.peer.conn
        landed = sorted(batch.landed)
        for start in range(0, len(landed), OPS_PER_MESSAGE):
            part = landed[start:start + OPS_PER_MESSAGE]
            waiting = [i for i in part if not h.is_final(i)]
            if not waiting and not batch.peer.wants_landed:
                continue
            body = {"ops": [[h.ops[i].remote_offset, h.ops[i].nbytes, h.ops[i].checksum] for i in part]}
            try:
                if not waiting:
                    conn.send("nixl.landed", body)
                    continue
                fut = conn.request_async("nixl.landed", body)
            except ConnectError as exc:
                for i in waiting:
                    h.complete(i, OpStatus.FAILED, str(exc))
                continue
            fut.add_done_callback(functools.partial(self._landed_reply, h, part))

    @staticmethod
    def _landed_reply(h: BatchHandle, part: list[int], fut: Any) -> None:
        exc = fut.exception()
        if exc is not None:
            for i in part:
                h.complete(i, OpStatus.FAILED, f"the receiver did not confirm the write: {exc}")
            return
        reply = fut.result()
        bad = set(reply.get("bad") or ())
        for j, i in enumerate(part):
            if j in bad:
                h.complete(i, OpStatus.CORRUPT, "the receiver's checksum did not match")
            else:
                h.complete(i, OpStatus.DONE)

    def _on_landed(self, conn: PeerConnection, body: Message) -> Message:
        """A peer's WRITE batch landed in our region: debug corruption and checksum checks."""
        ops = body.get("ops")
        size = self._region.nbytes if self._region is not None else 0
        if not isinstance(ops, list):
            raise WireError("nixl.landed without ops")
        bad = []
        for j, op in enumerate(ops):
            if (not isinstance(op, list) or len(op) != 3 or not isinstance(op[0], int)
                    or not isinstance(op[1], int) or op[0] < 0 or op[1] < 0 or op[0] + op[1] > size):
                raise WireError(f"nixl.landed op {op!r} is malformed or outside the region")
            off, n, cks = op
            if not self._received(off, n, cks if isinstance(cks, int) else None):
                bad.append(j)
        return {"bad": bad}

    # -- cancel / timeout --
    def _on_stop(self, handle: BatchHandle, status: OpStatus) -> None:
        """Called by the handle on cancel/timeout: wait until no NIXL transfer of it runs."""
        with self._cond:
            batch = self._batches.get(id(handle))
            if batch is None:
                return
            batch.stopped = True
            self._drop_queued(lambda b: b is batch)
            ok = self._cond.wait_for(lambda: batch.running == 0, timeout=STOP_WAIT_S)
        if not ok:
            log.warning("a NIXL transfer did not stop within %gs after %s", STOP_WAIT_S, status.value)

    # -- side-channel hooks --
    def _meta(self) -> Message:
        with self._alock:
            md = self._agent.get_agent_metadata()
        region = self._region
        return {"agent": self._agent_name, "md": md, "base": self._base, "mem": self._mem,
                "device": int(region.device) if region is not None else 0,
                "landed": self._corrupter.every > 0}

    def _on_peer(self, conn: PeerConnection) -> None:
        m = conn.meta
        agent, md, base = m.get("agent"), m.get("md"), m.get("base")
        mem, device, wants = m.get("mem"), m.get("device"), bool(m.get("landed"))
        if (not isinstance(agent, str) or not isinstance(md, bytes) or not isinstance(base, int)
                or mem not in ("DRAM", "VRAM") or not isinstance(device, int)):
            raise WireError("the peer's nixl metadata is malformed")
        with self._alock:
            with self._cond:
                old = self._peers.get(conn.peer_id)
            if old is not None:
                self._forget_agent(old.agent)
            try:
                name = self._agent.add_remote_agent(md)
            except Exception as exc:
                raise ConnectError(f"NIXL rejected the metadata of peer {conn.peer_id}: "
                                   f"{_describe(exc)}") from exc
            if isinstance(name, bytes):
                name = name.decode()
            if name != agent:
                self._forget_agent(name)
                raise WireError(f"the peer's NIXL agent is {name!r}, not {agent!r} as announced")
            try:
                self._agent.make_connection(name)
            except Exception as exc:
                log.debug("NIXL make_connection to %s failed (the first transfer connects): %s",
                          name, exc)
        with self._cond:
            self._peers[conn.peer_id] = _Peer(conn, agent, base, conn.info.region_nbytes, mem, device, wants)

    def _on_peer_dead(self, conn: PeerConnection, reason: str) -> None:
        with self._cond:
            p = self._peers.get(conn.peer_id)
            if p is None or p.conn is not conn:
                return
            del self._peers[conn.peer_id]
            p.dead = reason
            batches = [b for b in self._batches.values() if b.peer is p]
            self._drop_queued(lambda b: b.peer is p)
            self._cond.notify_all()
        for b in batches:
            b.handle.fail_all(OpStatus.FAILED, f"peer {conn.peer_id} gone: {reason}")
        with self._alock:
            self._forget_agent(p.agent)

    def _forget_agent(self, name: str) -> None:
        try:
            self._agent.remove_remote_agent(name)
        except Exception as exc:
            log.debug("NIXL remove_remote_agent(%s) failed: %s", name, exc)
