"""Data-moving jobs (fetch, send): their table, states and retention.

The server's control loop creates a job and hands it to a worker thread
(``pdx.agent.peers`` runs it); the loop never waits on one. A ``wait`` request
is answered when the job finishes (``on_done`` tells the loop) or when the
caller's timeout passes. Finished jobs stay queryable for ``retention_s``.

Thread-safety: ``JobTable`` and ``Job`` are safe to use from any thread; one
lock guards the table and every job's mutable fields.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from pdx.agent.types import ChunkResult, ChunkStatus, JobInfo, JobKind, JobState


class Job:
    """One fetch or send. Created by ``JobTable.create``; finished once by ``JobTable.finish``."""

    def __init__(self, job_id: int, kind: JobKind, request_id: str, peer: str, keys: Sequence[bytes],
                 deadline: float) -> None:
        self.id = job_id
        self.kind = kind
        self.request_id = request_id
        self.peer = peer
        self.keys = list(keys)
        self.deadline = deadline  # time.monotonic() by which the job must be over
        self.created = time.monotonic()
        self.finished_at = 0.0
        self.state = JobState.QUEUED
        self.chunks: tuple[ChunkResult, ...] = ()
        self.error = ""
        self.nbytes = 0
        self.cancelled = threading.Event()
        #: the transfer in flight, so ``cancel`` can stop it (set by the runner).
        self.on_cancel: Callable[[], None] | None = None
        #: (stage, time.monotonic()) as the runner passes them: logged at DEBUG when the job ends.
        self.marks: list[tuple[str, float]] = []

    def mark(self, stage: str) -> None:
        """Record that the runner reached ``stage`` (cheap; only the runner's thread calls it)."""
        self.marks.append((stage, time.monotonic()))

    def stages_ms(self) -> dict[str, float]:
        """Milliseconds spent before each mark, since the previous one (the first since creation)."""
        out: dict[str, float] = {}
        prev = self.created
        for stage, t in self.marks:
            out[stage] = out.get(stage, 0.0) + round((t - prev) * 1e3, 3)
            prev = t
        return out

    def time_left(self) -> float:
        return self.deadline - time.monotonic()


class JobTable:
    """Jobs by id. ``on_done(job)`` runs (on the finishing thread) after a job is finished."""

    def __init__(self, retention_s: float, max_jobs: int,
                 on_done: Callable[[Job], None] | None = None) -> None:
        self.retention_s = retention_s
        self.max_jobs = max_jobs
        self.on_done = on_done
        self._jobs: OrderedDict[int, Job] = OrderedDict()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._active = 0

    def create(self, kind: JobKind, request_id: str, peer: str, keys: Sequence[bytes],
               deadline: float) -> Job:
        with self._lock:
            job = Job(next(self._ids), kind, request_id, peer, keys, deadline)
            self._jobs[job.id] = job
            self._active += 1
            self._prune_locked(time.monotonic())
            return job

    def get(self, job_id: int) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def start(self, job: Job) -> bool:
        """Mark running; False when it was cancelled while queued (the runner then skips it)."""
        with self._lock:
            if job.state is not JobState.QUEUED:
                return False
            job.state = JobState.RUNNING
            return True

    def finish(self, job: Job, chunks: Sequence[ChunkResult], error: str = "", nbytes: int = 0) -> bool:
        """Record the outcome (once; later calls are ignored) and notify ``on_done``."""
        with self._lock:
            if job.state is JobState.DONE:
                return False
            job.state = JobState.DONE
            job.chunks = tuple(chunks)
            job.error = error
            job.nbytes = nbytes
            job.finished_at = time.monotonic()
        # ``on_done`` (metrics, waking the job's waiters) runs before the job stops counting as
        # active, so a drain that waits for idle jobs never closes the loop under a pending reply.
        try:
            if self.on_done is not None:
                self.on_done(job)
        finally:
            with self._lock:
                self._active -= 1
                if self._active == 0:
                    self._idle.notify_all()
        return True

    def cancel(self, job_id: int) -> bool:
        """Cancel a queued or running job; False when unknown or already done."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.state is JobState.DONE:
                return False
            job.cancelled.set()
            queued = job.state is JobState.QUEUED
            stop = job.on_cancel
        if queued:
            self.finish(job, [ChunkResult(k, ChunkStatus.CANCELLED, reason="cancelled") for k in job.keys],
                        "cancelled")
        elif stop is not None:
            stop()
        return True

    def snapshot(self, job: Job) -> JobInfo:
        with self._lock:
            end = job.finished_at or time.monotonic()
            return JobInfo(job.id, job.kind, job.state, job.request_id, job.peer, job.chunks, job.error,
                           job.nbytes, round(end - job.created, 6))

    @property
    def active(self) -> int:
        """Jobs queued or running."""
        with self._lock:
            return self._active

    def active_jobs(self) -> list[Job]:
        with self._lock:
            return [j for j in self._jobs.values() if j.state is not JobState.DONE]

    def wait_idle(self, timeout: float) -> bool:
        """Block until no job is active or ``timeout`` passed; True when idle."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._active:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
            return True

    def prune(self) -> None:
        with self._lock:
            self._prune_locked(time.monotonic())

    def _prune_locked(self, now: float) -> None:
        # Oldest first: drop finished jobs past retention, then finished ones over the cap.
        over = len(self._jobs) - self.max_jobs
        for jid in list(self._jobs):
            job = self._jobs[jid]
            if job.state is not JobState.DONE:
                continue
            if now - job.finished_at > self.retention_s or over > 0:
                del self._jobs[jid]
                over -= 1
