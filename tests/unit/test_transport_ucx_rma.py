"""The ucx backend's one-sided path: WRITEs go as a pull header that the receiver serves with
RMA gets (rkeys from the handshake metadata); a peer without RMA gets tagged messages."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from test_transport_nixl_ucx import MiB, Pair, _available

from pdx.errors import WireError
from pdx.transport.base import ChunkOp, OpKind, OpStatus
from pdx.transport.ucx_rma import UCS_INPROGRESS, UCS_OK, _status_ptr
from pdx.transport.ucx_wire import pack_msg, parse_header, unpack_msg

pytestmark = pytest.mark.skipif(not _available("ucx"), reason="ucxx is not installed")


def test_status_pointers_decode() -> None:
    assert _status_ptr(None) == (UCS_OK, None)
    assert _status_ptr(0) == (UCS_OK, None)
    assert _status_ptr(0x7F00_0000_1000) == (UCS_INPROGRESS, 0x7F00_0000_1000)
    assert _status_ptr((1 << 64) - 3) == (-3, None)  # UCS_ERR_NO_MESSAGE as a pointer


def test_pull_headers_parse_like_writes() -> None:
    head = {"k": "P", "b": 1, "ops": [[0, 10, None], [10, 6, 3]], "runs": [2], "src": [64]}
    assert parse_header(unpack_msg(pack_msg(head)), 16) == ("P", 1, head["ops"], [(0, 2)])
    with pytest.raises(WireError, match="outside"):
        parse_header({**head, "ops": [[0, 10, None], [10, 7, 3]]}, 16)


@pytest.fixture
def pulls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the pull headers served (by either side of an in-process pair)."""
    from pdx.transport.ucx_engine import UcxEngine

    served: list[int] = []
    real = UcxEngine._serve_pull

    def spy(self: Any, p: Any, seq: int, ops: Any, runs: Any, src: Any) -> None:
        served.append(len(ops))
        real(self, p, seq, ops, runs, src)
    monkeypatch.setattr(UcxEngine, "_serve_pull", spy)
    return served


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair("ucx", 16 * MiB)
    yield p
    p.close()


def test_writes_are_pulled_and_verified(pair: Pair, pulls: list[int]) -> None:
    good = pair.ma.fill(0, 3 * MiB, 1)
    other = pair.ma.fill(4 * MiB, MiB, 2)
    ops = [ChunkOp(0, 8 * MiB, 3 * MiB, good), ChunkOp(4 * MiB, 12 * MiB, MiB, other ^ 1)]
    res = pair.a.post(pair.pid, OpKind.WRITE, ops).wait(30)
    assert res.status == [OpStatus.DONE, OpStatus.CORRUPT], res.errors
    assert pair.mb.cks(8 * MiB, 3 * MiB) == good
    assert pair.mb.cks(12 * MiB, MiB) == other  # the bytes landed; the checksum sent was wrong
    assert pulls == [2]
    # READs still go as tagged messages, and the pair keeps working both ways
    back = pair.a.post(pair.pid, OpKind.READ, [ChunkOp(5 * MiB, 8 * MiB, 3 * MiB, good)]).wait(30)
    assert back.ok and pair.ma.cks(5 * MiB, 3 * MiB) == good
    (info,) = pair.b.peers()
    want = pair.mb.fill(0, MiB, 3)
    assert pair.b.post(info.peer_id, OpKind.WRITE, [ChunkOp(0, 6 * MiB, MiB, want)]).wait(30).ok
    assert pair.ma.cks(6 * MiB, MiB) == want
    assert pulls == [2, 1]


def test_a_peer_without_rma_gets_tagged_messages(monkeypatch: pytest.MonkeyPatch, pulls: list[int]) -> None:
    monkeypatch.setenv("PDX_UCX_RMA", "0")
    p = Pair("ucx", 4 * MiB)
    try:
        want = p.ma.fill(0, MiB, 4)
        assert p.a.post(p.pid, OpKind.WRITE, [ChunkOp(0, 2 * MiB, MiB, want)]).wait(30).ok
        assert p.mb.cks(2 * MiB, MiB) == want
        assert pulls == []
    finally:
        p.close()
