"""L3: a Redis/Valkey server shared by many hosts, through redis-py.

Each chunk is one string value under ``<key_prefix><key hex>``::

    magic "PDXR" | version u16 | header size u16 | num_tokens u32 | reserved u32
    | checksum u64 (xxh3-64 of the payload) | length u64 | payload

Batches are pipelined (no transaction): one round trip per ``read`` (MGET) or
``exists`` call and per write batch. Writes send each payload straight from its
L1 slab (see ``_send_sets``). Values may expire (``ttl_s``).

A server that cannot be reached is a miss, never an exception: the first
failure logs one warning and counts an error, then for ``retry_after_s`` every
call is an immediate miss (no network wait) and writes are dropped; the next
call after that tries again, and success logs the recovery. redis-py's own
retries are turned off so a dead server costs at most one socket timeout.

A value whose header or checksum does not match is a miss, counted as an
integrity failure, and is deleted.

Thread-safety: every method may be called from any thread (a blocking
connection pool of ``max_connections``); writes run on the tier's writer thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pdx.config import RedisConfig
from pdx.errors import ConfigError
from pdx.keys import ChunkKey
from pdx.store.metrics import StoreMetrics
from pdx.store.tier import LowerTier, Sink, WriteItem
from pdx.store.types import ChunkMeta, Tier
from pdx.store.value import HEADER_SIZE, CorruptValue, copy_verified, pack_header

log = logging.getLogger(__name__)

_FAILURES = (redis.RedisError, OSError)


class RedisTier(LowerTier):
    """L3 on a Redis/Valkey server. See the module docstring."""

    tier = Tier.REDIS

    def __init__(self, config: RedisConfig, *, chunk_fingerprint: str, data_dir: Path | None,
                 metrics: StoreMetrics, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(metrics, config.queue_depth, batch_size=config.batch_size)
        self.read_batch = max(1, config.batch_size)
        self._cfg = config
        self._clock = clock
        self._prefix = config.key_prefix.encode()
        self._ex = config.ttl_s or None
        try:
            self._pool = redis.BlockingConnectionPool.from_url(
                config.url,
                max_connections=config.max_connections,
                timeout=config.socket_timeout_s,
                socket_timeout=config.socket_timeout_s,
                socket_connect_timeout=config.socket_timeout_s,
                retry=Retry(NoBackoff(), 0),
            )
        except ValueError as exc:
            raise ConfigError(f"store.redis.url: {exc}") from exc
        self._client = redis.Redis(connection_pool=self._pool)
        self._state = threading.Lock()
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._refusing = False  # the server answers writes with errors (writer thread only)
        self._call("connecting", lambda: self._client.ping())
        self._start_writer()

    def name_of(self, key: ChunkKey) -> bytes:
        return self._prefix + key.hex().encode()

    @property
    def reachable(self) -> bool:
        """False while the tier treats the server as gone (until the next retry succeeds)."""
        return self._down_since is None

    # --- health ------------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], Any]) -> tuple[bool, Any]:
        """Run ``fn`` unless the server is marked down: ``(ok, result)``. Never raises."""
        if self._down_since is not None and self._clock() < self._retry_at:
            return False, None
        try:
            result = fn()
        except _FAILURES as exc:
            self._failed(what, exc)
            return False, None
        if self._down_since is not None:
            with self._state:
                if self._down_since is not None:
                    log.warning("redis tier: %s reachable again after %.1fs", self._cfg.url,
                                self._clock() - self._down_since)
                    self._down_since = None
        return True, result

    def _failed(self, what: str, exc: BaseException) -> None:
        self.metrics.tier_errors[self._label].inc()
        with self._state:
            now = self._clock()
            self._retry_at = now + self._cfg.retry_after_s
            if self._down_since is None:
                self._down_since = now
                log.warning("redis tier: %s failed while %s (%s: %s); serving misses and retrying "
                            "every %.1fs", self._cfg.url, what, type(exc).__name__, exc,
                            self._cfg.retry_after_s)

    # --- reads -------------------------------------------------------------------------------

    def exists(self, keys: Sequence[ChunkKey]) -> list[bool]:
        if not keys:
            return []

        def run() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for k in keys:
                pipe.exists(self.name_of(k))
            return pipe.execute()

        ok, res = self._call("checking keys", run)
        return [bool(r) for r in res] if ok else [False] * len(keys)

    def read(self, keys: Sequence[ChunkKey], sink: Sink) -> list[ChunkMeta | None]:
        if not keys:
            return []
        names = [self.name_of(k) for k in keys]
        ok, values = self._call("reading", lambda: self._client.mget(names))
        if not ok:
            return [None] * len(keys)
        out: list[ChunkMeta | None] = []
        bad: list[bytes] = []
        for i, value in enumerate(values):
            out.append(None if value is None else self._deliver(i, names[i], value, sink, bad))
        if bad:
            self._call("deleting corrupt chunks", lambda: self._client.delete(*bad))
        return out

    def _deliver(self, i: int, name: bytes, value: bytes, sink: Sink, bad: list[bytes]) -> ChunkMeta | None:
        try:
            meta = copy_verified(value, lambda m: sink(i, m))
        except CorruptValue as exc:
            self._corrupt(name, str(exc), bad)
            return None
        if meta is not None:
            self.metrics.bytes_out[self._label].inc(meta.nbytes)
        return meta

    def _corrupt(self, name: bytes, why: str, bad: list[bytes]) -> None:
        log.warning("redis tier: %s: %s; deleted", name.decode(errors="replace"), why)
        self.metrics.integrity_failures[self._label].inc()
        bad.append(name)

    # --- writes (writer thread) --------------------------------------------------------------

    def write_batch(self, items: list[WriteItem]) -> None:
        ok, results = self._call("writing", lambda: self._send_sets(items))
        if not ok:
            self.metrics.write_drops[self._label].inc(len(items))
            return
        written = 0
        for item, res in zip(items, results):
            if isinstance(res, Exception):  # e.g. OOM: the server refused this value
                if not self._refusing:
                    log.warning("redis tier: the server refused a chunk (%s); such chunks are dropped "
                                "until a write succeeds again", res)
                    self._refusing = True
                self.metrics.tier_errors[self._label].inc()
                self.metrics.write_drops[self._label].inc()
            else:
                written += item.meta.nbytes
                self._refusing = False
        self.metrics.bytes_in[self._label].inc(written)

    def _send_sets(self, items: list[WriteItem]) -> list[Any]:
        """Pipelined SETs with the payload sent straight from its buffer.

        A RESP bulk string may reach the socket in pieces, so each value goes
        out as (command prefix + header, payload, CRLF): the payload (an L1
        slab) is never copied into a joined value as redis-py's own packing of
        ``header + payload`` would need. Returns one reply or exception per item.
        """
        suffix = b"\r\n" if self._ex is None else b"\r\n$2\r\nEX\r\n$%d\r\n%d\r\n" % (
            len(str(self._ex)), self._ex)
        argc = b"*3\r\n" if self._ex is None else b"*5\r\n"
        parts: list[bytes | memoryview] = []
        tail = b""
        for item in items:
            name = self.name_of(item.key)
            header = pack_header(item.meta)
            parts.append(b"%s%s$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s" % (
                tail, argc, len(name), name, HEADER_SIZE + item.meta.nbytes, header))
            parts.append(item.data)
            tail = suffix
        parts.append(tail)
        conn = self._pool.get_connection()
        try:
            conn.send_packed_command(parts, check_health=False)
            results: list[Any] = []
            for _ in items:
                try:
                    results.append(conn.read_response())
                except redis.ResponseError as exc:  # this SET refused (e.g. OOM); the rest go on
                    results.append(exc)
            return results
        except BaseException:
            conn.disconnect()  # replies may be left unread: never reuse this connection
            raise
        finally:
            self._pool.release(conn)

    def close(self, drain_s: float = 5.0) -> None:
        super().close(drain_s)
        self._pool.disconnect()
