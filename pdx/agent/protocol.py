"""The agent's control-plane wire format: msgpack frames with a wire version.

Who uses it: ``pdx.agent.server`` decodes requests and encodes replies on its
ZMQ ROUTER sockets; ``pdx.agent.client`` (the connector, tests, benches) and
``pdx.agent.peers`` (agent to agent) do the reverse. Pure functions, no I/O,
thread-safe.

A request is one ZMQ frame holding a msgpack map::

    {"v": WIRE_VERSION, "id": <u64>, "op": "<Op>", "a": {<args>}, ["auth": <bytes>]}

and its reply::

    {"v": WIRE_VERSION, "id": <same id>, "ok": true, "r": <result>, "inst": "<agent instance>"}
    {"v": WIRE_VERSION, "id": <same id>, "ok": false, "err": {"type": "<PdxError subclass>", "msg": "..."},
     "inst": "..."}

``inst`` changes whenever the agent process restarts, so a client learns that
its pool mapping is stale. Frames are bounded (``max_bytes``), every argument
is type- and range-checked here, and the decoders raise nothing but
``WireError``: garbage from a socket becomes an error reply, never a crash.
Nothing is pickled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import msgpack

import pdx.errors as _errors
from pdx.errors import AgentError, PdxError, WireError

#: bumped on any incompatible change of the envelope, an op's arguments or its result
#: (2: peer sessions for every peer op, ``peer_hello`` names the caller's address, ``expect``).
WIRE_VERSION = 2

#: default bound on one frame (the server's ``control.max_frame`` overrides it).
DEFAULT_MAX_FRAME = 8 * 1024 * 1024
#: most chunk keys in one request (a 16M-token prompt at 256 tokens per chunk).
MAX_KEYS = 65536
#: longest string argument (owners, addresses, URLs).
MAX_STR = 1024
KEY_BYTES = 16
_U64 = (1 << 64) - 1


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
    # agent <-> agent
    PEER_HELLO = "peer_hello"
    PEER_PIN = "peer_pin"
    PEER_UNPIN = "peer_unpin"
    PEER_RELEASE = "peer_release"
    PEER_RESERVE = "peer_reserve"
    PEER_COMMIT = "peer_commit"
    PEER_ABORT = "peer_abort"


LOCAL_OPS = frozenset(op for op in Op if not op.value.startswith("peer_"))
PEER_OPS = frozenset({Op.PING} | {op for op in Op if op.value.startswith("peer_")})
_OPS_BY_NAME = {op.value: op for op in Op}
_ENVELOPE = frozenset({"v", "id", "op", "a", "auth"})


@dataclass(frozen=True, slots=True)
class Request:
    """A decoded, validated request. ``args`` holds only the op's known keys, with defaults filled in."""

    id: int
    op: Op
    args: dict[str, Any]
    auth: bytes = b""


@dataclass(frozen=True, slots=True)
class Reply:
    """A decoded reply. ``error`` is the exception to raise when ``ok`` is false."""

    id: int
    ok: bool
    result: Any
    instance: str
    error: PdxError | None = None


# --- argument validators: each returns the clean value or raises WireError ----------------------


def _bad(name: str, want: str, value: Any) -> WireError:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return WireError(f"argument {name!r}: expected {want}, got {shown}")


def _u64(name: str, v: Any) -> int:
    if type(v) is not int or not 0 <= v <= _U64:
        raise _bad(name, "a non-negative integer", v)
    return v


def _bounded(limit: float) -> Callable[[str, Any], float]:
    """A positive number of seconds up to ``limit`` (an unbounded deadline overflows timers)."""
    def check(name: str, v: Any) -> float:
        if type(v) not in (int, float) or not math.isfinite(v) or not 0 < v <= limit:
            raise _bad(name, f"a positive number of seconds, at most {limit:g}", v)
        return float(v)
    return check


#: longest deadline, lease or wait a request may ask for (seconds).
MAX_SECONDS = 86400.0
_seconds = _bounded(MAX_SECONDS)


def _bool(name: str, v: Any) -> bool:
    if type(v) is not bool:
        raise _bad(name, "true or false", v)
    return v


def _str(name: str, v: Any) -> str:
    if type(v) is not str or len(v) > MAX_STR:
        raise _bad(name, f"a string of at most {MAX_STR} characters", v)
    return v


def _nonempty_str(name: str, v: Any) -> str:
    v = _str(name, v)
    if not v:
        raise _bad(name, "a non-empty string", v)
    return v


def _bytes_small(name: str, v: Any) -> bytes:
    if type(v) is not bytes or len(v) > 256:
        raise _bad(name, "bytes (at most 256)", v)
    return v


def _keys(name: str, v: Any) -> list[bytes]:
    if type(v) is not list or len(v) > MAX_KEYS:
        raise _bad(name, f"a list of at most {MAX_KEYS} keys", v)
    for k in v:
        if type(k) is not bytes or len(k) != KEY_BYTES:
            raise _bad(name, f"keys of {KEY_BYTES} bytes", k)
    return v


