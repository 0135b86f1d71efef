"""Reading the server-sent events of an OpenAI-compatible stream: ``data: <json>`` lines.

Events are split on ``\\n`` only. httpx's ``iter_lines``/``aiter_lines`` also break lines at every
character ``str.splitlines`` counts as a line end (U+2028, U+0085, U+001C...), and a JSON string
in an event may hold those raw: an answer whose text contains one would be cut in the middle of
its event and fail to parse. Both functions yield the payload of each ``data:`` line, including
``[DONE]``.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator

_PREFIX = b"data:"


def _payload(line: bytes) -> str | None:
    line = line.rstrip(b"\r")
    if not line.startswith(_PREFIX):
        return None
    return line[len(_PREFIX):].lstrip(b" ").decode("utf-8", errors="replace")


def data_lines(chunks: Iterable[bytes]) -> Iterator[str]:
    """The ``data:`` payloads of a stream given as byte chunks (e.g. ``response.iter_bytes()``)."""
    buf = b""
    for chunk in chunks:
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if (p := _payload(line)) is not None:
                yield p
    if (p := _payload(buf)) is not None:
        yield p


async def adata_lines(chunks: AsyncIterable[bytes]) -> AsyncIterator[str]:
    """``data_lines`` for an async stream (e.g. ``response.aiter_bytes()``)."""
    buf = b""
    async for chunk in chunks:
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if (p := _payload(line)) is not None:
                yield p
    if (p := _payload(buf)) is not None:
        yield p
