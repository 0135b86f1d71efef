"""``cuda_ipc``: same-host GPU to GPU through CUDA IPC memory handles.

Data path: each side registers one GPU region (``MemoryKind.CUDA``: device
pointer + device); the handshake (``pdx.transport.handshake``) carries a CUDA IPC
handle of the allocation holding it, the region's offset inside that
allocation, the device and the host's boot id. Each side opens the other's
handle once (``cudaIpcOpenMemHandle``), so both can post. A batch is one
``cudaMemcpyAsync`` per run of contiguous ops on the transport's own stream and
one event recorded after them; nothing is staged through the host.

``post`` only enqueues the copies (CUDA calls that return at once) and never
blocks on them; ``wait``/``poll`` query the event (spinning briefly, then
sleeping in growing steps up to a millisecond). When the event has fired, READ
ops carrying a checksum are verified here (the bytes are copied to the host for
it); WRITE ops carrying one are verified by the receiver, asked over the side
channel once per batch (never per chunk). Copies already enqueued cannot be
taken back: a cancel or timeout waits for the event (bounded) before it returns.

CUDA is imported lazily (cuda-python's runtime bindings); without an NVIDIA
driver or GPU, creating the backend raises ``BackendUnavailable`` with the exact
reason. A peer that dies is noticed by the side channel; its mapping is closed
once no copy of ours uses it any more.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pdx.checksum import checksum
from pdx.config import TransportConfig
from pdx.errors import BackendUnavailable, ConnectError, TransportError, WireError
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
)
from pdx.transport.handshake import Message, PeerConnection, SideChannel, SideChannelPeers

log = logging.getLogger("pdx.transport.cuda_ipc")

NO_CUDA = "CUDA not available: no NVIDIA driver/GPU on this host"
#: longest a cancel waits for enqueued copies to finish before it gives up (and logs).
STOP_WAIT_S = 10.0
#: ops per "landed" side-channel message.
OPS_PER_MESSAGE = 8192


def load_cuda() -> Any:
    """cuda-python's runtime module, after checking that a GPU is usable.

    Raises ``BackendUnavailable``: ``NO_CUDA`` without a driver or device, or the
    install command without cuda-python.
    """
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # older cuda-python
        except ImportError as exc:
            raise BackendUnavailable(f"transport 'cuda_ipc' is unavailable ({exc}); install it with: "
                                     "pip install cuda-python (and a CUDA build of torch)") from exc
    try:
        err, count = runtime.cudaGetDeviceCount()
    except Exception as exc:  # the driver library itself is missing
        raise BackendUnavailable(f"{NO_CUDA} ({type(exc).__name__})") from exc
    if int(err) != 0 or not count:
        raise BackendUnavailable(f"{NO_CUDA} (cudaGetDeviceCount: {_name(err)}, {count or 0} devices)")
    return runtime


def _name(err: Any) -> str:
    return getattr(err, "name", str(err))


class Cuda:
    """The few CUDA runtime calls pdx needs, raising ``TransportError`` on failure. Thread-safe."""

    def __init__(self, runtime: Any, device: int) -> None:
        self.rt = runtime
        self.device = device
        self.use()
        self.call("cudaFree", 0)  # make the primary context current
        self.stream = self.call("cudaStreamCreateWithFlags", runtime.cudaStreamNonBlocking)

    def call(self, fn: str, *args: Any) -> Any:
        out = getattr(self.rt, fn)(*args)
        err, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
        if int(err) != 0:
            raise TransportError(f"{fn} failed: {_name(err)}")
        return rest[0] if len(rest) == 1 else rest or None

    def use(self) -> None:
        """Make our device current in the calling thread (the runtime's device is per thread)."""
        self.call("cudaSetDevice", self.device)

    def export(self, ptr: int) -> tuple[bytes, int]:
        """(IPC handle of the allocation holding ``ptr``, offset of ``ptr`` in it)."""
        from cuda.bindings import driver

        err, base, _size = driver.cuMemGetAddressRange(ptr)
        if int(err) != 0:
            raise TransportError(f"cuMemGetAddressRange failed: {_name(err)}")
        handle = self.call("cudaIpcGetMemHandle", int(base))
        return bytes(handle.reserved), ptr - int(base)

    def open(self, handle: bytes) -> int:
        h = self.rt.cudaIpcMemHandle_t()
        h.reserved = handle
        return int(self.call("cudaIpcOpenMemHandle", h, self.rt.cudaIpcMemLazyEnablePeerAccess))

    def close_mapping(self, ptr: int) -> None:
        self.call("cudaIpcCloseMemHandle", ptr)

    def copy(self, dst: int, src: int, n: int) -> None:
        self.call("cudaMemcpyAsync", dst, src, n, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self.stream)

    def record(self) -> Any:
        event = self.call("cudaEventCreateWithFlags", self.rt.cudaEventDisableTiming)
        self.call("cudaEventRecord", event, self.stream)
        return event

    def ready(self, event: Any) -> bool:
        err = self.rt.cudaEventQuery(event)[0]
        if int(err) == 0:
            return True
        if err == self.rt.cudaError_t.cudaErrorNotReady:
            return False
        raise TransportError(f"cudaEventQuery failed: {_name(err)}")

    def free_event(self, event: Any) -> None:
        self.rt.cudaEventDestroy(event)

    def to_host(self, ptr: int, n: int) -> bytes:
        import numpy as np

        out = np.empty(max(1, n), dtype=np.uint8)
        if n:
            self.call("cudaMemcpy", out.ctypes.data, ptr, n, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost)
        return out[:n].tobytes()

    def from_host(self, ptr: int, data: bytes | bytearray | memoryview) -> None:
        import numpy as np

        src = np.frombuffer(data, dtype=np.uint8)
        if src.nbytes:
            self.call("cudaMemcpy", ptr, src.ctypes.data, src.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice)

    def alloc(self, n: int) -> int:
        """``cudaMalloc`` (for tests and benches that need a GPU region without torch)."""
        return int(self.call("cudaMalloc", max(1, n)))

    def free(self, ptr: int) -> None:
        self.call("cudaFree", ptr)

    def flip_byte(self, ptr: int) -> None:
        """Testing only (``debug_corrupt_every``): invert one byte in device memory."""
        import numpy as np

        b = np.empty(1, dtype=np.uint8)
        self.call("cudaMemcpy", b.ctypes.data, ptr, 1, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost)
        b ^= 0xFF
        self.call("cudaMemcpy", ptr, b.ctypes.data, 1, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice)


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


@dataclass(eq=False)
class _Peer:
    conn: PeerConnection
    ptr: int  # the peer's region, mapped here
    mapping: int  # what cudaIpcOpenMemHandle returned (0: same process, nothing to close)
    nbytes: int
    wants_landed: bool
    dead: str | None = None
    busy: int = 0  # our batches whose copies touch the mapping


@dataclass(eq=False)
class _Batch:
    handle: _IpcHandle
    peer: _Peer
    kind: OpKind
    idxs: list[int]
    event: Any = None
    finished: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class _IpcHandle(BatchHandle):
    """Completion is observed by whoever waits or polls: the event is queried there."""

    def __init__(self, owner: CudaIpcTransport, ops: Sequence[ChunkOp], default_timeout: float) -> None:
        super().__init__(ops, default_timeout, on_stop=owner._on_stop, on_wait=owner._on_wait)
        self.owner = owner
        self.batch: _Batch | None = None

    def poll(self) -> TransferState:
        if self.batch is not None:
            self.owner._check(self.batch)
        return super().poll()


class CudaIpcTransport(SideChannelPeers, Transport):
    """CUDA IPC backend for GPU regions of processes on one host. Thread-safe."""

    name = "cuda_ipc"
    debug_corrupt = True

    def __init__(self, config: TransportConfig, fingerprint: str) -> None:
        super().__init__(config, fingerprint)
        self._rt = load_cuda()
        self._cuda: Cuda | None = None
        self._region: MemoryRegion | None = None
        self._export: tuple[bytes, int] = (b"", 0)
        self._lock = threading.Lock()
        self._peers: dict[PeerId, _Peer] = {}
        self._corrupter = DebugCorrupter(config.debug_corrupt_every)
        self._closed = False
        self._side = SideChannel(config, fingerprint, self.name, meta=self._meta,
                                 on_peer=self._on_peer, on_peer_dead=self._on_peer_dead)
        self._side.on("cuda_ipc.landed", self._on_landed)

    # -- Transport --
    def register(self, region: MemoryRegion) -> None:
        if self._region is not None:
            raise TransportError("a region is already registered")
        if region.kind is not MemoryKind.CUDA or not region.ptr:
            raise TransportError("cuda_ipc moves GPU memory: register a MemoryKind.CUDA region with its ptr")
        self._cuda = Cuda(self._rt, int(region.device))
        self._export = self._cuda.export(int(region.ptr))
        self._region = region
        self._side.region_nbytes = region.nbytes

    def post(self, peer: PeerId, kind: OpKind, ops: Sequence[ChunkOp]) -> TransferHandle:
        kind = OpKind(kind)
        handle = _IpcHandle(self, ops, self.config.transfer_timeout_s)
        cuda, region = self._cuda, self._region
        if cuda is None or region is None or self._closed:
            handle.fail_all(OpStatus.FAILED, "transport closed" if self._closed else "no region registered")
            return handle
        with self._lock:
            p = self._peers.get(peer)
            if p is not None and p.dead is None:
                p.busy += 1
        if p is None or p.dead is not None:
            handle.fail_all(OpStatus.FAILED, f"no live peer {peer!r}" + (f": {p.dead}" if p else ""))
            return handle
        bad = check_ops(handle.ops, region.nbytes, p.nbytes)
        for i, reason in bad.items():
            handle.complete(i, OpStatus.FAILED, reason)
        batch = _Batch(handle, p, kind, [i for i in range(len(handle.ops)) if i not in bad])
        try:
            cuda.use()
            local = int(region.ptr)
            for lo, ro, n in _runs(handle.ops, batch.idxs):
                dst, src = (p.ptr + ro, local + lo) if kind is OpKind.WRITE else (local + lo, p.ptr + ro)
                cuda.copy(dst, src, n)
            batch.event = cuda.record()
        except TransportError as exc:
            for i in batch.idxs:
                handle.complete(i, OpStatus.FAILED, str(exc))
            batch.finished = True
            self._release_peer(p)
            return handle
        handle.batch = batch
        return handle

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._side.close()
        if self._cuda is not None:
            try:
                self._cuda.use()
                self._cuda.call("cudaStreamSynchronize", self._cuda.stream)
            except TransportError as exc:
                log.warning("cuda_ipc close: %s", exc)
        with self._lock:
            peers = list(self._peers.values())
            self._peers.clear()
        for p in peers:
            self._unmap(p)

    # -- completion --
    def _check(self, b: _Batch) -> bool:
        """Finish ``b`` if its event fired; True once finished. Any thread; runs the tail once."""
        if b.finished:
            return True
        assert self._cuda is not None
        with b.lock:
            if b.finished:
                return True
            try:
                self._cuda.use()
                if not self._cuda.ready(b.event):
                    return False
            except TransportError as exc:
                for i in b.idxs:
                    b.handle.complete(i, OpStatus.FAILED, str(exc))
            else:
                self._landed(b)
            b.finished = True
            self._cuda.free_event(b.event)
        self._release_peer(b.peer)
        return True

    def _on_wait(self, handle: BatchHandle, deadline: float) -> None:
        b = getattr(handle, "batch", None)
        if b is not None:
            self._await(b, deadline)

    def _await(self, b: _Batch, deadline: float) -> None:
        """Wait for ``b``'s event until ``deadline``: spin briefly, then sleep in growing steps."""
        nap = 0.0
        while not self._check(b):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(nap, left))
            nap = min(0.001, nap * 2 or 0.00002)

    def _landed(self, b: _Batch) -> None:
        h = b.handle
        if b.kind is OpKind.READ:
            assert self._cuda is not None and self._region is not None
            for i in b.idxs:
                op = h.ops[i]
                ptr = int(self._region.ptr) + op.local_offset
                if op.nbytes and self._corrupt_hit():
                    self._cuda.flip_byte(ptr + op.nbytes // 2)
                if (self.config.verify_checksums and op.checksum is not None
                        and checksum(self._cuda.to_host(ptr, op.nbytes)) != op.checksum):
                    h.complete(i, OpStatus.CORRUPT, "checksum mismatch after the read")
                else:
                    h.complete(i, OpStatus.DONE)
            return
        waiting = {i for i in b.idxs if h.ops[i].checksum is not None and h.ops[i].nbytes}
        for i in b.idxs:
            if i not in waiting:
                h.complete(i, OpStatus.DONE)
        if not waiting and not b.peer.wants_landed:
            return
        for start in range(0, len(b.idxs), OPS_PER_MESSAGE):
            part = b.idxs[start:start + OPS_PER_MESSAGE]
            body = {"ops": [[h.ops[i].remote_offset, h.ops[i].nbytes, h.ops[i].checksum] for i in part]}
            try:
                if not any(h.ops[i].checksum is not None for i in part):
                    b.peer.conn.send("cuda_ipc.landed", body)
                    continue
                fut = b.peer.conn.request_async("cuda_ipc.landed", body)
            except ConnectError as exc:
                for i in part:
                    h.complete(i, OpStatus.FAILED, str(exc))
                continue
            fut.add_done_callback(functools.partial(_landed_reply, h, part))

    def _on_landed(self, conn: PeerConnection, body: Message) -> Message:
        """A peer's WRITE batch landed in our region: debug corruption and checksum checks."""
        ops, region, cuda = body.get("ops"), self._region, self._cuda
        if not isinstance(ops, list) or region is None or cuda is None:
            raise WireError("cuda_ipc.landed without ops, or no region here")
        cuda.use()
        bad = []
        for j, op in enumerate(ops):
            if (not isinstance(op, list) or len(op) != 3 or not all(isinstance(x, int) for x in op[:2])
                    or op[0] < 0 or op[1] < 0 or op[0] + op[1] > region.nbytes):
                raise WireError(f"cuda_ipc.landed op {op!r} is malformed or outside the region")
            off, n, cks = op
            ptr = int(region.ptr) + off
            if n and self._corrupt_hit():
                cuda.flip_byte(ptr + n // 2)
            if self.config.verify_checksums and isinstance(cks, int) and checksum(cuda.to_host(ptr, n)) != cks:
                bad.append(j)
        return {"bad": bad}

    def _corrupt_hit(self) -> bool:
        """``debug_corrupt_every`` for device chunks: True for every Nth chunk received (the
        shared counter flips a scratch byte; the caller flips the device byte)."""
        return self._corrupter.maybe_corrupt(memoryview(bytearray(1)))

    # -- cancel / timeout --
    def _on_stop(self, handle: BatchHandle, status: OpStatus) -> None:
        """Enqueued copies cannot be recalled: wait (bounded) until they are done."""
        b = getattr(handle, "batch", None)
        if b is None:
            return
        self._await(b, time.monotonic() + STOP_WAIT_S)
        if not b.finished:
            log.warning("cuda_ipc copies still running %gs after %s", STOP_WAIT_S, status.value)

    # -- peers --
    def _meta(self) -> Message:
        region = self._region
        handle, offset = self._export
        return {"handle": handle, "offset": offset, "ptr": int(region.ptr) if region else 0,
                "device": int(region.device) if region else 0, "pid": os.getpid(), "boot": _boot_id(),
                "landed": self._corrupter.every > 0}

    def _on_peer(self, conn: PeerConnection) -> None:
        m = conn.meta
        handle, offset, ptr, pid = m.get("handle"), m.get("offset"), m.get("ptr"), m.get("pid")
        if not isinstance(handle, bytes) or not isinstance(offset, int) or not isinstance(ptr, int) \
                or not isinstance(pid, int):
            raise WireError("the peer's cuda_ipc metadata is malformed")
        if m.get("boot") != _boot_id():
            raise ConnectError(f"peer {conn.peer_id} runs on another host: CUDA IPC needs both on one "
                               "host (use nixl across hosts)")
        assert self._cuda is not None
        self._cuda.use()
        if pid == os.getpid():
            mapped, mapping = ptr, 0  # same process: the pointer is valid here as it is
        else:
            try:
                mapping = self._cuda.open(handle)
            except TransportError as exc:
                raise ConnectError(f"cannot map the GPU region of peer {conn.peer_id}: {exc}") from exc
            mapped = mapping + offset
        with self._lock:
            old = self._peers.get(conn.peer_id)
            self._peers[conn.peer_id] = _Peer(conn, mapped, mapping, conn.info.region_nbytes,
                                              bool(m.get("landed")))
        if old is not None:
            self._retire(old, "replaced by a new connection")

    def _on_peer_dead(self, conn: PeerConnection, reason: str) -> None:
        with self._lock:
            p = self._peers.get(conn.peer_id)
            if p is None or p.conn is not conn:
                return
            del self._peers[conn.peer_id]
        self._retire(p, reason)

    def _retire(self, p: _Peer, reason: str) -> None:
        with self._lock:
            p.dead = reason
            idle = p.busy == 0
        if idle:
            self._unmap(p)

    def _release_peer(self, p: _Peer) -> None:
        with self._lock:
            p.busy -= 1
            idle = p.busy == 0 and p.dead is not None
        if idle:
            self._unmap(p)

    def _unmap(self, p: _Peer) -> None:
        if p.mapping and self._cuda is not None:
            mapping, p.mapping = p.mapping, 0
            try:
                self._cuda.use()
                self._cuda.close_mapping(mapping)
            except TransportError as exc:
                log.debug("closing the IPC mapping of %s failed: %s", p.conn.peer_id, exc)


def _landed_reply(h: BatchHandle, part: list[int], fut: Any) -> None:
    exc = fut.exception()
    if exc is not None:
        for i in part:
            h.complete(i, OpStatus.FAILED, f"the receiver did not confirm the write: {exc}")
        return
    bad = set(fut.result().get("bad") or ())
    for j, i in enumerate(part):
        h.complete(i, OpStatus.CORRUPT if j in bad else OpStatus.DONE,
                   "the receiver's checksum did not match" if j in bad else "")


def _runs(ops: Sequence[ChunkOp], idxs: list[int]) -> list[tuple[int, int, int]]:
    """Runs of consecutive ops contiguous on both sides, one copy each: (local, remote, nbytes)."""
    runs: list[tuple[int, int, int]] = []
    for i in idxs:
        op = ops[i]
        if not op.nbytes:
            continue
        if runs:
            lo, ro, n = runs[-1]
            if lo + n == op.local_offset and ro + n == op.remote_offset:
                runs[-1] = (lo, ro, n + op.nbytes)
                continue
        runs.append((op.local_offset, op.remote_offset, op.nbytes))
    return runs