def _u64_list(name: str, v: Any) -> list[int]:
    if type(v) is not list or len(v) > MAX_KEYS:
        raise _bad(name, f"a list of at most {MAX_KEYS} integers", v)
    for x in v:
        if type(x) is not int or not 0 <= x <= _U64:
            raise _bad(name, "non-negative integers", x)
    return v


def _u64_or_list(name: str, v: Any) -> int | list[int]:
    if type(v) is int:
        return _u64(name, v)
    return _u64_list(name, v)


def _layout(name: str, v: Any) -> dict[str, Any]:
    if type(v) is not dict or len(v) > 32:
        raise _bad(name, "a layout mapping", v)
    for k, x in v.items():
        if type(k) is not str or len(k) > 64:
            raise _bad(name, "string field names", k)
        if type(x) not in (str, int) or (type(x) is str and len(x) > MAX_STR):
            raise _bad(f"{name}.{k}", "a string or an integer", x)
    return v


_Validator = Callable[[str, Any], Any]
_REQUIRED = object()

#: op -> {argument: (validator, default or _REQUIRED)}
_SCHEMAS: dict[Op, dict[str, tuple[_Validator, Any]]] = {
    Op.PING: {},
    Op.REGISTER_ENGINE: {"layout": (_layout, _REQUIRED), "pid": (_u64, 0), "engine_url": (_str, "")},
    Op.LOOKUP: {"keys": (_keys, _REQUIRED), "remote": (_bool, False)},
    Op.RESERVE: {"keys": (_keys, _REQUIRED), "nbytes": (_u64_or_list, _REQUIRED)},
    Op.COMMIT: {"ids": (_u64_list, _REQUIRED), "checksums": (_u64_list, []),
                "num_tokens": (_u64_or_list, _REQUIRED)},
    Op.ABORT: {"ids": (_u64_list, _REQUIRED)},
    Op.PIN: {"keys": (_keys, _REQUIRED), "owner": (_nonempty_str, _REQUIRED), "lease_s": (_seconds, 0.0)},
    Op.UNPIN: {"lease_ids": (_u64_list, _REQUIRED)},
    Op.RELEASE: {"owner": (_nonempty_str, _REQUIRED)},
    Op.FETCH: {"peer": (_nonempty_str, _REQUIRED), "keys": (_keys, _REQUIRED),
               "request_id": (_nonempty_str, _REQUIRED), "deadline_s": (_seconds, 0.0),
               "remote_owner": (_str, ""), "pin": (_bool, True)},
    Op.SEND: {"peer": (_nonempty_str, _REQUIRED), "keys": (_keys, _REQUIRED),
              "request_id": (_nonempty_str, _REQUIRED), "deadline_s": (_seconds, 0.0)},
    Op.JOB_STATUS: {"job_id": (_u64, _REQUIRED)},
    Op.WAIT: {"job_id": (_u64, _REQUIRED), "timeout_s": (_seconds, _REQUIRED)},
    Op.CANCEL: {"job_id": (_u64, _REQUIRED)},
    Op.STATS: {},
    Op.EXPECT: {"keys": (_keys, _REQUIRED), "request_id": (_nonempty_str, _REQUIRED),
                "deadline_s": (_seconds, 0.0)},
    Op.PEER_HELLO: {"agent_id": (_str, ""), "address": (_str, ""), "chunk_fingerprint": (_str, ""), "nonce": (_bytes_small, b""),
                    "server_nonce": (_bytes_small, b""), "proof": (_bytes_small, b"")},
    Op.PEER_PIN: {"keys": (_keys, _REQUIRED), "owner": (_nonempty_str, _REQUIRED),
                  "lease_s": (_seconds, 0.0)},
    Op.PEER_UNPIN: {"lease_ids": (_u64_list, _REQUIRED)},
    Op.PEER_RELEASE: {"owner": (_nonempty_str, _REQUIRED)},
    Op.PEER_RESERVE: {"keys": (_keys, _REQUIRED), "nbytes": (_u64_or_list, _REQUIRED)},
    Op.PEER_COMMIT: {"ids": (_u64_list, _REQUIRED), "checksums": (_u64_list, _REQUIRED),
                     "num_tokens": (_u64_or_list, _REQUIRED)},
    Op.PEER_ABORT: {"ids": (_u64_list, _REQUIRED)},
}
assert set(_SCHEMAS) == set(Op)


# --- encoding ----------------------------------------------------------------------------------


