"""Frames on transport sockets: round trips, bounds, garbage (hypothesis for the decoder)."""

from __future__ import annotations

import socket
import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdx.errors import ConnectError, WireError
from pdx.transport.framing import (
    CONTROL_FRAME_MAX,
    decode_body,
    encode_frame,
    parse_address,
    recv_frame,
    send_frame,
)

values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20) | st.binary(max_size=64),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(st.text(min_size=1, max_size=10), st.dictionaries(st.text(max_size=8), values, max_size=6))
def test_round_trip(t: str, body: dict[str, object]) -> None:
    msg = {**body, "t": t}
    frame = encode_frame(msg)
    (n,) = struct.unpack(">I", frame[:4])
    assert n == len(frame) - 4
    assert decode_body(frame[4:]) == msg


@settings(max_examples=300)
@given(st.binary(max_size=256))
def test_garbage_never_raises_anything_but_wire_error(data: bytes) -> None:
    try:
        out = decode_body(data)
    except WireError:
        return
    assert isinstance(out, dict) and isinstance(out["t"], str)


@pytest.mark.parametrize("obj", [[1, 2], {"x": 1}, {"t": 5}, "t", {1: "a"}])
def test_untyped_or_non_map_frames_are_rejected(obj: object) -> None:
    with pytest.raises(WireError):
        decode_body(msgpack.packb(obj))


def test_oversized_frame_is_refused_on_both_ends() -> None:
    with pytest.raises(WireError, match="exceeds"):
        encode_frame({"t": "x", "b": b"0" * CONTROL_FRAME_MAX})
    a, b = socket.socketpair()
    with a, b:
        a.sendall(struct.pack(">I", CONTROL_FRAME_MAX + 1))
        b.settimeout(2)
        with pytest.raises(WireError, match="exceeds the limit"):
            recv_frame(b)


def test_socket_round_trip_and_eof_mid_frame() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(2)
        send_frame(a, {"t": "ping", "n": 1})
        assert recv_frame(b) == {"t": "ping", "n": 1}
        a.sendall(encode_frame({"t": "cut"})[:5])
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(ConnectError, match="closed by the peer"):
            recv_frame(b)


@pytest.mark.parametrize(("addr", "want"), [("127.0.0.1:80", ("127.0.0.1", 80)), ("[::1]:9", ("::1", 9)),
                                            ("localhost:0", ("localhost", 0))])
def test_parse_address(addr: str, want: tuple[str, int]) -> None:
    assert parse_address(addr) == want


@pytest.mark.parametrize("addr", ["", "127.0.0.1", ":80", "host:port", "host:-1"])
def test_parse_address_rejects(addr: str) -> None:
    with pytest.raises(ValueError, match="expected an address"):
        parse_address(addr)
