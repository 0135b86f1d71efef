"""L2: chunk files on local disk, written behind by a thread, indexed in memory.

One file per chunk under ``<root>/<chunk fingerprint>/<key hex>.chunk`` (one flat
folder: creating sub-folders cost more than the lookups they would save),
holding a 64-byte header and the payload::

    magic "PDXD" | version u16 | header size u16 | key 16B | chunk fingerprint 16B
    | num_tokens u32 | checksum u64 (xxh3-64 of the payload) | length u64 | xxh32 of the above

Files are written to a temporary name and renamed into place, so a reader never
sees half a file. On start the folder is scanned (headers only) to rebuild the
index; a file with a bad header or the wrong length is dropped with a warning.
Payload checksums are verified on every read; a mismatch deletes the file and is
a miss. The tier keeps its own LRU (insertion/read order; after a restart,
modification time) within ``capacity`` bytes of files.

A disk that is full, read-only or failing degrades to misses and dropped writes
with one logged warning per episode, never an exception to the caller.

Thread-safety: the index has its own lock; reads run in the caller's thread,
writes in the tier's writer thread. ``has`` is lock-free (one dict lookup).
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import xxhash

from pdx.config import DiskConfig
from pdx.errors import StoreError
from pdx.keys import KEY_BYTES, ChunkKey
from pdx.store.metrics import StoreMetrics
from pdx.store.tier import LowerTier, Sink, WriteItem
from pdx.store.types import ChunkMeta, Tier

log = logging.getLogger(__name__)

MAGIC = b"PDXD"
VERSION = 1
_FIELDS = struct.Struct("<4sHH16s16sIQQ")
_HCRC = struct.Struct("<I")
HEADER_SIZE = _FIELDS.size + _HCRC.size
assert HEADER_SIZE == 64
SUFFIX = ".chunk"
_MAX_WARNINGS = 10
_READ_BLOCK = 256 * 1024


def pack_header(key: ChunkKey, fingerprint: bytes, meta: ChunkMeta) -> bytes:
    fields = _FIELDS.pack(MAGIC, VERSION, HEADER_SIZE, key, fingerprint, meta.num_tokens,
                          meta.checksum, meta.nbytes)
    return fields + _HCRC.pack(xxhash.xxh32_intdigest(fields))


def unpack_header(raw: bytes, key: ChunkKey, fingerprint: bytes) -> ChunkMeta:
    """The header's metadata; ``ValueError`` saying what is wrong."""
    if len(raw) < HEADER_SIZE:
        raise ValueError(f"header truncated ({len(raw)} of {HEADER_SIZE} bytes)")
    fields = raw[: _FIELDS.size]
    (hcrc,) = _HCRC.unpack_from(raw, _FIELDS.size)
    magic, version, hsize, fkey, ffp, num_tokens, csum, length = _FIELDS.unpack(fields)
    if magic != MAGIC:
        raise ValueError(f"not a pdx chunk file (magic {magic!r})")
    if version != VERSION or hsize != HEADER_SIZE:
        raise ValueError(f"chunk file version {version} (header {hsize}), expected {VERSION}")
    if xxhash.xxh32_intdigest(fields) != hcrc:
        raise ValueError("header checksum mismatch")
    if fkey != key:
        raise ValueError(f"header names key {fkey.hex()}")
    if ffp != fingerprint:
        raise ValueError(f"header has chunk fingerprint {ffp!r}, expected {fingerprint!r}")
    return ChunkMeta(nbytes=length, checksum=csum, num_tokens=num_tokens)


class _File:
    __slots__ = ("meta", "size")

    def __init__(self, meta: ChunkMeta) -> None:
        self.meta = meta
        self.size = HEADER_SIZE + meta.nbytes


