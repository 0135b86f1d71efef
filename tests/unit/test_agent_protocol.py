"""The control-plane wire format: round trips, every rejection, and a fuzzed decoder
that never raises anything but ``WireError``."""

from __future__ import annotations

import re

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdx import errors
from pdx.agent.protocol import (
    ARGS,
    LOCAL_OPS,
    MAX_KEYS,
    PEER_OPS,
    REPLY_TYPES,
    WIRE_VERSION,
    FetchArgs,
    LookupArgs,
    Op,
    decode_reply,
    decode_request,
    encode_error,
    encode_reply,
    encode_request,
    error_from_wire,
)
from pdx.agent.types import ChunkResult, ChunkStatus, JobInfo, JobKind, JobState, PinInfo
from pdx.errors import (
    AgentError,
    CapacityError,
    ErrorCode,
    LayoutError,
    PeerDenied,
    ReservationError,
    WireError,
)

KEY = b"k" * 16


def pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def test_request_round_trip_fills_defaults() -> None:
    req = decode_request(encode_request(42, Op.LOOKUP, {"keys": [KEY, KEY]}))
    assert (req.id, req.op, req.args) == (42, Op.LOOKUP, LookupArgs([KEY, KEY], remote=False))
    req = decode_request(encode_request(1, Op.FETCH, FetchArgs("tcp://127.0.0.1:1", [KEY], "r"), auth=b"tok"))
    assert req.args.pin is True and req.args.deadline_s == 0.0 and req.auth == b"tok"


def test_every_op_has_a_schema_for_its_arguments_and_its_reply() -> None:
    assert set(ARGS) == set(Op) == set(REPLY_TYPES)


def test_reply_round_trip_and_error_codes() -> None:
    pins = [PinInfo(5, KEY, 4096, 10, 7, 256, 1.5), PinInfo(0, KEY)]
    r = decode_reply(encode_reply(7, pins, "inst-1"))
    assert r.ok and r.result(Op.PIN) == pins and r.instance == "inst-1"
    with pytest.raises(WireError, match="reply to lookup"):  # strict: a reply of another shape
        r.result(Op.LOOKUP)
    e = decode_reply(encode_error(8, ReservationError("gone"), "inst-1"))
    assert not e.ok and isinstance(e.error, ReservationError) and str(e.error) == "gone"
    e = decode_reply(encode_error(9, KeyError("boom"), "i"))  # not a PdxError: generic, says internal
    assert type(e.error) is AgentError and "internal error" in str(e.error)
    assert isinstance(error_from_wire(ErrorCode.CAPACITY, "full"), CapacityError)
    assert isinstance(error_from_wire(ErrorCode.PEER_DENIED, "no"), PeerDenied)
    assert type(error_from_wire(9999, "x")) is AgentError  # a code from a newer peer


def test_error_codes_are_unique_per_class() -> None:
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.PdxError)
               and "error_code" in vars(c) and c is not errors.PdxError]
    codes = [c.error_code for c in classes]
    assert len(codes) == len(set(codes)) and len(classes) >= 20
    for c in classes:
        assert errors.error_class(c.error_code) is c


@pytest.mark.parametrize("frame, message", [
    (b"\xc1", "not a msgpack request"),
    (pack([1, 2]), "bad request envelope: Expected `object`"),
    (pack({"v": 1, "id": 1, "op": "ping", "a": {}}), f"wire version 1, this agent speaks {WIRE_VERSION}"),
    (pack({"v": WIRE_VERSION, "id": -1, "op": "ping", "a": {}}), "at `$.id`"),
    (pack({"v": WIRE_VERSION, "id": 1, "op": "nope", "a": {}}), "unknown message type 'nope'"),
    (pack({"v": WIRE_VERSION, "id": 1, "op": "ping", "a": [], }), "ping: Expected `object`, got `array`"),
    (pack({"v": WIRE_VERSION, "id": 1, "op": "ping", "a": {}, "zz": 1}), "unknown field `zz`"),
    (pack({"v": WIRE_VERSION, "id": 1, "op": "lookup", "a": {}}), "missing required field `keys`"),
    (pack({"v": WIRE_VERSION, "id": 1, "op": "lookup", "a": {"keys": [b"x"]}}), "length >= 16"),
    (pack({"v": WIRE_VERSION, "id": 1, "op": "lookup", "a": {"keys": [KEY], "remote": 1}}),
     "Expected `bool`, got `int` - at `$.remote`"),
    (pack({"v": WIRE_VERSION, "id": 1, "op": "pin", "a": {"keys": [], "owner": ""}}), "length >= 1"),
    (pack({"v": WIRE_VERSION, "id": 1, "op": "wait", "a": {"job_id": 1, "timeout_s": float("nan")}}),
     "at `$.timeout_s`"),
    (pack({"v": WIRE_VERSION, "id": 1, "op": "fetch", "a": {"peer": "p", "keys": [], "request_id": "r",
                                                            "deadline_s": 1e300}}), "<= 86400.0"),
    (pack({"v": WIRE_VERSION, "id": 1, "op": "register_engine", "a": {"layout": {"a": [1]}}}),
     "at `$.layout"),
    (pack({"v": WIRE_VERSION, "id": 1, "op": "abort", "a": {"ids": [1] * (MAX_KEYS + 1)}}), "length <= 65536"),
])
def test_rejections_name_the_problem(frame: bytes, message: str) -> None:
    with pytest.raises(WireError, match=re.escape(message)):
        decode_request(frame)


