"""Results of control requests: the typed replies of the agent's ops (``pdx.agent.protocol``).

msgspec Structs, shared by both ends: the server returns them from its handlers and the loop
encodes them; the client decodes each reply strictly into the op's type (``REPLY_TYPES`` in
``pdx.agent.protocol``), so a malformed reply is a ``WireError``, never a half-read list. Rows
that come by the thousand (pins, reservations, chunk results, commit outcomes) travel as arrays
(``array_like``), the rest as maps. Immutable; safe to share between threads.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

import msgspec

from pdx.errors import ErrorCode

_U64 = Annotated[int, msgspec.Meta(ge=0)]
_KEY = Annotated[bytes, msgspec.Meta(min_length=16, max_length=16)]
_STR = Annotated[str, msgspec.Meta(max_length=4096)]


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


class ChunkResult(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """One chunk of a job. For a fetch with ``pin=True``, a usable chunk is pinned
    for the request (``lease_id``) at ``offset`` in the local pool."""

    key: _KEY
    status: ChunkStatus
    offset: _U64 = 0
    nbytes: _U64 = 0
    checksum: _U64 = 0
    num_tokens: _U64 = 0
    lease_id: _U64 = 0
    reason: _STR = ""


class JobInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A snapshot of one data-moving job (the reply of ``job_status`` and ``wait``)."""

    job_id: _U64
    kind: JobKind
    state: JobState
    request_id: _STR
    peer: _STR
    chunks: tuple[ChunkResult, ...] = ()
    error: _STR = ""  # job-level problem (peer unreachable...), also reflected per chunk
    nbytes: _U64 = 0  # bytes moved
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


class RegisterInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What ``register_engine`` returns: how to map the pool and what a chunk is."""

    agent_id: _STR
    instance: _STR
    shm_name: _STR
    pool_nbytes: _U64
    slab_size: _U64
    slab_count: _U64
    chunk_tokens: _U64
    chunk_bytes: _U64
    chunk_fingerprint: _STR
    fingerprint: _STR
    namespace: _STR
    peer_address: _STR  # where other agents reach this one (goes into kv_transfer_params); "" = off
    created: bool  # False: the pool existed (an engine restart); chunks from before are there


class LookupInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Which keys the agent holds: ``tiers[i]`` is the fastest tier of ``keys[i]`` or None."""

    prefix_chunks: _U64
    chunk_tokens: _U64
    tiers: tuple[_STR | None, ...]

    @property
    def prefix_tokens(self) -> int:
        return self.prefix_chunks * self.chunk_tokens


class ReserveRow(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """One key of a ``reserve``/``peer_reserve`` reply: a slab (``id`` > 0) or why not (``code``)."""

    id: _U64
    offset: _U64 = 0
    nbytes: _U64 = 0
    code: ErrorCode = ErrorCode.OK
    error: _STR = ""


class ReservationInfo(msgspec.Struct, frozen=True):
    """A slab reserved for one chunk: write ``nbytes`` at ``offset``, then commit ``id``.
    ``id`` is 0 and ``error`` (``code``) says why when this key could not be reserved."""

    id: int
    key: bytes
    offset: int
    nbytes: int
    error: str = ""
    code: ErrorCode = ErrorCode.OK


class Outcome(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """The outcome of one item of a batch (a commit): ``code`` OK, or the error code and message
    (``INTEGRITY``: the bytes failed their checksum; ``RESERVATION``: expired or unknown)."""

    code: ErrorCode = ErrorCode.OK
    msg: _STR = ""

    @property
    def ok(self) -> bool:
        return self.code is ErrorCode.OK


class PinInfo(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """A pinned chunk: read ``nbytes`` at ``offset`` until ``unpin``/``release`` or the lease ends.
    ``lease_id`` is 0 when the key is not in the pool."""

    lease_id: _U64
    key: _KEY
    offset: _U64 = 0
    nbytes: _U64 = 0
    checksum: _U64 = 0
    num_tokens: _U64 = 0
    expires_in_s: float = 0.0

    @property
    def found(self) -> bool:
        return self.lease_id != 0


class PingInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The reply of ``ping``."""

    agent_id: _STR
    instance: _STR
    role: _STR
    wire_version: int
    version: _STR
    pid: _U64
    uptime_s: float
    registered: bool
    peer_address: _STR

    def to_dict(self) -> dict[str, Any]:
        return msgspec.structs.asdict(self)


class HelloReply(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The reply of ``peer_hello``: a challenge (``challenge`` and the answerer's ``proof``) or,
    once the caller proved it holds the secret (or when there is none), a session."""

    challenge: Annotated[bytes, msgspec.Meta(max_length=64)] = b""
    proof: Annotated[bytes, msgspec.Meta(max_length=64)] = b""
    agent_id: _STR = ""
    instance: _STR = ""
    chunk_fingerprint: _STR = ""
    fingerprint: _STR = ""
    transport: _STR = ""
    transport_address: _STR = ""
    token: Annotated[bytes, msgspec.Meta(max_length=64)] = b""
    secret: bool = False
    signature: Annotated[bytes, msgspec.Meta(max_length=128)] = b""
