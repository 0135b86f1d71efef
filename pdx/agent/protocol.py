"""The agent's control-plane wire schema: msgspec Structs for every op, shared by both ends.

Who uses it: ``pdx.agent.server`` decodes requests and encodes replies on its ZMQ ROUTER
sockets; ``pdx.agent.client`` (the connector, tests, benches) and ``pdx.agent.links`` /
``pdx.agent.transfers`` (agent to agent) do the reverse. Pure functions, no I/O, thread-safe.

A request is one ZMQ frame holding a msgpack map::

    {"v": WIRE_VERSION, "id": <u64>, "op": "<Op>", "a": {<args>}, ["auth": <bytes>]}

and its reply::

    {"v": WIRE_VERSION, "id": <same id>, "ok": true, "r": <result>, "inst": "<agent instance>"}
    {"v": WIRE_VERSION, "id": <same id>, "ok": false, "err": {"code": <ErrorCode>, "msg": "..."},
     "inst": "..."}

Each op's arguments are one Struct (``ARGS[op]``) and its result one type (``REPLY_TYPES[op]``,
mostly Structs of ``pdx.agent.types``). Decoding is strict on both sides: an unknown field, a
missing one, a wrong type or a value out of its bounds (``msgspec.Meta``: key sizes, list
lengths, ``deadline_s`` and every other duration at most ``MAX_SECONDS``) is a ``WireError``
naming the field. Errors travel as a code of ``pdx.errors.ErrorCode`` plus a message; the
client raises the class of that code, and nothing is matched by its text. Frames are bounded
(``max_bytes``); the decoders raise nothing but ``WireError``: garbage from a socket becomes
an error reply, never a crash. Nothing is pickled.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from pdx.agent.types import (
    HelloReply,
    JobInfo,
    LookupInfo,
    Outcome,
    PingInfo,
    PinInfo,
    RegisterInfo,
    ReserveRow,
)
from pdx.errors import AgentError, ErrorCode, PdxError, WireError, code_of, error_class

#: bumped on any incompatible change of the envelope, an op's arguments or its result
#: (2: peer sessions, ``expect``; 3: msgspec schema, error codes, typed rows; 4: signed hellos).
WIRE_VERSION = 4

#: default bound on one frame (the server's ``control.max_frame`` overrides it).
DEFAULT_MAX_FRAME = 8 * 1024 * 1024
#: most chunk keys in one request (a 16M-token prompt at 256 tokens per chunk).
MAX_KEYS = 65536
#: longest string argument (owners, addresses, URLs).
MAX_STR = 1024
KEY_BYTES = 16
_U64_MAX = (1 << 64) - 1
#: longest deadline, lease or wait a request may ask for (seconds).
MAX_SECONDS = 86400.0


class Op(str, Enum):
    """Every control message. Local ops come from the engine's connector over the
    control socket; ``PEER_*`` ops come from other agents over the peer socket."""

    PING = "ping"
    REGISTER_ENGINE = "register_engine"
    LOOKUP = "lookup"
    RESERVE = "reserve"
    COMMIT = "commit"
    ABORT = "abort"
    PIN = "pin"
    UNPIN = "unpin"
    RELEASE = "release"
    FETCH = "fetch"
    SEND = "send"
    JOB_STATUS = "job_status"
    WAIT = "wait"
    CANCEL = "cancel"
    STATS = "stats"
    EXPECT = "expect"
    # layer-wise P/D (``pdx.agent.push``)
    PUSH_OPEN = "push_open"
    PUSH_LAYER = "push_layer"
    PUSH_SEAL = "push_seal"
    # agent <-> agent
    PEER_HELLO = "peer_hello"
    PEER_PIN = "peer_pin"
    PEER_UNPIN = "peer_unpin"
    PEER_RELEASE = "peer_release"
    PEER_RESERVE = "peer_reserve"
    PEER_COMMIT = "peer_commit"
    PEER_ABORT = "peer_abort"
    PEER_STAGE = "peer_stage"
    PEER_STAGED = "peer_staged"


_PEER = frozenset({Op.PEER_HELLO, Op.PEER_PIN, Op.PEER_UNPIN, Op.PEER_RELEASE, Op.PEER_RESERVE,
                   Op.PEER_COMMIT, Op.PEER_ABORT, Op.PEER_STAGE, Op.PEER_STAGED})
LOCAL_OPS = frozenset(op for op in Op if op not in _PEER)
PEER_OPS = frozenset({Op.PING} | _PEER)
_OPS_BY_NAME = {op.value: op for op in Op}

# --- field types (bounds live here) ---------------------------------------------------------------

#: msgpack carries at most 64 bits, so a non-negative int is an unsigned 64-bit one
U64 = Annotated[int, Meta(ge=0)]
Key = Annotated[bytes, Meta(min_length=KEY_BYTES, max_length=KEY_BYTES)]
Keys = Annotated[list[Key], Meta(max_length=MAX_KEYS)]
U64s = Annotated[list[U64], Meta(max_length=MAX_KEYS)]
Str = Annotated[str, Meta(max_length=MAX_STR)]
Name = Annotated[str, Meta(min_length=1, max_length=MAX_STR)]
#: a duration up to ``MAX_SECONDS`` (an unbounded one overflowed timers); 0 or absent: the agent's default
Seconds = Annotated[float, Meta(ge=0.0, le=MAX_SECONDS)]
Small = Annotated[bytes, Meta(max_length=256)]
LayoutDict = Annotated[dict[Annotated[str, Meta(max_length=64)], Str | int], Meta(max_length=32)]


class _Args(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Base of every op's arguments: strict (unknown fields refused), defaults not sent."""


