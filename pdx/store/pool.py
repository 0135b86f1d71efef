"""L1 memory: one POSIX shared-memory segment cut into fixed-size slabs.

The agent creates the pool once (``SlabPool``) and owns every piece of metadata
about it (which slab holds which chunk, reservations, pins: see
``pdx.store.index``). Another process, the engine's connector, maps the same
segment by name (``attach``) and reads or writes chunk bytes in place at the
``(offset, nbytes)`` the agent hands it. Nothing is allocated per chunk.

Segment layout::

    [ header page (4 KiB) | slab 0 | slab 1 | ... | slab N-1 ]

The header records the geometry (magic, version, slab size and count, owner pid)
so that ``attach(name)`` needs nothing but the name. Slabs are page-aligned.

The owner holds an exclusive ``flock`` on the segment for its lifetime: a new
owner asked for a fixed name takes over a segment only when nobody holds it
(its agent died), and refuses one that a live pool uses. ``sweep_stale`` (run by
every new store) unlinks segments whose owner died, so a crash strands no memory.

The segment is opened with ``_posixshmem`` (the module behind
``multiprocessing.shared_memory``) rather than ``SharedMemory`` itself: on Python
3.11/3.12 every attaching process would register the segment with its resource
tracker, which unlinks it (and warns) when that process exits, pulling the pool
out from under the agent.

Thread-safety: views may be created and used from any thread; the bytes
themselves are guarded by the reservation/pin protocol, not by a lock.
"""

from __future__ import annotations

import _posixshmem
import errno
import fcntl
import logging
import mmap
import os
import secrets
import struct
from types import TracebackType

import numpy as np
import xxhash

from pdx.errors import StoreError

log = logging.getLogger(__name__)

HEADER_SIZE = 4096
SLAB_ALIGN = 4096
POOL_VERSION = 1
_COPY_BLOCK = 256 * 1024
_MAGIC = b"PDXPOOL\x00"
_HEADER = struct.Struct("<8sIIQQQ")  # magic, version, header size, slab size, slab count, owner pid


