"""Frames on every pdx transport socket: a 4-byte big-endian length, then one msgpack map.

Used by the handshake/side channel and by the tcp data plane's headers. Every
frame carries a string ``"t"`` (its type) and is at most ``CONTROL_FRAME_MAX``
bytes unless the caller passes another bound; an oversized or undecodable frame
raises ``WireError`` and the caller drops that connection. Nothing is pickled.
All functions block, bounded by the socket's timeout.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Mapping
from typing import Any

import msgpack

from pdx.errors import AuthError, ConnectError, PeerIncompatible, TransportError, WireError

#: largest control frame accepted (hello, meta, requests, batch headers).
CONTROL_FRAME_MAX = 1 << 20

_LEN = struct.Struct(">I")

Message = dict[str, Any]


def encode_frame(obj: Mapping[str, Any], max_bytes: int = CONTROL_FRAME_MAX) -> bytes:
    """Length prefix + msgpack body. Raises ``WireError`` if larger than ``max_bytes``."""
    body = msgpack.packb(obj, use_bin_type=True)
    if len(body) > max_bytes:
        raise WireError(f"frame of {len(body)} bytes exceeds the limit of {max_bytes}")
    return _LEN.pack(len(body)) + body


def decode_body(body: bytes | bytearray | memoryview) -> Message:
    """Unpack one frame body; it must be a map with a string ``"t"``. Raises ``WireError``."""
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise WireError(f"undecodable frame: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("t"), str):
        raise WireError(f"frame is not a typed map: {str(obj)[:80]!r}")
    return obj


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock``; ``ConnectError`` on EOF. Uses the socket's timeout."""
    got = 0
    n = view.nbytes
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectError(f"connection closed by the peer after {got} of {n} bytes")
        got += k


def send_frame(sock: socket.socket, obj: Mapping[str, Any], max_bytes: int = CONTROL_FRAME_MAX) -> None:
    """Send one frame (blocking, bounded by the socket's timeout)."""
    sock.sendall(encode_frame(obj, max_bytes))


def recv_frame(sock: socket.socket, max_bytes: int = CONTROL_FRAME_MAX) -> Message:
    """Receive one frame (bounded by the socket's timeout). ``WireError`` if oversized or garbage."""
    head = bytearray(_LEN.size)
    recv_exact_into(sock, memoryview(head))
    (n,) = _LEN.unpack(head)
    if n > max_bytes:
        raise WireError(f"frame length {n} exceeds the limit of {max_bytes}")
    body = bytearray(n)
    recv_exact_into(sock, memoryview(body))
    return decode_body(body)


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> (host, port). ``ValueError`` if malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected an address like 127.0.0.1:5000, got {address!r}")
    return host.strip("[]"), int(port)


def error_from_frame(msg: Message, where: str) -> TransportError:
    code, reason = msg.get("code"), str(msg.get("reason", ""))
    if code == "auth":
        return AuthError(f"{where}: {reason}")
    if code == "incompatible":
        return PeerIncompatible(f"{where}: {reason}")
    return ConnectError(f"{where}: peer refused: {reason}")


def meta_of(m: Message) -> Message:
    meta = m.get("meta")
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise WireError("meta frame: 'meta' must be a map")
    return meta


def need(msg: Message, key: str, kind: type | tuple[type, ...]) -> Any:
    value = msg.get(key)
    if not isinstance(value, kind):
        raise WireError(f"{msg.get('t')!r} frame: field {key!r} missing or of the wrong type")
    return value