class NoArgs(_Args):
    pass


class RegisterArgs(_Args):
    layout: LayoutDict
    pid: U64 = 0
    engine_url: Str = ""


class LookupArgs(_Args):
    keys: Keys
    remote: bool = False
    #: a probe (candidate tail keys): not counted in the store's lookup metrics
    probe: bool = False


class ReserveArgs(_Args):
    keys: Keys
    nbytes: U64 | U64s  # one size, or one per key


class CommitArgs(_Args):
    ids: U64s
    num_tokens: U64 | U64s
    checksums: U64s = []


class IdsArgs(_Args):
    ids: U64s


class PinArgs(_Args):
    keys: Keys
    owner: Name
    lease_s: Seconds = 0.0


class UnpinArgs(_Args):
    lease_ids: U64s


class OwnerArgs(_Args):
    owner: Name


class FetchArgs(_Args):
    peer: Name
    keys: Keys
    request_id: Name
    deadline_s: Seconds = 0.0
    remote_owner: Str = ""
    pin: bool = True


class SendArgs(_Args):
    peer: Name
    keys: Keys
    request_id: Name
    deadline_s: Seconds = 0.0


class JobArgs(_Args):
    job_id: U64


class WaitArgs(_Args):
    job_id: U64
    timeout_s: Seconds


class ExpectArgs(_Args):
    keys: Keys
    request_id: Name
    deadline_s: Seconds = 0.0


class HelloArgs(_Args):
    """``peer_hello``: who the caller is (its agent id and peer address, checked against what the
    deployment knows of it), its chunk fingerprint, and the challenge's nonces and proofs
    (``pdx.transport.handshake``)."""

    agent_id: Str = ""
    address: Str = ""
    chunk_fingerprint: Str = ""
    nonce: Small = b""
    server_nonce: Small = b""
    proof: Small = b""
    signature: Small = b""


class PeerCommitArgs(_Args):
    ids: U64s
    checksums: U64s
    num_tokens: U64 | U64s


class PushOpenArgs(_Args):
    """``push_open``: stream the layers of reserved local slabs (``offsets``/``nbytes``, one per key)
    to the decode agent at ``peer``, staged there for its fetch of ``request_id``."""

    peer: Name
    request_id: Name
    keys: Keys
    offsets: U64s
    nbytes: U64s
    num_layers: Annotated[int, Meta(ge=1, le=4096)]
    deadline_s: Seconds = 0.0


class PushLayerArgs(_Args):
    push_id: U64
    layer: U64


class PushSealArgs(_Args):
    push_id: U64
    checksums: U64s
    num_tokens: U64s


class StageArgs(_Args):
    """``peer_stage``: reserve staging slabs here for the caller's push of ``request_id``."""

    request_id: Name
    keys: Keys
    nbytes: U64s


class StagedArgs(_Args):
    """``peer_staged``: every layer of these staged reservations was written; their checksums."""

    request_id: Name
    ids: U64s
    checksums: U64s
    num_tokens: U64s


