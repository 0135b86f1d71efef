"""``ChunkStore``: the tiered KV chunk store an agent owns (L1 pool, then ``store.tiers``).

Who calls what:

* the agent's control loop, on behalf of the engine's connector: ``lookup`` /
  ``lookup_tokens`` (scheduler hot path: dict lookups only), ``reserve`` then
  ``commit`` / ``abort`` around a chunk the connector packs in place, ``get``
  to load a prefix (promoting from the lower tiers into L1) and pin it, ``unpin`` /
  ``release_owner`` when the request is done;
* the agent's transfer threads: ``pin`` a chunk while it is sent, ``reserve`` /
  ``commit`` a chunk being received, ``view`` for the bytes;
* the agent's housekeeping: ``reap`` (expire leases and reservations; also done
  lazily by ``reserve``, ``commit``, ``pin`` and ``get``), ``stats``, ``metrics.registry``.

Thread-safety: one lock guards all metadata; no I/O and no checksum of a whole
chunk runs under it (commit hashes outside it, ``get`` reads tiers outside it).
Only the write-behind copy of an evicted chunk (a memcpy) happens under it.
Blocking: ``lookup``/``pin``/``unpin``/``reserve``/``abort`` never block beyond the
lock; ``commit`` hashes the chunk; ``get`` and ``lookup(remote=True)`` may do disk
or network I/O (bounded by the tiers' timeouts). Tier failures are misses, never
exceptions; caller mistakes raise ``StoreError`` subclasses.

Buffers: the pool's bytes belong to whoever holds the reservation (to write)
or a pin (to read); everything else belongs to the store.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pdx.checksum import checksum as checksum_of
from pdx.config import StoreConfig, tier_type
from pdx.errors import CapacityError, IntegrityError, StoreError
from pdx.keys import ChunkKey, chunk_keys
from pdx.layout import KVLayout
from pdx.store.eviction import make_policy
from pdx.store.index import Entry, L1Index, Lease
from pdx.store.lookup import RemoteLookups
from pdx.store.metrics import StoreMetrics
from pdx.store.pool import SlabPool, copy_and_hash, round_slab_size, sweep_stale
from pdx.store.tier import TIERS, LowerTier
from pdx.store.types import (
    ChunkInfo,
    ChunkMeta,
    LeaseId,
    LookupResult,
    Pin,
    Reservation,
    ReservationId,
    StoreStats,
    Tier,
)
from pdx.store.writeback import WriteBack

L1 = Tier.L1.value


class ChunkStore:
    """L1 slab pool + index + eviction policy + the lower tiers of ``config.lower_tiers``, in order.

    ``slab_size`` is the largest chunk in bytes (normally
    ``layout.chunk_bytes(config.chunk_tokens)``; ``config.l1.slab_size`` wins when
    set). ``chunk_fingerprint`` names the chunk format: disk files of another
    format are never read, and ``lookup_tokens`` hashes keys with it.
    ``clock`` (monotonic seconds) drives every expiry, so tests can inject one.
    """

    def __init__(self, config: StoreConfig, slab_size: int = 0, chunk_fingerprint: str = "",
                 data_dir: str | Path | None = None, *,
                 clock: Callable[[], float] = time.monotonic, metrics: StoreMetrics | None = None) -> None:
        size = config.l1.slab_size or slab_size
        if size <= 0:
            raise StoreError("no slab size: set store.l1.slab_size or build the store from a KV layout")
        if not chunk_fingerprint:
            raise StoreError("a chunk fingerprint is required (KVLayout.chunk_fingerprint)")
        count = config.l1.capacity // round_slab_size(size)
        if count < 1:
            raise StoreError(f"store.l1.capacity ({config.l1.capacity} bytes) holds no slab of "
                             f"{round_slab_size(size)} bytes")
        self.config = config
        self.chunk_fingerprint = chunk_fingerprint
        self.chunk_tokens = config.chunk_tokens
        self.metrics = metrics if metrics is not None else StoreMetrics()
        self._clock = clock
        self._lock = threading.Lock()
        self._closed = False
        self._lease_s = config.l1.lease_s
        self._res_timeout = config.l1.reservation_timeout_s
        sweep_stale()  # give back the memory of agents that crashed
        self.pool = SlabPool(size, count, name=config.l1.shm_name, prefault=config.l1.prefault)
        self._index = L1Index(count, make_policy(config.l1.eviction.value, count))
        self._slab_size = self.pool.slab_size
        self._writeback = WriteBack(self.pool, self._index, self._lock)
        #: the tiers below L1 in configured order; local ones (an in-memory index) are asked
        #: on every lookup, remote ones only when a caller asks with ``remote=True``
        self.tiers: list[LowerTier] = []
        ddir = Path(data_dir) if data_dir is not None else None
        try:
            for cfg in config.lower_tiers:
                tier = TIERS.get(tier_type(cfg))(cfg, chunk_fingerprint=chunk_fingerprint, data_dir=ddir,
                                                 metrics=self.metrics, clock=clock)
                self.tiers.append(tier)
                self._writeback.add(tier, cfg.write)
                self.metrics.bind_usage(tier.tier, tier.used_bytes, tier.capacity_bytes, tier.chunk_count)
            for tier in self.tiers:
                tier.use_pool(self.pool.buffer)
        except BaseException:
            self.close()
            raise
        remote = self.remote_tiers
        self._remote_lookups = RemoteLookups(self.metrics, 4 * len(remote)) if remote else None
        idx = self._index
        self.metrics.bind_usage(Tier.L1, lambda: idx.used_bytes,
                                lambda: count * self._slab_size, lambda: len(idx.entries))
        self.metrics.pinned_slabs.set_function(lambda: idx.pinned_slabs)
        self.metrics.reserved_slabs.set_function(lambda: len(idx.reservations))

    @property
    def local_tiers(self) -> list[LowerTier]:
        return [t for t in self.tiers if t.local]

    @property
    def remote_tiers(self) -> list[LowerTier]:
        return [t for t in self.tiers if not t.local]

    def tier(self, kind: Tier) -> LowerTier | None:
        """The lower tier of type ``kind``, if configured (there is at most one of each)."""
        return next((t for t in self.tiers if t.tier is kind), None)

    @property
    def disk(self) -> LowerTier | None:
        """Shorthand for ``tier(Tier.DISK)`` (tests and tools)."""
        return self.tier(Tier.DISK)

    @property
    def redis(self) -> LowerTier | None:
        """Shorthand for ``tier(Tier.REDIS)`` (tests and tools)."""
        return self.tier(Tier.REDIS)

    @classmethod
    def from_layout(cls, config: StoreConfig, layout: KVLayout, data_dir: str | Path | None = None,
                    **kwargs: Any) -> ChunkStore:
        """A store whose slabs hold one packed chunk of ``layout``."""
        return cls(config, layout.chunk_bytes(config.chunk_tokens), layout.chunk_fingerprint,
                   data_dir, **kwargs)

    # --- geometry (what an attaching process needs) -----------------------------------------

    @property
    def pool_name(self) -> str:
        return self.pool.name

    @property
    def slab_size(self) -> int:
        return self._slab_size

    @property
    def slab_count(self) -> int:
        return self.pool.slab_count

    def slab_offset(self, slab: int) -> int:
        return self.pool.slab_offset(slab)

    def view(self, item: Pin | Reservation | ChunkInfo) -> memoryview:
        """The bytes of a pinned chunk, a reservation or a just-committed chunk (no copy).

        Valid while the pin or reservation lives; release the view before ``close``.
        """
        return self.pool.view(item.offset, item.nbytes)

    # --- writes ------------------------------------------------------------------------------

    def reserve(self, key: ChunkKey, nbytes: int, timeout_s: float | None = None) -> Reservation:
        """A slab for ``nbytes`` of chunk ``key``, evicting if needed.

        Raises ``StoreError`` if ``nbytes`` exceeds the slab size and
        ``CapacityError`` when every slab is pinned or reserved.
        """
        if not 0 < nbytes <= self._slab_size:
            raise StoreError(f"chunk of {nbytes} bytes does not fit a slab of {self._slab_size} bytes")
        timeout = self._res_timeout if timeout_s is None else timeout_s
        with self._lock:
            self._check_open()
            now = self._reap(self._clock())
            rec = self._reserve(key, nbytes, now, timeout)
            return Reservation(ReservationId(rec.id), key, rec.slab, self.pool.slab_offset(rec.slab),
                               nbytes, rec.expires_at)

    def _reserve(self, key: ChunkKey, nbytes: int, now: float, timeout: float) -> Any:
        try:
            rec, evicted = self._index.reserve(key, nbytes, now, timeout)
        except CapacityError:
            self.metrics.capacity_errors.inc()
            raise
        if evicted is not None:
            self.metrics.evictions[L1].inc()
            self._writeback.evicted(evicted)
        return rec

    def commit(self, reservation_id: ReservationId | int, checksum: int | None = None,
               num_tokens: int | None = None) -> ChunkInfo:
        """Make a reserved chunk visible. Hashes the slab bytes; a given ``checksum`` must match.

        Raises ``ReservationError`` (unknown, expired, already committed) or
        ``IntegrityError`` (the bytes do not match ``checksum``; the reservation is
        aborted). ``num_tokens`` defaults to ``config.chunk_tokens``.
        """
        with self._lock:
            self._check_open()
            self._reap(self._clock())
            rec = self._index.begin_commit(reservation_id)
        view = self.pool.view(self.pool.slab_offset(rec.slab), rec.nbytes)
        try:
            actual = checksum_of(view)
        except BaseException:
            with self._lock:
                self._index.abort(rec.id, committing=True)
            raise
        finally:
            view.release()
        if checksum is not None and actual != checksum:
            with self._lock:
                self._index.abort(rec.id, committing=True)
            self.metrics.integrity_failures[L1].inc()
            raise IntegrityError(
                f"chunk {rec.key.hex()}: the written bytes hash to {actual:#018x}, the writer said "
                f"{checksum:#018x}; reservation {rec.id} aborted"
            )
        return self._finish_commit(rec.id, actual, num_tokens)

    def _finish_commit(self, rid: int, checksum: int, num_tokens: int | None,
                       origin: Tier | None = None) -> ChunkInfo:
        with self._lock:
            entry, _new = self._commit_locked(rid, checksum, num_tokens, origin)
            return self._info(entry)

    def _commit_locked(self, rid: int, checksum: int, num_tokens: int | None,
                       origin: Tier | None) -> tuple[Entry, bool]:
        tokens = self.chunk_tokens if num_tokens is None else num_tokens
        entry, new = self._index.finish_commit(rid, checksum, tokens)
        if new:
            self.metrics.bytes_in[L1].inc(entry.nbytes)
            self._writeback.committed(entry, origin)
        return entry, new

    def abort(self, reservation_id: ReservationId | int) -> bool:
        """Give a reservation's slab back; ``False`` if it is already gone (idempotent)."""
        with self._lock:
            return self._index.abort(reservation_id)

    def put(self, key: ChunkKey, data: bytes | bytearray | memoryview | np.ndarray,
            num_tokens: int | None = None) -> ChunkInfo:
        """Copy a chunk from this process's memory into L1 (reserve, copy, commit).

        The checksum is computed while copying, on the slab bytes. Blocking (a
        memcpy), never under the lock.
        """
        if isinstance(data, np.ndarray):
            src = np.ascontiguousarray(data).data.cast("B")
        else:
            src = memoryview(data).cast("B")
        n = len(src)
        res = self.reserve(key, n)
        dst = self.pool.view(res.offset, n)
        try:
            digest = copy_and_hash(dst, src)
        except BaseException:
            self.abort(res.id)
            raise
        finally:
            dst.release()
        with self._lock:
            self._index.begin_commit(res.id)
        return self._finish_commit(res.id, digest, num_tokens)

    def discard(self, key: ChunkKey) -> bool:
        """Drop an unpinned chunk from L1 (e.g. a receiver found it corrupt). ``False`` if absent or pinned."""
        with self._lock:
            entry = self._index.drop(key)
            if entry is None:
                return False
            self._writeback.forget(key)
            return True

    # --- reads -------------------------------------------------------------------------------

    def pin(self, keys: Sequence[ChunkKey], lease_s: float | None = None, owner: str = ""
            ) -> list[Pin | None]:
        """Pin the L1 chunks among ``keys`` for ``lease_s`` (default ``l1.lease_s``); ``None`` where absent.

        ``owner`` (a request id) lets ``release_owner`` drop every pin of a request at once.
        """
        out: list[Pin | None] = []
        with self._lock:
            self._check_open()
            now = self._reap(self._clock())
            expires = now + (self._lease_s if lease_s is None else lease_s)
            found = tokens = 0
            for key in keys:
                lease = self._index.pin(key, owner, expires)
                if lease is None:
                    out.append(None)
                else:
                    found += 1
                    tokens += lease.entry.num_tokens
                    out.append(self._pin(lease))
        self.metrics.count(L1, "get", found, tokens, len(keys) - found, self.chunk_tokens)
        return out

    def unpin(self, lease_id: LeaseId | int) -> bool:
        """Release one pin; ``False`` if unknown, already released or expired (idempotent)."""
        with self._lock:
            return self._index.unpin(lease_id)

    def release_owner(self, owner: str) -> int:
        """Release every pin held under ``owner``; returns how many."""
        with self._lock:
            return self._index.release_owner(owner)

    def owner_keys(self, owner: str) -> list[ChunkKey]:
        """The keys of the live pins held under ``owner`` (the agent checks a peer may release them)."""
        with self._lock:
            leases = [self._index.leases.get(lid) for lid in self._index.owners.get(owner, ())]
            return [lease.entry.key for lease in leases if lease is not None]

    def extend(self, lease_id: LeaseId | int, lease_s: float | None = None) -> bool:
        """Push a live lease's expiry to ``now + lease_s``; ``False`` if it is gone."""
        with self._lock:
            now = self._clock()
            return self._index.extend(lease_id, now + (self._lease_s if lease_s is None else lease_s))

    def lookup(self, keys: Sequence[ChunkKey], remote: bool = False, count: bool = True) -> LookupResult:
        """Which tier holds each key, and how many leading keys are present.

        L1 and the local tiers only (memory dict lookups) unless ``remote``: then
        keys found nowhere locally are asked of every remote tier at once (one
        batched existence check per tier); a tier that does not answer within its
        ``lookup_timeout_s`` is a miss for this lookup, the others still count. ``count=False``
        (a probe of candidate tail keys, most of them absent by design) leaves the lookup metrics as
        they are.
        """
        entries = self._index.entries
        local = self.local_tiers
        with self._lock:
            tiers: list[Tier | None] = []
            for k in keys:
                if k in entries:
                    tiers.append(Tier.L1)
                else:
                    tiers.append(next((t.tier for t in local if t.has(k)), None))
        searched = [Tier.L1] + [t.tier for t in local]
        missing = [i for i, t in enumerate(tiers) if t is None]
        if remote and missing and self._remote_lookups is not None:
            # every remote tier at once, each within its own budget; the first in list order wins
            rts = self.remote_tiers
            searched += [rt.tier for rt in rts]
            answers = self._remote_lookups.exists(rts, [keys[i] for i in missing])
            for rt, there in zip(rts, answers):
                if there is None:
                    continue
                for i, yes in zip(missing, there):
                    if yes and tiers[i] is None:
                        tiers[i] = rt.tier
        prefix = 0
        for t in tiers:
            if t is None:
                break
            prefix += 1
        if count:
            self.metrics.count_lookup(tiers, prefix, searched, self.chunk_tokens)
        return LookupResult(tuple(keys), tuple(tiers), prefix, self.chunk_tokens)

    def lookup_tokens(self, token_ids: Sequence[int] | np.ndarray, remote: bool = False,
                      namespace: str | None = None) -> LookupResult:
        """``lookup`` of the keys of every full chunk of ``token_ids`` (hashing included)."""
        ns = self.config.namespace if namespace is None else namespace
        return self.lookup(chunk_keys(token_ids, self.chunk_fingerprint, self.chunk_tokens, ns), remote)

    def get(self, keys: Sequence[ChunkKey], lease_s: float | None = None, owner: str = "",
            remote: bool = True) -> list[Pin | None]:
        """Pin the leading run of ``keys`` in L1, promoting chunks from disk and Redis first.

        Returns one entry per key: a ``Pin`` for each chunk of the leading run,
        ``None`` from the first chunk found nowhere on (later chunks are not
        pinned even if present). Chunks read from a lower tier are verified
        against their checksum. Blocking (disk and network reads, outside the lock).
        """
        n = len(keys)
        pins: list[Pin | None] = [None] * n
        local = self.local_tiers
        lookups = self._remote_lookups
        # a remote tier whose lookup is hanging past its budget would hang this load too: skip it
        usable = local + ([t for t in self.remote_tiers if lookups is None or not lookups.stuck(t)]
                          if remote else [])
        pending: list[int] = []  # not in L1, maybe in a lower tier
        with self._lock:
            self._check_open()
            now = self._reap(self._clock())
            expires = now + (self._lease_s if lease_s is None else lease_s)
            l1_tokens = 0
            for i, key in enumerate(keys):
                lease = self._index.pin(key, owner, expires)
                if lease is not None:
                    pins[i] = self._pin(lease)
                    l1_tokens += lease.entry.num_tokens
                elif len(usable) > len(local) or any(t.has(key) for t in local):
                    pending.append(i)
                else:
                    break
        l1_hits = sum(p is not None for p in pins)
        self.metrics.count(L1, "get", l1_hits, l1_tokens, n - l1_hits, self.chunk_tokens)
        for j, tier in enumerate(usable):
            if not pending:
                break
            wanted = [i for i in pending if tier.has(keys[i])] if tier.local else pending
            if not wanted:
                continue
            # The last tier that could serve stops at its first miss: later chunks would not be used.
            failed = set(self._promote(tier, keys, wanted, pins, owner, expires,
                                       stop_at_miss=j == len(usable) - 1))
            done = set(wanted) - failed
            pending = [i for i in pending if i not in done]
        # Only the leading run is useful to the caller: let the rest go (it stays in L1).
        cut = next((i for i, p in enumerate(pins) if p is None), n)
        late = [p.lease_id for p in pins[cut:] if p is not None]
        if late:
            with self._lock:
                for lid in late:
                    self._index.unpin(lid)
            pins[cut:] = [None] * (n - cut)
        self.metrics.request("get", cut, n)
        return pins

    def _promote(self, tier: LowerTier, keys: Sequence[ChunkKey], idxs: list[int],
                 pins: list[Pin | None], owner: str, expires: float, stop_at_miss: bool) -> list[int]:
        """Read ``keys[idxs]`` from ``tier`` into fresh slabs and pin them; returns the failed idxs.

        Reads go in batches of ``tier.read_batch`` (bounding the memory a remote
        reply takes); with ``stop_at_miss`` nothing after a batch with a miss is
        read, since the caller only uses the leading run.
        """
        failed: list[int] = []
        hits = tokens = 0
        step = max(1, tier.read_batch)
        for a in range(0, len(idxs), step):
            h, t, miss = self._promote_batch(tier, keys, idxs[a : a + step], pins, owner, expires)
            hits += h
            tokens += t
            failed += miss
            if miss and stop_at_miss:
                failed += idxs[a + step :]
                break
        self.metrics.count(tier.tier.value, "get", hits, tokens, len(idxs) - hits, self.chunk_tokens)
        return failed

    def _promote_batch(self, tier: LowerTier, keys: Sequence[ChunkKey], idxs: list[int],
                       pins: list[Pin | None], owner: str, expires: float
                       ) -> tuple[int, int, list[int]]:
        wanted = [keys[i] for i in idxs]
        reserved: dict[int, int] = {}  # position in wanted -> reservation id
        views: list[memoryview] = []

        def sink(j: int, meta: ChunkMeta) -> memoryview | None:
            if meta.nbytes > self._slab_size or meta.nbytes <= 0:
                return None
            with self._lock:
                if self._closed:
                    return None
                try:
                    rec = self._reserve(wanted[j], meta.nbytes, self._clock(), self._res_timeout)
                except CapacityError:
                    rec = self._reserve_from_tail(wanted[j], meta.nbytes, idxs[j], pins)
                    if rec is None:
                        return None
                self._index.begin_commit(rec.id)  # ours until filled: no expiry
            reserved[j] = rec.id
            view = self.pool.view(self.pool.slab_offset(rec.slab), meta.nbytes)
            views.append(view)
            return view

        try:
            metas = tier.read(wanted, sink)
        except BaseException:  # tiers do not raise; if one does, give the slabs back first
            with self._lock:
                for res_id in reserved.values():
                    self._index.abort(res_id, committing=True)
            raise
        finally:
            for v in views:
                v.release()
        failed: list[int] = []
        hits = tokens = 0
        with self._lock:
            for j, i in enumerate(idxs):
                meta = metas[j]
                rid = reserved.get(j)
                if meta is None or rid is None:
                    if rid is not None:
                        self._index.abort(rid, committing=True)
                    failed.append(i)
                    continue
                entry, _new = self._commit_locked(rid, meta.checksum, meta.num_tokens, tier.tier)
                pins[i] = self._pin(self._index.pin_entry(entry, owner, expires))
                hits += 1
                tokens += meta.num_tokens
        return hits, tokens, failed

    def _reserve_from_tail(self, key: ChunkKey, nbytes: int, pos: int,
                           pins: list[Pin | None]) -> Any:
        """The pool is full while promoting ``keys[pos]``: the chunks this get pinned
        further along the prompt are worth nothing without it, so give them up, last
        first, until a slab frees. Lock held. Returns a reservation record or ``None``."""
        for p in range(len(pins) - 1, pos, -1):
            pin = pins[p]
            if pin is None:
                continue
            pins[p] = None
            self._index.unpin(pin.lease_id)
            entry = self._index.drop(pin.key)
            if entry is None:  # someone else holds it too
                continue
            self.metrics.evictions[L1].inc()
            self._writeback.evicted(entry)
            try:
                return self._reserve(key, nbytes, self._clock(), self._res_timeout)
            except CapacityError:
                continue
        return None

    # --- housekeeping ------------------------------------------------------------------------

    def reap(self) -> None:
        """Expire leases and reservations whose deadline passed (the agent calls this periodically)."""
        with self._lock:
            self._reap(self._clock())

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued write-behind reached its tier; ``False`` on timeout."""
        deadline = time.monotonic() + timeout_s
        ok = True
        for tier in self.tiers:
            ok = tier.flush(max(0.0, deadline - time.monotonic())) and ok
        return ok

    def keys(self) -> list[ChunkKey]:
        """Keys of the chunks now in L1 (a snapshot; the agent summarises them for the proxy)."""
        with self._lock:
            return list(self._index.entries)

    def stats(self) -> StoreStats:
        with self._lock:
            idx = self._index
            return StoreStats(
                slab_size=self._slab_size, slab_count=idx.slab_count, free_slabs=idx.free_slabs,
                reserved_slabs=len(idx.reservations), pinned_slabs=idx.pinned_slabs,
                chunks=len(idx.entries), used_bytes=idx.used_bytes, leases=len(idx.leases),
                disk_chunks=int(disk.chunk_count()) if (disk := self.disk) is not None else 0,
                redis_reachable=redis.reachable if (redis := self.redis) is not None else None,
            )

    def tier_health(self) -> dict[str, dict[str, Any]]:
        """Per lower tier (by type): enabled, chunks held (where known), reachable. For health endpoints."""
        out: dict[str, dict[str, Any]] = {
            "disk": {"enabled": False, "chunks": 0}, "redis": {"enabled": False, "reachable": None}}
        for t in self.tiers:
            out[t.tier.value] = {"enabled": True, "local": t.local, "chunks": int(t.chunk_count()),
                                 "reachable": t.reachable}
        return out

    def close(self) -> None:
        """Drain write-behind (up to ``config.drain_s``), stop the tiers, unlink the pool. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        lookups = getattr(self, "_remote_lookups", None)
        if lookups is not None:
            lookups.close()
        for tier in getattr(self, "tiers", ()):
            tier.close(self.config.drain_s)
        if hasattr(self, "pool"):
            self.pool.close()

    def __enter__(self) -> ChunkStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals (lock held unless said otherwise) ----------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the store is closed")

    def _reap(self, now: float) -> float:
        res, leases = self._index.reap(now)
        if res:
            self.metrics.expired_reservations.inc(res)
        if leases:
            self.metrics.expired_leases.inc(leases)
        return now

    def _pin(self, lease: Lease) -> Pin:
        e = lease.entry
        return Pin(LeaseId(lease.id), e.key, e.slab, self.pool.slab_offset(e.slab), e.nbytes,
                   e.checksum, e.num_tokens, lease.expires_at)

    def _info(self, e: Entry) -> ChunkInfo:
        return ChunkInfo(e.key, e.slab, self.pool.slab_offset(e.slab), e.nbytes, e.checksum, e.num_tokens)
