"""Local chunk files moved by a NIXL storage plugin: POSIX here, GDS / GDS_MT on CUDA hosts.

The same files, header, index, capacity and failure handling as the disk tier
(``pdx.store.disk``; it is a ``DiskTier`` with ``tier = Tier.NIXL``), but each
payload goes between memory and its file through a NIXL agent's storage
backend (``plugin``) instead of ``pwritev``/``preadv``: the buffer and the
file are registered (``DRAM`` and ``FILE`` descriptors), one ``WRITE`` or
``READ`` transfer moves the payload, and the header is written and read with
plain calls. With GDS a GPU region can later take the place of the buffer.

Blocking: a transfer is polled to completion (bounded by ``TRANSFER_TIMEOUT_S``)
in the calling thread (reads: the store's ``get``; writes: the tier's writer).
One NIXL agent per tier, used under a lock. Raises ``BackendUnavailable`` at
creation when NIXL or the plugin is missing (GDS without CUDA, for instance).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pdx.checksum import checksum
from pdx.config import NixlStorageConfig
from pdx.errors import BackendUnavailable
from pdx.store.disk import HEADER_SIZE, DiskTier, pack_header
from pdx.store.metrics import StoreMetrics
from pdx.store.tier import WriteItem
from pdx.store.types import Tier
from pdx.transport.nixl import load_nixl

#: longest one payload transfer may take before it counts as an I/O failure
TRANSFER_TIMEOUT_S = 30.0


class NixlStorageTier(DiskTier):
    """A local tier whose payload I/O goes through NIXL (see the module docstring)."""

    tier = Tier.NIXL
    default_dir = "nixl-cache"
    write_batch_size = 16
    gather_s = 0.002  # a request's chunks are committed moments apart: one transfer, not several

    def __init__(self, config: NixlStorageConfig, *, chunk_fingerprint: str, data_dir: Path | None,
                 metrics: StoreMetrics, clock: Callable[[], float] = time.monotonic) -> None:
        api = load_nixl()
        self.plugin = config.plugin
        self._xfer_lock = threading.Lock()
        self._name = f"pdx-store-{config.plugin.lower()}-{os.getpid()}-{id(self):x}"
        agent = api.nixl_agent(self._name, api.nixl_agent_config(enable_prog_thread=False, backends=[]))
        if config.plugin not in agent.get_plugin_list():
            raise BackendUnavailable(f"store tier 'nixl': NIXL has no {config.plugin} plugin here "
                                     f"(plugins: {', '.join(agent.get_plugin_list())})")
        try:
            agent.create_backend(config.plugin, {})
        except Exception as exc:  # NIXL raises its own types; GDS without CUDA lands here
            raise BackendUnavailable(f"store tier 'nixl': the {config.plugin} plugin does not start on this "
                                     f"host ({exc}); GDS and GDS_MT need CUDA and GPUDirect Storage") from exc
        self._agent: Any = agent
        super().__init__(config, chunk_fingerprint=chunk_fingerprint, data_dir=data_dir, metrics=metrics,
                         clock=clock)

    def _move(self, op: str, moves: list[tuple[np.ndarray, int, int]]) -> None:
        """One NIXL transfer of every ``(buffer, fd, offset)`` of ``moves``: ``WRITE`` buffer to
        file, or ``READ`` file to buffer. Raises ``OSError``."""
        a = self._agent
        mem_descs = [(buf.ctypes.data, int(buf.nbytes), 0) for buf, _, _ in moves]
        file_descs = [(offset, int(buf.nbytes), fd) for buf, fd, offset in moves]
        total = sum(n for _, n, _ in mem_descs)
        with self._xfer_lock:
            mem = fmem = handle = None
            try:
                mem = a.register_memory(a.get_reg_descs([(*d, "") for d in mem_descs], "DRAM"))
                fmem = a.register_memory(a.get_reg_descs([(*d, "") for d in file_descs], "FILE"))
                handle = a.initialize_xfer(op, a.get_xfer_descs(mem_descs, "DRAM"),
                                           a.get_xfer_descs(file_descs, "FILE"), self._name)
                state = a.transfer(handle)
                deadline = time.monotonic() + TRANSFER_TIMEOUT_S
                while state not in ("DONE", "ERR"):
                    if time.monotonic() > deadline:
                        raise OSError(f"NIXL {self.plugin} {op} of {total} bytes did not finish in "
                                      f"{TRANSFER_TIMEOUT_S:.0f}s")
                    state = a.check_xfer_state(handle)
                if state == "ERR":
                    raise OSError(f"NIXL {self.plugin} {op} of {total} bytes failed")
            except OSError:
                raise
            except Exception as exc:  # NIXL raises its own types: an I/O failure to the tier
                raise OSError(f"NIXL {self.plugin} {op} of {total} bytes: {exc}") from exc
            finally:
                if handle is not None:
                    a.release_xfer_handle(handle)
                if fmem is not None:
                    a.deregister_memory(fmem)
                if mem is not None:
                    a.deregister_memory(mem)

    def _read_payload(self, fd: int, target: memoryview, offset: int) -> tuple[int, int]:
        size = os.fstat(fd).st_size
        n = max(0, min(len(target), size - offset))
        if n:
            self._move("READ", [(np.frombuffer(target, np.uint8, n), fd, offset)])
        return n, checksum(target[:n])

    def _write_file(self, fd: int, header: bytes, data: memoryview | bytes) -> None:
        os.pwrite(fd, header, 0)
        payload = np.frombuffer(data, np.uint8)
        if payload.nbytes:
            os.ftruncate(fd, len(header) + payload.nbytes)
            self._move("WRITE", [(payload, fd, len(header))])

    def write_batch(self, items: list[WriteItem]) -> None:
        """The writer's batch as one NIXL transfer: headers with plain calls, then every payload
        in a single ``WRITE`` (registering and polling once per batch, not per chunk); a failed
        transfer drops the whole batch, counted like any failed write."""
        if len(items) == 1:
            self._write_one(items[0])
            return
        files = [f for f in map(self._open_staged, items) if f is not None]
        moves = [(np.frombuffer(item.data, np.uint8), fd, HEADER_SIZE)
                 for item, _, _, _, fd in files if item.meta.nbytes]
        error: OSError | None = None
        if moves:
            try:
                self._move("WRITE", moves)
            except OSError as exc:
                error = exc
        for item, path, tmp, size, fd in files:
            self._commit_file(item, path, tmp, size, fd, error)

    def _open_staged(self, item: WriteItem) -> tuple[WriteItem, Path, Path, int, int] | None:
        """Stage ``item``, create its temp file sized for it and write its header: ``(item, path,
        temp path, size, fd)``, or None (already stored, too big, or failed and counted)."""
        staged = self._stage(item)
        if staged is None:
            return None
        path, tmp, size = staged
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            self._write_failed(path, tmp, size, exc)
            return None
        try:
            os.pwrite(fd, pack_header(item.key, self._fp, item.meta), 0)
            os.ftruncate(fd, size)
        except OSError as exc:
            os.close(fd)
            self._write_failed(path, tmp, size, exc)
            return None
        return item, path, tmp, size, fd