def _unpack(frame: Any, max_bytes: int) -> Any:
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise WireError(f"expected a bytes frame, got {type(frame).__name__}")
    if len(frame) > max_bytes:
        raise WireError(f"frame of {len(frame)} bytes is over the limit of {max_bytes}")
    try:
        return msgpack.unpackb(frame, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises many types (ValueError, TypeError, StackError...)
        raise WireError(f"not a msgpack message: {type(exc).__name__}: {exc}") from None


def _pack(obj: Any) -> bytes:
    try:
        return msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireError(f"cannot encode message: {exc}") from exc


def encode_request(req_id: int, op: Op, args: Mapping[str, Any] | None = None, auth: bytes = b"") -> bytes:
    """The frame of one request (the client side)."""
    msg: dict[str, Any] = {"v": WIRE_VERSION, "id": req_id, "op": op.value, "a": dict(args or {})}
    if auth:
        msg["auth"] = auth
    return _pack(msg)


def decode_request(frame: Any, max_bytes: int = DEFAULT_MAX_FRAME,
                   allowed: frozenset[Op] | None = None) -> Request:
    """Decode and validate one request frame (the server side).

    Raises only ``WireError``; when the envelope carried a usable id, the error
    has it as ``request_id`` so the server can address its error reply.
    """
    msg = _unpack(frame, max_bytes)
    if type(msg) is not dict:
        raise WireError(f"expected a map, got {type(msg).__name__}")
    rid = msg.get("id")
    try:
        if type(rid) is not int or not 0 <= rid <= _U64:
            raise WireError(f"'id' must be a non-negative integer, got {rid!r}")
        version = msg.get("v")
        if version != WIRE_VERSION:
            raise WireError(f"wire version {version!r}, this agent speaks {WIRE_VERSION}")
        if not msg.keys() <= _ENVELOPE:
            extra = set(msg) - _ENVELOPE
            if extra:
                raise WireError(f"unknown envelope field {sorted(map(str, extra))[0]!r}")
        name = msg.get("op")
        op = _OPS_BY_NAME.get(name) if type(name) is str else None
        if op is None or (allowed is not None and op not in allowed):
            raise WireError(f"unknown message type {name!r}")
        raw_args = msg.get("a", {})
        if type(raw_args) is not dict:
            raise WireError(f"'a' must be a map, got {type(raw_args).__name__}")
        auth = msg.get("auth", b"")
        if type(auth) is not bytes or len(auth) > 64:
            raise WireError("'auth' must be at most 64 bytes")
        return Request(rid, op, _validate_args(op, raw_args), auth)
    except WireError as exc:
        if type(rid) is int and 0 <= rid <= _U64:
            exc.request_id = rid  # type: ignore[attr-defined]
        raise


def _validate_args(op: Op, raw: dict[str, Any]) -> dict[str, Any]:
    schema = _SCHEMAS[op]
    extra = set(raw) - set(schema)
    if extra:
        raise WireError(f"{op.value}: unknown argument {sorted(map(str, extra))[0]!r}; "
                        f"allowed: {', '.join(sorted(schema)) or 'none'}")
    out: dict[str, Any] = {}
    for name, (check, default) in schema.items():
        if name in raw:
            out[name] = check(name, raw[name])
        elif default is _REQUIRED:
            raise WireError(f"{op.value}: missing argument {name!r}")
        else:
            out[name] = default
    return out


def encode_reply(req_id: int, result: Any, instance: str) -> bytes:
    return _pack({"v": WIRE_VERSION, "id": req_id, "ok": True, "r": result, "inst": instance})


def encode_error(req_id: int, exc: BaseException, instance: str) -> bytes:
    """An error reply. ``PdxError`` subclasses keep their class name; anything else is an AgentError."""
    name = type(exc).__name__ if isinstance(exc, PdxError) else "AgentError"
    msg = str(exc) if isinstance(exc, PdxError) else f"internal error: {type(exc).__name__}: {exc}"
    return _pack({"v": WIRE_VERSION, "id": req_id, "ok": False,
                  "err": {"type": name, "msg": msg[:4096]}, "inst": instance})


def decode_reply(frame: Any, max_bytes: int = DEFAULT_MAX_FRAME) -> Reply:
    """Decode one reply frame (the client side). Raises only ``WireError``."""
    msg = _unpack(frame, max_bytes)
    if type(msg) is not dict:
        raise WireError(f"reply: expected a map, got {type(msg).__name__}")
    if msg.get("v") != WIRE_VERSION:
        raise WireError(f"reply of wire version {msg.get('v')!r}, this client speaks {WIRE_VERSION}")
    rid, ok, inst = msg.get("id"), msg.get("ok"), msg.get("inst", "")
    if type(rid) is not int or type(ok) is not bool or type(inst) is not str:
        raise WireError("reply: bad envelope (id, ok, inst)")
    if ok:
        return Reply(rid, True, msg.get("r"), inst)
    err = msg.get("err")
    if type(err) is not dict or type(err.get("type")) is not str or type(err.get("msg")) is not str:
        raise WireError("reply: error without type and message")
    return Reply(rid, False, None, inst, error_from_wire(err["type"], err["msg"]))


def error_from_wire(type_name: str, message: str) -> PdxError:
    """The exception a client raises for an error reply: the same ``pdx.errors`` class
    when it is one, ``AgentError`` otherwise."""
    cls = getattr(_errors, type_name, None)
    if isinstance(cls, type) and issubclass(cls, PdxError):
        return cls(message)
    return AgentError(f"{type_name}: {message}")
