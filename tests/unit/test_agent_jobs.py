"""The job table: states, cancel, drain, retention."""

from __future__ import annotations

import threading
import time

from pdx.agent.jobs import JobTable
from pdx.agent.types import ChunkResult, ChunkStatus, JobKind, JobState

K = [bytes([i]) * 16 for i in range(3)]


def test_life_cycle_and_notification() -> None:
    done: list[int] = []
    table = JobTable(60, 100, on_done=lambda j: done.append(j.id))
    job = table.create(JobKind.FETCH, "r", "peer", K, time.monotonic() + 10)
    assert table.active == 1 and table.snapshot(job).state is JobState.QUEUED
    assert table.start(job) and not table.start(job)
    assert table.finish(job, [ChunkResult(k, ChunkStatus.DONE) for k in K], nbytes=30)
    assert not table.finish(job, [])  # once only
    info = table.snapshot(job)
    assert info.state is JobState.DONE and info.ok and info.nbytes == 30 and done == [job.id]
    assert table.active == 0 and table.wait_idle(0.01)


def test_cancel_queued_and_running() -> None:
    table = JobTable(60, 100)
    queued = table.create(JobKind.SEND, "r", "p", K, time.monotonic() + 10)
    assert table.cancel(queued.id)
    assert [c.status for c in table.snapshot(queued).chunks] == [ChunkStatus.CANCELLED] * 3
    assert not table.start(queued)  # the runner skips it
    running = table.create(JobKind.FETCH, "r", "p", K, time.monotonic() + 10)
    table.start(running)
    stopped: list[bool] = []
    running.on_cancel = lambda: stopped.append(True)
    assert table.cancel(running.id) and running.cancelled.is_set() and stopped == [True]
    assert not table.cancel(12345)


def test_wait_idle_blocks_until_the_last_job_ends() -> None:
    table = JobTable(60, 100)
    job = table.create(JobKind.FETCH, "r", "p", K, time.monotonic() + 10)
    assert not table.wait_idle(0.05)
    threading.Timer(0.1, lambda: table.finish(job, [])).start()
    assert table.wait_idle(5)


def test_retention_and_cap() -> None:
    table = JobTable(retention_s=0.0, max_jobs=2)
    old = table.create(JobKind.FETCH, "r", "p", K, time.monotonic() + 10)
    table.finish(old, [])
    time.sleep(0.01)
    table.prune()
    assert table.get(old.id) is None
    capped = JobTable(retention_s=60, max_jobs=2)
    jobs = [capped.create(JobKind.FETCH, "r", "p", K, time.monotonic() + 10) for _ in range(3)]
    for j in jobs:
        capped.finish(j, [])
    capped.create(JobKind.FETCH, "r", "p", K, time.monotonic() + 10)
    assert capped.get(jobs[0].id) is None and capped.get(jobs[2].id) is not None
