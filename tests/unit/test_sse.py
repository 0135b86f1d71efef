"""pdx.sse: events split on newlines only, whatever the answer's text holds."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from pdx.sse import adata_lines, data_lines

# characters str.splitlines (and so httpx's iter_lines) treats as line ends; JSON may carry them raw
ODD = "a\u2028b\x85c\x1cd\x1de\x1ef\x0bg\x0ch\u2029i"


def _stream() -> bytes:
    events = [{"choices": [{"text": ODD, "token_ids": [1, 2]}]}, {"choices": [{"text": "x"}]}]
    body = "".join(f"data: {json.dumps(e, ensure_ascii=False)}\n\n" for e in events) + "data: [DONE]\n\n"
    return body.encode()


def _chunks(raw: bytes, size: int) -> list[bytes]:
    return [raw[i:i + size] for i in range(0, len(raw), size)]


def test_odd_line_breaks_stay_inside_their_event() -> None:
    raw = _stream()
    for size in (1, 3, 7, len(raw)):  # events cut at every possible place across reads
        got = list(data_lines(_chunks(raw, size)))
        assert got[-1] == "[DONE]"
        assert [json.loads(d)["choices"][0]["text"] for d in got[:-1]] == [ODD, "x"]


def test_async_form_and_crlf() -> None:
    raw = _stream().replace(b"\n", b"\r\n")

    async def gen() -> AsyncIterator[bytes]:
        for c in _chunks(raw, 5):
            yield c

    async def collect() -> list[str]:
        return [d async for d in adata_lines(gen())]

    got = asyncio.run(collect())
    assert json.loads(got[0])["choices"][0]["token_ids"] == [1, 2]
    assert got[1:] == ['{"choices": [{"text": "x"}]}', "[DONE]"]


def test_lines_that_are_not_data_are_skipped() -> None:
    assert list(data_lines([b": keep-alive\n", b"event: x\ndata: 1\n", b"data: 2"])) == ["1", "2"]
