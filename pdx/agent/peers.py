"""Agent to agent: the peer socket's ops, peer sessions, and the fetch/send jobs.

The decode side's agent runs a *fetch* on a worker thread:

1. ``PeerLink`` (one per peer address, cached): a ZMQ session with the peer's
   peer socket (``peer_hello``, with the shared-secret challenge when a secret
   is set), which names the peer's transport address; then ``Transport.connect``
   (the transport's own handshake checks wire version and chunk fingerprint).
2. Keys already in the local pool are not moved (``PRESENT``).
3. ``peer_pin``: the peer pins the rest under a lease owned by this job (promoting
   them from its disk/Redis tiers first), and answers offsets, sizes, checksums.
4. Local slabs are reserved, one READ batch is posted, and each landed chunk is
   committed with the peer's checksum: ``ChunkStore.commit`` re-hashes the bytes,
   so a chunk damaged on the way is ``CORRUPT`` and dropped, never served.
5. The peer's pins are released (and, with ``remote_owner``, the pins the peer
   kept for the request); the job's per-chunk results are recorded.

A *send* is the mirror: ``peer_reserve`` on the peer, a WRITE batch, ``peer_commit``
(the peer re-hashes against our checksums). Every step is bounded by the job's
deadline; a dead or slow peer turns into per-chunk ``FAILED``/``TIMEOUT``, never a hang.

``PeerService`` also implements the peer socket's handlers (run by the control
loop; those that hash or do tier I/O return a ``Deferred``). Thread-safety: links
are created under a lock; jobs run on the server's executor.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from pdx.agent.client import AgentClient
from pdx.agent.jobs import Job
from pdx.agent.loop import Deferred
from pdx.agent.protocol import Op, Request
from pdx.agent.trust import Expectations, Grant, KnownPeers, Session, Sessions
from pdx.agent.types import ChunkResult, ChunkStatus, JobKind
from pdx.errors import (
    AgentError,
    AgentUnavailable,
    AuthError,
    CapacityError,
    IntegrityError,
    PdxError,
    PeerDenied,
    PeerIncompatible,
    ReservationError,
    StoreError,
    TransferCancelled,
    TransferTimeout,
    WireError,
)
from pdx.keys import ChunkKey
from pdx.store.types import Tier
from pdx.transport.base import ChunkOp, OpKind, OpStatus

if TYPE_CHECKING:
    from pdx.agent.server import AgentServer

log = logging.getLogger("pdx.agent.peers")

#: bytes per transfer group: each group is committed (and verified) while the next ones move.
PIPELINE_BYTES = 4 * 1024 * 1024
#: limit on waiting for the commits of one job (hashing what already landed; never I/O).
COMMIT_WAIT_S = 60.0
#: a challenge must be answered within this many seconds.
CHALLENGE_TTL_S = 30.0
#: owners of the pins a prefill keeps for the decode side (``pd:<request id>``): the decode agent
#: that was granted all their keys may release them once its fetch is over.
HANDOFF_PREFIX = "pd:"
#: pending challenges kept at most.
MAX_SESSIONS = 4096

_OP_TO_CHUNK = {OpStatus.FAILED: ChunkStatus.FAILED, OpStatus.TIMEOUT: ChunkStatus.TIMEOUT,
                OpStatus.CANCELLED: ChunkStatus.CANCELLED, OpStatus.CORRUPT: ChunkStatus.CORRUPT}


def then(result: Any, fn: Callable[[Any], Any]) -> Any:
    """``fn(result)``; for a ``Deferred``, a ``Deferred`` of ``fn`` applied to its result once it is done."""
    if not isinstance(result, Deferred):
        return fn(result)
    out: Future[Any] = Future()

    def chain(f: Future[Any]) -> None:
        try:
            out.set_result(fn(f.result()))
        except BaseException as exc:  # the loop sends it as an error reply
            out.set_exception(exc)

    result.future.add_done_callback(chain)
    return Deferred(out, result.timeout_s, result.on_timeout)


def _mac(secret: str, label: bytes, a: bytes, b: bytes) -> bytes:
    return hmac.new(secret.encode(), label + a + b, hashlib.sha256).digest()


@dataclass
class PeerLink:
    """A session with one peer agent: its control client and transport peer id."""

    address: str
    client: AgentClient
    agent_id: str
    transport_peer: Any  # pdx.transport.base.PeerId
    transport_address: str


class PeerService:
    """Peer-socket handlers and fetch/send jobs of one agent (see the module docstring)."""

    def __init__(self, server: AgentServer) -> None:
        self.server = server
        self.secret = server.secret
        cfg = server.config
        self.sessions = Sessions(lambda op: server.metrics.peer_denied.labels(op=op).inc())
        self.expected = Expectations()
        self.known = KnownPeers(cfg.transport.peers, bool(cfg.registration.proxy_url))
        #: asks the proxy for its current list of agents (set when registration is on); blocking
        self.refresh_known: Callable[[], object] | None = None
        self._refreshed = 0.0
        self._links: dict[str, PeerLink] = {}
        self._links_lock = threading.Lock()
        self._challenges: OrderedDict[bytes, float] = OrderedDict()
        # Commits of received chunks (hashing) run here, beside the job threads; never waits on them.
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="pdx-agent-commit")

    # --- serving peers (control-loop thread) ---------------------------------------------------

    def handlers(self) -> dict[Op, Any]:
        s = self.server
        return {Op.PING: lambda a, _s: s.h_ping(a), Op.PEER_HELLO: self.h_hello, Op.PEER_PIN: self.h_pin,
                Op.PEER_UNPIN: self.h_unpin, Op.PEER_RELEASE: self.h_release,
                Op.PEER_RESERVE: self.h_reserve, Op.PEER_COMMIT: self.h_commit, Op.PEER_ABORT: self.h_abort}

    def check_auth(self, req: Request) -> Session | None:
        """The peer endpoint's gate: every op but hello/ping needs a live session token."""
        if req.op in (Op.PEER_HELLO, Op.PING):
            return None
        try:
            return self.sessions.get(req.auth)
        except AuthError:
            self.server.metrics.auth_failures.inc()
            self.sessions.deny(None, req.op.value, "no valid session")
            raise

    def quota(self) -> int:
        """Slabs one peer may hold pinned or reserved here at once."""
        store = self.server.store
        count = store.slab_count if store is not None else 0
        return max(1, int(count * self.server.config.control.peer_max_share))

    def h_hello(self, a: dict[str, Any], _s: None) -> dict[str, Any]:
        srv = self.server
        _store, transport, layout = srv.require_store()
        if a["chunk_fingerprint"] and a["chunk_fingerprint"] != layout.chunk_fingerprint:
            raise PeerIncompatible(f"chunk fingerprint: peer {a['chunk_fingerprint']}, "
                                   f"this agent {layout.chunk_fingerprint}")
        if a["address"] and not self.known.name_matches(a["address"], a["agent_id"]):
            raise self.sessions.deny(None, "peer_hello", f"{a['address']} is registered under another "
                                     f"agent id than {a['agent_id']!r}")
        if self.secret:
            now = time.monotonic()
            if not a["proof"]:  # step 1: issue a challenge and prove we know the secret
                nonce = os.urandom(16)
                self._challenges[nonce] = now + CHALLENGE_TTL_S
                while len(self._challenges) > MAX_SESSIONS:
                    self._challenges.popitem(last=False)
                return {"challenge": nonce, "proof": _mac(self.secret, b"S", a["nonce"], nonce)}
            expires = self._challenges.pop(a["server_nonce"], 0.0)
            good = _mac(self.secret, b"C", a["server_nonce"], a["nonce"])
            if expires < now or not hmac.compare_digest(good, a["proof"]):
                srv.metrics.auth_failures.inc()
                raise AuthError("the peer failed the shared-secret challenge")
        session = self.sessions.open(a["agent_id"], a["address"])
        return {"agent_id": srv.agent_id, "instance": srv.instance, "chunk_fingerprint": layout.chunk_fingerprint,
                "fingerprint": layout.fingerprint, "transport": transport.name,
                "transport_address": srv.transport_address, "token": session.token, "secret": bool(self.secret)}

    def h_pin(self, a: dict[str, Any], s: Session) -> Any:
        """Pin keys for the peer (under an owner private to its session) and grant it their ranges."""
        srv = self.server
        srv.require_store()
        lease = min(a["lease_s"] or srv.config.leases.remote_s, srv.config.leases.max_s)
        keys: list[bytes] = a["keys"]
        with self.sessions.lock:
            room = max(0, self.quota() - s.held(time.monotonic()))
            s.owners.add(a["owner"])
        if room < len(keys):
            self.sessions.deny(s, "peer_pin", f"quota: at most {self.quota()} slabs per peer")
        owner = s.owner(a["owner"])
        granted, refused = keys[:room], keys[room:]

        def grant(rows: list[list[Any]]) -> list[list[Any]]:
            now = time.monotonic()
            with self.sessions.lock:
                for lid, k, off, nb, _c, _n, left in rows:
                    if lid:
                        s.add(s.pins, lid, Grant(off, nb, now + left, k, a["owner"]))
            return rows + [[0, k, 0, 0, 0, 0, 0.0] for k in refused]

        return then(srv.pin_keys(granted, owner, lease, origin="peer"), grant)

    def h_unpin(self, a: dict[str, Any], s: Session) -> int:
        store, _t, _l = self.server.require_store()
        ids = a["lease_ids"]
        with self.sessions.lock:
            foreign = [i for i in ids if i not in s.pins]
        if foreign:
            raise self.sessions.deny(s, "peer_unpin", f"lease {foreign[0]} was not granted to this peer")
        n = sum(bool(store.unpin(lid)) for lid in ids)
        with self.sessions.lock:
            for lid in ids:
                s.drop_pin(lid)
        self.server.metrics.leases_released.inc(n)
        return n

    def h_release(self, a: dict[str, Any], s: Session) -> int:
        """Drop the pins of one of the peer's own owners, or of a request's hand-off owner (``pd:<id>``:
        the chunks a prefill kept for the decode side) whose keys were all granted to this peer."""
        store, _t, _l = self.server.require_store()
        name = a["owner"]
        with self.sessions.lock:
            own = name in s.owners
        if own:
            n = store.release_owner(s.owner(name))
            with self.sessions.lock:
                s.owners.discard(name)
                s.drop_owner_pins([lid for lid, g in s.pins.items() if g.owner == name])
        else:
            keys = store.owner_keys(name) if name.startswith(HANDOFF_PREFIX) else []
            with self.sessions.lock:
                ok = bool(keys) and all(k in s.keys for k in keys)
            if not ok:
                raise self.sessions.deny(s, "peer_release", f"owner {name!r} is not this peer's")
            n = store.release_owner(name)
        self.server.metrics.leases_released.inc(n)
        return n

    def h_reserve(self, a: dict[str, Any], s: Session) -> list[list[Any]]:
        """Reserve slabs for a push: only for keys this agent asked for (``expect``), within the quota."""
        store, _t, _l = self.server.require_store()
        keys: list[bytes] = a["keys"]
        unasked = next((k for k in keys if not self.expected.expected(k)), None)
        if unasked is not None:
            raise self.sessions.deny(s, "peer_reserve", f"chunk {unasked.hex()[:16]} was not asked for")
        nbytes = a["nbytes"]
        if not isinstance(nbytes, int) and len(nbytes) != len(keys):
            raise WireError("peer_reserve: 'nbytes' must be one size or one per key")
        present = store.lookup([ChunkKey(k) for k in keys]).tiers
        out: list[list[Any]] = []
        now = time.monotonic()
        with self.sessions.lock:
            room = max(0, self.quota() - s.held(now))
        over = False
        for i, key in enumerate(keys):
            if present[i] is Tier.L1:
                out.append([0, 0, 0, "present"])
                continue
            if room <= 0:
                over = True
                out.append([0, 0, 0, f"capacity: at most {self.quota()} slabs per peer"])
                continue
            nb = nbytes if isinstance(nbytes, int) else nbytes[i]
            try:
                res = store.reserve(ChunkKey(key), nb)
            except CapacityError as exc:
                out.append([0, 0, 0, f"capacity: {exc}"])
                continue
            except StoreError as exc:
                out.append([0, 0, 0, str(exc)])
                continue
            room -= 1
            with self.sessions.lock:
                s.add(s.reservations, res.id, Grant(res.offset, res.nbytes, res.expires_at, key))
            out.append([res.id, res.offset, res.nbytes, ""])
        if over:
            self.sessions.deny(s, "peer_reserve", f"quota: at most {self.quota()} slabs per peer")
        return out

    def _own_reservations(self, s: Session, ids: list[int], op: str) -> list[bytes]:
        with self.sessions.lock:
            foreign = [i for i in ids if i not in s.reservations]
            if not foreign:
                return [s.reservations[i].key for i in ids]
        raise self.sessions.deny(s, op, f"reservation {foreign[0]} was not made for this peer")

    def h_commit(self, a: dict[str, Any], s: Session) -> Deferred:
        keys = self._own_reservations(s, a["ids"], "peer_commit")

        def done(errs: list[str]) -> list[str]:
            with self.sessions.lock:
                for rid in a["ids"]:
                    s.drop_reservation(rid)
            self.expected.fulfilled(k for k, e in zip(keys, errs) if not e)
            return errs

        return cast(Deferred, then(self.server.h_commit(a), done))

    def h_abort(self, a: dict[str, Any], s: Session) -> int:
        self._own_reservations(s, a["ids"], "peer_abort")
        n = self.server.h_abort(a)
        with self.sessions.lock:
            for rid in a["ids"]:
                s.drop_reservation(rid)
        return n

    def data_guard(self, token: bytes, write: bool, ranges: Sequence[Sequence[int]]) -> str:
        """The transport's data-plane check (tcp serving threads): see ``Sessions.data_guard``."""
        return self.sessions.data_guard(token, write, ranges)

    # --- links (worker threads) ----------------------------------------------------------------

    def link(self, address: str, timeout: float) -> PeerLink:
        """The session with the peer at ``address`` (hello + transport connect on first use)."""
        with self._links_lock:
            link = self._links.get(address)
        if link is not None:
            return link
        srv = self.server
        _store, transport, layout = srv.require_store()
        # A dead peer answers nothing (ZMQ connects lazily): the hello, not the job's whole
        # deadline, is what bounds finding that out.
        hello_s = min(timeout, srv.config.control.request_timeout_s)
        client = AgentClient(address, timeout_s=hello_s, max_frame=srv.config.control.max_frame)
        try:
            info = self._hello(client, layout.chunk_fingerprint, hello_s)
            peer = transport.connect(info["transport_address"], timeout=timeout)
            # the data plane presents the same session: the peer serves only what it granted to it
            transport.set_session(peer.peer_id, client.auth)
        except BaseException:
            client.close()
            raise
        link = PeerLink(address, client, str(info["agent_id"]), peer.peer_id, str(info["transport_address"]))
        client.on_restart = lambda _inst, a=address: self.drop_link(a)
        with self._links_lock:
            old = self._links.get(address)
            if old is not None:  # another thread won the race
                client.close()
                return old
            self._links[address] = link
        srv.metrics.peers.set(len(self._links))
        log.info("peer session with %s at %s (transport %s at %s)", link.agent_id, address, transport.name,
                 link.transport_address)
        return link

    def _hello(self, client: AgentClient, chunk_fp: str, timeout: float) -> dict[str, Any]:
        nonce = os.urandom(16)
        args: dict[str, Any] = {"agent_id": self.server.agent_id, "address": self.server.peer_address,
                                "chunk_fingerprint": chunk_fp, "nonce": nonce}
        reply = client.call(Op.PEER_HELLO, args, timeout)
        if not isinstance(reply, dict):
            raise AgentError("peer_hello: bad reply")
        if "challenge" in reply:
            if not self.secret:
                raise AuthError(f"peer at {client.address} requires a shared secret and none is configured here")
            challenge = bytes(reply["challenge"])
            if not hmac.compare_digest(_mac(self.secret, b"S", nonce, challenge), bytes(reply["proof"])):
                raise AuthError(f"peer at {client.address} failed the shared-secret challenge")
            args.update(server_nonce=challenge, proof=_mac(self.secret, b"C", challenge, nonce))
            reply = client.call(Op.PEER_HELLO, args, timeout)
        elif self.secret:
            raise AuthError(f"a shared secret is configured here but the peer at {client.address} has none")
        token = reply.get("token") if isinstance(reply, dict) else None
        if not isinstance(token, bytes) or not token:
            raise AgentError(f"peer at {client.address}: peer_hello answered no session token")
        client.auth = token
        return reply

    def drop_link(self, address: str) -> None:
        with self._links_lock:
            link = self._links.pop(address, None)
        if link is not None:
            self.server.metrics.peers.set(len(self._links))
            threading.Thread(target=link.client.close, daemon=True).start()

    def links(self) -> list[dict[str, str]]:
        with self._links_lock:
            return [{"address": lk.address, "agent_id": lk.agent_id, "transport_address": lk.transport_address}
                    for lk in self._links.values()]

    def close(self) -> None:
        with self._links_lock:
            links, self._links = list(self._links.values()), {}
        for lk in links:
            lk.client.close()
        self._committer.shutdown(wait=True)

    # --- jobs (worker threads) -----------------------------------------------------------------

    def submit(self, executor: Executor, job: Job, **kw: Any) -> Future[None]:
        run = self._fetch if job.kind is JobKind.FETCH else self._send
        return executor.submit(self._run, run, job, kw)

    def check_known(self, address: str) -> None:
        """Raise ``PeerDenied`` (counted) unless ``address`` is an agent of this deployment; an unknown
        one first makes us ask the proxy again (at most once a second: it may have just registered)."""
        if self.known.knows(address):
            return
        now = time.monotonic()
        if self.refresh_known is not None and now - self._refreshed > 1.0:
            self._refreshed = now
            self.refresh_known()
            if self.known.knows(address):
                return
        self.server.metrics.unknown_peers.inc()
        log.warning("refused to dial %s: not an agent of this deployment (neither registered with the same "
                    "proxy nor in transport.peers); the engine recomputes", address)
        raise PeerDenied(f"{address} is not a known agent of this deployment (register it with the same "
                         "proxy or list it in transport.peers)")

    def _run(self, fn: Any, job: Job, kw: dict[str, Any]) -> None:
        srv = self.server
        if not srv.jobs.start(job):
            return
        results: dict[bytes, ChunkResult] = {}
        error = ""
        nbytes = 0
        try:
            self.check_known(job.peer)
            nbytes = fn(job, results, **kw)
        except (PdxError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, AgentUnavailable) or (isinstance(exc, AuthError) and
                                                     not isinstance(exc, PeerDenied)):
                self.drop_link(job.peer)  # dead, restarted, or our session expired: hello again next time
            log.warning("%s job %d (request %s) with %s failed: %s", job.kind.value, job.id, job.request_id,
                        job.peer, error)
        except Exception as exc:
            error = f"internal error: {type(exc).__name__}: {exc}"
            log.exception("%s job %d failed", job.kind.value, job.id)
        default = (ChunkStatus.CANCELLED if job.cancelled.is_set() else
                   ChunkStatus.TIMEOUT if job.time_left() <= 0 else ChunkStatus.FAILED)
        chunks = [results.get(k) or ChunkResult(k, default, reason=error or default.value) for k in job.keys]
        srv.jobs.finish(job, chunks, error, nbytes)

    def _fetch(self, job: Job, results: dict[bytes, ChunkResult], remote_owner: str = "",
               pin: bool = True) -> int:
        srv = self.server
        store, transport, _layout = srv.require_store()
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
            elif tiers is not None and tiers[i] is Tier.L1:
                results[k] = ChunkResult(k, ChunkStatus.PRESENT)
            else:
                need.append(k)
        owner = f"fetch:{srv.agent_id}:{srv.instance}:{job.id}"
        link: PeerLink | None = None
        try:
            if not need:
                return 0
            link = self.link(job.peer, self._left(job))
            lease = min(max(self._left(job) + 5.0, 10.0), srv.config.leases.max_s)
            raw = link.client.call(Op.PEER_PIN, {"keys": list(need), "owner": owner, "lease_s": lease},
                                   self._left(job))
            ops: list[ChunkOp] = []
            moving: list[tuple[ChunkKey, int, int, int]] = []  # key, reservation id, checksum, num_tokens
            for k, p in zip(need, raw):
                lid, _key, off, nb, csum, ntok, _exp = p
                if not lid:
                    results[k] = ChunkResult(k, ChunkStatus.MISSING, reason="not held by the peer")
                    continue
                try:
                    res = store.reserve(k, int(nb))
                except (CapacityError, StoreError) as exc:
                    results[k] = ChunkResult(k, ChunkStatus.FAILED, reason=f"no local slab: {exc}")
                    continue
                ops.append(ChunkOp(res.offset, int(off), int(nb)))
                moving.append((k, res.id, int(csum), int(ntok)))
            return self._move(job, transport, link, OpKind.READ, ops, moving, results, store, pin)
        finally:
            if link is not None:
                self._release_later(link, owner, remote_owner)

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
        for i, op in enumerate(ops):
            if size and size + op.nbytes > PIPELINE_BYTES:
                groups.append((start, i))
                start, size = i, 0
            size += op.nbytes
        groups.append((start, len(ops)))
        handles = [transport.post(link.transport_peer, kind, ops[a:b]) for a, b in groups]

        def cancel_all() -> None:
            for h in handles:
                h.cancel()

        job.on_cancel = cancel_all
        if job.cancelled.is_set():
            cancel_all()
        commits: list[Future[int]] = []
        waited = 0.0
        for (a, b), handle in zip(groups, handles):
            tw = time.perf_counter()
            batch = handle.wait(timeout=max(0.0, job.time_left()))
            waited += time.perf_counter() - tw
            # Commit on the committer thread while this one keeps the transport busy (some
            # backends copy in the thread that waits).
            commits.append(self._committer.submit(self._land_group, job, store, moving[a:b], batch, results, pin))
        job.on_cancel = None
        moved = sum(f.result(timeout=COMMIT_WAIT_S) for f in commits)
        took = time.perf_counter() - t0
        log.debug("%s job %d: %d chunks, %d bytes in %d group(s): %.2f ms (%.2f GB/s), %.2f ms of it waiting "
                  "for the transport", job.kind.value, job.id, len(ops), moved, len(groups),
                  took * 1e3, moved / max(took, 1e-9) / 1e9, waited * 1e3)
        return moved

    def _land_group(self, job: Job, store: Any, items: list[tuple[ChunkKey, int, int, int]], batch: Any,
                    results: dict[bytes, ChunkResult], pin: bool) -> int:
        return sum(self._land(job, store, item, batch.status[i], batch.errors.get(i, ""), results, pin)
                   for i, item in enumerate(items))

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
            self.server.executor.submit(self._release_remote, link, owner, remote_owner)
        except RuntimeError:  # shutting down
            pass

    def _release_remote(self, link: PeerLink, owner: str, remote_owner: str) -> None:
        for who in (owner, remote_owner):
            if not who:
                continue
            try:
                link.client.call(Op.PEER_RELEASE, {"owner": who}, timeout=1.0)
            except PdxError as exc:  # the lease expires on its own
                log.info("could not release pins of %s at %s: %s", who, link.address, exc)

    def _send(self, job: Job, results: dict[bytes, ChunkResult]) -> int:
        srv = self.server
        store, transport, _layout = srv.require_store()
        keys = [ChunkKey(k) for k in job.keys]
        owner = f"send:{srv.instance}:{job.id}"
        pins = store.pin(keys, owner=owner)
        try:
            present = [(k, p) for k, p in zip(keys, pins) if p is not None]
            for k, p in zip(keys, pins):
                if p is None:
                    results[k] = ChunkResult(k, ChunkStatus.MISSING, reason="not in the local pool")
            if not present:
                return 0
            link = self.link(job.peer, self._left(job))
            raw = link.client.call(Op.PEER_RESERVE, {"keys": [k for k, _ in present],
                                                     "nbytes": [p.nbytes for _, p in present]}, self._left(job))
            ops: list[ChunkOp] = []
            sent: list[tuple[ChunkKey, int, int, int]] = []
            for (k, p), (rid, off, _nb, err) in zip(present, raw):
                if err == "present":
                    results[k] = ChunkResult(k, ChunkStatus.PRESENT)
                elif not rid:
                    results[k] = ChunkResult(k, ChunkStatus.FAILED, reason=f"peer: {err}")
                else:
                    ops.append(ChunkOp(p.offset, int(off), p.nbytes))
                    sent.append((k, int(rid), p.checksum, p.num_tokens))
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
                    link.client.call(Op.PEER_ABORT, {"ids": [s[1] for _, s in failed]}, 1.0)
                except PdxError:
                    pass  # the peer's reservations expire on their own
            moved = 0
            if landed:
                errs = link.client.call(Op.PEER_COMMIT, {
                    "ids": [s[1] for _, s in landed], "checksums": [s[2] for _, s in landed],
                    "num_tokens": [s[3] for _, s in landed]}, max(0.5, self._left(job)))
                for (i, (k, _rid, _c, _n)), err in zip(landed, errs):
                    if err:
                        status = ChunkStatus.CORRUPT if str(err).startswith("corrupt") else ChunkStatus.FAILED
                        results[k] = ChunkResult(k, status, reason=str(err))
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