#: each op's argument Struct
ARGS: dict[Op, type[_Args]] = {
    Op.PING: NoArgs, Op.REGISTER_ENGINE: RegisterArgs, Op.LOOKUP: LookupArgs, Op.RESERVE: ReserveArgs,
    Op.COMMIT: CommitArgs, Op.ABORT: IdsArgs, Op.PIN: PinArgs, Op.UNPIN: UnpinArgs, Op.RELEASE: OwnerArgs,
    Op.FETCH: FetchArgs, Op.SEND: SendArgs, Op.JOB_STATUS: JobArgs, Op.WAIT: WaitArgs, Op.CANCEL: JobArgs,
    Op.STATS: NoArgs, Op.EXPECT: ExpectArgs, Op.PEER_HELLO: HelloArgs, Op.PEER_PIN: PinArgs,
    Op.PEER_UNPIN: UnpinArgs, Op.PEER_RELEASE: OwnerArgs, Op.PEER_RESERVE: ReserveArgs,
    Op.PEER_COMMIT: PeerCommitArgs, Op.PEER_ABORT: IdsArgs, Op.PUSH_OPEN: PushOpenArgs,
    Op.PUSH_LAYER: PushLayerArgs, Op.PUSH_SEAL: PushSealArgs, Op.PEER_STAGE: StageArgs,
    Op.PEER_STAGED: StagedArgs,
}
assert set(ARGS) == set(Op)

#: each op's result type (``stats`` is the free-form ``/v1/status`` document)
REPLY_TYPES: dict[Op, Any] = {
    Op.PING: PingInfo, Op.REGISTER_ENGINE: RegisterInfo, Op.LOOKUP: LookupInfo,
    Op.RESERVE: list[ReserveRow], Op.COMMIT: list[Outcome], Op.ABORT: U64, Op.PIN: list[PinInfo],
    Op.UNPIN: U64, Op.RELEASE: U64, Op.FETCH: U64, Op.SEND: U64, Op.JOB_STATUS: JobInfo, Op.WAIT: JobInfo,
    Op.CANCEL: bool, Op.STATS: dict[str, Any], Op.EXPECT: U64, Op.PEER_HELLO: HelloReply,
    Op.PEER_PIN: list[PinInfo], Op.PEER_UNPIN: U64, Op.PEER_RELEASE: U64, Op.PEER_RESERVE: list[ReserveRow],
    Op.PEER_COMMIT: list[Outcome], Op.PEER_ABORT: U64, Op.PUSH_OPEN: U64, Op.PUSH_LAYER: bool,
    Op.PUSH_SEAL: bool, Op.PEER_STAGE: list[ReserveRow], Op.PEER_STAGED: U64,
}
assert set(REPLY_TYPES) == set(Op)


# --- envelopes -------------------------------------------------------------------------------------


class _RequestFrame(msgspec.Struct, forbid_unknown_fields=True):
    v: int
    id: U64
    op: Annotated[str, Meta(max_length=64)]
    a: msgspec.Raw = msgspec.Raw(b"\x80")
    auth: Annotated[bytes, Meta(max_length=64)] = b""


class _ErrorBody(msgspec.Struct, forbid_unknown_fields=True):
    code: int
    msg: Annotated[str, Meta(max_length=8192)]


