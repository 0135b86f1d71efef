"""The fetch and send jobs: moving chunks between this agent's pool and a peer's.

The decode side's agent runs a *fetch* on a transfer thread:

1. ``Links.link`` gives the session with the peer (hello, transport connect).
2. Keys already in the local pool are not moved (``PRESENT``).
3. ``peer_pin``: the peer pins the rest under a lease owned by this job (promoting them from
   its disk/Redis tiers first), and answers offsets, sizes, checksums: its read grants.
4. Local slabs are reserved, READ batches are posted in about ``PIPELINE_GROUPS`` groups (none
   under ``PIPELINE_BYTES``), and each
   group is committed with the peer's checksums as soon as it landed: ``ChunkStore.commit``
   re-hashes the bytes, so a chunk damaged on the way is ``CORRUPT`` and dropped, never served.
5. The peer's pins are released (and, with ``remote_owner``, the pins the peer kept for the
   request); the job's per-chunk results are recorded.

A *send* is the mirror: ``peer_reserve`` on the peer (only keys it asked for with ``expect``), a
WRITE batch, ``peer_commit`` (the peer re-hashes against our checksums). Every step is bounded by
the job's deadline; a dead or slow peer turns into per-chunk ``FAILED``/``TIMEOUT``, never a hang.

``Transfers`` needs only an ``AgentContext``, a ``Links`` and a check of the peer's address, so
its jobs are unit-tested against fakes (``tests/unit/test_agent_transfers.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from pdx.agent.context import AgentContext
from pdx.agent.jobs import Job
from pdx.agent.links import Links, PeerLink
from pdx.agent.protocol import IdsArgs, Op, OwnerArgs, PeerCommitArgs, PinArgs, ReserveArgs
from pdx.agent.types import ChunkResult, ChunkStatus, JobKind, Outcome, PinInfo, ReserveRow
from pdx.errors import (
    AgentUnavailable,
    AuthError,
    CapacityError,
    ErrorCode,
    IntegrityError,
    PdxError,
    PeerDenied,
    ReservationError,
    StoreError,
    TransferCancelled,
    TransferTimeout,
    WireError,
)
from pdx.keys import ChunkKey
from pdx.store.types import Tier
from pdx.transport.base import ChunkOp, OpKind, OpStatus

log = logging.getLogger("pdx.agent.peers")

#: smallest transfer group: each group is committed (and verified) while the next ones move.
PIPELINE_BYTES = 4 * 1024 * 1024
#: groups a large fetch is split into. Each group costs a transfer of its own and hand-offs between
#: threads; measured on a 64 MiB fetch over nixl (docs/agent.md), 4 groups of 16 MiB took 20.4-20.9 ms
#: where 16 groups of 4 MiB took 24.1-25.8 ms.
PIPELINE_GROUPS = 4
#: limit on waiting for the commits of one job (hashing what already landed; never I/O).
COMMIT_WAIT_S = 60.0

_OP_TO_CHUNK = {OpStatus.FAILED: ChunkStatus.FAILED, OpStatus.TIMEOUT: ChunkStatus.TIMEOUT,
                OpStatus.CANCELLED: ChunkStatus.CANCELLED, OpStatus.CORRUPT: ChunkStatus.CORRUPT}


class Transfers:
    """Runs fetch and send jobs on ``ctx.transfers`` (see the module docstring).

    ``check_peer(address)`` raises (``PeerDenied``) for a peer this agent must not dial.
    """

    def __init__(self, ctx: AgentContext, links: Links, check_peer: Callable[[str], None]) -> None:
        self.ctx = ctx
        self.links = links
        self._check_peer = check_peer
        # Commits of received chunks (hashing) run here, beside the job threads; never waits on them.
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="pdx-agent-commit")
        #: chunks peers pushed layer by layer (``pdx.agent.push.Staging``); None: no layer-wise P/D
        self.staging: Any = None

    def submit(self, job: Job, **kw: Any) -> Future[None]:
        run = self._fetch if job.kind is JobKind.FETCH else self._send
        return self.ctx.transfers.submit(self._run, run, job, kw)

    def close(self) -> None:
        self._committer.shutdown(wait=True)

    def _run(self, fn: Any, job: Job, kw: dict[str, Any]) -> None:
        ctx = self.ctx
        if not ctx.jobs.start(job):
            return
        job.mark("queued")
        results: dict[bytes, ChunkResult] = {}
        error = ""
        nbytes = 0
        try:
            self._check_peer(job.peer)
            nbytes = fn(job, results, **kw)
        except (PdxError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, AgentUnavailable) or (isinstance(exc, AuthError) and
                                                     not isinstance(exc, PeerDenied)):
                self.links.drop_link(job.peer)  # dead, restarted, or our session expired: hello again next time
            log.warning("%s job %d (request %s) with %s failed: %s", job.kind.value, job.id, job.request_id,
                        job.peer, error)
        except Exception as exc:
            error = f"internal error: {type(exc).__name__}: {exc}"
            log.exception("%s job %d failed", job.kind.value, job.id)
        default = (ChunkStatus.CANCELLED if job.cancelled.is_set() else
                   ChunkStatus.TIMEOUT if job.time_left() <= 0 else ChunkStatus.FAILED)
        chunks = [results.get(k) or ChunkResult(k, default, reason=error or default.value) for k in job.keys]
        job.mark("results")
        ctx.jobs.finish(job, chunks, error, nbytes)
        if log.isEnabledFor(logging.DEBUG):
            job.mark("finished")  # on_done: metrics, the waiters' replies
            log.debug("%s job %d stages (ms): %s", job.kind.value, job.id,
                      " ".join(f"{k}={v:.3f}" for k, v in job.stages_ms().items()))

    def _fetch(self, job: Job, results: dict[bytes, ChunkResult], remote_owner: str = "",
               pin: bool = True) -> int:
        ctx = self.ctx
        store, transport, _layout = ctx.require_store()
        keys = [ChunkKey(k) for k in job.keys]
        # Chunks already here are not moved.
        local = store.pin(keys, owner=job.request_id) if pin else [None] * len(keys)
        tiers = store.lookup(keys).tiers if not pin else None
        need: list[ChunkKey] = []
        for i, k in enumerate(keys):
            p = local[i]
            if p is not None:
                results[k] = ChunkResult(k, ChunkStatus.PRESENT, p.offset, p.nbytes, p.checksum, p.num_tokens,
                                         p.lease_id)
                ctx.metrics.loaded_tokens.labels(source="l1").inc(p.num_tokens)
            elif tiers is not None and tiers[i] is Tier.L1:
                results[k] = ChunkResult(k, ChunkStatus.PRESENT)
            else:
                need.append(k)
        owner = f"fetch:{ctx.agent_id}:{ctx.instance}:{job.id}"
        link: PeerLink | None = None
        staged = 0
        if need and remote_owner.startswith("pd:") and self.staging is not None:
            need, staged = self._take_staged(job, store, need, remote_owner[3:], results, pin)
        try:
            if not need:
                if staged and remote_owner:  # the prefill side's pins for this request can go now
                    self._release_staged_later(job.peer, remote_owner)
                return staged
            link = self.links.link(job.peer, self._left(job))
            job.mark("link")
            lease = min(max(self._left(job) + 5.0, 10.0), ctx.config.leases.max_s)
            pins: list[PinInfo] = link.client.call(Op.PEER_PIN, PinArgs(list(need), owner, lease), self._left(job))
            if len(pins) != len(need):
                raise WireError(f"peer_pin: {len(pins)} rows for {len(need)} keys")
            job.mark("peer_pin")
            ops: list[ChunkOp] = []
            moving: list[tuple[ChunkKey, int, int, int]] = []  # key, reservation id, checksum, num_tokens
            for k, pin_ in zip(need, pins):
                if not pin_.lease_id or pin_.key != k:
                    results[k] = ChunkResult(k, ChunkStatus.MISSING, reason="not held by the peer")
                    continue
                try:
                    res = store.reserve(k, pin_.nbytes)
                except (CapacityError, StoreError) as exc:
                    results[k] = ChunkResult(k, ChunkStatus.FAILED, reason=f"no local slab: {exc}")
                    continue
                ops.append(ChunkOp(res.offset, pin_.offset, pin_.nbytes))
                moving.append((k, res.id, pin_.checksum, pin_.num_tokens))
            job.mark("reserve")
            moved = staged + self._move(job, transport, link, OpKind.READ, ops, moving, results, store, pin)
            if pin:  # an engine's load: count what came over the peer plane, by why it was fetched
                source = "pd" if remote_owner else "peer"
                tokens = sum(results[k].num_tokens for k in need
                             if k in results and results[k].status is ChunkStatus.DONE)
                if tokens:
                    ctx.metrics.loaded_tokens.labels(source=source).inc(tokens)
            return moved
        finally:
            if link is not None:
                self._release_later(link, owner, remote_owner)

    def _take_staged(self, job: Job, store: Any, need: list[ChunkKey], stage_id: str,
                     results: dict[bytes, ChunkResult], pin: bool) -> tuple[list[ChunkKey], int]:
        """Commit the chunks the peer pushed layer by layer for this request (``pdx.agent.push``),
        each re-hashed against the peer's checksum; returns the keys still to fetch and the bytes kept.
        Waits for the push's seal up to half the job's time left."""
        if not self.staging.has(job.peer, stage_id):
            return need, 0
        t0 = time.perf_counter()
        taken = self.staging.take(job.peer, stage_id, need, wait_s=job.time_left() / 2)
        kept = sum(self._land(job, store, (ChunkKey(k), rid, csum, ntok), OpStatus.DONE, "", results, pin)
                   for k, rid, csum, ntok in taken)
        rest = [k for k in need if k not in results or not results[k].status.usable]
        if pin and len(rest) < len(need):
            tokens = sum(results[k].num_tokens for k in need if k in results and results[k].status.usable)
            self.ctx.metrics.loaded_tokens.labels(source="pd").inc(tokens)
        log.debug("fetch job %d: %d of %d chunks were staged by %s (%.1f ms)", job.id, len(need) - len(rest),
                  len(need), job.peer, (time.perf_counter() - t0) * 1e3)
        return rest, kept

    def _move(self, job: Job, transport: Any, link: PeerLink, kind: OpKind, ops: list[ChunkOp],
              moving: list[tuple[ChunkKey, int, int, int]], results: dict[bytes, ChunkResult],
              store: Any, pin: bool) -> int:
        """Post ``ops`` as consecutive groups and commit each group as soon as it landed.

        Committing re-hashes every chunk; doing it group by group, while the next
        groups are still moving, hashes bytes that are still in the CPU cache and
        hides most of the verification behind the transfer.
        """
        if not ops:
            return 0
        t0 = time.perf_counter()
        groups: list[tuple[int, int]] = []
        start = size = 0
        limit = max(PIPELINE_BYTES, -(-sum(op.nbytes for op in ops) // PIPELINE_GROUPS))
        for i, op in enumerate(ops):
            if size and size + op.nbytes > limit:
                groups.append((start, i))
                start, size = i, 0
            size += op.nbytes
        groups.append((start, len(ops)))
        handles = [transport.post(link.transport_peer, kind, ops[a:b]) for a, b in groups]
        job.mark("post")

        def cancel_all() -> None:
            for h in handles:
                h.cancel()

        job.on_cancel = cancel_all
        if job.cancelled.is_set():
            cancel_all()
        commits: list[Future[int]] = []
        busy: list[float] = []  # seconds the committer spent on each group (hashing, indexing)
        waited = 0.0
        for (a, b), handle in zip(groups, handles):
            tw = time.perf_counter()
            batch = handle.wait(timeout=max(0.0, job.time_left()))
            waited += time.perf_counter() - tw
            # Commit on the committer thread while this one keeps the transport busy (some
            # backends copy in the thread that waits).
            commits.append(self._committer.submit(self._land_group, job, store, moving[a:b], batch, results, pin,
                                                  busy))
        job.on_cancel = None
        job.mark("move")
        moved = sum(f.result(timeout=COMMIT_WAIT_S) for f in commits)
        job.mark("verify_tail")
        took = time.perf_counter() - t0
        log.debug("%s job %d: %d chunks, %d bytes in %d group(s): %.2f ms (%.2f GB/s), %.2f ms of it waiting "
                  "for the transport, commits busy %.2f ms", job.kind.value, job.id, len(ops), moved, len(groups),
                  took * 1e3, moved / max(took, 1e-9) / 1e9, waited * 1e3, sum(busy) * 1e3)
        return moved

    def _land_group(self, job: Job, store: Any, items: list[tuple[ChunkKey, int, int, int]], batch: Any,
                    results: dict[bytes, ChunkResult], pin: bool, busy: list[float]) -> int:
        t0 = time.perf_counter()
        n = sum(self._land(job, store, item, batch.status[i], batch.errors.get(i, ""), results, pin)
                for i, item in enumerate(items))
        busy.append(time.perf_counter() - t0)
        return n

    def _land(self, job: Job, store: Any, item: tuple[ChunkKey, int, int, int], status: OpStatus, why: str,
              results: dict[bytes, ChunkResult], pin: bool) -> int:
        """Commit (verifying its checksum) or abort one received chunk; returns the bytes kept."""
        k, rid, csum, ntok = item
        if status is not OpStatus.DONE:
            store.abort(rid)
            results[k] = ChunkResult(k, _OP_TO_CHUNK.get(status, ChunkStatus.FAILED), reason=why or status.value)
            return 0
        try:
            info = store.commit(rid, checksum=csum, num_tokens=ntok)
        except IntegrityError as exc:
            results[k] = ChunkResult(k, ChunkStatus.CORRUPT, reason=str(exc))
            return 0
        except ReservationError as exc:  # expired while the bytes were in flight
            results[k] = ChunkResult(k, ChunkStatus.TIMEOUT, reason=str(exc))
            return 0
        if pin:
            (p,) = store.pin([k], owner=job.request_id)
            if p is None:
                results[k] = ChunkResult(k, ChunkStatus.FAILED, reason="evicted before it could be pinned")
                return 0
            results[k] = ChunkResult(k, ChunkStatus.DONE, p.offset, p.nbytes, p.checksum, p.num_tokens,
                                     p.lease_id)
        else:
            results[k] = ChunkResult(k, ChunkStatus.DONE, info.offset, info.nbytes, info.checksum,
                                     info.num_tokens)
        return int(info.nbytes)

    def _release_later(self, link: PeerLink, owner: str, remote_owner: str) -> None:
        """Drop the peer's pins off the job's critical path (their leases expire anyway)."""
        try:
            self.ctx.control.submit(self._release_remote, link, owner, remote_owner)
        except RuntimeError:  # shutting down
            pass

    def _release_staged_later(self, address: str, remote_owner: str) -> None:
        """Every chunk came staged (layer-wise P/D): release the prefill side's hand-off pins off the
        critical path, over a session opened there if this agent holds none."""
        def run() -> None:
            try:
                link = self.links.link(address, 5.0)
            except (PdxError, OSError) as exc:  # the lease expires on its own
                log.info("could not release pins of %s at %s: %s", remote_owner, address, exc)
                return
            self._release_remote(link, "", remote_owner)

        try:
            self.ctx.control.submit(run)
        except RuntimeError:  # shutting down
            pass

    def _release_remote(self, link: PeerLink, owner: str, remote_owner: str) -> None:
        for who in (owner, remote_owner):
            if not who:
                continue
            try:
                link.client.call(Op.PEER_RELEASE, OwnerArgs(who), timeout=1.0)
            except PdxError as exc:  # the lease expires on its own
                log.info("could not release pins of %s at %s: %s", who, link.address, exc)

    def _send(self, job: Job, results: dict[bytes, ChunkResult]) -> int:
        ctx = self.ctx
        store, transport, _layout = ctx.require_store()
        keys = [ChunkKey(k) for k in job.keys]
        owner = f"send:{ctx.instance}:{job.id}"
        pins = store.pin(keys, owner=owner)
        try:
            present = [(k, p) for k, p in zip(keys, pins) if p is not None]
            for k, p in zip(keys, pins):
                if p is None:
                    results[k] = ChunkResult(k, ChunkStatus.MISSING, reason="not in the local pool")
            if not present:
                return 0
            link = self.links.link(job.peer, self._left(job))
            rows: list[ReserveRow] = link.client.call(
                Op.PEER_RESERVE, ReserveArgs([k for k, _ in present], [p.nbytes for _, p in present]),
                self._left(job))
            if len(rows) != len(present):
                raise WireError(f"peer_reserve: {len(rows)} rows for {len(present)} keys")
            ops: list[ChunkOp] = []
            sent: list[tuple[ChunkKey, int, int, int]] = []
            for (k, p), row in zip(present, rows):
                if row.code is ErrorCode.PRESENT:
                    results[k] = ChunkResult(k, ChunkStatus.PRESENT)
                elif not row.id:
                    results[k] = ChunkResult(k, ChunkStatus.FAILED, reason=f"peer: {row.code.name}: {row.error}")
                else:
                    ops.append(ChunkOp(p.offset, row.offset, p.nbytes))
                    sent.append((k, row.id, p.checksum, p.num_tokens))
            if not ops:
                return 0
            handle = transport.post(link.transport_peer, OpKind.WRITE, ops)
            job.on_cancel = handle.cancel
            batch = handle.wait(timeout=max(0.0, self._left(job)))
            job.on_cancel = None
            landed = [(i, s) for i, s in enumerate(sent) if batch.status[i] is OpStatus.DONE]
            failed = [(i, s) for i, s in enumerate(sent) if batch.status[i] is not OpStatus.DONE]
            for i, (k, _rid, _c, _n) in failed:
                results[k] = ChunkResult(k, _OP_TO_CHUNK.get(batch.status[i], ChunkStatus.FAILED),
                                         reason=batch.errors.get(i, ""))
            if failed:
                try:
                    link.client.call(Op.PEER_ABORT, IdsArgs([s[1] for _, s in failed]), 1.0)
                except PdxError:
                    pass  # the peer's reservations expire on their own
            moved = 0
            if landed:
                outcomes: list[Outcome] = link.client.call(Op.PEER_COMMIT, PeerCommitArgs(
                    [s[1] for _, s in landed], [s[2] for _, s in landed], [s[3] for _, s in landed]),
                    max(0.5, self._left(job)))
                if len(outcomes) != len(landed):
                    raise WireError(f"peer_commit: {len(outcomes)} outcomes for {len(landed)} chunks")
                for (i, (k, _rid, _c, _n)), o in zip(landed, outcomes):
                    if not o.ok:
                        status = ChunkStatus.CORRUPT if o.code is ErrorCode.INTEGRITY else ChunkStatus.FAILED
                        results[k] = ChunkResult(k, status, reason=f"{o.code.name}: {o.msg}")
                    else:
                        results[k] = ChunkResult(k, ChunkStatus.DONE, nbytes=ops[i].nbytes)
                        moved += ops[i].nbytes
            return moved
        finally:
            store.release_owner(owner)

    @staticmethod
    def _left(job: Job) -> float:
        if job.cancelled.is_set():
            raise TransferCancelled(f"job {job.id}: cancelled")
        left = job.time_left()
        if left <= 0:
            raise TransferTimeout(f"job {job.id}: deadline passed")
        return left


def split_results(chunks: Sequence[ChunkResult]) -> tuple[int, int]:
    """(usable, failed) counts: for logs and metrics."""
    usable = sum(1 for c in chunks if c.status.usable)
    return usable, len(chunks) - usable
