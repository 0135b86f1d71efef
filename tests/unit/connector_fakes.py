"""An in-process stand-in for ``pdx.agent.client.AgentClient``, for the connector's unit tests.

``FakeAgent`` keeps chunks in a numpy "pool" with the same reserve/commit/pin/fetch
semantics the connector relies on: a reservation hands out an offset, commit makes
the key visible with the writer's checksum, pin returns offsets of present keys (or
``found == False``), fetch copies from another ``FakeAgent`` registered under a peer
address. Knobs make it misbehave: ``down`` (every call raises ``AgentUnavailable``),
``corrupt_keys`` (a fetch reports those keys CORRUPT), ``flip_on_fetch`` (a fetch
copies the bytes with one bit flipped but reports them DONE), ``hang_fetch`` (the
job never finishes), ``on_disk`` (keys a lookup reports in the disk tier, not L1).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pdx.agent.types import (
    ChunkResult,
    ChunkStatus,
    JobInfo,
    JobKind,
    JobState,
    LookupInfo,
    Outcome,
    PinInfo,
    ReservationInfo,
)
from pdx.checksum import checksum
from pdx.errors import AgentUnavailable, ErrorCode
from pdx.layout import KVLayout

PEERS: dict[str, FakeAgent] = {}


class FakePool:
    """What ``pdx.store.pool.AttachedPool`` offers the worker: byte views by offset."""

    def __init__(self, buf: np.ndarray) -> None:
        self.buf = buf
        self.closed = False

    def array(self, offset: int, nbytes: int) -> np.ndarray:
        return self.buf[offset:offset + nbytes]

    def close(self) -> None:
        self.closed = True


@dataclass
class _Chunk:
    offset: int
    nbytes: int
    checksum: int
    num_tokens: int


@dataclass
class FakeAgent:
    slab_size: int
    slabs: int = 64
    chunk_tokens: int = 128
    peer_address: str = ""
    instance: str = "inst-1"
    down: bool = False
    corrupt_keys: set[bytes] = field(default_factory=set)
    flip_on_fetch: bool = False
    hang_fetch: bool = False
    on_disk: set[bytes] = field(default_factory=set)
    calls: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.buf = np.zeros(self.slab_size * self.slabs, dtype=np.uint8)
        self.chunks: dict[bytes, _Chunk] = {}
        self.reserved: dict[int, tuple[bytes, int, int]] = {}
        self.free = list(range(self.slabs))
        self.pins: dict[str, int] = {}
        self.leases: set[int] = set()  # live lease ids (``expire_leases`` ends them all)
        self.jobs: dict[int, JobInfo] = {}
        self._ids = itertools.count(1)
        if self.peer_address:
            PEERS[self.peer_address] = self

    def pool(self) -> FakePool:
        return FakePool(self.buf)

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if self.down:
            raise AgentUnavailable(f"fake agent down ({name})")

    # --- the AgentClient calls the connector makes -------------------------------------------

    def register_engine(self, layout: KVLayout, pid: int = 0, engine_url: str = "",
                        timeout: float | None = None) -> Any:
        self._call("register_engine")
        return layout

    def lookup(self, keys: Sequence[bytes], remote: bool = False, timeout: float | None = None,
               probe: bool = False) -> Any:
        """Chunks in ``on_disk`` count as present but not in L1; a ``probe`` is recorded as such."""
        self._call("probe" if probe else "lookup")
        tiers: list[str | None] = []
        for k in keys:
            tiers.append("disk" if k in self.on_disk else "l1" if k in self.chunks else None)
        n = 0
        for t in tiers:
            if t is None:
                break
            n += 1
        return LookupInfo(n, self.chunk_tokens, tuple(tiers))

    def reserve(self, keys: Sequence[bytes], nbytes: int | Sequence[int],
                timeout: float | None = None) -> list[ReservationInfo]:
        self._call("reserve")
        out = []
        for i, k in enumerate(keys):
            if k in self.chunks:
                out.append(ReservationInfo(0, k, 0, 0, "exists", ErrorCode.EXISTS))
                continue
            if not self.free:
                out.append(ReservationInfo(0, k, 0, 0, "full", ErrorCode.CAPACITY))
                continue
            slab = self.free.pop(0)
            rid = next(self._ids)
            n = nbytes if isinstance(nbytes, int) else nbytes[i]
            self.reserved[rid] = (k, slab * self.slab_size, n)
            out.append(ReservationInfo(rid, k, slab * self.slab_size, n))
        return out

    def commit(self, ids: Sequence[int], num_tokens: int | Sequence[int], checksums: Sequence[int] = (),
               timeout: float | None = None) -> list[Outcome]:
        self._call("commit")
        out = []
        for i, rid in enumerate(ids):
            k, off, n = self.reserved.pop(rid)
            cs = checksum(self.buf[off:off + n].data)
            if checksums and checksums[i] != cs:
                self.free.append(off // self.slab_size)
                out.append(Outcome(ErrorCode.INTEGRITY, "checksum mismatch"))
                continue
            self.chunks[k] = _Chunk(off, n, cs, num_tokens if isinstance(num_tokens, int) else num_tokens[i])
            out.append(Outcome())
        return out

    def abort(self, ids: Sequence[int], timeout: float | None = None) -> int:
        self._call("abort")
        for rid in ids:
            _k, off, _n = self.reserved.pop(rid)
            self.free.append(off // self.slab_size)
        return len(ids)

    def pin(self, keys: Sequence[bytes], owner: str, lease_s: float | None = None,
            timeout: float | None = None) -> list[PinInfo]:
        self._call("pin")
        out = []
        for k in keys:
            c = self.chunks.get(k)
            if c is None:
                out.append(PinInfo(0, k))
            else:
                self.pins[owner] = self.pins.get(owner, 0) + 1
                lid = next(self._ids)
                self.leases.add(lid)
                out.append(PinInfo(lid, k, c.offset, c.nbytes, c.checksum, c.num_tokens, 60.0))
        return out

    def unpin(self, lease_ids: Sequence[int], timeout: float | None = None) -> int:
        self._call("unpin")
        live = [lid for lid in lease_ids if lid in self.leases]
        self.leases.difference_update(live)
        return len(live)

    def expire_leases(self) -> None:
        """Every pin's lease runs out (as if the agent's sweep reaped them)."""
        self.leases.clear()

    def release(self, owner: str, timeout: float | None = None) -> int:
        self._call("release")
        return self.pins.pop(owner, 0)

    def fetch(self, peer: str, keys: Sequence[bytes], request_id: str, deadline_s: float | None = None,
              remote_owner: str = "", pin: bool = True, timeout: float | None = None) -> int:
        self._call("fetch")
        job = next(self._ids)
        src = PEERS.get(peer)
        results = []
        for k in keys:
            if src is None:
                results.append(ChunkResult(k, ChunkStatus.FAILED, reason="peer unreachable"))
                continue
            c = src.chunks.get(k)
            if c is None:
                results.append(ChunkResult(k, ChunkStatus.MISSING))
                continue
            if k in self.corrupt_keys:
                results.append(ChunkResult(k, ChunkStatus.CORRUPT, reason="checksum"))
                continue
            data = src.buf[c.offset:c.offset + c.nbytes].copy()
            if self.flip_on_fetch:
                data[len(data) // 2] ^= 0x40
            mine = self.chunks.get(k)
            if mine is None:
                slab = self.free.pop(0)
                off = slab * self.slab_size
                self.buf[off:off + c.nbytes] = data
                mine = self.chunks[k] = _Chunk(off, c.nbytes, c.checksum, c.num_tokens)
            self.pins[request_id] = self.pins.get(request_id, 0) + 1
            lid = next(self._ids)
            self.leases.add(lid)
            results.append(ChunkResult(k, ChunkStatus.DONE, mine.offset, mine.nbytes, mine.checksum,
                                       mine.num_tokens, lease_id=lid))
        if src is not None and remote_owner:
            src.release(remote_owner)
        state = JobState.RUNNING if self.hang_fetch else JobState.DONE
        self.jobs[job] = JobInfo(job, JobKind.FETCH, state, request_id, peer, tuple(results),
                                 error="" if src is not None else "peer unreachable")
        return job

    def wait(self, job_id: int, timeout_s: float) -> JobInfo:
        self._call("wait")
        info = self.jobs[job_id]
        if info.state is not JobState.DONE:
            return JobInfo(info.job_id, info.kind, info.state, info.request_id, info.peer, ())
        return info

    def cancel(self, job_id: int, timeout: float | None = None) -> bool:
        self._call("cancel")
        return True

    # --- test helpers --------------------------------------------------------------------------

    def put(self, key: bytes, payload: np.ndarray, num_tokens: int) -> None:
        """Commit ``payload`` under ``key`` directly (as another engine would have)."""
        slab = self.free.pop(0)
        off = slab * self.slab_size
        self.buf[off:off + payload.nbytes] = payload
        self.chunks[key] = _Chunk(off, payload.nbytes, checksum(payload.data), num_tokens)