class _ReplyFrame(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    v: int
    id: U64
    ok: bool
    inst: Annotated[str, Meta(max_length=MAX_STR)] = ""
    r: msgspec.Raw = msgspec.Raw(b"\xc0")
    err: _ErrorBody | None = None


class _OkReply(msgspec.Struct):
    v: int
    id: int
    ok: bool
    r: Any
    inst: str


class _ErrReply(msgspec.Struct):
    v: int
    id: int
    ok: bool
    err: _ErrorBody
    inst: str


@dataclass(frozen=True, slots=True)
class Request:
    """A decoded, validated request: ``args`` is the op's argument Struct."""

    id: int
    op: Op
    args: Any
    auth: bytes = b""


@dataclass(frozen=True, slots=True)
class Reply:
    """A decoded reply envelope. ``error`` is the exception to raise when ``ok`` is false; ``raw``
    is the undecoded result (``result(op)`` decodes it into the op's type)."""

    id: int
    ok: bool
    raw: bytes
    instance: str
    error: PdxError | None = None

    def result(self, op: Op | None) -> Any:
        """The result, decoded strictly into ``REPLY_TYPES[op]`` (plain data without an op)."""
        dec = _REPLY_DECODERS[op] if op is not None else _ANY
        try:
            return dec.decode(self.raw)
        except msgspec.DecodeError as exc:
            raise WireError(f"reply to {op.value if op else '?'}: {exc}") from None


_ENCODER = msgspec.msgpack.Encoder()
_REQ_DECODER = msgspec.msgpack.Decoder(_RequestFrame)
_REPLY_DECODER = msgspec.msgpack.Decoder(_ReplyFrame)
_ARG_DECODERS = {op: msgspec.msgpack.Decoder(t) for op, t in ARGS.items()}
_REPLY_DECODERS = {op: msgspec.msgpack.Decoder(t) for op, t in REPLY_TYPES.items()}
_ANY = msgspec.msgpack.Decoder()


def _pack(obj: Any) -> bytes:
    try:
        return _ENCODER.encode(obj)
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireError(f"cannot encode message: {exc}") from exc


def encode_request(req_id: int, op: Op, args: _Args | Mapping[str, Any] | None = None, auth: bytes = b"") -> bytes:
    """The frame of one request (the client side). ``args`` is the op's Struct (or, for tests and
    tools, a plain mapping: the server checks it the same way)."""
    a = args if isinstance(args, msgspec.Struct) else dict(args or {})
    msg: dict[str, Any] = {"v": WIRE_VERSION, "id": req_id, "op": op.value, "a": a}
    if auth:
        msg["auth"] = auth
    return _pack(msg)


def _check_frame(frame: Any, max_bytes: int) -> None:
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise WireError(f"expected a bytes frame, got {type(frame).__name__}")
    if len(frame) > max_bytes:
        raise WireError(f"frame of {len(frame)} bytes is over the limit of {max_bytes}")


def _salvage_id(frame: Any) -> int | None:
    """The request id of a frame whose envelope is bad, when it has a usable one (for the error reply)."""
    try:
        msg = _ANY.decode(frame)
    except Exception:
        return None
    rid = msg.get("id") if type(msg) is dict else None
    return rid if type(rid) is int and 0 <= rid <= _U64_MAX else None


def _why(exc: msgspec.ValidationError | msgspec.DecodeError) -> str:
    text = str(exc)
    return text if len(text) <= 300 else text[:297] + "..."


def decode_request(frame: Any, max_bytes: int = DEFAULT_MAX_FRAME,
                   allowed: frozenset[Op] | None = None) -> Request:
    """Decode and validate one request frame (the server side).

    Raises only ``WireError``; when the envelope carried a usable id, the error
    has it as ``request_id`` so the server can address its error reply.
    """
    _check_frame(frame, max_bytes)
    try:
        env = _REQ_DECODER.decode(frame)
    except msgspec.ValidationError as exc:
        err = WireError(f"bad request envelope: {_why(exc)}")
        rid = _salvage_id(frame)
        if rid is not None:
            err.request_id = rid  # type: ignore[attr-defined]
        raise err from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise WireError(f"not a msgpack request: {exc}") from None
    try:
        if env.v != WIRE_VERSION:
            raise WireError(f"wire version {env.v!r}, this agent speaks {WIRE_VERSION}")
        op = _OPS_BY_NAME.get(env.op)
        if op is None or (allowed is not None and op not in allowed):
            raise WireError(f"unknown message type {env.op!r}")
        try:
            args = _ARG_DECODERS[op].decode(env.a)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise WireError(f"{op.value}: {_why(exc)}") from None
        return Request(env.id, op, args, env.auth)
    except WireError as exc:
        exc.request_id = env.id  # type: ignore[attr-defined]
        raise


def encode_reply(req_id: int, result: Any, instance: str) -> bytes:
    return _pack(_OkReply(WIRE_VERSION, req_id, True, result, instance))


def encode_error(req_id: int, exc: BaseException, instance: str) -> bytes:
    """An error reply: the code of the exception's class and its message (anything that is not a
    ``PdxError`` is ``INTERNAL``)."""
    msg = str(exc) if isinstance(exc, PdxError) else f"internal error: {type(exc).__name__}: {exc}"
    return _pack(_ErrReply(WIRE_VERSION, req_id, False, _ErrorBody(int(code_of(exc)), msg[:4096]), instance))


def decode_reply(frame: Any, max_bytes: int = DEFAULT_MAX_FRAME) -> Reply:
    """Decode one reply envelope (the client side). Raises only ``WireError``."""
    _check_frame(frame, max_bytes)
    try:
        env = _REPLY_DECODER.decode(frame)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
        raise WireError(f"reply: {exc}") from None
    if env.v != WIRE_VERSION:
        raise WireError(f"reply of wire version {env.v!r}, this client speaks {WIRE_VERSION}")
    if env.ok:
        return Reply(env.id, True, bytes(env.r), env.inst)
    if env.err is None:
        raise WireError("reply: error without code and message")
    return Reply(env.id, False, b"", env.inst, error_from_wire(env.err.code, env.err.msg))


def error_from_wire(code: int, message: str) -> PdxError:
    """The exception a client raises for an error reply: the class of ``code`` (``AgentError`` for a
    code this side does not know)."""
    cls = error_class(code)
    if code == ErrorCode.INTERNAL:
        return AgentError(message)
    return cls(message)
