"""A Mooncake Store shared by a fleet: ``mooncake.store.MooncakeDistributedStore``.

Each chunk is one object ``<key_prefix><key hex>`` holding the remote-tier value
format (``pdx.store.value``: header with checksum, then the payload). The
agent's client joins the store at start: it contributes
``global_segment_size`` bytes of its memory to the fleet's pool and talks to
``mooncake_master`` (placement, eviction) and the metadata server; bytes move
peer to peer over ``protocol`` (``tcp`` here, ``rdma`` where the NICs have it).
Chunks any agent of the fleet wrote are visible to all the others.

Batches: ``exists`` is one ``batch_is_exist``, ``read`` one ``get_batch``, a
write batch one ``put_batch``. Every call runs under ``ServerHealth``
(``pdx.store.remote``): a failing master (error codes), an exception or a call
past ``timeout_s`` is a miss and starts the back-off; objects the master evicted
or lost (a restarted master starts empty) are plain misses. A value whose
header or checksum does not match is a miss, counted, and removed.

Thread-safety: every method may be called from any thread; writes run on the
tier's writer thread. The master and metadata server must be reachable when
the tier starts (the client's ``setup`` would wait for them without end).
Raises ``BackendUnavailable`` at creation if the
``mooncake`` package (or the ``libibverbs.so.1`` it links) is missing, and
``StoreError`` if the client cannot join the store.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pdx.config import MooncakeConfig
from pdx.errors import BackendUnavailable, StoreError
from pdx.keys import ChunkKey
from pdx.store.metrics import StoreMetrics
from pdx.store.remote import ServerDown, ServerHealth
from pdx.store.tier import LowerTier, Sink, WriteItem
from pdx.store.types import ChunkMeta, Tier
from pdx.store.value import CorruptValue, copy_verified, pack_header

log = logging.getLogger(__name__)

#: the client's code for "the master did not answer" (other negative codes are refusals)
RPC_FAIL = -900

_INSTALL = ("pip install 'pdx[mooncake]' (mooncake-transfer-engine on GPU hosts), and the system's "
            "libibverbs.so.1 (Debian: apt-get install libibverbs1)")


def load_mooncake() -> Any:
    """The ``MooncakeDistributedStore`` class; ``BackendUnavailable`` saying what to install."""
    try:
        from mooncake.store import MooncakeDistributedStore
    except ImportError as exc:
        raise BackendUnavailable(f"store tier 'mooncake' is unavailable ({exc}); install {_INSTALL}") from exc
    return MooncakeDistributedStore


def _check_reachable(config: MooncakeConfig) -> None:
    """Connect to the master and the HTTP metadata server first, bounded by ``timeout_s``.

    The client's ``setup`` waits for an absent master without end, holding the GIL (the whole
    process stops), so an unreachable one must be caught before. Raises ``StoreError``.
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
            raise StoreError(f"store tier 'mooncake': the {what} at {where} is not reachable ({exc}); start it "
                             f"before the agent (the client cannot join a store whose {what} is down)") from exc


class MooncakeTier(LowerTier):
    """A remote tier on a Mooncake Store. See the module docstring."""

    tier = Tier.MOONCAKE

    def __init__(self, config: MooncakeConfig, *, chunk_fingerprint: str, data_dir: Path | None,
                 metrics: StoreMetrics, clock: Callable[[], float] = time.monotonic) -> None:
        cls = load_mooncake()
        super().__init__(metrics, config.queue_depth, batch_size=config.batch_size)
        self.read_batch = max(1, config.batch_size)
        self._cfg = config
        self._prefix = config.key_prefix
        _check_reachable(config)
        self._client = cls()
        rc = self._client.setup(config.local_hostname, config.metadata_server, config.global_segment_size,
                                config.local_buffer_size, config.protocol, config.device_name, config.master)
        if rc != 0:
            raise StoreError(f"store tier 'mooncake': cannot join the store at master {config.master} "
                             f"(metadata {config.metadata_server}): setup returned {rc}")
        self._health = ServerHealth(self._label, f"master {config.master}", metrics, clock,
                                    config.retry_after_s, config.timeout_s, (RuntimeError, OSError))
        self._refusing = False  # writer thread only
        self._start_writer()

    def name_of(self, key: ChunkKey) -> str:
        return self._prefix + key.hex()

    @property
    def reachable(self) -> bool:
        return self._health.reachable

    # --- reads -------------------------------------------------------------------------------

    def exists(self, keys: Sequence[ChunkKey]) -> list[bool]:
        if not keys:
            return []
        names = [self.name_of(k) for k in keys]

        def run() -> list[int]:
            codes = list(self._client.batch_is_exist(names))
            if any(c < 0 for c in codes):  # 1 present, 0 absent, negative: the master failed
                raise ServerDown(f"batch_is_exist returned {min(codes)}")
            return codes

        ok, res = self._health.call("checking keys", run)
        return [c == 1 for c in res] if ok and res is not None else [False] * len(keys)

    def read(self, keys: Sequence[ChunkKey], sink: Sink) -> list[ChunkMeta | None]:
        if not keys:
            return []
        names = [self.name_of(k) for k in keys]
        ok, values = self._health.call("reading", lambda: list(self._client.get_batch(names)))
        if not ok or values is None:
            return [None] * len(keys)
        out: list[ChunkMeta | None] = []
        for i, value in enumerate(values):
            # an absent, evicted or unreadable object comes back empty
            out.append(self._deliver(i, names[i], value, sink) if value else None)
        return out

    def _deliver(self, i: int, name: str, value: bytes, sink: Sink) -> ChunkMeta | None:
        try:
            meta = copy_verified(value, lambda m: sink(i, m))
        except CorruptValue as exc:
            self._corrupt(name, str(exc))
            return None
        if meta is not None:
            self.metrics.bytes_out[self._label].inc(meta.nbytes)
        return meta

    def _corrupt(self, name: str, why: str) -> None:
        log.warning("mooncake tier: %s: %s; removing it", name, why)
        self.metrics.integrity_failures[self._label].inc()
        self._health.call("removing a corrupt chunk", lambda: self._client.remove(name))

    # --- writes (writer thread) --------------------------------------------------------------

    def write_batch(self, items: list[WriteItem]) -> None:
        names = [self.name_of(it.key) for it in items]
        # The client copies each value into its registered buffer; joining header and payload
        # here is one more copy of the chunk (see docs/store.md).
        values = [b"".join((pack_header(it.meta), it.data)) for it in items]

        def run() -> int:
            rc = int(self._client.put_batch(names, values))
            if rc == RPC_FAIL:
                raise ServerDown(f"put_batch returned {rc}")
            return rc

        ok, rc = self._health.call("writing", run)
        if not ok:
            self.metrics.write_drops[self._label].inc(len(items))
            return
        if rc != 0:  # the master refused (e.g. no space left until it evicts): dropped, not "down"
            if not self._refusing:
                log.warning("mooncake tier: the master refused a batch of %d chunks (code %s); such "
                            "batches are dropped until a write succeeds again", len(items), rc)
                self._refusing = True
            self.metrics.tier_errors[self._label].inc()
            self.metrics.write_drops[self._label].inc(len(items))
            return
        self._refusing = False
        self.metrics.bytes_in[self._label].inc(sum(it.meta.nbytes for it in items))

    def close(self, drain_s: float = 5.0) -> None:
        super().close(drain_s)
        self._health.close()
        try:
            self._client.close()
        except Exception:  # the process is leaving the store either way
            log.warning("mooncake tier: closing the client failed", exc_info=True)