class DiskTier(LowerTier):
    """L2 on a local folder. See the module docstring."""

    tier = Tier.DISK
    local = True
    #: folder under the agent's data dir when ``path`` is empty
    default_dir = "disk-cache"

    #: chunks per writer batch (the NIXL tier moves a whole batch in one transfer)
    write_batch_size: int = 1

    def __init__(self, config: DiskConfig, *, chunk_fingerprint: str, data_dir: Path | None,
                 metrics: StoreMetrics, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(metrics, config.queue_depth, batch_size=self.write_batch_size)
        if config.path:
            root = Path(config.path).expanduser()
        elif data_dir is not None:
            root = Path(data_dir) / self.default_dir
        else:
            raise StoreError(f"store.tiers: the {self.tier.value} tier's path is empty and no data dir was given")
        self._fp = chunk_fingerprint.encode().ljust(16, b"\0")[:16]
        self.dir = root / chunk_fingerprint
        self._capacity = config.capacity
        self._fsync = config.fsync
        self._lock = threading.Lock()
        self._index: OrderedDict[ChunkKey, _File] = OrderedDict()  # least recently used first
        self._used = 0  # bytes of indexed files plus files being written
        self._failing: str | None = None  # why writes fail, while they do
        self._tmp_seq = 0
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._warn_failing(f"cannot create {self.dir}: {exc.strerror}")
        self._scan()
        self._start_writer()

    # --- membership --------------------------------------------------------------------------

    def has(self, key: ChunkKey) -> bool:
        return key in self._index

    def exists(self, keys: Sequence[ChunkKey]) -> list[bool]:
        index = self._index
        return [k in index for k in keys]

    def used_bytes(self) -> float:
        return float(self._used)

    def capacity_bytes(self) -> float:
        return float(self._capacity)

    def chunk_count(self) -> float:
        return float(len(self._index))

    def path_of(self, key: ChunkKey) -> Path:
        return self.dir / (key.hex() + SUFFIX)

    # --- reads -------------------------------------------------------------------------------

    def read(self, keys: Sequence[ChunkKey], sink: Sink) -> list[ChunkMeta | None]:
        out: list[ChunkMeta | None] = []
        for i, key in enumerate(keys):
            with self._lock:
                f = self._index.get(key)
                if f is not None:
                    self._index.move_to_end(key)
            out.append(None if f is None else self._read_one(i, key, sink))
        return out

    def _read_one(self, i: int, key: ChunkKey, sink: Sink) -> ChunkMeta | None:
        path = self.path_of(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            log.warning("disk tier: cannot open %s: %s; dropped from the index", path, exc.strerror)
            self.metrics.tier_errors[self._label].inc()
            self._forget(key)
            return None
        try:
            try:
                meta = unpack_header(os.pread(fd, HEADER_SIZE, 0), key, self._fp)
            except ValueError as exc:
                self._corrupt(key, path, str(exc))
                return None
            dest = sink(i, meta)
            if dest is None:
                return None
            target = dest[: meta.nbytes]
            try:
                got, digest = self._read_payload(fd, target, HEADER_SIZE)
                if got != meta.nbytes:
                    self._corrupt(key, path, f"payload truncated ({got} of {meta.nbytes} bytes)")
                    return None
                if digest != meta.checksum:
                    self._corrupt(key, path, "payload checksum mismatch")
                    return None
            finally:
                target.release()
        except OSError as exc:
            log.warning("disk tier: reading %s failed: %s", path, exc.strerror)
            self.metrics.tier_errors[self._label].inc()
            return None
        finally:
            os.close(fd)
        self.metrics.bytes_out[self._label].inc(meta.nbytes)
        return meta

    def _corrupt(self, key: ChunkKey, path: Path, why: str) -> None:
        log.warning("disk tier: %s: %s; file dropped", path, why)
        self.metrics.integrity_failures[self._label].inc()
        self._forget(key)
        _unlink(path)

    def _forget(self, key: ChunkKey) -> None:
        with self._lock:
            f = self._index.pop(key, None)
            if f is not None:
                self._used -= f.size

    # --- writes (writer thread) --------------------------------------------------------------

    def write_batch(self, items: list[WriteItem]) -> None:
        for item in items:
            self._write_one(item)

    def _write_one(self, item: WriteItem) -> None:
        staged = self._stage(item)
        if staged is None:
            return
        path, tmp, size = staged
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            self._write_failed(path, tmp, size, exc)
            return
        error: OSError | None = None
        try:
            self._write_file(fd, pack_header(item.key, self._fp, item.meta), item.data)
        except OSError as exc:
            error = exc
        self._commit_file(item, path, tmp, size, fd, error)

    def _commit_file(self, item: WriteItem, path: Path, tmp: Path, size: int, fd: int,
                     error: OSError | None) -> None:
        """Finish a staged write whose bytes went to ``fd`` (``error``: they did not): sync if
        configured, close, move the file in place and index it; any failure drops it, counted."""
        try:
            try:
                if error is not None:
                    raise error
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            self._write_failed(path, tmp, size, exc)
            return
        self._written(item)

    def _stage(self, item: WriteItem) -> tuple[Path, Path, int] | None:
        """Claim room for ``item`` (evicting the oldest files): ``(path, temp path, size)``, or
        None when it is already stored or can never fit."""
        size = HEADER_SIZE + item.meta.nbytes
        victims: list[ChunkKey] = []
        with self._lock:
            if item.key in self._index:
                return None
            if size > self._capacity:
                self.metrics.write_drops[self._label].inc()
                return None
            while self._used + size > self._capacity and self._index:
                key, f = self._index.popitem(last=False)
                self._used -= f.size
                victims.append(key)
            self._used += size  # claimed while the file is written
        for key in victims:
            _unlink(self.path_of(key))
        if victims:
            self.metrics.evictions[self._label].inc(len(victims))
        path = self.path_of(item.key)
        self._tmp_seq += 1
        return path, path.with_name(f".{path.name}.{self._tmp_seq}.tmp"), size

    def _write_failed(self, path: Path, tmp: Path, size: int, exc: OSError) -> None:
        """A staged write that failed: give its room back, drop it, count it."""
        with self._lock:
            self._used -= size
        _unlink(tmp)
        self.metrics.tier_errors[self._label].inc()
        self.metrics.write_drops[self._label].inc()
        self._warn_failing(f"writing {path.name} failed: {exc.strerror or exc}")

    def _written(self, item: WriteItem) -> None:
        """A staged write whose file is in place: index it."""
        with self._lock:
            self._index[item.key] = _File(item.meta)
        self.metrics.bytes_in[self._label].inc(item.meta.nbytes)
        if self._failing is not None:
            log.warning("disk tier: writes to %s work again", self.dir)
            self._failing = None

    # --- payload I/O (the NIXL storage tier moves payloads with NIXL instead) ---------------

    def _read_payload(self, fd: int, target: memoryview, offset: int) -> tuple[int, int]:
        """Fill ``target`` from ``fd`` at ``offset``: ``(bytes read, xxh3-64)``. Raises ``OSError``."""
        return _read_and_hash(fd, target, offset)

    def _write_file(self, fd: int, header: bytes, data: memoryview | bytes) -> None:
        """Write ``header`` then ``data`` from offset 0 of ``fd``. Raises ``OSError``."""
        _write_all(fd, [header, data])

    def _warn_failing(self, why: str) -> None:
        if self._failing is None:
            log.warning("disk tier: %s; chunks are not written to disk until this clears "
                        "(reads of existing chunks go on)", why)
        self._failing = why

    # --- start-up ----------------------------------------------------------------------------

    def _scan(self) -> None:
        """Rebuild the index from the files' headers, oldest first."""
        found: list[tuple[float, ChunkKey, _File]] = []
        bad = 0
        try:
            entries = list(os.scandir(self.dir))
        except OSError:
            return
        for ent in entries:
            name = ent.name
            if name.endswith(".tmp"):  # a write cut short by a crash
                _unlink(Path(ent.path))
                continue
            if not name.endswith(SUFFIX):
                continue
            why, item = self._check_file(ent)
            if item is None:
                bad += 1
                if bad <= _MAX_WARNINGS:
                    log.warning("disk tier: %s: %s; file dropped", ent.path, why)
                _unlink(Path(ent.path))
                self.metrics.integrity_failures[self._label].inc()
                continue
            found.append(item)
        if bad > _MAX_WARNINGS:
            log.warning("disk tier: %d bad chunk files dropped in all", bad)
        found.sort(key=lambda t: t[0])
        for _, key, f in found:
            self._index[key] = f
            self._used += f.size
        while self._used > self._capacity and self._index:  # capacity lowered since last run
            key, f = self._index.popitem(last=False)
            self._used -= f.size
            _unlink(self.path_of(key))
        if found:
            log.info("disk tier: %d chunks (%d bytes) found in %s", len(self._index), self._used, self.dir)

    def _check_file(self, ent: os.DirEntry[str]) -> tuple[str, tuple[float, ChunkKey, _File] | None]:
        stem = ent.name[: -len(SUFFIX)]
        try:
            key = ChunkKey(bytes.fromhex(stem))
        except ValueError:
            return "name is not a chunk key", None
        if len(key) != KEY_BYTES:
            return "name is not a chunk key", None
        try:
            st = ent.stat()
            with open(ent.path, "rb") as f:
                raw = f.read(HEADER_SIZE)
            meta = unpack_header(raw, key, self._fp)
        except OSError as exc:
            return f"unreadable ({exc.strerror})", None
        except ValueError as exc:
            return str(exc), None
        if st.st_size != HEADER_SIZE + meta.nbytes:
            return f"length {st.st_size}, header says {HEADER_SIZE + meta.nbytes}", None
        return "", (st.st_mtime, key, _File(meta))


def _read_and_hash(fd: int, buf: memoryview, offset: int) -> tuple[int, int]:
    """Fill ``buf`` from ``fd`` at ``offset`` and hash it: ``(bytes read, xxh3-64)``.

    Block by block, so each block is hashed while it is still in cache.
    """
    h = xxhash.xxh3_64()
    done = 0
    total = len(buf)
    while done < total:
        block = buf[done : min(total, done + _READ_BLOCK)]
        n = os.preadv(fd, [block], offset + done)
        if n == 0:
            break
        h.update(block[:n])
        done += n
    return done, h.intdigest()


def _write_all(fd: int, parts: list[bytes | memoryview]) -> None:
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