def test_errors_carry_the_request_id_when_there_is_one() -> None:
    with pytest.raises(WireError) as err:
        decode_request(pack({"v": 5, "id": 77, "op": "ping", "a": {}}))
    assert getattr(err.value, "request_id", None) == 77
    with pytest.raises(WireError) as err:  # a bad envelope with a usable id: still answerable
        decode_request(pack({"v": WIRE_VERSION, "id": 78, "op": 5, "a": {}}))
    assert getattr(err.value, "request_id", None) == 78
    with pytest.raises(WireError) as err:
        decode_request(b"\x00garbage")
    assert getattr(err.value, "request_id", None) is None


def test_oversized_frames_and_op_sets() -> None:
    frame = encode_request(1, Op.LOOKUP, {"keys": [KEY] * 1000})
    with pytest.raises(WireError, match="over the limit"):
        decode_request(frame, max_bytes=len(frame) - 1)
    with pytest.raises(WireError, match="unknown message type"):
        decode_request(encode_request(1, Op.PEER_PIN, {"keys": [], "owner": "o"}), allowed=LOCAL_OPS)
    with pytest.raises(WireError, match="unknown message type"):
        decode_request(encode_request(1, Op.LOOKUP, {"keys": []}), allowed=PEER_OPS)
    assert Op.PING in LOCAL_OPS and Op.PING in PEER_OPS


def test_result_types_round_trip() -> None:
    info = JobInfo(3, JobKind.FETCH, JobState.DONE, "r", "tcp://x",
                   (ChunkResult(KEY, ChunkStatus.DONE, 4096, 10, 5, 256, 9),
                    ChunkResult(KEY, ChunkStatus.CORRUPT, reason="bad")), "", 10, 0.5)
    back = decode_reply(encode_reply(1, info, "i")).result(Op.WAIT)
    assert back == info and back.usable_prefix == 1 and not back.ok
    bad = decode_reply(encode_reply(1, {"job_id": "x"}, "i"))
    with pytest.raises(WireError):
        bad.result(Op.JOB_STATUS)
    bad = decode_reply(encode_reply(1, [[KEY, "weird", 0, 0, 0, 0, 0, ""]], "i"))
    with pytest.raises(WireError):
        bad.result(Op.PEER_PIN)


# --- fuzzing --------------------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=True)
           | st.text(max_size=16) | st.binary(max_size=24))
values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=5)
                      | st.dictionaries(st.text(max_size=10) | st.integers(0, 3), kids, max_size=5),
                      max_leaves=20)
arg_names = st.sampled_from(["keys", "owner", "ids", "job_id", "nbytes", "layout", "peer", "timeout_s",
                             "lease_s", "num_tokens", "checksums", "remote", "pin", "nonce", "x"])
envelopes = st.fixed_dictionaries(
    {"v": st.sampled_from([WIRE_VERSION, 0, 2, "1"]), "id": st.integers(-1, 2**64 - 1) | st.text(max_size=3),
     "op": st.sampled_from([o.value for o in Op] + ["", "PING", "peer_"]),
     "a": st.dictionaries(arg_names, values, max_size=6) | values},
    optional={"auth": st.binary(max_size=80) | st.integers(-5, 5), "extra": values})


def _only_wire_errors(frame: bytes) -> None:
    for fn in (decode_request, decode_reply):
        try:
            fn(frame)
        except WireError:
            pass


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2048))
def test_decoders_on_random_bytes(frame: bytes) -> None:
    _only_wire_errors(frame)


@settings(max_examples=400, deadline=None)
@given(values)
def test_decoders_on_random_msgpack(obj: object) -> None:
    _only_wire_errors(pack(obj))


@settings(max_examples=600, deadline=None)
@given(envelopes)
def test_decoder_on_near_valid_requests(msg: dict[str, object]) -> None:
    try:
        req = decode_request(pack(msg))
    except WireError:
        return
    assert isinstance(req.op, Op) and isinstance(req.args, ARGS[req.op])


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.integers(0, 200))
def test_decoder_on_corrupted_valid_frames(noise: bytes, at: int) -> None:
    frame = bytearray(encode_request(5, Op.FETCH, {"peer": "tcp://h:1", "keys": [KEY] * 3, "request_id": "r"}))
    at = at % len(frame)
    frame[at:at + len(noise)] = noise
    _only_wire_errors(bytes(frame))
    _only_wire_errors(bytes(frame[:at]))  # truncated


def test_deep_nesting_is_a_wire_error() -> None:
    frame = b"\x91" * 100_000 + b"\xc0"  # 100k nested one-element arrays
    with pytest.raises(WireError):
        decode_request(frame)


def test_layout_errors_come_from_the_layout_not_the_decoder() -> None:
    req = decode_request(encode_request(1, Op.REGISTER_ENGINE, {"layout": {"model_id": "m"}}))
    from pdx.layout import KVLayout
    with pytest.raises(LayoutError):
        KVLayout.from_dict(req.args.layout)
