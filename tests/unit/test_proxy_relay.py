"""The stream relay (decode's bytes written to the client from the upstream callback) against
clients that read slowly or speak HTTP/1.0: every byte arrives, in order, framed right."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import pytest

from proxy import flow
from proxy.standin import content_of_stream
from proxy.testing import Cluster

MODEL = "standin-model"


def _raw_stream(url: str, max_tokens: int, version: str = "1.1", read_delay_s: float = 0.0) -> bytes:
    """POST a streaming completion on a plain socket with a small receive buffer; optionally
    read nothing for ``read_delay_s`` first (the proxy's socket to us fills up meanwhile).
    Returns the whole response (head and body) once the server ends it."""
    u = urlsplit(url)
    body = json.dumps({"model": MODEL, "prompt": "hello", "max_tokens": max_tokens, "stream": True}).encode()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(30)
    s.connect((u.hostname or "127.0.0.1", u.port or 80))
    conn = "Connection: close\r\n" if version == "1.1" else ""
    s.sendall(f"POST /v1/completions HTTP/{version}\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
              f"{conn}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    if read_delay_s:
        time.sleep(read_delay_s)
    out = bytearray()
    while data := s.recv(65536):
        out += data
    s.close()
    return bytes(out)


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while True:
        eol = body.index(b"\r\n", pos)
        size = int(body[pos:eol], 16)
        if size == 0:
            assert body[eol:] == b"\r\n\r\n", "the body ends with the last chunk"
            return bytes(out)
        out += body[eol + 2:eol + 2 + size]
        assert body[eol + 2 + size:eol + 4 + size] == b"\r\n"
        pos = eol + 4 + size


def _expected(n: int) -> str:
    return "".join(f" w{i}" for i in range(n))


def test_a_slow_reader_gets_every_byte_in_order() -> None:
    """A long, fast stream to a client that reads nothing for a while: pieces go out both
    through the relay and through the handler's writer (what arrived before the relay
    started); the answer is whole, in order, in well-formed chunks."""
    n = 6000  # ~100 bytes an event: ~600 KB
    with Cluster(1, 1) as c:
        raw = _raw_stream(c.url, n, read_delay_s=0.5)
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
        events = _dechunk(body)
        assert events.endswith(b"data: [DONE]\n\n")
        assert content_of_stream(events) == _expected(n)
        assert c.decode[0].completed and not c.decode[0].aborted


def test_a_client_that_never_drains_enough_takes_the_writer_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the relay's limit below zero every piece is refused (as for a client with too
    much unsent): each one then goes through ``readany`` and the handler's writer, and the
    relay is tried again for the next; the paced stream still arrives whole and in order."""
    monkeypatch.setattr(flow, "RELAY_HIGH_WATER", -1)
    with Cluster(1, 1) as c:
        c.decode[0].behaviour.pace_s = 0.002
        raw = _raw_stream(c.url, 40)
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        events = _dechunk(body)
        assert events.endswith(b"data: [DONE]\n\n")
        assert content_of_stream(events) == _expected(40)


def test_an_http10_client_gets_the_stream_unchunked() -> None:
    with Cluster(1, 1) as c:
        raw = _raw_stream(c.url, 50, version="1.0")
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0] + b" "
        assert b"transfer-encoding" not in head.lower()
        assert body.endswith(b"data: [DONE]\n\n")
        assert content_of_stream(body) == _expected(50)
