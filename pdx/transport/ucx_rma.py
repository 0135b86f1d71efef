"""One-sided UCX RMA (memory registration, rkeys, put/get) for the ``ucx`` backend.

ucxx's Python API has no RMA calls, so this module binds the few UCP functions it needs
with ctypes from the ``libucp`` that ucxx itself loaded (the same library, so the handles
ucxx hands out, ``UCXContext.handle``, ``UCXEndpoint.handle``, are valid here). Called
only by ``pdx.transport.ucx`` / ``ucx_engine`` with the worker in hand (the ``_drive``
lock); nothing here is thread-safe on its own.

* ``Rma.map(context, address, nbytes)`` registers the region (``ucp_mem_map``) and
  returns a ``Mapping`` whose ``rkey`` bytes the peer unpacks.
* ``Rma.unpack(ep, rkey)`` gives a ``RemoteKey`` for an endpoint.
* ``put``/``get`` start one transfer and ``flush`` one endpoint flush; each returns a
  ``Pending`` (``done()`` polls; the worker must be progressed) or raises ``RmaError``.

``BackendUnavailable`` when libucp or a symbol is missing (the transport then keeps its
tag path).
"""

from __future__ import annotations

import ctypes
import glob
import os
from dataclasses import dataclass
from typing import Any

from pdx.errors import BackendUnavailable, TransportError

UCS_OK = 0
UCS_INPROGRESS = 1
_ERR_LAST = -100
_MAP_ADDRESS = 1 << 0
_MAP_LENGTH = 1 << 1
#: ucp_request_param_t is under 128 bytes in every UCX 1.x; with op_attr_mask 0 UCX reads
#: only that mask, the rest stays zero.
_PARAM_BYTES = 256


class RmaError(TransportError):
    """A UCP RMA call failed (the message names the call and UCX's status)."""


class _MapParams(ctypes.Structure):
    _fields_ = [("field_mask", ctypes.c_uint64), ("address", ctypes.c_void_p), ("length", ctypes.c_size_t),
                ("flags", ctypes.c_uint), ("prot", ctypes.c_uint), ("memory_type", ctypes.c_int),
                ("exported_memh_buffer", ctypes.c_void_p)]


def _find_libucp() -> str:
    try:
        import libucx  # type: ignore[import-not-found]  # the wheel ucxx depends on

        for base in libucx.__path__:
            hits = sorted(glob.glob(os.path.join(base, "lib", "libucp.so*")))
            if hits:
                return hits[0]
    except ImportError:
        pass
    return "libucp.so.0"


def _status_ptr(p: int | None) -> tuple[int, int | None]:
    """(status, request) of a ``ucs_status_ptr_t``."""
    if not p:
        return UCS_OK, None
    signed = ctypes.c_int64(p).value
    if _ERR_LAST <= signed < 0:
        return signed, None
    return UCS_INPROGRESS, p


@dataclass
class Mapping:
    memh: int
    address: int
    nbytes: int
    rkey: bytes


@dataclass
class RemoteKey:
    handle: int
    address: int
    nbytes: int


class Pending:
    """One UCP request (or an operation that completed at once)."""

    __slots__ = ("_lib", "_req", "status")

    def __init__(self, lib: Rma, req: int | None, status: int) -> None:
        self._lib, self._req, self.status = lib, req, status

    def done(self) -> bool:
        if self._req is None:
            return True
        st = self._lib._check(self._req)
        if st == UCS_INPROGRESS:
            return False
        self._lib._free(self._req)
        self._req, self.status = None, st
        return True

    @property
    def ok(self) -> bool:
        return self._req is None and self.status == UCS_OK

    def cancel(self, worker: int) -> None:
        if self._req is not None:
            self._lib._cancel(worker, self._req)


