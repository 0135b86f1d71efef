"""The ``Transport`` interface: move chunk bytes between two agents' registered memory.

A transport knows nothing of keys or the store. The agent registers one memory
region (its pool; on GPUs a staging buffer), listens for peers, connects to a
peer by address, and posts batches of ``ChunkOp``s: byte ranges between its
region and the peer's. Every backend does the same handshake first (see
``pdx.transport.handshake``): wire version, layout fingerprint, optional
shared-secret challenge, then backend metadata (NIXL agent metadata, UCX worker
address, shm name, CUDA IPC handles).

Threading: a ``Transport`` is safe to use from several threads; ``post`` never
blocks on the network (it queues and returns a handle); ``TransferHandle.wait``
blocks up to its timeout. Buffers: the caller owns the registered region and
must keep it alive until ``close()``; ops must not overlap a range that another
in-flight op writes.

Errors: connecting raises ``ConnectError``/``PeerIncompatible``/``AuthError``;
a batch never raises for a per-chunk failure: ``BatchResult`` lists which ops
completed and why the others failed (partial results are data). ``wait``
raises ``TransferTimeout`` only when asked to (``raise_on_timeout``), otherwise
reports the unfinished ops as timed out and cancels them.
"""

from __future__ import annotations

import abc
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import ClassVar, NewType

from pdx.config import TransportConfig
from pdx.errors import TransferTimeout

#: bumped on any incompatible change of the handshake or of a backend's wire format.
#: 2: transport connections between agents present a ``peer_hello`` session (``sess`` in the
#: hello, session-keyed proofs, ``pdx.bind``) and data headers name it by its handle.
WIRE_VERSION = 2

PeerId = NewType("PeerId", str)


@dataclass(frozen=True)
class SessionCred:
    """The dialing side's credential for one ``peer_hello`` session (``pdx.transport.handshake``):
    its public handle and the key both agents derived; the key never crosses the wire."""

    handle: bytes
    key: bytes = field(repr=False)


class MemoryKind(str, Enum):
    HOST = "host"
    CUDA = "cuda"


class OpKind(str, Enum):
    WRITE = "write"  # local region -> peer region (push)
    READ = "read"  # peer region -> local region (pull)


class OpStatus(str, Enum):
    DONE = "done"
    FAILED = "failed"  # the peer died or the backend reported an error
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    CORRUPT = "corrupt"  # bytes arrived but did not match the expected checksum


class TransferState(str, Enum):
    PENDING = "pending"
    DONE = "done"  # every op finished (some may have failed: see BatchResult)


@dataclass(frozen=True)
class MemoryRegion:
    """The one region a transport moves bytes in and out of.

    ``buffer`` is a writable buffer (memoryview, numpy array, mmap) for host
    memory; for CUDA, ``ptr`` is the device pointer and ``buffer`` may be None.
    """

    nbytes: int
    kind: MemoryKind = MemoryKind.HOST
    buffer: object | None = None
    ptr: int = 0
    device: int = 0
    name: str = ""  # e.g. the POSIX shm name, so a same-host peer can map it


@dataclass(frozen=True)
class ChunkOp:
    """One contiguous byte range: ``nbytes`` at ``local_offset`` <-> ``remote_offset``.

    ``checksum`` (pdx.checksum.checksum of the bytes) lets the side that
    observes completion verify them: the initiator for a READ; for a WRITE the
    receiver verifies when it commits the chunk to its store.
    """

    local_offset: int
    remote_offset: int
    nbytes: int
    checksum: int | None = None


@dataclass
class BatchResult:
    """Outcome of one batch, one status per op in posting order."""

    status: list[OpStatus]
    errors: dict[int, str] = field(default_factory=dict)  # op index -> reason
    nbytes: int = 0  # bytes of the ops that are DONE

    @property
    def ok(self) -> bool:
        return all(s is OpStatus.DONE for s in self.status)

    def failed(self) -> list[int]:
        return [i for i, s in enumerate(self.status) if s is not OpStatus.DONE]


