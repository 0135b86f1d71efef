"""Wire format of the ``ucx`` backend: tags, control messages and batch headers.

Used only by ``pdx.transport.ucx`` (on its UCX thread); pure functions, no I/O.

Tags (64 bits): kind (4) | sender id (24) | batch (24) | op (12). Sender ids are
random per transport and exchanged in the handshake; batch numbers count per
initiator; op is the index of the op inside the batch's header (the last value,
``ACK_OP``, is the READ ack). So messages of different peers, batches and ops
never match each other's receives, and one probe with ``BATCH_MASK`` finds every
message of one batch.

Data messages carry *runs*: consecutive ops that are contiguous in both regions
go as one message (``coalesce``), so the op field of a data tag is a run index.

Control messages (headers, acks) are a 4-byte little-endian length and a msgpack
map, at most ``HDR_MAX`` bytes; nothing is pickled.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np

from pdx.errors import WireError
from pdx.transport.base import ChunkOp

K_HDR, K_DATA, K_RDATA, K_ACK = 1, 2, 3, 4
ID_BITS = 24
BATCH_BITS = 24
OP_BITS = 12
ACK_OP = (1 << OP_BITS) - 1
#: ops described by one header (a batch with more is sent as several parts).
OPS_PER_HDR = 2048
#: a run of contiguous ops sent as one message stays under this (unless one op is bigger).
RUN_MAX = 64 << 20
#: largest header; acks are smaller (``ACK_MAX``).
HDR_MAX = 128 << 10
ACK_MAX = 16 << 10
#: matches kind and sender: one peer's headers.
PEER_MASK = 0xFFFFFFF000000000
#: matches kind, sender and batch: every message of one batch.
BATCH_MASK = 0xFFFFFFFFFFFFF000

_LEN = struct.Struct("<I")


def tag(kind: int, src: int, batch: int = 0, op: int = 0) -> int:
    return ((kind << 60) | ((src & ((1 << ID_BITS) - 1)) << 36)
            | ((batch & ((1 << BATCH_BITS) - 1)) << OP_BITS) | (op & ACK_OP))


def op_of(t: int) -> int:
    return t & ACK_OP


def pack_msg(obj: Any, limit: int = HDR_MAX) -> np.ndarray:
    """Length-prefixed msgpack in a fresh buffer (the caller keeps it alive until sent)."""
    body = msgpack.packb(obj, use_bin_type=True)
    if len(body) + _LEN.size > limit:
        raise WireError(f"ucx control message of {len(body)} bytes exceeds {limit}")
    out = np.empty(_LEN.size + len(body), dtype=np.uint8)
    out[:_LEN.size] = np.frombuffer(_LEN.pack(len(body)), dtype=np.uint8)
    out[_LEN.size:] = np.frombuffer(body, dtype=np.uint8)
    return out


def unpack_msg(buf: np.ndarray) -> dict[str, Any]:
    """Inverse of ``pack_msg``; ``WireError`` on anything malformed."""
    if buf.nbytes < _LEN.size:
        raise WireError("truncated ucx control message")
    (n,) = _LEN.unpack(buf[:_LEN.size].tobytes())
    if n > buf.nbytes - _LEN.size:
        raise WireError("truncated ucx control message")
    try:
        obj = msgpack.unpackb(buf[_LEN.size:_LEN.size + n].tobytes(), raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise WireError(f"undecodable ucx control message: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise WireError("ucx control message is not a map")
    return obj


def coalesce(ops: Sequence[ChunkOp]) -> list[tuple[int, int, int, int]]:
    """Group consecutive ops contiguous on both sides into runs (one message each).

    Returns ``(first op, op count, local offset, nbytes)`` per run; a run stays under
    ``RUN_MAX`` bytes unless one op alone is bigger. UCX pays a rendezvous per message,
    so 256 adjacent 256 KiB chunks cost one message instead of 256.
    """
    runs: list[tuple[int, int, int, int]] = []
    remote_end = -1
    for j, op in enumerate(ops):
        if runs:
            first, count, off, n = runs[-1]
            if off + n == op.local_offset and remote_end == op.remote_offset and n + op.nbytes <= RUN_MAX:
                runs[-1] = (first, count + 1, off, n + op.nbytes)
                remote_end += op.nbytes
                continue
        runs.append((j, 1, op.local_offset, op.nbytes))
        remote_end = op.remote_offset + op.nbytes
    return runs


def parse_header(head: dict[str, Any], size: int) -> tuple[str, int, list[list[Any]], list[tuple[int, int]]]:
    """``(kind, batch, ops, runs)`` of a batch header, checked against our region of ``size`` bytes.

    ``kind`` is ``"w"`` (the peer writes into us), ``"P"`` (the peer writes into us by
    letting us RMA-get the runs from its region, at the header's ``src`` offsets) or ``"r"``
    (the peer reads from us);
    each op is ``[offset in our region, nbytes, checksum or None]``; each run is
    ``(first op, op count)``, the ops of one message, contiguous in our region.
    ``WireError`` if anything is malformed or out of bounds.
    """
    kind, batch, ops, counts = head.get("k"), head.get("b"), head.get("ops"), head.get("runs")
    if kind not in ("w", "P", "r") or not isinstance(batch, int) or not isinstance(ops, list) \
            or len(ops) > OPS_PER_HDR or not isinstance(counts, list):
        raise WireError("header fields missing or of the wrong type")
    for op in ops:
        if (not isinstance(op, list) or len(op) != 3 or not isinstance(op[0], int)
                or not isinstance(op[1], int) or op[0] < 0 or op[1] <= 0 or op[0] + op[1] > size
                or not (op[2] is None or isinstance(op[2], int))):
            raise WireError(f"header op {op!r} is malformed or outside the region ({size} bytes)")
    runs, first = [], 0
    for count in counts:
        if not isinstance(count, int) or count <= 0 or first + count > len(ops):
            raise WireError(f"header run of {count!r} ops does not fit the {len(ops)} ops")
        for a, b in zip(ops[first:first + count - 1], ops[first + 1:first + count]):
            if a[0] + a[1] != b[0]:
                raise WireError("header run is not contiguous")
        runs.append((first, count))
        first += count
    if first != len(ops):
        raise WireError(f"header runs cover {first} of {len(ops)} ops")
    return kind, batch, ops, runs
