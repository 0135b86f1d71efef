"""The peer socket's ops: what another agent may ask of this one, checked against its grants.

``PeerService`` implements the handlers the control loop runs for the peer socket (those that
hash or read tiers return a ``Deferred``): ``peer_hello`` (the deployment secret's challenge,
then a session: ``pdx.agent.trust.Sessions``), and ``peer_pin``/``unpin``/``release``/
``reserve``/``commit``/``abort``, each allowed only within the caller's session grants (its
own ids and owners, its quota, keys this agent asked for). It also answers the transport's
data-plane check (``data_guard``) and whether an address is an agent of this deployment
(``check_known``, asked by the transfer jobs before they dial).

The dialing side lives in ``pdx.agent.links`` (sessions with peers) and ``pdx.agent.transfers``
(fetch and send jobs). Everything here sees an ``AgentContext``, never the server. Thread-safety:
the handlers run on the control-loop thread; ``data_guard`` on transport threads; the session
tables have their own lock.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, cast

from pdx.agent.context import AgentContext, abort_ids, commit_chunks, pin_keys
from pdx.agent.loop import Deferred
from pdx.agent.protocol import (
    HelloArgs,
    IdsArgs,
    Op,
    OwnerArgs,
    PeerCommitArgs,
    PinArgs,
    Request,
    ReserveArgs,
    StageArgs,
    StagedArgs,
    UnpinArgs,
)
from pdx.agent.push import Staging
from pdx.agent.trust import Expectations, Grant, KnownPeers, Session, Sessions
from pdx.agent.types import HelloReply, Outcome, PinInfo, ReserveRow
from pdx.errors import AuthError, ErrorCode, PeerDenied, PeerIncompatible, StoreError, WireError, code_of
from pdx.keys import ChunkKey
from pdx.store.types import Tier
from pdx.transport.handshake import (
    client_proof,
    hello_transcript,
    identity_ok,
    proof_ok,
    server_proof,
    session_key,
)

log = logging.getLogger("pdx.agent.peers")

#: a challenge must be answered within this many seconds.
CHALLENGE_TTL_S = 30.0
#: owners of the pins a prefill keeps for the decode side (``pd:<request id>``): the decode agent
#: that fetched any of their chunks may release them once its fetch is over.
HANDOFF_PREFIX = "pd:"
#: the owner of a session's grant on a staging slab (``peer_stage``): written, never committed by the peer
STAGED = "staged"
#: pending challenges kept at most.
MAX_CHALLENGES = 4096


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


#: roles of the agents a fetch may come from: a prefill side keeps its chunks for decode, a
#: ``both`` agent serves reuse; a decode agent serves nobody (a proxy that names no role: "")
SERVING_ROLES = ("prefill", "both", "")


def warm_targets(role: str, own_address: str, peers: Sequence[tuple[str, ...]]) -> list[str]:
    """Peer addresses this agent will fetch from, from the proxy's list: none for a prefill agent
    (it only serves: the decode side pulls), else every other agent that serves, prefill ones first."""
    if role == "prefill":
        return []
    rows = [(p[3] if len(p) > 3 else "", p[1]) for p in peers if len(p) > 1 and p[1] and p[1] != own_address]
    rows = [r for r in rows if r[0] in SERVING_ROLES]
    rows.sort(key=lambda r: r[0] != "prefill")
    return [address for _role, address in rows]


class PeerService:
    """The peer socket's handlers of one agent (see the module docstring). ``ping`` answers ``ping``."""

    def __init__(self, ctx: AgentContext, ping: Callable[[Any], Any]) -> None:
        self.ctx = ctx
        self.secret = ctx.secret
        self._ping = ping
        cfg = ctx.config
        self.sessions = Sessions(lambda op: ctx.metrics.peer_denied.labels(op=op).inc())
        self.expected = Expectations()
        #: chunks peers pushed layer by layer for a request of ours (``pdx.agent.push``)
        self.staging = Staging(self._settle_staged)
        #: request id -> the agent this agent pushed its chunks to (``Pushes.pushed_to``; set by the server)
        self.pushed_to: Callable[[str], str] | None = None
        self.known = KnownPeers(cfg.transport.peers, bool(cfg.registration.proxy_url))
        #: asks the proxy for its current list of agents (set when registration is on); blocking
        self.refresh_known: Callable[[], object] | None = None
        #: told the peer addresses worth keeping warm whenever the proxy's list arrives (never blocks)
        self.warm: Callable[[list[str]], None] | None = None
        self._refreshed = 0.0
        self._challenges: OrderedDict[bytes, float] = OrderedDict()

    def listed(self, peers: Sequence[tuple[str, ...]]) -> None:
        """The proxy's list of agents arrived (``(agent_id, peer_address, identity_key, role)``, the
        registration thread): they are the known agents now, and those this one fetches from are
        warmed (``warm_targets``)."""
        self.known.update(peers)
        if self.warm is not None:
            self.warm(warm_targets(self.ctx.config.role, self.ctx.peer_address, peers))

    # --- serving peers (control-loop thread) ---------------------------------------------------

    def handlers(self) -> dict[Op, Any]:
        return {Op.PING: lambda a, _s: self._ping(a), Op.PEER_HELLO: self.h_hello, Op.PEER_PIN: self.h_pin,
                Op.PEER_UNPIN: self.h_unpin, Op.PEER_RELEASE: self.h_release,
                Op.PEER_RESERVE: self.h_reserve, Op.PEER_COMMIT: self.h_commit, Op.PEER_ABORT: self.h_abort,
                Op.PEER_STAGE: self.h_stage, Op.PEER_STAGED: self.h_staged}

    def check_auth(self, req: Request) -> Session | None:
        """The peer endpoint's gate: every op but hello/ping needs a live session token."""
        if req.op in (Op.PEER_HELLO, Op.PING):
            return None
        try:
            return self.sessions.get(req.auth)
        except AuthError:
            self.ctx.metrics.auth_failures.inc()
            self.sessions.deny(None, req.op.value, "no valid session")
            raise

    def quota(self) -> int:
        """Slabs one peer may hold pinned or reserved here at once."""
        store = self.ctx.store
        count = store.slab_count if store is not None else 0
        return max(1, int(count * self.ctx.config.control.peer_max_share))

    def h_hello(self, a: HelloArgs, _s: None) -> HelloReply:
        ctx = self.ctx
        _store, transport, layout = ctx.require_store()
        if a.chunk_fingerprint and a.chunk_fingerprint != layout.chunk_fingerprint:
            raise PeerIncompatible(f"chunk fingerprint: peer {a.chunk_fingerprint}, "
                                   f"this agent {layout.chunk_fingerprint}")
        if a.address and not self.known.name_matches(a.address, a.agent_id):
            raise self.sessions.deny(None, "peer_hello", f"{a.address} is registered under another "
                                     f"agent id than {a.agent_id!r}")
        signature = b""
        if self.secret:
            now = time.monotonic()
            if not a.proof:  # step 1: issue a challenge and prove we know the secret
                nonce = os.urandom(16)
                self._challenges[nonce] = now + CHALLENGE_TTL_S
                while len(self._challenges) > MAX_CHALLENGES:
                    self._challenges.popitem(last=False)
                return HelloReply(challenge=nonce, proof=server_proof(self.secret, a.nonce, nonce))
            expires = self._challenges.pop(a.server_nonce, 0.0)
            if expires < now or not proof_ok(client_proof(self.secret, a.nonce, a.server_nonce), a.proof):
                ctx.metrics.auth_failures.inc()
                raise AuthError("the peer failed the shared-secret challenge")
            self._check_identity(a)
            if ctx.identity is not None:  # prove ours in turn
                signature = ctx.identity.sign(hello_transcript(b"S", a.nonce, a.server_nonce, ctx.agent_id,
                                                               ctx.peer_address))
        # the key the transport's data connections prove (they run no challenge of their own)
        secret, server_nonce = self.secret, a.server_nonce if self.secret else b""
        session = self.sessions.open(a.agent_id, a.address,
                                     lambda token: session_key(secret, a.nonce, server_nonce, token))
        return HelloReply(agent_id=ctx.agent_id, instance=ctx.instance, chunk_fingerprint=layout.chunk_fingerprint,
                          fingerprint=layout.fingerprint, transport=transport.name,
                          transport_address=ctx.transport_address, token=session.token, secret=bool(self.secret),
                          signature=signature)

    def _check_identity(self, a: HelloArgs) -> None:
        """An agent id the deployment registered (with the proxy) may only be claimed by the holder of
        that agent's key, from that agent's address: refused and counted otherwise."""
        known = self.known.identity_of(a.agent_id)
        if known is None:
            return
        address, key = known
        if a.address != address:
            raise self.sessions.deny(None, "peer_hello", f"{a.agent_id!r} is registered at {address}, "
                                     f"not {a.address or 'an unnamed address'}")
        if not identity_ok(key, a.signature, hello_transcript(b"C", a.nonce, a.server_nonce, a.agent_id,
                                                                a.address)):
            raise self.sessions.deny(None, "peer_hello", f"the hello is not signed with the key registered "
                                     f"for {a.agent_id!r}")

    def h_pin(self, a: PinArgs, s: Session) -> Any:
        """Pin keys for the peer (under an owner private to its session) and grant it their ranges."""
        ctx = self.ctx
        ctx.require_store()
        lease = min(a.lease_s or ctx.config.leases.remote_s, ctx.config.leases.max_s)
        keys: list[bytes] = a.keys
        with self.sessions.lock:
            room = max(0, self.quota() - s.held(time.monotonic()))
            s.owners.add(a.owner)
        if room < len(keys):
            self.sessions.deny(s, "peer_pin", f"quota: at most {self.quota()} slabs per peer")
        owner = s.owner(a.owner)
        granted, refused = keys[:room], keys[room:]

        def grant(rows: list[PinInfo]) -> list[PinInfo]:
            now = time.monotonic()
            with self.sessions.lock:
                for p in rows:
                    if p.lease_id:
                        s.add(s.pins, p.lease_id, Grant(p.offset, p.nbytes, now + p.expires_in_s, p.key, a.owner))
            return rows + [PinInfo(0, k) for k in refused]

        return then(pin_keys(ctx, granted, owner, lease, origin="peer"), grant)

    def h_unpin(self, a: UnpinArgs, s: Session) -> int:
        store, _t, _l = self.ctx.require_store()
        ids = a.lease_ids
        with self.sessions.lock:
            foreign = [i for i in ids if i not in s.pins]
        if foreign:
            raise self.sessions.deny(s, "peer_unpin", f"lease {foreign[0]} was not granted to this peer")
        n = sum(bool(store.unpin(lid)) for lid in ids)
        with self.sessions.lock:
            for lid in ids:
                s.drop_pin(lid)
        self.ctx.metrics.leases_released.inc(n)
        return n

    def h_release(self, a: OwnerArgs, s: Session) -> int:
        """Drop the pins of one of the peer's own owners, or of a request's hand-off owner (``pd:<id>``:
        the chunks a prefill kept for the decode side) of which this peer was granted a key."""
        store, _t, _l = self.ctx.require_store()
        name = a.owner
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
                # the decode side fetched at least one of the request's chunks (it may hold the others)
                ok = any(k in s.keys for k in keys)
            if not ok and name.startswith(HANDOFF_PREFIX) and self.pushed_to is not None:
                # or this agent pushed the request's chunks to that decode agent (layer-wise P/D)
                ok = bool(s.address) and self.pushed_to(name[len(HANDOFF_PREFIX):]) == s.address
            if not ok:
                raise self.sessions.deny(s, "peer_release", f"owner {name!r} is not this peer's")
            n = store.release_owner(name)
        self.ctx.metrics.leases_released.inc(n)
        return n

    def h_reserve(self, a: ReserveArgs, s: Session) -> list[ReserveRow]:
        """Reserve slabs for a push: only for keys this agent asked for (``expect``), within the quota."""
        store, _t, _l = self.ctx.require_store()
        keys: list[bytes] = a.keys
        unasked = next((k for k in keys if not self.expected.expected(k)), None)
        if unasked is not None:
            raise self.sessions.deny(s, "peer_reserve", f"chunk {unasked.hex()[:16]} was not asked for")
        nbytes = a.nbytes
        if not isinstance(nbytes, int) and len(nbytes) != len(keys):
            raise WireError("peer_reserve: 'nbytes' must be one size or one per key")
        present = store.lookup([ChunkKey(k) for k in keys]).tiers
        out: list[ReserveRow] = []
        now = time.monotonic()
        with self.sessions.lock:
            room = max(0, self.quota() - s.held(now))
        over = False
        for i, key in enumerate(keys):
            if present[i] is Tier.L1:
                out.append(ReserveRow(0, code=ErrorCode.PRESENT, error="already held here"))
                continue
            if room <= 0:
                over = True
                out.append(ReserveRow(0, code=ErrorCode.CAPACITY, error=f"at most {self.quota()} slabs per peer"))
                continue
            nb = nbytes if isinstance(nbytes, int) else nbytes[i]
            try:
                res = store.reserve(ChunkKey(key), nb)
            except StoreError as exc:
                out.append(ReserveRow(0, code=code_of(exc), error=str(exc)))
                continue
            room -= 1
            with self.sessions.lock:
                s.add(s.reservations, res.id, Grant(res.offset, res.nbytes, res.expires_at, key))
            out.append(ReserveRow(res.id, res.offset, res.nbytes))
        if over:
            self.sessions.deny(s, "peer_reserve", f"quota: at most {self.quota()} slabs per peer")
        return out

    def h_stage(self, a: StageArgs, s: Session) -> list[ReserveRow]:
        """Reserve staging slabs for the peer's layer-wise push of ``request_id`` (``pdx.agent.push``):
        within its quota, never visible to lookups; only this agent's fetch of the same request from
        the same peer commits them, re-hashed against the checksums of the peer's seal."""
        store, _t, _l = self.ctx.require_store()
        keys: list[bytes] = a.keys
        if len(a.nbytes) != len(keys):
            raise WireError("peer_stage: 'nbytes' needs one size per key")
        present = store.lookup([ChunkKey(k) for k in keys]).tiers
        out: list[ReserveRow] = []
        now = time.monotonic()
        with self.sessions.lock:
            room = max(0, self.quota() - s.held(now))
        for i, key in enumerate(keys):
            if present[i] is Tier.L1:
                out.append(ReserveRow(0, code=ErrorCode.PRESENT, error="already held here"))
                continue
            if room <= 0:
                out.append(ReserveRow(0, code=ErrorCode.CAPACITY, error=f"at most {self.quota()} slabs per peer"))
                continue
            try:
                res = store.reserve(ChunkKey(key), a.nbytes[i])
            except StoreError as exc:
                out.append(ReserveRow(0, code=code_of(exc), error=str(exc)))
                continue
            room -= 1
            with self.sessions.lock:
                s.add(s.reservations, res.id, Grant(res.offset, res.nbytes, res.expires_at, key, owner=STAGED))
            out.append(ReserveRow(res.id, res.offset, res.nbytes))
        ttl = self.ctx.config.store.l1.reservation_timeout_s
        self.staging.add(s.address, a.request_id, keys, out, ttl, session=s)
        return out

    def h_staged(self, a: StagedArgs, s: Session) -> int:
        if len(a.checksums) != len(a.ids) or len(a.num_tokens) != len(a.ids):
            raise WireError("peer_staged: 'checksums' and 'num_tokens' need one entry per id")
        self._own_reservations(s, a.ids, "peer_staged")
        return self.staging.seal(s.address, a.request_id, a.ids, a.checksums, a.num_tokens)

    def _settle_staged(self, session: Session | None, rid: int, abort: bool) -> None:
        """End a session's write grant on a staged slab (and abort the reservation if asked)."""
        if session is not None:
            with self.sessions.lock:
                session.drop_reservation(rid)
        if abort and self.ctx.store is not None:
            abort_ids(self.ctx.store, [rid])

    def _own_reservations(self, s: Session, ids: list[int], op: str) -> list[bytes]:
        with self.sessions.lock:
            foreign = [i for i in ids if i not in s.reservations]
            if not foreign:
                return [s.reservations[i].key for i in ids]
        raise self.sessions.deny(s, op, f"reservation {foreign[0]} was not made for this peer")

    def h_commit(self, a: PeerCommitArgs, s: Session) -> Deferred:
        keys = self._own_reservations(s, a.ids, "peer_commit")
        with self.sessions.lock:
            staged = next((i for i in a.ids if getattr(s.reservations.get(i), "owner", "") == STAGED), None)
        if staged is not None:  # staged slabs enter the store only through our own fetch
            raise self.sessions.deny(s, "peer_commit", f"reservation {staged} is staged, not pushed")

        def done(outcomes: list[Outcome]) -> list[Outcome]:
            with self.sessions.lock:
                for rid in a.ids:
                    s.drop_reservation(rid)
            self.expected.fulfilled(k for k, o in zip(keys, outcomes) if o.ok)
            return outcomes

        store, _t, _l = self.ctx.require_store()
        ids, sums, ntok = a.ids, a.checksums, a.num_tokens
        if len(sums) != len(ids) or (not isinstance(ntok, int) and len(ntok) != len(ids)):
            raise WireError("peer_commit: 'checksums' and a 'num_tokens' list need one entry per id")
        return cast(Deferred, then(self.ctx.deferred(commit_chunks, store, ids, sums, ntok), done))

    def h_abort(self, a: IdsArgs, s: Session) -> int:
        self._own_reservations(s, a.ids, "peer_abort")
        store, _t, _l = self.ctx.require_store()
        n = abort_ids(store, a.ids)
        with self.sessions.lock:
            for rid in a.ids:
                s.drop_reservation(rid)
        return n

    def data_guard(self, token: bytes, write: bool, ranges: Sequence[Sequence[int]]) -> str:
        """The transport's data-plane check (tcp serving threads): see ``Sessions.data_guard``."""
        return self.sessions.data_guard(token, write, ranges)

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
        self.ctx.metrics.unknown_peers.inc()
        log.warning("refused to dial %s: not an agent of this deployment (neither registered with the same "
                    "proxy nor in transport.peers); the engine recomputes", address)
        raise PeerDenied(f"{address} is not a known agent of this deployment (register it with the same "
                         "proxy or list it in transport.peers)")