@dataclass(frozen=True)
class PeerInfo:
    """What the handshake learned about a peer."""

    peer_id: PeerId
    address: str
    wire_version: int
    fingerprint: str
    backend: str
    region_nbytes: int


class TransferHandle(abc.ABC):
    """A posted batch. ``wait`` and ``poll`` may be called from any thread."""

    @abc.abstractmethod
    def poll(self) -> TransferState:
        """Non-blocking progress check."""

    @abc.abstractmethod
    def wait(self, timeout: float | None = None, raise_on_timeout: bool = False) -> BatchResult:
        """Block until every op finished or ``timeout`` (default: the config's
        transfer_timeout_s) passed; unfinished ops are then cancelled and
        reported as TIMEOUT (or ``TransferTimeout`` is raised if asked)."""

    @abc.abstractmethod
    def cancel(self) -> None:
        """Stop the batch; unfinished ops end CANCELLED. Idempotent."""


class Transport(abc.ABC):
    """One backend. Construct via ``pdx.transport.create(name, ...)``.

    Lifecycle: ``register(region)`` once, ``listen()`` if peers connect to us,
    ``connect(address)`` to reach a peer, ``post(...)`` batches, ``close()``.
    """

    name: str = ""
    #: True when the backend honours ``config.debug_corrupt_every`` (the conformance
    #: suite skips its corruption test otherwise). See ``DebugCorrupter``.
    debug_corrupt: ClassVar[bool] = False

    #: True when the backend asks ``guard`` before it serves a peer's data-plane op (tcp): the
    #: others move bytes one-sidedly (mapped shared memory, RDMA) and cannot check per op.
    enforces_grants: ClassVar[bool] = False

    def __init__(self, config: TransportConfig, fingerprint: str) -> None:
        self.config = config
        self.fingerprint = fingerprint
        #: ``guard(session, write, [(offset, nbytes), ...])`` -> "" to serve, else why not; set by
        #: the agent. ``None`` serves any range of the region (a bare transport, its tests).
        self.guard: Callable[[bytes, bool, Sequence[Sequence[int]]], str] | None = None
        #: ``on_denied(op)``: called once per refused data-plane request (metrics).
        self.on_denied: Callable[[str], None] | None = None

    def set_session(self, peer: PeerId, session: bytes) -> None:
        """Name ``session`` (the handle of our ``peer_hello`` session with ``peer``, bound to the
        connection by ``connect``) in every data-plane request to ``peer``; backends without per-op
        checks ignore it."""
        return None

    def accept_sessions(self, lookup: Callable[[bytes], tuple[bytes, bytes] | None],
                        on_refused: Callable[[str], None] | None = None) -> None:
        """Accept only connections that present a live ``peer_hello`` session: ``lookup(handle)``
        answers ``(session key, session token)`` or ``None``; ``on_refused(op)`` counts refusals."""
        return None

    @abc.abstractmethod
    def register(self, region: MemoryRegion) -> None:
        """Register the region that every op's local offsets refer to (once)."""

    @abc.abstractmethod
    def listen(self) -> str:
        """Start accepting peers; returns the address they connect to (idempotent)."""

    @abc.abstractmethod
    def connect(self, address: str, timeout: float | None = None,
                session: SessionCred | None = None) -> PeerInfo:
        """Handshake with the peer at ``address`` (idempotent per address), presenting ``session``."""

    def prepare(self, peer: PeerId, timeout: float | None = None) -> bool:
        """Do now the per-peer set-up a first ``post`` to ``peer`` would otherwise pay (data streams,
        per-peer registrations), so that it finds the link ready. True when something was ready or
        made ready; never raises for a dead peer (the next ``post`` fails as usual). Backends whose
        ``connect`` already does it all keep this default."""
        return True

    def session_bound(self, peer: PeerId, handle: bytes) -> bool:
        """Whether the live connection to ``peer`` carries the session ``handle`` (presented at its
        handshake or bound since). False when a live connection does not: the one the session rode
        on was replaced (both agents dialled each other at once, or a reconnect), so ``connect``
        again with the session. True when there is no live connection (nothing to bind to: the next
        ``post`` finds the peer gone). Backends without peer sessions keep this default."""
        return True

    @abc.abstractmethod
    def post(self, peer: PeerId, kind: OpKind, ops: Sequence[ChunkOp]) -> TransferHandle:
        """Queue a batch of ops to/from ``peer``; returns at once."""

    @abc.abstractmethod
    def peers(self) -> list[PeerInfo]:
        """Peers currently connected and alive."""

    @abc.abstractmethod
    def close(self) -> None:
        """Fail what is in flight, drop peers, release registrations. Idempotent."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- helpers shared by backends ----------------------------------------------------------------
#
# Interface notes for backend authors (additive refinements, all optional to use):
# * ``pdx.transport.handshake.SideChannel`` does the handshake, heartbeats and the
#   request/notify side channel; every backend should build on it so that version,
#   fingerprint and secret checks and dead-peer detection are the same everywhere.
# * ``BatchHandle`` below is a complete ``TransferHandle``: call ``complete(i, status)``
#   from your progress code; ``wait`` handles deadlines (TIMEOUT), ``cancel`` CANCELLED,
#   and ``fail_all`` is what a peer-dead callback calls. Optional ``on_wait`` (added
#   later, additive): lets the waiting thread run work no worker started yet.
# * ``region_view`` gives the flat writable bytes of a host region.
# * ``DebugCorrupter`` implements ``config.debug_corrupt_every``: call ``maybe_corrupt``
#   on every chunk your side *receives* (for one-sided backends: the side that moves
#   the bytes, on the destination range), then set the class attribute
#   ``debug_corrupt = True`` on your Transport.
# * ``Transport.peers()`` lists peers whichever side connected; ``post`` to a peer
#   that connected to us must work too (both READ and WRITE).


def region_view(region: MemoryRegion) -> memoryview:
    """The flat, writable ``memoryview`` (format ``B``) of a host region's buffer.

    Raises ``ValueError`` for a CUDA region, a missing/read-only/non-contiguous
    buffer, or one smaller than ``region.nbytes``.
    """
    if region.kind is not MemoryKind.HOST or region.buffer is None:
        raise ValueError("region_view needs a host region with a buffer")
    view = memoryview(region.buffer)  # type: ignore[arg-type]
    if view.readonly:
        raise ValueError("the registered region must be writable")
    if not view.c_contiguous:
        raise ValueError("the registered region must be contiguous")
    view = view.cast("B")
    if view.nbytes < region.nbytes:
        raise ValueError(f"region buffer holds {view.nbytes} bytes, fewer than nbytes={region.nbytes}")
    return view[: region.nbytes]


def check_ops(ops: Sequence[ChunkOp], local_nbytes: int, remote_nbytes: int) -> dict[int, str]:
    """Ops whose ranges fall outside either region: ``{index: reason}`` (empty if all fit)."""
    bad: dict[int, str] = {}
    for i, op in enumerate(ops):
        if op.nbytes < 0 or op.local_offset < 0 or op.remote_offset < 0:
            bad[i] = f"negative offset or size in {op}"
        elif op.local_offset + op.nbytes > local_nbytes:
            bad[i] = f"local range {op.local_offset}+{op.nbytes} beyond the region ({local_nbytes} bytes)"
        elif op.remote_offset + op.nbytes > remote_nbytes:
            bad[i] = (f"remote range {op.remote_offset}+{op.nbytes} beyond the peer's region "
                      f"({remote_nbytes} bytes)")
    return bad


class DebugCorrupter:
    """Testing only: flips one byte in every Nth chunk received (``config.debug_corrupt_every``).

    Thread-safe. ``maybe_corrupt(view)`` is called with the destination bytes of a
    chunk after they landed; returns True when it flipped one.
    """

    def __init__(self, every: int) -> None:
        self.every = max(0, int(every))
        self._count = 0
        self._lock = threading.Lock()

    def maybe_corrupt(self, view: memoryview) -> bool:
        if self.every <= 0 or view.nbytes == 0:
            return False
        with self._lock:
            self._count += 1
            hit = self._count % self.every == 0
        if hit:
            mid = view.nbytes // 2
            view[mid] = view[mid] ^ 0xFF
        return hit


class BatchHandle(TransferHandle):
    """A ready-made ``TransferHandle`` for backends: per-op status, first completion wins.

    Thread-safe. The backend calls ``complete(i, status, reason)`` as ops finish
    (from any thread). ``on_stop(handle, status)`` is called once, before the
    unfinished ops are marked, when the batch is cancelled or times out, so the
    backend can stop touching the ops' memory; it must return within a bounded time.
    ``on_wait(handle, deadline)`` (optional) is called by ``wait`` before it
    blocks, on the waiting thread: a backend may run work of this batch that no
    worker has started yet right there (saves two thread hand-offs per batch); it
    should give up at ``deadline`` (``time.monotonic()``), leaving the rest pending.
    """

    def __init__(self, ops: Sequence[ChunkOp], default_timeout: float,
                 on_stop: Callable[[BatchHandle, OpStatus], None] | None = None,
                 on_wait: Callable[[BatchHandle, float], None] | None = None) -> None:
        self.ops = list(ops)
        self.default_timeout = default_timeout
        self._on_stop = on_stop
        self._on_wait = on_wait
        self._status: list[OpStatus | None] = [None] * len(self.ops)
        self._errors: dict[int, str] = {}
        self._pending = len(self.ops)
        self._cond = threading.Condition()
        self._stopped = False

    # -- backend side --
    def complete(self, index: int, status: OpStatus, reason: str = "") -> bool:
        """Record op ``index``'s outcome; False if it was already final (e.g. cancelled)."""
        with self._cond:
            if self._status[index] is not None:
                return False
            self._status[index] = status
            if status is not OpStatus.DONE:
                self._errors[index] = reason or status.value
            self._pending -= 1
            if self._pending == 0:
                self._cond.notify_all()
            return True

    def fail_all(self, status: OpStatus, reason: str) -> int:
        """Mark every unfinished op ``status``; returns how many were marked."""
        n = 0
        with self._cond:
            for i, s in enumerate(self._status):
                if s is None:
                    self._status[i] = status
                    self._errors[i] = reason
                    n += 1
            self._pending = 0
            self._cond.notify_all()
        return n

    def is_final(self, index: int) -> bool:
        with self._cond:
            return self._status[index] is not None

    @property
    def stopped(self) -> bool:
        """True once cancelled or timed out: progress code should give up on this batch."""
        return self._stopped

    # -- caller side --
    def poll(self) -> TransferState:
        with self._cond:
            return TransferState.DONE if self._pending == 0 else TransferState.PENDING

    def _stop(self, status: OpStatus, reason: str) -> None:
        with self._cond:
            if self._pending == 0 or self._stopped:
                return
            self._stopped = True
        if self._on_stop is not None:
            self._on_stop(self, status)
        self.fail_all(status, reason)

    def wait(self, timeout: float | None = None, raise_on_timeout: bool = False) -> BatchResult:
        limit = self.default_timeout if timeout is None else timeout
        deadline = time.monotonic() + max(0.0, limit)
        if self._on_wait is not None and self._pending and not self._stopped:
            self._on_wait(self, deadline)
        with self._cond:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            timed_out = self._pending > 0
        if timed_out:
            self._stop(OpStatus.TIMEOUT, f"not finished within {limit:g}s")
            if raise_on_timeout:
                raise TransferTimeout(f"batch of {len(self.ops)} ops not finished within {limit:g}s")
        return self.result()

    def cancel(self) -> None:
        self._stop(OpStatus.CANCELLED, "cancelled")

    def result(self) -> BatchResult:
        """Snapshot; ops still running show as TIMEOUT only after ``wait`` gave up."""
        with self._cond:
            status = [s if s is not None else OpStatus.TIMEOUT for s in self._status]
            errors = dict(self._errors)
        nbytes = sum(op.nbytes for op, s in zip(self.ops, status) if s is OpStatus.DONE)
        return BatchResult(status=status, errors=errors, nbytes=nbytes)
