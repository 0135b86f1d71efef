"""A lean HTTP/1.1 client for the proxy's calls to its workers, with keep-alive pools.

Why not a general client: every request through the proxy makes two upstream calls
and forwards every streamed token, so per-call and per-chunk costs are the proxy's
overhead. This client does only what those calls need: ``POST``/``GET`` with a
body in bytes, responses framed by ``Content-Length``, chunked encoding or the
end of the connection, keep-alive reuse, and nothing else (no redirects, cookies,
compression, TLS or proxies; workers are plain ``http://``).

* ``UpstreamPool.request`` connects (or reuses an idle connection), writes the
  request in one write and returns an ``UpstreamResponse`` once the status line
  and headers arrived. It raises ``ConnectError`` when the worker cannot be
  reached, ``TransportError`` when the connection breaks before the headers.
  A reused idle connection that turns out closed is retried once on a new one.
* ``UpstreamResponse.readany()`` returns the body bytes that arrived (de-chunked),
  ``b""`` at the end; ``read()`` the whole body. A connection that breaks mid-body
  raises ``TransportError``. ``relay(sink)`` hands body bytes to ``sink`` straight
  from the protocol callback, as they arrive (no task wake-up per piece), until the
  body ends, breaks, or ``sink`` refuses a piece (kept for ``readany``). ``close()`` drops the connection at once, which makes
  vLLM abort the request; a response read to its end goes back to the pool.

Waits have no timeouts of their own: the caller wraps them (``asyncio.timeout``)
and closes the response on expiry. Event-loop thread only; one response per
connection at a time (no pipelining). The pool owns its connections; a response
owns its connection until it ends or is closed.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from urllib.parse import urlsplit

from pdx.errors import ConnectError, TransportError

#: body bytes buffered before reading from the worker pauses (the client is slower).
HIGH_WATER = 1 << 20
MAX_HEAD = 64 * 1024
#: idle connections older than this are not reused: uvicorn (vLLM's server) closes idle
#: keep-alive connections after 5 s by default, and reusing one it is closing fails the call.
IDLE_TIMEOUT_S = 4.0


class _Conn(asyncio.Protocol):
    """One connection and the parse state of the response being read on it."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.head: asyncio.Future[None] | None = None
        self.raw = bytearray()  # bytes not yet parsed
        self.body: list[bytes] = []  # parsed body pieces not yet read
        self.buffered = 0
        self.waiter: asyncio.Future[None] | None = None
        self.status = 0
        self.headers: dict[str, str] = {}
        self.in_head = True
        self.mode = "length"  # length | chunked | close | none
        self.remaining = 0  # body bytes left (length) or in the current chunk (chunked)
        self.chunk_state = "size"  # size | data | crlf | trailer
        self.complete = False
        self.got_bytes = False
        self.error: Exception | None = None
        self.paused = False
        self.reusable = False
        #: while set (``UpstreamResponse.relay``), body bytes go to it from ``data_received``
        self.sink: Callable[[bytes], bool] | None = None

    # --- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        if self.in_head or not self.complete:
            if self.mode == "close" and not self.in_head:
                self.complete = True
            else:
                self.error = TransportError(f"connection to {self.key[0]}:{self.key[1]} broke"
                                            + (f": {exc}" if exc else ""))
        self._wake()

    def data_received(self, data: bytes) -> None:
        if self.head is None or (self.complete and not self.in_head):
            # bytes on an idle connection: the worker is confused, drop the connection
            self.abort()
            return
        self.got_bytes = True
        if self.in_head:
            self.raw += data
            end = self.raw.find(b"\r\n\r\n")
            if end < 0:
                if len(self.raw) > MAX_HEAD:
                    self._fail("response head too large")
                return
            try:
                self._parse_head(bytes(self.raw[:end]))
            except (ValueError, IndexError) as exc:
                self._fail(f"malformed response head: {exc}")
                return
            data = bytes(self.raw[end + 4:])
            self.raw = bytearray()
            self.in_head = False
            if self.head is not None and not self.head.done():
                self.head.set_result(None)
        if data:
            self._feed(data)
        if self.sink is not None and self.body:
            self._to_sink(self.sink)
        self._wake()

    def _to_sink(self, sink: Callable[[bytes], bool]) -> None:
        """Everything parsed from one read goes to ``sink`` as one piece; a refused piece stays
        buffered (for ``readany``) and ends the relay."""
        body = self.body
        piece = body[0] if len(body) == 1 else b"".join(body)
        if not sink(piece):
            self.sink = None
            return
        body.clear()
        self.buffered = 0
        if self.paused and self.transport is not None and not self.closed:
            self.transport.resume_reading()
            self.paused = False

    # --- parsing -----------------------------------------------------------------------------

    def _parse_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        version, status = lines[0].split(" ", 2)[:2]
        if not version.startswith("HTTP/1."):
            raise ValueError(f"not HTTP/1.x: {lines[0]!r}")
        self.status = int(status)
        headers = self.headers
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if self.status in (204, 304) or 100 <= self.status < 200:
            self.mode, self.complete = "none", True
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self.mode = "chunked"
        elif "content-length" in headers:
            self.mode = "length"
            self.remaining = int(headers["content-length"])
            self.complete = self.remaining == 0
        else:
            self.mode = "close"
        if headers.get("connection", "").lower() == "close" or version == "HTTP/1.0":
            self.reusable = False
        else:
            self.reusable = self.mode != "close"

    def _feed(self, data: bytes) -> None:
        if self.complete:
            self.reusable = False  # bytes after the end: the worker is confused, do not reuse
            return
        if self.mode == "length":
            piece = data[: self.remaining]
            self.remaining -= len(piece)
            self._push(piece)
            self.complete = self.remaining == 0
            if len(data) > len(piece):
                self.reusable = False
        elif self.mode == "close":
            self._push(data)
        else:
            self._feed_chunked(data)

    def _feed_chunked(self, data: bytes) -> None:
        buf = self.raw
        buf += data
        pos = 0
        n = len(buf)
        while pos < n:
            st = self.chunk_state
            if st == "data":
                take = min(self.remaining, n - pos)
                self._push(bytes(buf[pos:pos + take]))
                pos += take
                self.remaining -= take
                if self.remaining == 0:
                    self.chunk_state = "crlf"
            elif st == "crlf":
                if n - pos < 2:
                    break
                pos += 2
                self.chunk_state = "size"
            else:  # size or trailer: one line
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if n - pos > 4096:
                        self._fail("chunk header too long")
                        return
                    break
                line = bytes(buf[pos:eol])
                pos = eol + 2
                if st == "trailer":
                    if not line:
                        self.complete = True
                        if pos < n:
                            self.reusable = False  # bytes after the end
                        break
                    continue
                try:
                    size = int(line.split(b";", 1)[0], 16)
                except ValueError:
                    self._fail(f"bad chunk size {line[:20]!r}")
                    return
                if size == 0:
                    self.chunk_state = "trailer"
                else:
                    self.remaining = size
                    self.chunk_state = "data"
        del buf[:pos]

    def _push(self, piece: bytes) -> None:
        if piece:
            self.body.append(piece)
            self.buffered += len(piece)
            if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
                self.transport.pause_reading()
                self.paused = True

    def _fail(self, why: str) -> None:
        self.error = TransportError(f"{self.key[0]}:{self.key[1]}: {why}")
        if self.head is not None and not self.head.done():
            self.head.set_result(None)
        self._wake()
        self.abort()

    def _wake(self) -> None:
        if self.head is not None and not self.head.done() and (self.error or self.closed):
            self.head.set_result(None)
        w = self.waiter
        if w is not None and not w.done() and (
                self.sink is None or self.complete or self.error is not None or self.closed):
            w.set_result(None)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class UpstreamResponse:
    """The answer of one upstream call. Read it to the end, or ``close()`` it."""

    def __init__(self, conn: _Conn) -> None:
        self._conn = conn
        self.status = conn.status
        self.headers = conn.headers
        self._done = False

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";", 1)[0].strip()

    async def readany(self) -> bytes:
        """Body bytes that arrived since the last call (waits for some); ``b""`` at the end."""
        c = self._conn
        if self._done:  # finished (the connection may already serve another call) or closed
            if c.error is not None and not c.complete:
                raise c.error
            return b""
        while True:
            if c.body:
                out = c.body[0] if len(c.body) == 1 else b"".join(c.body)
                c.body.clear()
                c.buffered = 0
                if c.paused and c.transport is not None and not c.closed:
                    c.transport.resume_reading()
                    c.paused = False
                return out
            if c.complete:
                self._finish()
                return b""
            if c.error is not None:
                raise c.error
            if c.closed:
                raise TransportError("the response was closed")
            c.waiter = asyncio.get_running_loop().create_future()
            await c.waiter
            c.waiter = None

    async def relay(self, sink: Callable[[bytes], bool]) -> None:
        """Hand the body to ``sink`` as it arrives, from the connection's protocol callback
        (one call per read from the socket, so nothing waits for a task to be scheduled).
        ``sink(piece)`` returns False to refuse ``piece``, which then stays for ``readany``.
        Returns when the body ended, the connection broke or was closed, or ``sink`` refused
        a piece; bytes already buffered make it return at once. Then ``readany`` goes on
        (and gives ``b""`` at the end, raises on a break, as without the relay)."""
        c = self._conn
        if self._done or c.body or c.complete or c.error is not None or c.closed:
            return
        c.sink = sink
        try:
            while c.sink is not None and not c.complete and c.error is None and not c.closed:
                c.waiter = asyncio.get_running_loop().create_future()
                await c.waiter
                c.waiter = None
        finally:
            c.sink = None
            c.waiter = None

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body. Over ``limit`` bytes the call is closed and ``TransportError``
        raised: a worker (or anything posing as one) cannot make the proxy buffer without end."""
        parts: list[bytes] = []
        size = 0
        while True:
            piece = await self.readany()
            if not piece:
                return b"".join(parts)
            size += len(piece)
            if limit is not None and size > limit:
                self.close()
                raise TransportError(f"the answer is over the limit of {limit} bytes")
            parts.append(piece)

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            self._conn.pool._release(self._conn)

    def close(self) -> None:
        """End the call now: a finished response returns its connection, an unfinished one
        drops it (the worker sees the client go away and aborts the request). Idempotent."""
        if self._done:
            return
        c = self._conn
        if c.complete and not c.body:
            self._finish()
            return
        self._done = True
        c.abort()


class UpstreamPool:
    """Keep-alive connections to workers, keyed by host and port."""

    def __init__(self, connect_timeout_s: float, max_idle_per_host: int = 512) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.max_idle_per_host = max_idle_per_host
        self._idle: dict[tuple[str, int], deque[_Conn]] = {}
        self._all: set[_Conn] = set()
        self._targets: dict[str, tuple[tuple[str, int], str]] = {}
        self.connects = 0  # new connections made (for tests and metrics)

    def _target(self, base_url: str) -> tuple[tuple[str, int], str]:
        """``((host, port), path prefix)`` of a worker's base URL (parsed once per URL)."""
        got = self._targets.get(base_url)
        if got is None:
            u = urlsplit(base_url)
            if u.scheme != "http":
                raise ConnectError(f"only http:// workers are supported, got {base_url!r}")
            got = self._targets[base_url] = ((u.hostname or "127.0.0.1", u.port or 80), u.path.rstrip("/"))
        return got

    async def _connect(self, key: tuple[str, int]) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(lambda: _Conn(self, key), key[0], key[1])
        except TimeoutError:
            raise ConnectError(f"connecting to {key[0]}:{key[1]} timed out after "
                               f"{self.connect_timeout_s:g}s") from None
        except OSError as exc:
            raise ConnectError(f"cannot connect to {key[0]}:{key[1]}: {exc.strerror or exc}") from None
        self.connects += 1
        self._all.add(conn)
        return conn

    def _take_idle(self, key: tuple[str, int]) -> _Conn | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        fresh_after = asyncio.get_running_loop().time() - IDLE_TIMEOUT_S
        while idle and idle[0].idle_since < fresh_after:  # oldest first: drop the stale ones
            idle.popleft().abort()
        while idle:
            conn = idle.pop()  # the most recently used: warmest
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                conn.reused = True
                return conn
        return None

    async def request(self, base_url: str, method: str, path: str, body: bytes = b"",
                      headers: dict[str, str] | None = None) -> UpstreamResponse:
        """Send one request; returns when the response head arrived (see the module doc)."""
        key, prefix = self._target(base_url)
        head = [f"{method} {prefix}{path} HTTP/1.1\r\nHost: {key[0]}:{key[1]}\r\n"
                f"Content-Length: {len(body)}\r\n"]
        for name, value in (headers or {}).items():
            head.append(f"{name}: {value}\r\n")
        head.append("\r\n")
        data = "".join(head).encode("latin-1") + body
        for attempt in (0, 1):
            conn = self._take_idle(key)
            if conn is None:
                conn = await self._connect(key)
            conn._reset()
            conn.head = asyncio.get_running_loop().create_future()
            assert conn.transport is not None
            conn.transport.write(data)
            try:
                await conn.head
            except asyncio.CancelledError:
                conn.abort()
                raise
            if conn.error is None and not conn.in_head:
                return UpstreamResponse(conn)
            conn.abort()
            if attempt == 0 and conn.reused and not conn.got_bytes:
                continue  # the worker had closed this idle connection: once more on a new one
            raise conn.error or TransportError(f"connection to {key[0]}:{key[1]} closed before an answer")
        raise AssertionError("unreachable")

    def _release(self, conn: _Conn) -> None:
        if conn.closed or not getattr(conn, "reusable", False) or conn.transport is None \
                or conn.transport.is_closing():
            conn.abort()
            return
        if conn.paused:
            conn.transport.resume_reading()
            conn.paused = False
        idle = self._idle.setdefault(conn.key, deque())
        if len(idle) >= self.max_idle_per_host:
            conn.abort()
            return
        conn.idle_since = asyncio.get_running_loop().time()
        idle.append(conn)

    def _forget(self, conn: _Conn) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    async def close(self) -> None:
        """Drop every connection (in use or idle)."""
        for conn in list(self._all):
            conn.abort()
        self._all.clear()
        self._idle.clear()
        await asyncio.sleep(0)
