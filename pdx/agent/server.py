"""``AgentServer``: the daemon beside one engine worker.

It owns the store (created lazily by the first ``register_engine``: the pool's
slab is one packed chunk of that layout), the transport (registered on the
pool, listening on ``transport.host``), the jobs that move chunks, and the
control plane (``pdx.agent.loop``): the local socket for the engine's
connector and the peer socket for other agents. ``pdx.agent.cli`` wires it to
the HTTP endpoint, the announcer and the engine supervisor.

The handlers (``h_*``) run on the control-loop thread and never block: a lookup,
reserve, abort, pin of L1 chunks or release is a few dict operations under the
store's lock; what hashes bytes (commit), reads tiers (pin with lower tiers,
remote lookups), creates the pool (first registration) or moves data (fetch,
send, wait) runs on the executor and answers through a ``Deferred``.

Engine restarts: the pool lives as long as the agent, so a restarted engine
registers the same layout and gets the same pool with every chunk committed
before the crash. Another layout is refused with ``LayoutError`` naming the
fields that differ. Uncommitted reservations and pins of the dead engine
expire on their own (``store.l1.reservation_timeout_s``, the leases).

Thread-safety: the store and transport are thread-safe; ``_reg_lock`` guards
their creation; ``status()`` and ``ready()`` may be called from any thread.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pdx
from pdx.agent.context import AgentContext, abort_ids, commit_chunks, pin_keys
from pdx.agent.jobs import Job, JobTable
from pdx.agent.links import Links
from pdx.agent.loop import ControlLoop, Deferred, Endpoint
from pdx.agent.metrics import AgentMetrics
from pdx.agent.peers import PeerService
from pdx.agent.protocol import (
    LOCAL_OPS,
    WIRE_VERSION,
    CommitArgs,
    ExpectArgs,
    FetchArgs,
    IdsArgs,
    JobArgs,
    LookupArgs,
    NoArgs,
    OwnerArgs,
    PinArgs,
    PushLayerArgs,
    PushOpenArgs,
    PushSealArgs,
    RegisterArgs,
    ReserveArgs,
    SendArgs,
    UnpinArgs,
    WaitArgs,
)
from pdx.agent.push import LocalChunk, Pushes
from pdx.agent.transfers import Transfers
from pdx.agent.trust import check_bind, load_secret
from pdx.agent.types import (
    JobInfo,
    JobKind,
    JobState,
    LookupInfo,
    PingInfo,
    RegisterInfo,
    ReserveRow,
)
from pdx.config import AgentConfig, data_dir
from pdx.errors import (
    AgentError,
    ErrorCode,
    LayoutError,
    StoreError,
    WireError,
    code_of,
)
from pdx.keys import ChunkKey
from pdx.layout import KVLayout
from pdx.transport.handshake import Identity

if TYPE_CHECKING:
    from pdx.agent.launcher import EngineSupervisor
    from pdx.store.store import ChunkStore
    from pdx.transport.base import Transport

log = logging.getLogger("pdx.agent")

#: longest ``wait`` the agent holds a reply for.
MAX_WAIT_S = 600.0
#: threads for short work off the control loop (hashing commits, tier reads, peer releases).
CONTROL_WORKERS = 2


def default_name(role: str) -> str:
    return f"{role}-{socket.gethostname()}-{os.getpid()}"


#: how long a stopping agent keeps its control sockets open after its last replies
REPLY_GRACE_S = 0.2

class AgentServer:
    """See the module docstring. ``start()`` binds and serves; ``stop()`` drains and closes."""

    def __init__(self, config: AgentConfig, *, data_path: Path | None = None) -> None:
        self.config = config
        self.agent_id = config.name or default_name(config.role)
        self.instance = secrets.token_hex(8)
        self.data_dir = Path(data_path) if data_path is not None else data_dir(config.data_dir)
        #: the deployment secret (``transport.secret`` or ``transport.secret_file``); raises ConfigError
        self.secret = load_secret(config.transport)
        check_bind(config, self.secret)
        self.metrics = AgentMetrics()
        self.loop = ControlLoop(self.instance, self.metrics, config.control.max_frame)
        self.jobs = JobTable(config.control.job_retention_s, config.control.max_jobs, on_done=self._job_done)
        # Long transfer jobs and short control work on separate threads: slow peers holding every
        # transfer thread cannot delay a local commit.
        self.ctx = AgentContext(
            config=config, agent_id=self.agent_id, instance=self.instance, secret=self.secret,
            metrics=self.metrics, jobs=self.jobs,
            transfers=ThreadPoolExecutor(config.control.workers, thread_name_prefix="pdx-agent-xfer"),
            control=ThreadPoolExecutor(CONTROL_WORKERS, thread_name_prefix="pdx-agent-ctl"),
            identity=Identity())
        self.peers = PeerService(self.ctx, ping=self.h_ping)
        self.links = Links(self.ctx, key_at=self.peers.known.key_at)
        self.peers.warm = self.links.want
        self.transfers = Transfers(self.ctx, self.links, check_peer=self.peers.check_known)
        self.transfers.staging = self.peers.staging
        self.pushes = Pushes(self.ctx, self.links, check_peer=self.peers.check_known)
        self.peers.pushed_to = self.pushes.pushed_to
        # read when /metrics is scraped (the store's lock, no I/O)
        self.metrics.leases_active.set_function(lambda: self.store.stats().leases if self.store else 0)
        self.engine: EngineSupervisor | None = None
        self.engine_url = config.engine.url
        self.engine_pids: list[int] = []  # pids that registered, latest last
        self.http_url = ""
        self._reg_lock = threading.Lock()
        self._waiters: dict[int, list[Future[Any]]] = {}
        self._waiters_lock = threading.Lock()
        self._draining = False
        self._started = time.monotonic()
        self._control: Endpoint | None = None
        self._peer: Endpoint | None = None
        self._stopped = False

    # --- life cycle --------------------------------------------------------------------------

    @property
    def store(self) -> ChunkStore | None:
        return self.ctx.store

    @property
    def transport(self) -> Transport | None:
        return self.ctx.transport

    @property
    def layout(self) -> KVLayout | None:
        return self.ctx.layout

    @property
    def transport_address(self) -> str:
        return self.ctx.transport_address

    @property
    def control_address(self) -> str:
        return self._control.address if self._control is not None else ""

    @property
    def peer_address(self) -> str:
        return self._peer.address if self._peer is not None else ""

    def start(self) -> None:
        """Bind the control (and peer) sockets and start the loop thread. Raises ``ConfigError``."""
        cfg = self.config
        address = cfg.control.address or f"ipc://{self.data_dir / 'run' / f'agent-{self.agent_id}.sock'}"
        local = {op: getattr(self, f"h_{op.value}") for op in LOCAL_OPS}
        self._control = self.loop.bind("control", address, local)
        if cfg.control.peer_enabled:
            host = cfg.transport.host
            self._peer = self.loop.bind("peer", f"tcp://{host}:{cfg.control.peer_port}",
                                        self.peers.handlers(), auth=self.peers.check_auth)
            self.ctx.peer_address = self._peer.address
        self.loop.every(cfg.leases.sweep_s, self._sweep)
        self.loop.start()
        log.info("agent %s (%s) listening: control %s, peers %s", self.agent_id, cfg.role, self.control_address,
                 self.peer_address or "off")

    def stop(self, drain_timeout_s: float | None = None) -> None:
        """Refuse new transfers, let in-flight ones finish (bounded), then close everything. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        limit = self.config.control.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        if not self.drain(limit):
            left = self.jobs.active_jobs()
            log.warning("cancelling %d job(s) still running after %.0fs", len(left), limit)
            for job in left:
                self.jobs.cancel(job.id)
            self.jobs.wait_idle(5.0)
        # The last replies (a drained job's ``wait``) are sent by now; keep the connections up a
        # moment: a reply sent just before the sockets closed was seen lost on the client's side
        # (about 1 stop in 10 under load; none in 20 with this pause).
        time.sleep(REPLY_GRACE_S)
        self.loop.stop()
        self.links.close()
        self.pushes.close()
        self.transfers.close()
        self.ctx.transfers.shutdown(wait=True, cancel_futures=True)
        self.ctx.control.shutdown(wait=True, cancel_futures=True)
        if self.transport is not None:
            self.transport.close()
        if self.store is not None:
            self.store.close()
        log.info("agent %s stopped", self.agent_id)

    @property
    def draining(self) -> bool:
        return self._draining

    def drain(self, timeout_s: float) -> bool:
        """Refuse new transfers from now on and wait (up to ``timeout_s``) for in-flight ones.
        True when none is left. Blocking; any thread."""
        self._draining = True
        active = self.jobs.active
        if active:
            log.info("draining %d in-flight transfer job(s) (up to %.0fs)", active, timeout_s)
        return self.jobs.wait_idle(timeout_s)

    def _sweep(self) -> None:
        if self.store is not None:
            self.store.reap()
        self.jobs.prune()
        self.metrics.jobs_active.set(self.jobs.active)
        self.peers.staging.sweep()

    # --- helpers -----------------------------------------------------------------------------

    def require_store(self) -> tuple[ChunkStore, Transport, KVLayout]:
        return self.ctx.require_store()

    def _deferred(self, fn: Any, *args: Any, timeout_s: float | None = None) -> Deferred:
        return self.ctx.deferred(fn, *args, timeout_s=timeout_s)

    # --- local handlers (control-loop thread) --------------------------------------------------

    def h_ping(self, a: NoArgs) -> PingInfo:
        return PingInfo(agent_id=self.agent_id, instance=self.instance, role=self.config.role,
                        wire_version=WIRE_VERSION, version=pdx.__version__, pid=os.getpid(),
                        uptime_s=round(time.monotonic() - self._started, 3), registered=self.store is not None,
                        peer_address=self.peer_address)

    def h_register_engine(self, a: RegisterArgs) -> Any:
        layout = KVLayout.from_dict(dict(a.layout.items()))
        if self.store is not None and not self._reg_lock.locked():  # an engine restart: answer at once
            return self._register(layout, a.pid, a.engine_url)
        return self._deferred(self._register, layout, a.pid, a.engine_url, timeout_s=120.0)

    def _register(self, layout: KVLayout, pid: int, engine_url: str) -> RegisterInfo:
        with self._reg_lock:
            created = self.store is None
            if created:
                self._create_store(layout)
            elif self.layout is not None and layout.fingerprint != self.layout.fingerprint:
                self.metrics.registrations.labels(outcome="refused").inc()
                mine, theirs = self.layout.to_dict(), layout.to_dict()
                diff = ", ".join(f"{k}: pool has {mine[k]!r}, engine has {theirs[k]!r}"
                                 for k in mine if mine[k] != theirs.get(k))
                raise LayoutError(f"this agent's pool was made for another KV layout ({diff}); restart the "
                                  "agent to change the model or layout")
            store, _transport, lay = self.require_store()
            if pid:
                self.engine_pids = [*self.engine_pids[-7:], pid]
            if engine_url and not self.config.engine.url:
                self.engine_url = engine_url
        self.metrics.registrations.labels(outcome="created" if created else "attached").inc()
        log.info("engine pid %s registered (%s pool %s, %d slabs of %d bytes)", pid or "?",
                 "new" if created else "existing", store.pool_name, store.slab_count, store.slab_size)
        return RegisterInfo(agent_id=self.agent_id, instance=self.instance, shm_name=store.pool_name,
                            pool_nbytes=store.pool.nbytes, slab_size=store.slab_size, slab_count=store.slab_count,
                            chunk_tokens=store.chunk_tokens, chunk_bytes=lay.chunk_bytes(store.chunk_tokens),
                            chunk_fingerprint=lay.chunk_fingerprint, fingerprint=lay.fingerprint,
                            namespace=self.config.store.namespace, peer_address=self.peer_address,
                            created=created)

    def _transport_refused(self, op: str) -> None:
        """A transport connection without a valid peer session: counted like a peer op without one."""
        self.metrics.auth_failures.inc()
        self.metrics.peer_denied.labels(op=op).inc()

    def _create_store(self, layout: KVLayout) -> None:
        from pdx.store.metrics import StoreMetrics
        from pdx.store.store import ChunkStore
        from pdx.transport import create
        from pdx.transport.base import MemoryKind, MemoryRegion

        cfg = self.config
        store = ChunkStore.from_layout(cfg.store, layout, self.data_dir,
                                       metrics=StoreMetrics(self.metrics.registry))
        try:
            tcfg = dataclasses.replace(cfg.transport, secret=self.secret, secret_file="")
            transport = create(cfg.transport.backend, tcfg, layout.chunk_fingerprint)
            transport.guard = self.peers.data_guard
            transport.on_denied = lambda op: self.metrics.peer_denied.labels(op=op).inc()
            # transport connections must ride on a peer_hello session (no challenge of their own)
            transport.accept_sessions(self.peers.sessions.lookup, self._transport_refused)
            try:
                transport.register(MemoryRegion(store.pool.nbytes, MemoryKind.HOST, store.pool.buffer,
                                                name=store.pool_name))
                address = transport.listen()
            except BaseException:
                transport.close()
                raise
        except BaseException:
            store.close()
            raise
        ctx = self.ctx
        ctx.store, ctx.transport, ctx.layout, ctx.transport_address = store, transport, layout, address
        log.info("pool %s created: %d slabs of %d bytes; transport %s listening at %s", store.pool_name,
                 store.slab_count, store.slab_size, transport.name, address)

    def h_lookup(self, a: LookupArgs) -> Any:
        store, _t, _l = self.require_store()
        if a.remote and store.remote_tiers:
            return self._deferred(self._lookup, store, a.keys, True, a.probe)
        return self._lookup(store, a.keys, False, a.probe)

    @staticmethod
    def _lookup(store: ChunkStore, keys: list[bytes], remote: bool, probe: bool = False) -> LookupInfo:
        # keys are 16-byte bytes (checked)
        r = store.lookup(cast("list[ChunkKey]", keys), remote=remote, count=not probe)
        return LookupInfo(r.prefix_chunks, r.chunk_tokens, tuple(t.value if t is not None else None for t in r.tiers))

    def reserve_one(self, key: bytes, nbytes: int) -> ReserveRow:
        store, _t, _l = self.require_store()
        try:
            res = store.reserve(ChunkKey(key), nbytes)
        except StoreError as exc:
            return ReserveRow(0, code=code_of(exc), error=str(exc))
        return ReserveRow(res.id, res.offset, res.nbytes)

    def h_reserve(self, a: ReserveArgs) -> list[ReserveRow]:
        keys, nbytes = a.keys, a.nbytes
        if not isinstance(nbytes, int) and len(nbytes) != len(keys):
            raise WireError("reserve: 'nbytes' must be one size or one per key")
        out = []
        full: ReserveRow | None = None
        for i, key in enumerate(keys):
            if full is not None:  # the pool is full of pinned/reserved slabs: the rest would fail the same way
                out.append(full)
                continue
            r = self.reserve_one(key, nbytes if isinstance(nbytes, int) else nbytes[i])
            if r.code is ErrorCode.CAPACITY:
                full = r
            out.append(r)
        return out

    def h_commit(self, a: CommitArgs) -> Deferred:
        store, _t, _l = self.require_store()
        ids, sums, ntok = a.ids, a.checksums, a.num_tokens
        if (sums and len(sums) != len(ids)) or (not isinstance(ntok, int) and len(ntok) != len(ids)):
            raise WireError("commit: 'checksums' (if given) and a 'num_tokens' list need one entry per id")
        return self._deferred(commit_chunks, store, ids, sums, ntok)

    def h_abort(self, a: IdsArgs) -> int:
        store, _t, _l = self.require_store()
        return abort_ids(store, a.ids)

    def h_pin(self, a: PinArgs) -> Any:
        lease = min(a.lease_s or self.config.store.l1.lease_s, self.config.leases.max_s)
        return pin_keys(self.ctx, a.keys, a.owner, lease, origin="local")

    def h_unpin(self, a: UnpinArgs) -> int:
        store, _t, _l = self.require_store()
        n = sum(bool(store.unpin(lid)) for lid in a.lease_ids)
        self.metrics.leases_released.inc(n)
        return n

    def h_release(self, a: OwnerArgs) -> int:
        """Drop the owner's pins and cancel its transfers (a finished or aborted request)."""
        owner = a.owner
        self.peers.expected.forget(owner)
        for job in self.jobs.active_jobs():
            if job.request_id == owner:
                self.jobs.cancel(job.id)
        if self.store is None:
            return 0
        n = self.store.release_owner(owner)
        self.metrics.leases_released.inc(n)
        return n

    def _start_job(self, kind: JobKind, a: FetchArgs | SendArgs, **kw: Any) -> int:
        self.require_store()
        if self._draining:
            raise AgentError("the agent is shutting down: no new transfers")
        deadline = time.monotonic() + (a.deadline_s or self.config.transport.transfer_timeout_s)
        job = self.jobs.create(kind, a.request_id, a.peer, a.keys, deadline)
        self.metrics.jobs_active.set(self.jobs.active)
        self.transfers.submit(job, **kw)
        return job.id

    def h_fetch(self, a: FetchArgs) -> int:
        return self._start_job(JobKind.FETCH, a, remote_owner=a.remote_owner, pin=a.pin)

    def h_send(self, a: SendArgs) -> int:
        return self._start_job(JobKind.SEND, a)

    def h_expect(self, a: ExpectArgs) -> int:
        """Accept pushes (a peer's ``send``) of ``keys`` until the deadline: the only keys a peer may
        reserve here. ``release(request_id)`` withdraws them."""
        self.peers.expected.add(a.keys, a.request_id, a.deadline_s or self.config.transport.transfer_timeout_s)
        return len(a.keys)

    def h_push_open(self, a: PushOpenArgs) -> int:
        """Start streaming the layers of reserved slabs to a decode agent (``pdx.agent.push``)."""
        self.require_store()
        if self._draining:
            raise AgentError("the agent is shutting down: no new transfers")
        n = len(a.keys)
        if len(a.offsets) != n or len(a.nbytes) != n:
            raise WireError("push_open: 'offsets' and 'nbytes' need one entry per key")
        if any(nb % a.num_layers for nb in a.nbytes):
            raise WireError(f"push_open: chunk sizes are not multiples of {a.num_layers} layers")
        chunks = [LocalChunk(k, o, nb) for k, o, nb in zip(a.keys, a.offsets, a.nbytes)]
        return self.pushes.open(a.peer, a.request_id, chunks, a.num_layers,
                                a.deadline_s or self.config.transport.transfer_timeout_s)

    def h_push_layer(self, a: PushLayerArgs) -> bool:
        return self.pushes.layer(a.push_id, a.layer)

    def h_push_seal(self, a: PushSealArgs) -> bool:
        return self.pushes.seal(a.push_id, a.checksums, a.num_tokens)

    def _job(self, job_id: int) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise AgentError(f"unknown job {job_id} (finished jobs are kept "
                             f"{self.config.control.job_retention_s:g}s)")
        return job

    def h_job_status(self, a: JobArgs) -> JobInfo:
        return self.jobs.snapshot(self._job(a.job_id))

    def h_wait(self, a: WaitArgs) -> Any:
        job = self._job(a.job_id)
        with self._waiters_lock:
            if job.state is not JobState.DONE:
                fut: Future[Any] = Future()
                self._waiters.setdefault(job.id, []).append(fut)
                return Deferred(fut, min(a.timeout_s, MAX_WAIT_S), on_timeout=lambda: self.jobs.snapshot(job))
        return self.jobs.snapshot(job)

    def _waiting_calls(self) -> int:
        """``wait`` calls parked until their job finishes."""
        with self._waiters_lock:
            return sum(len(f) for f in self._waiters.values())

    def _job_done(self, job: Job) -> None:
        """Runs on the thread that finished the job: metrics, then wake the waiters."""
        info = self.jobs.snapshot(job)
        kind = job.kind.value
        usable = sum(1 for c in info.chunks if c.status.usable)
        result = "ok" if usable == len(info.chunks) else "partial" if usable else "failed"
        m = self.metrics
        m.jobs.labels(kind=kind, result=result).inc()
        for c in info.chunks:
            m.chunks.labels(kind=kind, status=c.status.value).inc()
        m.bytes.labels(kind=kind).inc(info.nbytes)
        m.transfer_seconds.labels(kind=kind).observe(info.elapsed_s)
        m.jobs_active.set(max(0, self.jobs.active - 1))  # this job still counts until on_done returns
        with self._waiters_lock:
            futs = self._waiters.pop(job.id, [])
        for f in futs:
            f.set_result(info)

    def h_cancel(self, a: JobArgs) -> bool:
        return self.jobs.cancel(a.job_id)

    def h_stats(self, a: NoArgs) -> dict[str, Any]:
        return self.status()

    # --- status (any thread) -------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        store, transport, layout = self.store, self.transport, self.layout
        doc: dict[str, Any] = {
            "agent_id": self.agent_id, "instance": self.instance, "role": self.config.role,
            "version": pdx.__version__, "wire_version": WIRE_VERSION, "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self._started, 3), "draining": self._draining,
            "control": {"address": self.control_address, "peer_address": self.peer_address,
                        "http": self.http_url, "pending_replies": self.loop.pending},
            "layout": layout.to_dict() if layout is not None else None,
            "fingerprint": layout.fingerprint if layout is not None else "",
            "chunk_fingerprint": layout.chunk_fingerprint if layout is not None else "",
            "chunk_tokens": self.config.store.chunk_tokens,
            "jobs": {"active": self.jobs.active, "waiting_calls": self._waiting_calls()},
            "peers": self.links.links(),
            "warm_links": self.links.warm_count(),
            "registered_peers": self.peers.known.registered_ids(),
            "engine": self.engine.status().to_dict() if self.engine is not None else {"state": "none"},
            "engine_pids": list(self.engine_pids),
            "engine_url": self.engine_url,
            "push": {"open": self.pushes.active(), "opened": self.pushes.opened, "sealed": self.pushes.sealed,
                     "failed": self.pushes.failed, "layers": self.pushes.layers, "bytes": self.pushes.bytes,
                     "stages": len(self.peers.staging), "staged_taken": self.peers.staging.taken},
        }
        if store is not None:
            st = store.stats()
            doc["pool"] = {"shm_name": store.pool_name, "slab_size": st.slab_size, "slab_count": st.slab_count,
                           "free_slabs": st.free_slabs, "reserved_slabs": st.reserved_slabs,
                           "pinned_slabs": st.pinned_slabs, "chunks": st.chunks, "used_bytes": st.used_bytes,
                           "capacity_bytes": st.slab_count * st.slab_size, "leases": st.leases}
            doc["tiers"] = {"l1": {"chunks": st.chunks, "used_bytes": st.used_bytes}, **store.tier_health()}
        else:
            doc["pool"] = None
            doc["tiers"] = None
        if transport is not None:
            doc["transport"] = {"backend": transport.name, "address": self.transport_address,
                                "peers": [{"peer_id": p.peer_id, "address": p.address, "backend": p.backend}
                                          for p in transport.peers()]}
        else:
            doc["transport"] = {"backend": self.config.transport.backend, "address": "", "peers": []}
        return doc

    def ready(self) -> list[str]:
        """Why the agent is not ready (empty when it is)."""
        problems = []
        if self._draining:
            problems.append("shutting down")
        if self.store is None:
            problems.append("store not up: no engine has registered its layout yet")
        if self.engine is not None and not self.engine.running:
            problems.append(f"engine {self.engine.status().state.value}")
        return problems
