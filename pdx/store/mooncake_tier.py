"""A Mooncake Store shared by a fleet: ``mooncake.store.MooncakeDistributedStore``.

Each chunk is one object ``<key_prefix><key hex>`` holding the remote-tier value
format (``pdx.store.value``: header with checksum, then the payload). The
agent's client joins the store: it contributes ``global_segment_size`` bytes of
its memory to the fleet's pool and talks to ``mooncake_master`` (placement,
eviction) and the metadata server; bytes move peer to peer over ``protocol``
(``tcp`` here, ``rdma`` where the NICs have it). Chunks any agent of the fleet
wrote are visible to all the others.

Zero-copy writes: the L1 pool is registered with the client (``use_pool``), and
so is a small arena of value headers; a chunk written from its pinned slab goes
out with one ``batch_put_from_multi_buffers`` per write batch, each value being
(its header in the arena, its payload in the slab), without being joined or
copied into the client's buffer first. A chunk held elsewhere (a copy of an
evicted one) goes through ``put_batch``. Reads are one ``get_batch`` per batch,
verified and copied into fresh slabs; ``exists`` is one ``batch_is_exist``.

Every call runs under ``ServerHealth`` (``pdx.store.remote``): a failing master
(error codes), an exception or a call past ``timeout_s`` is a miss and starts
the back-off; retries first ask the client's own ``health_check`` (local, no
wait), so a master that is still gone costs nothing. Objects the master evicted
or lost (a restarted master starts empty) are plain misses. A value whose header
or checksum does not match is a miss, counted, and removed.

Joining: when the master or the metadata server is not reachable at start, the
tier starts anyway, unjoined (every call a miss, ``reachable`` False), and a
joiner thread tries again every ``retry_after_s``; it joins once both answer.
(The client's ``setup`` waits for an absent master without end while holding the
GIL, so the tier only calls it after both answered a TCP connect.)

Thread-safety: every method may be called from any thread; writes run on the
tier's writer thread. Raises ``BackendUnavailable`` at creation if the
``mooncake`` package (or the ``libibverbs.so.1`` it links) is missing, and
``StoreError`` if a reachable store refuses the client.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from pdx.config import MooncakeConfig
from pdx.errors import BackendUnavailable, StoreError
from pdx.keys import ChunkKey
from pdx.store.metrics import StoreMetrics
from pdx.store.remote import Refusal, RemoteTier, ServerDown, ServerHealth
from pdx.store.tier import WriteItem
from pdx.store.types import Tier
from pdx.store.value import HEADER_SIZE, pack_header

log = logging.getLogger(__name__)

#: the client's code for "the master did not answer" (other negative codes are refusals)
RPC_FAIL = -900
#: ``health_check``: 0 healthy, 1 not set up or closed, 2 master unreachable
HEALTHY = 0

_INSTALL = ("pip install 'pdx[mooncake]' (mooncake-transfer-engine on GPU hosts), and the system's "
            "libibverbs.so.1 (Debian: apt-get install libibverbs1)")


def load_mooncake() -> Any:
    """The ``MooncakeDistributedStore`` class; ``BackendUnavailable`` saying what to install."""
    try:
        from mooncake.store import MooncakeDistributedStore
    except ImportError as exc:
        raise BackendUnavailable(f"store tier 'mooncake' is unavailable ({exc}); install {_INSTALL}") from exc
    return MooncakeDistributedStore


def unreachable(config: MooncakeConfig) -> str:
    """Why the master or the HTTP metadata server does not answer a TCP connect ("" when both do).

    Bounded by ``timeout_s``: the client's ``setup`` must never meet an absent master.
    """
    targets = [("master", config.master)]
    meta = urlsplit(config.metadata_server)
    if meta.scheme in ("http", "https") and meta.hostname:
        targets.append(("metadata server", f"{meta.hostname}:{meta.port or (443 if meta.scheme == 'https' else 80)}"))
    for what, where in targets:
        host, _, port = where.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=config.timeout_s):
                pass
        except (OSError, ValueError) as exc:
            return f"the {what} at {where} is not reachable ({exc})"
    return ""


def _address(buffer: memoryview) -> int:
    arr = np.frombuffer(buffer, dtype=np.uint8)
    try:
        return int(arr.ctypes.data)
    finally:
        del arr  # no export of the pool's buffer may outlive this call


class MooncakeTier(RemoteTier):
    """A remote tier on a Mooncake Store. See the module docstring."""

    tier = Tier.MOONCAKE

    def __init__(self, config: MooncakeConfig, *, chunk_fingerprint: str, data_dir: Path | None,
                 metrics: StoreMetrics, clock: Callable[[], float] = time.monotonic) -> None:
        self._cls = load_mooncake()
        super().__init__(metrics, config.queue_depth, batch_size=config.batch_size)
        self.lookup_timeout_s = config.lookup_timeout_s
        self._cfg = config
        self._prefix = config.key_prefix
        self._client: Any = None  # set once joined
        self._join_lock = threading.Lock()
        self._stop = threading.Event()
        self._joiner: threading.Thread | None = None
        self._pool: tuple[int, int] | None = None  # (address, size) of the L1 pool
        self._headers = np.zeros(max(1, config.batch_size) * HEADER_SIZE, dtype=np.uint8)
        self._health = ServerHealth(self._label, f"master {config.master}", metrics, clock,
                                    config.retry_after_s, config.timeout_s, (RuntimeError, OSError),
                                    probe=self._healthy)
        why = unreachable(config)
        if why:
            self._health.mark_down(f"is not joined: {why}")
            self._joiner = threading.Thread(target=self._join_later, name="pdx-mooncake-join", daemon=True)
            self._joiner.start()
        else:
            self._join()
        self._start_writer()

    def name_of(self, key: ChunkKey) -> str:
        return self._prefix + key.hex()

    @property
    def joined(self) -> bool:
        return self._client is not None

    # --- joining -----------------------------------------------------------------------------

    def _join(self) -> None:
        """Set the client up (both servers answered just now). ``StoreError`` if the store refuses."""
        c = self._cfg
        client = self._cls()
        rc = client.setup(c.local_hostname, c.metadata_server, c.global_segment_size, c.local_buffer_size,
                          c.protocol, c.device_name, c.master)
        if rc != 0:
            raise StoreError(f"store tier 'mooncake': cannot join the store at master {c.master} "
                             f"(metadata {c.metadata_server}): setup returned {rc}")
        self._register(client, self._headers.ctypes.data, self._headers.nbytes, "header arena")
        with self._join_lock:
            if self._pool is not None:
                self._register(client, *self._pool, "L1 pool")
            self._client = client

    @staticmethod
    def _register(client: Any, address: int, size: int, what: str) -> None:
        rc = client.register_buffer(address, size)
        if rc != 0:
            raise StoreError(f"store tier 'mooncake': registering the {what} ({size} bytes) failed: {rc}")

    def _join_later(self) -> None:
        while not self._stop.wait(self._cfg.retry_after_s):
            if unreachable(self._cfg) or self._stop.is_set():
                continue
            try:
                self._join()
            except StoreError as exc:
                log.warning("%s; trying again in %.1fs", exc, self._cfg.retry_after_s)
                continue
            log.warning("mooncake tier: joined the store at master %s", self._cfg.master)
            self._health.succeeded()
            return

    def _healthy(self) -> bool:
        client = self._client
        return client is not None and client.health_check() == HEALTHY

    def _joined_client(self) -> Any:
        client = self._client
        if client is None:
            raise ServerDown("not joined to the store yet")
        return client

    def use_pool(self, buffer: memoryview) -> None:
        with self._join_lock:
            self._pool = (_address(buffer), len(buffer))
            if self._client is not None:
                self._register(self._client, *self._pool, "L1 pool")

    # --- client calls (under ServerHealth) -------------------------------------------------------

    def _exists(self, names: list[Any]) -> list[bool]:
        codes = list(self._joined_client().batch_is_exist(names))
        if any(c < 0 for c in codes):  # 1 present, 0 absent, negative: the master failed
            raise ServerDown(f"batch_is_exist returned {min(codes)}")
        return [c == 1 for c in codes]

    def _get(self, names: list[Any]) -> Sequence[bytes | None]:
        client = self._joined_client()
        values = list(client.get_batch(names))
        # an absent, evicted or unreadable object comes back empty; so does every one of a dead master
        if not any(values) and client.health_check() != HEALTHY:
            raise ServerDown("the master is unreachable")
        return values

    def _remove(self, names: list[Any]) -> None:
        # best effort: the master refuses while a read lease holds the object
        self._joined_client().batch_remove(names)

    def _put(self, items: list[WriteItem]) -> list[Refusal]:
        client = self._joined_client()
        pool = self._pool
        direct = [j for j, it in enumerate(items) if pool is not None and it.offset >= 0]
        copied = [j for j, it in enumerate(items) if pool is None or it.offset < 0]
        out: list[Refusal] = [None] * len(items)
        if direct:
            assert pool is not None
            heads = self._headers
            for n, j in enumerate(direct):
                heads[n * HEADER_SIZE : (n + 1) * HEADER_SIZE] = np.frombuffer(pack_header(items[j].meta), np.uint8)
            base = int(heads.ctypes.data)
            codes = client.batch_put_from_multi_buffers(
                [self.name_of(items[j].key) for j in direct],
                [[base + n * HEADER_SIZE, pool[0] + items[j].offset] for n, j in enumerate(direct)],
                [[HEADER_SIZE, items[j].meta.nbytes] for j in direct])
            self._codes(out, direct, [int(c) for c in codes])
        if copied:
            rc = int(client.put_batch([self.name_of(items[j].key) for j in copied],
                                      [b"".join((pack_header(items[j].meta), items[j].data)) for j in copied]))
            self._codes(out, copied, [rc] * len(copied))
        return out

    @staticmethod
    def _codes(out: list[Refusal], idxs: list[int], codes: list[int]) -> None:
        if RPC_FAIL in codes:
            raise ServerDown(f"put returned {RPC_FAIL}")
        for j, rc in zip(idxs, codes):
            # a key already there is a success (same key, same bytes); -200: no space until it evicts
            out[j] = None if rc >= 0 else f"the master refused it with code {rc}"

    def close(self, drain_s: float = 5.0) -> None:
        self._stop.set()
        super().close(drain_s)
        if self._joiner is not None:
            self._joiner.join(timeout=max(1.0, self._cfg.timeout_s * 2))
        with self._join_lock:
            client, self._client = self._client, None
        if client is None:
            return
        try:
            if self._pool is not None:
                client.unregister_buffer(self._pool[0])
            client.unregister_buffer(int(self._headers.ctypes.data))
            client.close()
        except Exception:  # the process is leaving the store either way
            log.warning("mooncake tier: closing the client failed", exc_info=True)
