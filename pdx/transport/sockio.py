"""Blocking socket I/O for the tcp data plane: whole payloads in pieces, bounded by deadlines.

Data sockets stay blocking (no Python-level timeout) so that ``MSG_WAITALL`` fills
a piece in one call; a deadline is enforced with the kernel's ``SO_RCVTIMEO`` /
``SO_SNDTIMEO`` (``arm``), and any thread can unblock a call with ``shutdown``.
All functions raise ``OSError`` (``TimeoutError``/``BlockingIOError`` past a deadline)
or ``ConnectError`` when the peer closes mid-payload.
"""

from __future__ import annotations

import socket
import struct
import time

from pdx.errors import ConnectError

#: payloads are received and sent in pieces of these sizes (the sender gathers ``IOV_PER_SEND``
#: pieces per ``sendmsg``): on loopback this pipelines the two copies (sender into
#: the kernel, kernel to receiver) better than one huge call (measured with
#: ``pdx-bench transfer``); the wire format does not depend on it.
RECV_PIECE = 256 << 10
SEND_PIECE = 256 << 10
IOV_PER_SEND = 64
#: a deadline that never comes.
NEVER = float("inf")
_TIMEVAL = struct.Struct("ll")


def arm(sock: socket.socket, deadline: float) -> None:
    """Bound the next blocking calls on ``sock`` by ``deadline`` (kernel timeouts, so the
    socket stays blocking and ``MSG_WAITALL`` still works); ``NEVER`` leaves it unbounded."""
    if deadline == NEVER:
        return
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    tv = _TIMEVAL.pack(int(left), max(1, int((left % 1) * 1e6)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def disarm(sock: socket.socket) -> None:
    tv = _TIMEVAL.pack(0, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def recv_into(sock: socket.socket, view: memoryview, deadline: float = NEVER) -> None:
    got, n = 0, view.nbytes
    while got < n:
        arm(sock, deadline)
        step = min(n - got, RECV_PIECE)
        k = sock.recv_into(view[got:got + step], step, socket.MSG_WAITALL)
        if k == 0:
            raise ConnectError(f"stream closed after {got} of {n} bytes")
        got += k


def send_views(sock: socket.socket, views: list[memoryview], deadline: float = NEVER) -> None:
    """Send ``views`` back to back, cut into ``SEND_PIECE`` slices gathered ``IOV_PER_SEND`` per ``sendmsg``."""
    pieces = [v[off:off + SEND_PIECE] for v in views for off in range(0, v.nbytes, SEND_PIECE)]
    for start in range(0, len(pieces), IOV_PER_SEND):
        group = pieces[start:start + IOV_PER_SEND]
        while group:
            arm(sock, deadline)
            sent = sock.sendmsg(group)
            while group and sent >= group[0].nbytes:
                sent -= group[0].nbytes
                group.pop(0)
            if group and sent:
                group[0] = group[0][sent:]


def shutdown(sock: socket.socket | None) -> None:
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
