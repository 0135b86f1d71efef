"""The proxy's upstream HTTP/1.1 client against hand-written servers: framing, keep-alive,
broken connections, aborts."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from pdx.errors import ConnectError, TransportError
from proxy.upstream import HIGH_WATER, UpstreamPool

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def serve(handler: Handler) -> AsyncIterator[str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await reader.readexactly(length)


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))  # type: ignore[arg-type]


def chunked(pieces: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def test_chunked_body_survives_any_split() -> None:
    """Many random bodies, each delivered in random slices (down to one byte)."""
    rng = random.Random(7)
    cases = []
    for _ in range(40):
        pieces = [rng.randbytes(rng.randint(1, 40)) for _ in range(rng.randint(1, 8))]
        cases.append((pieces, [rng.randint(1, 30) for _ in range(rng.randint(1, 10))]))
    cases.append(([b"x" * 300], [1]))  # every byte on its own

    async def go() -> None:
        for pieces, cuts in cases:
            payload = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n" + chunked(pieces)

            async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                              payload: bytes = payload, cuts: list[int] = cuts) -> None:
                await read_request(reader)
                pos, i = 0, 0
                while pos < len(payload):
                    n = cuts[i % len(cuts)]
                    writer.write(payload[pos:pos + n])
                    await writer.drain()
                    await asyncio.sleep(0)
                    pos, i = pos + n, i + 1
                await reader.read()  # keep the connection open until the client goes

            async with serve(handler) as url:
                pool = UpstreamPool(2.0)
                resp = await pool.request(url, "POST", "/x", b"{}", {"Content-Type": "application/json"})
                assert resp.status == 200 and resp.headers["x-a"] == "b"
                assert await resp.read() == b"".join(pieces)
                await pool.close()

    run(go())


def test_content_length_keep_alive_and_reuse() -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head, body = await read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            seen.append(head.split(b"\r\n")[0] + b" " + body)
            writer.write(b"HTTP/1.1 201 Created\r\nContent-Type: application/json; x=1\r\n"
                         b"Content-Length: 2\r\n\r\nok")
            await writer.drain()

    async def go() -> None:
        async with serve(handler) as url:
            pool = UpstreamPool(2.0)
            for i in range(3):
                resp = await pool.request(url + "/base/", "POST", "/v1/x", b"body%d" % i)
                assert (resp.status, resp.content_type, await resp.read()) == (201, "application/json", b"ok")
                assert await resp.readany() == b""
            assert pool.connects == 1
            assert seen == [b"POST /base/v1/x HTTP/1.1 body0", b"POST /base/v1/x HTTP/1.1 body1",
                            b"POST /base/v1/x HTTP/1.1 body2"]
            await pool.close()

    run(go())


def test_close_delimited_body_and_no_reuse() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\npart1")
        await writer.drain()
        writer.write(b"part2")
        writer.close()

    async def go() -> None:
        async with serve(handler) as url:
            pool = UpstreamPool(2.0)
            resp = await pool.request(url, "GET", "/")
            assert await resp.read() == b"part1part2"
            resp2 = await pool.request(url, "GET", "/")
            assert await resp2.read() == b"part1part2"
            assert pool.connects == 2
            await pool.close()

    run(go())


def test_unreachable_worker_is_connect_error() -> None:
    async def go() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        pool = UpstreamPool(2.0)
        with pytest.raises(ConnectError, match="cannot connect"):
            await pool.request(f"http://127.0.0.1:{port}", "GET", "/")
        with pytest.raises(ConnectError, match="http://"):
            await pool.request("https://127.0.0.1:1", "GET", "/")

    run(go())


@pytest.mark.parametrize("answer", [
    b"",  # closes without answering
    b"garbage\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",  # then closes: truncated
])
def test_broken_answers_are_transport_errors(answer: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()
        writer.close()

    async def go() -> None:
        async with serve(handler) as url:
            pool = UpstreamPool(2.0)
            with pytest.raises(TransportError):
                resp = await pool.request(url, "POST", "/", b"x")
                await resp.read()
            await pool.close()

    run(go())


def test_close_mid_body_drops_the_connection_and_the_server_sees_it() -> None:
    async def go() -> None:
        closed = asyncio.Event()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await writer.drain()
            if await reader.read() == b"":
                closed.set()

        async with serve(handler) as url:
            pool = UpstreamPool(2.0)
            resp = await pool.request(url, "POST", "/", b"x")
            assert await resp.readany() == b"hello"
            waiting = asyncio.create_task(resp.readany())
            await asyncio.sleep(0.01)
            resp.close()
            with pytest.raises(TransportError):
                await waiting
            await asyncio.wait_for(closed.wait(), 5)
            with pytest.raises(TransportError):  # reading a closed response fails, never hangs
                await resp.readany()
            await pool.close()

    run(go())


def test_stale_idle_connection_is_retried_once_on_a_new_one() -> None:
    async def go() -> None:
        conns = 0

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal conns
            conns += 1
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1")
            await writer.drain()
            if conns == 1:
                # like a server's keep-alive timeout: close after the first answer, quietly
                await asyncio.sleep(0.05)
                writer.transport.abort()
                return
            await reader.read()

        async with serve(handler) as url:
            pool = UpstreamPool(2.0)
            assert await (await pool.request(url, "GET", "/")).read() == b"1"
            await asyncio.sleep(0.01)  # the server has not closed yet: the connection looks idle
            resp = await pool.request(url, "GET", "/")
            assert await resp.read() == b"1"
            await pool.close()

    run(go())


def test_large_body_pauses_reading_and_resumes() -> None:
    size = 3 * HIGH_WATER

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        block = b"x" * 65536
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()
        await reader.read()

    async def go() -> None:
        async with serve(handler) as url:
            pool = UpstreamPool(2.0)
            resp = await pool.request(url, "GET", "/")
            await asyncio.sleep(0.2)  # let the worker push more than the high-water mark
            total = 0
            while piece := await resp.readany():
                total += len(piece)
            assert total == size
            await pool.close()

    run(go())


def test_cancelled_request_aborts_the_connection() -> None:
    async def go() -> None:
        closed = asyncio.Event()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            if await reader.read() == b"":  # never answers; waits for the client to go
                closed.set()

        async with serve(handler) as url:
            pool = UpstreamPool(2.0)
            task = asyncio.create_task(pool.request(url, "POST", "/", b"x"))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.wait_for(closed.wait(), 5)
            await pool.close()

    run(go())


def test_relay_hands_every_piece_to_the_sink_and_returns_at_the_end() -> None:
    """Random bodies in random slices: the sink gets them all, in order, from the protocol
    callback; at the end ``readany`` gives ``b""`` and the connection is reused."""
    rng = random.Random(11)
    cases = [([rng.randbytes(rng.randint(1, 40)) for _ in range(rng.randint(1, 8))],
              [rng.randint(1, 30) for _ in range(rng.randint(1, 10))]) for _ in range(20)]

    async def go() -> None:
        for pieces, cuts in cases:
            payload = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(pieces)

            async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                              payload: bytes = payload, cuts: list[int] = cuts) -> None:
                for _ in range(2):  # two calls on one keep-alive connection
                    await read_request(reader)
                    pos, i = 0, 0
                    while pos < len(payload):
                        n = cuts[i % len(cuts)]
                        writer.write(payload[pos:pos + n])
                        await writer.drain()
                        await asyncio.sleep(0)
                        pos, i = pos + n, i + 1
                await reader.read()
                writer.close()

            async with serve(handler) as url:
                pool = UpstreamPool(2.0)
                for _ in range(2):
                    resp = await pool.request(url, "POST", "/x", b"{}")
                    got: list[bytes] = []
                    first = await resp.readany()  # as the proxy does: the first bytes, then relay

                    def sink(piece: bytes, got: list[bytes] = got) -> bool:
                        got.append(piece)
                        return True

                    await resp.relay(sink)
                    assert await resp.readany() == b""
                    assert first + b"".join(got) == b"".join(pieces)
                assert pool.connects == 1
                await pool.close()

    run(go())


def test_relay_refused_piece_stays_for_readany() -> None:
    """A sink that refuses (its client is not draining) ends the relay; nothing is lost."""
    pieces = [b"a" * 10, b"b" * 10, b"c" * 10]
    sent = [asyncio.Event() for _ in pieces]
    go_on = [asyncio.Event() for _ in pieces]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for p, s, g in zip(pieces, sent, go_on, strict=True):
            await g.wait()
            writer.write(b"%x\r\n%s\r\n" % (len(p), p))
            await writer.drain()
            s.set()
        writer.write(b"0\r\n\r\n")
        await reader.read()
        writer.close()

    async def go() -> None:
        async with serve(handler) as url:
            pool = UpstreamPool(2.0)
            resp = await pool.request(url, "GET", "/")
            got: list[bytes] = []
            offers: list[bytes] = []

            def sink(piece: bytes) -> bool:
                offers.append(piece)
                if len(offers) == 1:
                    got.append(piece)
                    return True
                return False  # the second piece is refused

            go_on[0].set()
            relay = asyncio.create_task(resp.relay(sink))
            await sent[0].wait()
            go_on[1].set()
            await asyncio.wait_for(relay, 5)  # returns once the second piece is refused
            assert offers == [pieces[0], pieces[1]] and got == [pieces[0]]
            go_on[2].set()
            rest = await resp.read()
            assert b"".join(got) + rest == b"".join(pieces)
            await pool.close()

    run(go())


def test_relay_returns_when_the_connection_breaks() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    async def go() -> None:
        async with serve(handler) as url:
            pool = UpstreamPool(2.0)
            resp = await pool.request(url, "GET", "/")
            got: list[bytes] = []
            await resp.relay(lambda p: got.append(p) is None)
            with pytest.raises(TransportError):
                while await resp.readany():
                    pass
            assert b"".join(got) in (b"", b"hello")
            await pool.close()

    run(go())
