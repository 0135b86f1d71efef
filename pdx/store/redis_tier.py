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
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pdx.config import RedisConfig
from pdx.errors import ConfigError
from pdx.keys import ChunkKey
from pdx.store.metrics import StoreMetrics
from pdx.store.remote import Refusal, RemoteTier, ServerHealth
from pdx.store.tier import WriteItem
from pdx.store.types import Tier
from pdx.store.value import HEADER_SIZE, pack_header

log = logging.getLogger(__name__)

_FAILURES = (redis.RedisError, OSError)


class RedisTier(RemoteTier):
    """L3 on a Redis/Valkey server. See the module docstring."""

    tier = Tier.REDIS

    def __init__(self, config: RedisConfig, *, chunk_fingerprint: str, data_dir: Path | None,
                 metrics: StoreMetrics, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(metrics, config.queue_depth, batch_size=config.batch_size)
        self.lookup_timeout_s = config.lookup_timeout_s
        self._cfg = config
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
        # redis-py bounds every call with its socket timeouts: calls run inline
        self._health = ServerHealth(self._label, config.url, metrics, clock, config.retry_after_s,
                                    config.socket_timeout_s, _FAILURES, workers=0)
        self._health.call("connecting", lambda: self._client.ping())
        self._start_writer()

    def name_of(self, key: ChunkKey) -> bytes:
        return self._prefix + key.hex().encode()

    # --- client calls (under ServerHealth) -------------------------------------------------------

    def _exists(self, names: list[Any]) -> list[bool]:
        pipe = self._client.pipeline(transaction=False)
        for name in names:
            pipe.exists(name)
        return [bool(r) for r in pipe.execute()]

    def _get(self, names: list[Any]) -> Sequence[bytes | None]:
        return cast("list[bytes | None]", self._client.mget(names))

    def _remove(self, names: list[Any]) -> None:
        self._client.delete(*names)

    def _put(self, items: list[WriteItem]) -> list[Refusal]:
        # a SET the server refused (e.g. OOM) comes back as its exception; the rest went in
        return [str(r) if isinstance(r, Exception) else None for r in self._send_sets(items)]

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
