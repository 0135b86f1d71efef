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
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import NewType

from pdx.config import TransportConfig

#: bumped on any incompatible change of the handshake or of a backend's wire format.
WIRE_VERSION = 1

PeerId = NewType("PeerId", str)


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

    def __init__(self, config: TransportConfig, fingerprint: str) -> None:
        self.config = config
        self.fingerprint = fingerprint

    @abc.abstractmethod
    def register(self, region: MemoryRegion) -> None:
        """Register the region that every op's local offsets refer to (once)."""

    @abc.abstractmethod
    def listen(self) -> str:
        """Start accepting peers; returns the address they connect to."""

    @abc.abstractmethod
    def connect(self, address: str, timeout: float | None = None) -> PeerInfo:
        """Handshake with the peer at ``address`` (idempotent per address)."""

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
