"""The job machinery of the ``nixl`` backend: planning, running and polling NIXL transfers.

``NixlJobs`` is the half of ``pdx.transport.nixl.NixlTransport`` that turns a batch into
*jobs* (at most ``JOB_BYTES`` of descriptors, one ``initialize_xfer`` + ``transfer`` each)
and runs them: on the thread that waits for the batch (``_help``, the ``on_wait`` hook:
no hand-off), or on the executor thread (``_run``) for jobs nobody claimed within
``GRACE_S`` and for transfers an asynchronous backend left in progress. Every agent
call holds ``_alock``; queues and counters are guarded by ``_cond``. What happens once an
op's bytes are in place (checksums, the receiver's verdict) is the transport's
``_finish_op`` / ``_notify_landed``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pdx.config import TransportConfig
from pdx.transport.base import BatchHandle, MemoryRegion, OpKind, OpStatus, PeerId
from pdx.transport.handshake import PeerConnection

log = logging.getLogger("pdx.transport.nixl")

#: most bytes moved by one NIXL transfer (bounds cancel latency and partial-result granularity).
JOB_BYTES = 64 << 20
#: most descriptors in one NIXL transfer.
JOB_DESCS = 4096
#: a queued job is left this long to the thread that waits for it before the executor takes it.
GRACE_S = 0.0005
#: how often the idle executor lets UCX progress (connection set-up on transports that need it).
IDLE_PROGRESS_S = 0.01


@dataclass
class _Peer:
    conn: PeerConnection
    agent: str  # the peer's NIXL agent name
    base: int
    nbytes: int
    mem: str  # "DRAM" or "VRAM"
    device: int
    wants_landed: bool  # it asked for a message on every landed WRITE (debug corruption)
    dead: str | None = None


@dataclass
class _Batch:
    handle: BatchHandle
    peer: _Peer
    kind: OpKind
    pieces_left: list[int]
    landed: list[int] = field(default_factory=list)  # ops whose bytes are all in place
    jobs_left: int = 0
    helped: bool = False  # a waiting thread is running its jobs
    running: int = 0  # jobs inside NIXL right now
    stopped: bool = False


@dataclass
class _Job:
    batch: _Batch
    local: np.ndarray  # N x 3 uint64: address, length, device
    remote: np.ndarray
    owners: list[int]  # op index of each descriptor
    xfer: Any = None
    polls: int = 0
    queued: float = 0.0


class NixlJobs:
    """Job planning and execution of a ``NixlTransport`` (see the module docstring)."""

    config: TransportConfig
    _agent: Any
    _alock: threading.RLock
    _cond: threading.Condition
    _queue: list[_Job]
    _adopt: list[_Job]
    _batches: dict[int, _Batch]
    _peers: dict[PeerId, _Peer]
    _region: MemoryRegion | None
    _base: int
    _mem: str
    _closed: bool

    def _finish_op(self, batch: _Batch, i: int) -> None:
        """Op ``i``'s bytes are all in place (the transport verifies and completes it)."""
        raise NotImplementedError

    def _notify_landed(self, batch: _Batch) -> None:
        """A WRITE batch's last job ended (the transport tells the receiver if needed)."""
        raise NotImplementedError

    # -- planning --
    def _plan(self, batch: _Batch, idxs: list[int]) -> list[_Job]:
        """Split the batch's ops into NIXL jobs; zero-byte ops complete here."""
        p, ops, dev = batch.peer, batch.handle.ops, int(self._region.device if self._region else 0)
        jobs: list[_Job] = []
        local: list[tuple[int, int, int]] = []
        remote: list[tuple[int, int, int]] = []
        owners: list[int] = []
        size = 0

        def flush() -> None:
            nonlocal local, remote, owners, size
            if owners:
                jobs.append(_Job(batch, np.array(local, dtype=np.uint64).reshape(-1, 3),
                                 np.array(remote, dtype=np.uint64).reshape(-1, 3), owners))
            local, remote, owners, size = [], [], [], 0

        for i in idxs:
            op = ops[i]
            if op.nbytes == 0:
                self._finish_op(batch, i)
                continue
            done = 0
            while done < op.nbytes:
                n = min(op.nbytes - done, JOB_BYTES - size)
                local.append((self._base + op.local_offset + done, n, dev))
                remote.append((p.base + op.remote_offset + done, n, p.device))
                owners.append(i)
                batch.pieces_left[i] += 1
                done += n
                size += n
                if size >= JOB_BYTES or len(owners) >= JOB_DESCS:
                    flush()
        flush()
        batch.jobs_left = len(jobs)
        return jobs

    def _kick(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # -- the thread that waits --
    def _help(self, handle: BatchHandle, deadline: float) -> None:
        """Run ``handle``'s queued jobs in the calling (waiting) thread until ``deadline``:
        no thread handoff on the common post-then-wait path. Transfers still in progress
        (asynchronous backends) go to the executor thread to be polled."""
        with self._cond:
            batch = self._batches.get(id(handle))
            if batch is None:
                return
            batch.helped = True  # the executor leaves its jobs to us meanwhile
        try:
            while time.monotonic() < deadline:
                with self._cond:
                    job = next((j for j in self._queue if j.batch is batch), None)
                    if job is None:
                        return
                    self._queue.remove(job)
                later: list[_Job] = []
                self._start(job, later)
                if later:
                    with self._cond:
                        self._adopt.extend(later)
                        self._cond.notify_all()
        finally:
            with self._cond:
                batch.helped = False
                if any(j.batch is batch for j in self._queue):  # left over: the executor takes them
                    self._cond.notify_all()

    # -- the executor thread --
    def _run(self) -> None:
        active: list[_Job] = []
        while True:
            with self._cond:
                ripe = self._ripe()
                if not ripe and not active and not self._adopt and not self._closed:
                    # leave fresh jobs to the thread that will wait for them (GRACE_S) and
                    # jobs a waiting thread is running; when idle with peers, wake now and
                    # then so UCX can progress for them
                    wait = IDLE_PROGRESS_S if self._peers else None
                    fresh = [j.queued for j in self._queue if not j.batch.helped]
                    if fresh:
                        wait = max(0.0, GRACE_S - (time.monotonic() - min(fresh)))
                    self._cond.wait(wait)
                    ripe = self._ripe()
                if self._closed and not active and not self._queue and not self._adopt:
                    return
                if ripe:
                    taken = {id(j) for j in ripe}
                    self._queue = [j for j in self._queue if id(j) not in taken]
                active.extend(self._adopt)
                self._adopt.clear()
            for job in ripe:
                self._start(job, active)
            if active:
                self._poll(active)
            elif not ripe:
                self._progress()

    def _ripe(self) -> list[_Job]:
        """Queued jobs the executor may take: unclaimed for ``GRACE_S``, no waiter on them."""
        now = time.monotonic()
        return [j for j in self._queue if not j.batch.helped and now - j.queued >= GRACE_S]

    def _progress(self) -> None:
        with self._alock:
            if self._peers:
                try:
                    self._agent.get_new_notifs()  # progresses the UCX worker; we send no NIXL notifs
                except Exception as exc:
                    log.debug("NIXL notification progress failed: %s", exc)

    def _start(self, job: _Job, active: list[_Job]) -> None:
        batch = job.batch
        with self._cond:
            skip = batch.stopped or batch.peer.dead is not None
            if not skip:
                batch.running += 1
        if skip:
            self._job_over(job, running=False)
            return
        op = "WRITE" if batch.kind is OpKind.WRITE else "READ"
        try:
            with self._alock:
                local = self._agent.get_xfer_descs(job.local, self._mem)
                remote = self._agent.get_xfer_descs(job.remote, batch.peer.mem)
                job.xfer = self._agent.initialize_xfer(op, local, remote, batch.peer.agent, b"")
                state = self._agent.transfer(job.xfer)
        except Exception as exc:
            self._job_failed(job, f"NIXL {op} failed: {_describe(exc)}")
            return
        if state == "PROC":
            active.append(job)
        else:
            self._job_state(job, state)

    def _poll(self, active: list[_Job]) -> None:
        for job in list(active):
            try:
                with self._alock:
                    state = self._agent.check_xfer_state(job.xfer)
            except Exception as exc:
                active.remove(job)
                self._job_failed(job, f"NIXL transfer failed: {_describe(exc)}")
                continue
            if state == "PROC":
                job.polls += 1
                if job.batch.stopped or job.batch.peer.dead is not None:
                    self._try_abort(job, active)
                continue
            active.remove(job)
            self._job_state(job, state)
        if active:
            # an asynchronous backend (RDMA, GPU) is working: spin briefly, then back off gently
            polls = min(j.polls for j in active)
            time.sleep(0 if polls < 50 else min(0.001, 0.00002 * polls))

    def _job_state(self, job: _Job, state: str) -> None:
        if state == "DONE":
            self._job_done(job)
        else:
            self._job_failed(job, f"NIXL reported {state!r} for the transfer")

    def _try_abort(self, job: _Job, active: list[_Job]) -> None:
        try:
            with self._alock:
                job.xfer.release()  # NIXL aborts an active transfer, or raises if it cannot
        except Exception:
            return  # still running: keep polling until it ends
        active.remove(job)
        job.xfer = None
        self._job_over(job, running=True)

    def _release(self, job: _Job) -> None:
        if job.xfer is not None:
            try:
                with self._alock:
                    job.xfer.release()
            except Exception as exc:
                log.warning("releasing a NIXL transfer failed: %s", exc)
            job.xfer = None

    def _job_failed(self, job: _Job, reason: str) -> None:
        self._release(job)
        batch = job.batch
        if batch.peer.dead is not None:
            reason = f"peer {batch.peer.conn.peer_id} gone: {batch.peer.dead}"
        for i in sorted(set(job.owners)):
            batch.handle.complete(i, OpStatus.FAILED, reason)
        self._job_over(job, running=True)

    def _job_done(self, job: _Job) -> None:
        self._release(job)
        batch = job.batch
        for i in job.owners:
            batch.pieces_left[i] -= 1
            if batch.pieces_left[i] == 0:
                batch.landed.append(i)
                self._finish_op(batch, i)
        self._job_over(job, running=True)

    def _job_over(self, job: _Job, running: bool) -> None:
        """Bookkeeping once a job ended (or was skipped); the last one notifies the receiver."""
        batch = job.batch
        with self._cond:
            if running:
                batch.running -= 1
            batch.jobs_left -= 1
            last = batch.jobs_left == 0
            if last:
                self._batches.pop(id(batch.handle), None)
            if batch.stopped:
                # only a cancel/timeout waits for ``running`` to drop; waking the executor for
                # every finished job cost the waiting thread GIL hand-offs on each batch
                self._cond.notify_all()
        if last and batch.kind is OpKind.WRITE and batch.landed and not batch.stopped \
                and batch.peer.dead is None:
            self._notify_landed(batch)

    def _drop_queued(self, pred: Any) -> list[_Batch]:
        """Remove queued jobs whose batch matches ``pred``; caller holds ``_cond``."""
        keep: list[_Job] = []
        dropped: list[_Job] = []
        for job in self._queue:
            (dropped if pred(job.batch) else keep).append(job)
        self._queue = keep
        ended = []
        for job in dropped:
            job.batch.jobs_left -= 1
            if job.batch.jobs_left == 0 and job.batch.running == 0:
                self._batches.pop(id(job.batch.handle), None)
                ended.append(job.batch)
        return ended


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if type(exc).__name__ in text else f"{type(exc).__name__}: {text}"