def round_slab_size(nbytes: int) -> int:
    """``nbytes`` rounded up to the slab alignment (one page)."""
    if nbytes <= 0:
        raise ValueError(f"slab size must be positive, got {nbytes}")
    return -(-nbytes // SLAB_ALIGN) * SLAB_ALIGN


def copy_and_hash(dst: memoryview, src: memoryview) -> int:
    """Copy ``src`` into ``dst`` and return the xxh3-64 of the copy (``pdx.checksum.checksum``).

    Block by block, so each block is hashed while it is still in cache: about
    the cost of the copy alone, where hashing afterwards would read it all again.
    """
    h = xxhash.xxh3_64()
    n = len(src)
    for a in range(0, n, _COPY_BLOCK):
        b = min(n, a + _COPY_BLOCK)
        block = dst[a:b]
        block[:] = src[a:b]
        h.update(block)
        block.release()
    return h.intdigest()


def generate_name() -> str:
    """A fresh pool name: unique per process and call."""
    return f"pdx-{os.getpid()}-{secrets.token_hex(4)}"


class _MappedPool:
    """A mapping of a pool segment: geometry, views, close. Base of both sides."""

    def __init__(self, name: str, fd: int, size: int, populate: bool) -> None:
        self._name = name
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
        try:
            self._mmap: mmap.mmap | None = mmap.mmap(
                fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        finally:
            os.close(fd)
        self._buf: memoryview | None = memoryview(self._mmap)
        self._size = size
        self._slab_size = 0
        self._slab_count = 0

    # --- geometry ----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The segment's name; pass it to ``attach`` in another process."""
        return self._name

    @property
    def slab_size(self) -> int:
        """Bytes per slab (page-aligned); every chunk is at most this long."""
        return self._slab_size

    @property
    def slab_count(self) -> int:
        return self._slab_count

    @property
    def nbytes(self) -> int:
        """Size of the whole segment, header included."""
        return self._size

    def slab_offset(self, slab: int) -> int:
        """Byte offset of ``slab`` within the segment."""
        if not 0 <= slab < self._slab_count:
            raise IndexError(f"slab {slab} outside [0, {self._slab_count})")
        return HEADER_SIZE + slab * self._slab_size

    # --- bytes -------------------------------------------------------------------------------

    @property
    def buffer(self) -> memoryview:
        """The whole segment as a writable memoryview."""
        if self._buf is None:
            raise StoreError(f"pool {self._name!r} is closed")
        return self._buf

    def view(self, offset: int, nbytes: int) -> memoryview:
        """A writable memoryview of ``nbytes`` at ``offset`` (bounds-checked, no copy)."""
        if offset < HEADER_SIZE or nbytes < 0 or offset + nbytes > self._size:
            raise IndexError(
                f"range [{offset}, {offset + nbytes}) outside the slab area "
                f"[{HEADER_SIZE}, {self._size}) of pool {self._name!r}"
            )
        return self.buffer[offset : offset + nbytes]

    def array(self, offset: int, nbytes: int) -> np.ndarray:
        """A uint8 numpy view of ``nbytes`` at ``offset`` (no copy)."""
        return np.frombuffer(self.view(offset, nbytes), dtype=np.uint8)

    # --- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap (idempotent). Views still alive keep the mapping until they are dropped."""
        if self._buf is not None:
            self._buf.release()
            self._buf = None
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                log.debug("pool %s: views still alive; unmapped when they are dropped", self._name)
            self._mmap = None

    def __enter__(self) -> _MappedPool:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class SlabPool(_MappedPool):
    """The owner's side: creates (and on close unlinks) the segment.

    Created once by the store; blocking only during construction (the pages are
    reserved with ``posix_fallocate`` so a too-small ``/dev/shm`` is a clear
    error now rather than a SIGBUS later, and optionally mapped in up front).
    """

    def __init__(self, slab_size: int, slab_count: int, name: str = "",
                 prefault: bool = True) -> None:
        if slab_count <= 0:
            raise StoreError(f"a pool needs at least one slab, got {slab_count}")
        slab_size = round_slab_size(slab_size)
        name = name or generate_name()
        size = HEADER_SIZE + slab_size * slab_count
        fd = _create(name)
        self._unlinked = False
        try:
            _reserve(fd, size, name)
            self._lock_fd: int | None = os.dup(fd)  # keeps the owner's flock while the pool lives
        except BaseException:
            os.close(fd)
            _unlink(name)
            raise
        try:
            super().__init__(name, fd, size, populate=prefault)
        except BaseException:
            os.close(self._lock_fd)
            _unlink(name)
            raise
        self._slab_size = slab_size
        self._slab_count = slab_count
        _HEADER.pack_into(self.buffer, 0, _MAGIC, POOL_VERSION, HEADER_SIZE, slab_size,
                          slab_count, os.getpid())

    def close(self) -> None:
        """Unmap and unlink the segment (idempotent); attached processes keep their mappings."""
        super().close()
        if not self._unlinked:
            self._unlinked = True
            _unlink(self._name)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class AttachedPool(_MappedPool):
    """Another process's view of a pool: bytes only, no metadata. See ``attach``."""

    def __init__(self, name: str, populate: bool = False) -> None:
        try:
            fd = _posixshmem.shm_open("/" + name, os.O_RDWR, 0)
        except FileNotFoundError:
            raise StoreError(f"no pdx pool named {name!r} (is the agent running?)") from None
        size = os.fstat(fd).st_size
        if size < HEADER_SIZE:
            os.close(fd)
            raise StoreError(f"shared memory {name!r} is not a pdx pool ({size} bytes)")
        super().__init__(name, fd, size, populate=populate)
        magic, version, header, slab_size, slab_count, _pid = _HEADER.unpack_from(self.buffer, 0)
        if magic != _MAGIC or version != POOL_VERSION or header != HEADER_SIZE:
            self.close()
            raise StoreError(
                f"shared memory {name!r} is not a pdx pool of version {POOL_VERSION} "
                f"(magic {magic!r}, version {version})"
            )
        if HEADER_SIZE + slab_size * slab_count > size:
            self.close()
            raise StoreError(f"pool {name!r} header claims more slabs than the segment holds")
        self._slab_size = slab_size
        self._slab_count = slab_count


def attach(name: str, populate: bool = False) -> AttachedPool:
    """Map the pool ``name`` created by an agent, in this process.

    The caller may read and write only the ``(offset, nbytes)`` ranges the agent
    reserved or pinned for it; closing it never unlinks the segment.
    """
    return AttachedPool(name, populate=populate)


# --- helpers ---------------------------------------------------------------------------------


def _create(name: str) -> int:
    """Create the segment and take the owner's lock on it; returns the fd."""
    flags = os.O_CREAT | os.O_EXCL | os.O_RDWR
    try:
        fd = int(_posixshmem.shm_open("/" + name, flags, 0o600))
    except FileExistsError:
        # A fixed name: in use by a live agent (it holds the lock), or left by a crashed one.
        fd = int(_posixshmem.shm_open("/" + name, os.O_RDWR, 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(
                f"shared memory {name!r} is in use by a running pool (pid {_owner_pid(name)}); "
                "choose another store.l1.shm_name or leave it empty"
            ) from None
        os.close(fd)
        log.warning("removing stale pool %r left by pid %s", name, _owner_pid(name))
        _unlink(name)
        fd = int(_posixshmem.shm_open("/" + name, flags, 0o600))
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while the owner lives
    return fd


def sweep_stale(prefix: str = "pdx-") -> list[str]:
    """Unlink pools left by owners that died (Linux: lists ``/dev/shm``). Returns their names.

    A segment is stale when nobody holds its owner lock, its header is complete
    and the pid in it is gone; a pool being created right now has no header yet
    and is left alone.
    """
    try:
        names = [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
    except OSError:
        return []
    removed = []
    for name in names:
        try:
            fd = _posixshmem.shm_open("/" + name, os.O_RDWR, 0)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live owner
            raw = os.pread(fd, _HEADER.size, 0)
            if len(raw) < _HEADER.size:
                continue
            magic, _v, _h, _s, _c, pid = _HEADER.unpack(raw)
            if magic != _MAGIC or _alive(pid):
                continue
            _unlink(name)
            removed.append(name)
        finally:
            os.close(fd)
    if removed:
        log.warning("removed %d pools left by processes that died: %s", len(removed), ", ".join(removed))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reserve(fd: int, size: int, name: str) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            os.ftruncate(fd, size)
            return
        raise StoreError(
            f"cannot allocate {size} bytes of shared memory for pool {name!r}: "
            f"{exc.strerror}; lower store.l1.capacity or enlarge /dev/shm"
        ) from exc


def _owner_pid(name: str) -> int | None:
    try:
        fd = _posixshmem.shm_open("/" + name, os.O_RDONLY, 0)
    except OSError:
        return None
    try:
        raw = os.pread(fd, _HEADER.size, 0)
    finally:
        os.close(fd)
    if len(raw) < _HEADER.size:
        return None
    magic, _v, _h, _s, _c, pid = _HEADER.unpack(raw)
    return int(pid) if magic == _MAGIC else None


def _unlink(name: str) -> None:
    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        pass
