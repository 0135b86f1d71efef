"""Results of control requests, as the client hands them to its caller.

The server builds the plain msgpack-friendly forms (``to_wire``); the client
turns them back into these frozen dataclasses (``from_wire``, which raises only
``WireError``). Immutable; safe to share between threads.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from pdx.errors import WireError


class ChunkStatus(str, Enum):
    """Outcome of one chunk of a fetch or send job."""

    DONE = "done"  # moved and committed (checksum verified on arrival)
    PRESENT = "present"  # already in the local pool: nothing moved
    MISSING = "missing"  # the source does not hold it
    CORRUPT = "corrupt"  # bytes arrived but failed their checksum: dropped
    TIMEOUT = "timeout"  # the job's deadline passed first
    FAILED = "failed"  # peer unreachable or died, no room, transport error
    CANCELLED = "cancelled"

    @property
    def usable(self) -> bool:
        """True when the chunk is now in the destination pool."""
        return self in (ChunkStatus.DONE, ChunkStatus.PRESENT)


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"  # finished; per-chunk statuses say what worked


class JobKind(str, Enum):
    FETCH = "fetch"  # pull keys from a peer into the local pool
    SEND = "send"  # push local keys into a peer's pool


@dataclass(frozen=True)
class ChunkResult:
    """One chunk of a job. For a fetch with ``pin=True``, a usable chunk is pinned
    for the request (``lease_id``) at ``offset`` in the local pool."""

    key: bytes
    status: ChunkStatus
    offset: int = 0
    nbytes: int = 0
    checksum: int = 0
    num_tokens: int = 0
    lease_id: int = 0
    reason: str = ""

    def to_wire(self) -> list[Any]:
        return [self.key, self.status.value, self.offset, self.nbytes, self.checksum,
                self.num_tokens, self.lease_id, self.reason]

    @classmethod
    def from_wire(cls, raw: Any) -> ChunkResult:
        try:
            key, status, offset, nbytes, csum, ntok, lease, reason = raw
            return cls(bytes(key), ChunkStatus(status), int(offset), int(nbytes), int(csum), int(ntok),
                       int(lease), str(reason))
        except (TypeError, ValueError) as exc:
            raise WireError(f"bad chunk result {raw!r}: {exc}") from None


@dataclass(frozen=True)
class JobInfo:
    """A snapshot of one data-moving job."""

    job_id: int
    kind: JobKind
    state: JobState
    request_id: str
    peer: str
    chunks: tuple[ChunkResult, ...] = ()
    error: str = ""  # job-level problem (peer unreachable...), also reflected per chunk
    nbytes: int = 0  # bytes moved
    elapsed_s: float = 0.0

    @property
    def done(self) -> bool:
        return self.state is JobState.DONE

    @property
    def ok(self) -> bool:
        """Finished and every chunk usable."""
        return self.done and all(c.status.usable for c in self.chunks)

    @property
    def usable_prefix(self) -> int:
        """Leading chunks now in the local pool (the tokens that need no recompute)."""
        n = 0
        for c in self.chunks:
            if not c.status.usable:
                break
            n += 1
        return n

    def to_wire(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "kind": self.kind.value, "state": self.state.value,
                "request_id": self.request_id, "peer": self.peer,
                "chunks": [c.to_wire() for c in self.chunks], "error": self.error,
                "nbytes": self.nbytes, "elapsed_s": self.elapsed_s}

    @classmethod
    def from_wire(cls, raw: Any) -> JobInfo:
        try:
            return cls(int(raw["job_id"]), JobKind(raw["kind"]), JobState(raw["state"]),
                       str(raw["request_id"]), str(raw["peer"]),
                       tuple(ChunkResult.from_wire(c) for c in raw["chunks"]), str(raw["error"]),
                       int(raw["nbytes"]), float(raw["elapsed_s"]))
        except (TypeError, ValueError, KeyError) as exc:
            raise WireError(f"bad job info: {exc}") from None


@dataclass(frozen=True)
class RegisterInfo:
    """What ``register_engine`` returns: how to map the pool and what a chunk is."""

    agent_id: str
    instance: str
    shm_name: str
    pool_nbytes: int
    slab_size: int
    slab_count: int
    chunk_tokens: int
    chunk_bytes: int
    chunk_fingerprint: str
    fingerprint: str
    namespace: str
    peer_address: str  # where other agents reach this one (goes into kv_transfer_params); "" = off
    created: bool  # False: the pool existed (an engine restart); chunks from before are there

    @classmethod
    def from_wire(cls, raw: Any) -> RegisterInfo:
        try:
            return cls(**{f: raw[f] for f in cls.__dataclass_fields__})
        except (TypeError, KeyError) as exc:
            raise WireError(f"bad register reply: {exc}") from None


@dataclass(frozen=True)
class LookupInfo:
    """Which keys the agent holds: ``tiers[i]`` is the fastest tier of ``keys[i]`` or None."""

    prefix_chunks: int
    chunk_tokens: int
    tiers: tuple[str | None, ...]

    @property
    def prefix_tokens(self) -> int:
        return self.prefix_chunks * self.chunk_tokens


@dataclass(frozen=True)
class ReservationInfo:
    """A slab reserved for one chunk: write ``nbytes`` at ``offset``, then commit ``id``.
    ``id`` is 0 and ``error`` says why when this key could not be reserved."""

    id: int
    key: bytes
    offset: int
    nbytes: int
    error: str = ""


@dataclass(frozen=True)
class PinInfo:
    """A pinned chunk: read ``nbytes`` at ``offset`` until ``unpin``/``release`` or the lease ends.
    ``lease_id`` is 0 when the key is not in the pool."""

    lease_id: int
    key: bytes
    offset: int = 0
    nbytes: int = 0
    checksum: int = 0
    num_tokens: int = 0
    expires_in_s: float = 0.0

    @property
    def found(self) -> bool:
        return self.lease_id != 0

    def to_wire(self) -> list[Any]:
        return [self.lease_id, self.key, self.offset, self.nbytes, self.checksum, self.num_tokens,
                self.expires_in_s]

    @classmethod
    def from_wire(cls, raw: Any) -> PinInfo:
        try:
            lid, key, off, nb, cs, nt, exp = raw
            return cls(int(lid), bytes(key), int(off), int(nb), int(cs), int(nt), float(exp))
        except (TypeError, ValueError) as exc:
            raise WireError(f"bad pin {raw!r}: {exc}") from None
