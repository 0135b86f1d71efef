"""The control-plane wire format: round trips, every rejection, and a fuzzed decoder
that never raises anything but ``WireError``."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdx.agent.protocol import (
    LOCAL_OPS,
    PEER_OPS,
    WIRE_VERSION,
    Op,
    decode_reply,
    decode_request,
    encode_error,
    encode_reply,
    encode_request,
    error_from_wire,
)
from pdx.agent.types import ChunkResult, ChunkStatus, JobInfo, JobKind, JobState, PinInfo
from pdx.errors import AgentError, CapacityError, LayoutError, ReservationError, WireError

KEY = b"k" * 16


def pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def test_request_round_trip_fills_defaults() -> None:
    req = decode_request(encode_request(42, Op.LOOKUP, {"keys": [KEY, KEY]}))
    assert (req.id, req.op, req.args) == (42, Op.LOOKUP, {"keys": [KEY, KEY], "remote": False})
    req = decode_request(encode_request(1, Op.FETCH, {"peer": "tcp://127.0.0.1:1", "keys": [KEY],
                                                      "request_id": "r"}, auth=b"tok"))
    assert req.args["pin"] is True and req.args["deadline_s"] == 0.0 and req.auth == b"tok"


def test_reply_round_trip_and_error_classes() -> None:
    r = decode_reply(encode_reply(7, {"x": [1, b"b"]}, "inst-1"))
    assert r.ok and r.result == {"x": [1, b"b"]} and r.instance == "inst-1"
    e = decode_reply(encode_error(8, ReservationError("gone"), "inst-1"))
    assert not e.ok and isinstance(e.error, ReservationError) and str(e.error) == "gone"
    e = decode_reply(encode_error(9, KeyError("boom"), "i"))  # not a PdxError: generic, says internal
    assert type(e.error) is AgentError and "internal error" in str(e.error)
    assert isinstance(error_from_wire("CapacityError", "full"), CapacityError)
    assert type(error_from_wire("SystemExit", "x")) is AgentError  # never instantiates non-pdx classes
    assert type(error_from_wire("__builtins__", "x")) is AgentError


@pytest.mark.parametrize("frame, message", [
    (b"\xc1", "not a msgpack message"),
    (pack([1, 2]), "expected a map"),
    (pack({"v": 1, "id": 1, "op": "ping", "a": {}}), "wire version 1, this agent speaks 2"),
    (pack({"v": WIRE_VERSION, "id": -1, "op": "ping", "a": {}}), "'id'"),
    (pack({"v": WIRE_VERSION, "id": 1, "op": "nope", "a": {}}), "unknown message type 'nope'"),
    (pack({"v": WIRE_VERSION, "id": 1, "op": "ping", "a": [], }), "'a' must be a map"),
    (pack({"v": WIRE_VERSION, "id": 1, "op": "ping", "a": {}, "zz": 1}), "unknown envelope field"),
    (pack({"v": WIRE_VERSION, "id": 1, "op": "lookup", "a": {}}), "missing argument 'keys'"),
    (pack({"v": WIRE_VERSION, "id": 1, "op": "lookup", "a": {"keys": [b"x"]}}), "keys of 16 bytes"),
    (pack({"v": WIRE_VERSION, "id": 1, "op": "lookup", "a": {"keys": [KEY], "remote": 1}}), "true or false"),
    (pack({"v": WIRE_VERSION, "id": 1, "op": "pin", "a": {"keys": [], "owner": ""}}), "non-empty"),
    (pack({"v": WIRE_VERSION, "id": 1, "op": "wait", "a": {"job_id": 1, "timeout_s": float("nan")}}),
     "positive number"),
    (pack({"v": WIRE_VERSION, "id": 1, "op": "register_engine", "a": {"layout": {"a": [1]}}}),
     "a string or an integer"),
])
def test_rejections_name_the_problem(frame: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message.replace("(", r"\(")):
        decode_request(frame)


def test_errors_carry_the_request_id_when_there_is_one() -> None:
    with pytest.raises(WireError) as err:
        decode_request(pack({"v": 5, "id": 77, "op": "ping", "a": {}}))
    assert getattr(err.value, "request_id", None) == 77
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
    back = JobInfo.from_wire(msgpack.unpackb(pack(info.to_wire()), raw=False))
    assert back == info and back.usable_prefix == 1 and not back.ok
    pin = PinInfo(5, KEY, 4096, 10, 7, 256, 1.5)
    assert PinInfo.from_wire(pin.to_wire()) == pin and pin.found
    with pytest.raises(WireError):
        JobInfo.from_wire({"job_id": "x"})
    with pytest.raises(WireError):
        ChunkResult.from_wire([KEY, "weird", 0, 0, 0, 0, 0, ""])


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
    assert isinstance(req.op, Op) and isinstance(req.args, dict)


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
        KVLayout.from_dict(req.args["layout"])