class Rma:
    """ctypes bindings to libucp's RMA calls (see the module docstring)."""

    def __init__(self) -> None:
        try:
            # RTLD_LOCAL: NIXL bundles its own, newer libucp; a global one would shadow it
            lib = ctypes.CDLL(_find_libucp(), mode=ctypes.RTLD_LOCAL)
            self._map_fn = lib.ucp_mem_map
            self._unmap_fn = lib.ucp_mem_unmap
            self._pack_fn = lib.ucp_rkey_pack
            self._release_fn = lib.ucp_rkey_buffer_release
            self._unpack_fn = lib.ucp_ep_rkey_unpack
            self._destroy_fn = lib.ucp_rkey_destroy
            self._put_fn = lib.ucp_put_nbx
            self._get_fn = lib.ucp_get_nbx
            self._flush_fn = lib.ucp_ep_flush_nbx
            self._check = lib.ucp_request_check_status
            self._free = lib.ucp_request_free
            self._cancel = lib.ucp_request_cancel
            self._strerr = lib.ucs_status_string if hasattr(lib, "ucs_status_string") else None
        except (OSError, AttributeError) as exc:
            raise BackendUnavailable(f"UCX RMA unavailable: {exc}") from exc
        vp, sz = ctypes.c_void_p, ctypes.c_size_t
        self._map_fn.argtypes = [vp, ctypes.POINTER(_MapParams), ctypes.POINTER(vp)]
        self._map_fn.restype = ctypes.c_int
        self._unmap_fn.argtypes = [vp, vp]
        self._unmap_fn.restype = ctypes.c_int
        self._pack_fn.argtypes = [vp, vp, ctypes.POINTER(vp), ctypes.POINTER(sz)]
        self._pack_fn.restype = ctypes.c_int
        self._release_fn.argtypes = [vp]
        self._release_fn.restype = None
        self._unpack_fn.argtypes = [vp, ctypes.c_char_p, ctypes.POINTER(vp)]
        self._unpack_fn.restype = ctypes.c_int
        self._destroy_fn.argtypes = [vp]
        self._destroy_fn.restype = None
        for fn in (self._put_fn, self._get_fn):
            fn.argtypes = [vp, vp, sz, ctypes.c_uint64, vp, ctypes.c_char_p]
            fn.restype = vp
        self._flush_fn.argtypes = [vp, ctypes.c_char_p]
        self._flush_fn.restype = vp
        self._check.argtypes = [vp]
        self._check.restype = ctypes.c_int
        self._free.argtypes = [vp]
        self._free.restype = None
        self._cancel.argtypes = [vp, vp]
        self._cancel.restype = None
        if self._strerr is not None:
            self._strerr.argtypes = [ctypes.c_int]
            self._strerr.restype = ctypes.c_char_p
        self._param = ctypes.create_string_buffer(_PARAM_BYTES)  # op_attr_mask 0: no callback

    def _fail(self, call: str, status: int) -> RmaError:
        text = self._strerr(status).decode() if self._strerr is not None else ""
        return RmaError(f"{call} failed: UCX status {status} {text}".rstrip())

    def map(self, context: int, address: int, nbytes: int) -> Mapping:
        params = _MapParams(_MAP_ADDRESS | _MAP_LENGTH, address, nbytes, 0, 0, 0, None)
        memh = ctypes.c_void_p()
        st = self._map_fn(context, ctypes.byref(params), ctypes.byref(memh))
        if st != UCS_OK:
            raise self._fail("ucp_mem_map", st)
        buf, size = ctypes.c_void_p(), ctypes.c_size_t()
        st = self._pack_fn(context, memh, ctypes.byref(buf), ctypes.byref(size))
        if st != UCS_OK:
            self._unmap_fn(context, memh)
            raise self._fail("ucp_rkey_pack", st)
        rkey = ctypes.string_at(buf, size.value)
        self._release_fn(buf)
        assert memh.value is not None
        return Mapping(memh.value, address, nbytes, rkey)

    def unmap(self, context: int, m: Mapping) -> None:
        self._unmap_fn(context, m.memh)

    def unpack(self, ep: int, rkey: bytes, address: int, nbytes: int) -> RemoteKey:
        handle = ctypes.c_void_p()
        st = self._unpack_fn(ep, rkey, ctypes.byref(handle))
        if st != UCS_OK:
            raise self._fail("ucp_ep_rkey_unpack", st)
        assert handle.value is not None
        return RemoteKey(handle.value, address, nbytes)

    def destroy(self, key: RemoteKey) -> None:
        self._destroy_fn(key.handle)

    def _start(self, call: str, p: int | None) -> Pending:
        st, req = _status_ptr(p)
        if st < 0:
            raise self._fail(call, st)
        return Pending(self, req, st)

    def put(self, ep: int, local: int, nbytes: int, key: RemoteKey, offset: int) -> Pending:
        return self._start("ucp_put_nbx", self._put_fn(ep, local, nbytes, key.address + offset, key.handle,
                                                       self._param))

    def get(self, ep: int, local: int, nbytes: int, key: RemoteKey, offset: int) -> Pending:
        return self._start("ucp_get_nbx", self._get_fn(ep, local, nbytes, key.address + offset, key.handle,
                                                       self._param))

    def flush(self, ep: int) -> Pending:
        return self._start("ucp_ep_flush_nbx", self._flush_fn(ep, self._param))


_RMA: list[Rma] = []


def rma() -> Rma:
    """The process's bindings (``BackendUnavailable`` without libucp)."""
    if not _RMA:
        _RMA.append(Rma())
    return _RMA[0]


def handle(obj: Any) -> int:
    """The UCP handle behind a ucxx object (context, worker or endpoint)."""
    return int(obj.handle)
