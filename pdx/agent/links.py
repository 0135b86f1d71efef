"""Links to peer agents: one cached session per peer address (the dialing side), kept warm.

``Links.link(address)`` (called by the transfer jobs, on their threads) says ``peer_hello`` on
the peer's socket (the deployment secret's challenge-response when a secret is set; always a
session token), connects the transport to the address the hello named, and makes the transport
present the same session token with every data-plane op, so the peer serves only what it granted
to this session. A link is dropped when the peer is gone, restarted, or our session expired; the
next job dials again. Thread-safe (links are created under a lock; a race keeps one).

Warm links (``transport.warm_links``, on by default): ``Links.want(addresses)`` names the peers this
agent will fetch from (``transport.peers``, and the proxy's list of agents that can serve it); a
``Warmer`` thread opens their links in the background as soon as the store is up (hello, transport
connect, ``Transport.prepare``: the data streams), so the first fetch finds them ready. Each attempt
runs on a small pool of its own, bounded by the hello's and the connect's timeouts; a peer that fails
is retried with a doubling back-off (0.5 s to 10 s) and never delays a job, registration or the control
loop. A warm link's peer is pinged every ``transport.warm_probe_s``: a restarted peer answers with
a new instance, which drops the link, and the warmer opens a new one; a link that nears the end of its
session (idle or too old) is renewed the same way.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import msgspec

from pdx.agent.client import AgentClient
from pdx.agent.context import AgentContext
from pdx.agent.protocol import HelloArgs, NoArgs, Op
from pdx.agent.trust import SESSION_IDLE_S, SESSION_MAX_S
from pdx.agent.types import HelloReply
from pdx.errors import AgentError, AuthError, PdxError, PeerDenied
from pdx.transport.base import SessionCred
from pdx.transport.handshake import (
    client_proof,
    hello_transcript,
    identity_ok,
    proof_ok,
    server_proof,
    session_handle,
    session_key,
)

log = logging.getLogger("pdx.agent.peers")


@dataclass
class PeerLink:
    """A session with one peer agent: its control client and transport peer id."""

    address: str
    client: AgentClient
    agent_id: str
    transport_peer: Any  # pdx.transport.base.PeerId
    transport_address: str
    created: float = 0.0  # monotonic time of the hello
    used: float = 0.0  # last time a job took this link
    session_handle: bytes = b""  # the session the transport connection must carry (``session_bound``)

    def stale(self, now: float) -> bool:
        """True when the peer may have let our session lapse (``pdx.agent.trust``): say hello again
        before a job, rather than have that job fail on an expired token."""
        return now - self.used > SESSION_IDLE_S / 2 or now - self.created > SESSION_MAX_S * 0.9


class Links:
    """The sessions this agent opened with peers (see the module docstring)."""

    def __init__(self, ctx: AgentContext,
                 key_at: Callable[[str], tuple[str, str] | None] = lambda _address: None) -> None:
        self.ctx = ctx
        #: ``(agent id, public key)`` the deployment registered at a peer address (``KnownPeers.key_at``)
        self._key_at = key_at
        self.secret = ctx.secret
        self._links: dict[str, PeerLink] = {}
        self._links_lock = threading.Lock()
        self.warmer: Warmer | None = Warmer(self) if ctx.config.transport.warm_links else None
        if self.warmer is not None and ctx.config.transport.peers:
            self.want([])

    def want(self, addresses: Iterable[str]) -> None:
        """The peers to keep warm now, besides ``transport.peers`` (replaces the previous set;
        never blocks)."""
        if self.warmer is not None:
            self.warmer.want([*self.ctx.config.transport.peers, *addresses])

    def get(self, address: str) -> PeerLink | None:
        """The link with ``address`` if one is open (not necessarily fresh)."""
        with self._links_lock:
            return self._links.get(address)

    def warm_count(self) -> int:
        """Peers wanted warm whose link is open now."""
        return self.warmer.warm_count() if self.warmer is not None else 0

    def link(self, address: str, timeout: float) -> PeerLink:
        """The session with the peer at ``address`` (hello + transport connect on first use)."""
        now = time.monotonic()
        with self._links_lock:
            link = self._links.get(address)
            if link is not None and not link.stale(now) and self.bound(link):
                link.used = now
                return link
        if link is not None:
            self.drop_link(address)
        ctx = self.ctx
        _store, transport, layout = ctx.require_store()
        # A dead peer answers nothing (ZMQ connects lazily): the hello, not the job's whole
        # deadline, is what bounds finding that out.
        hello_s = min(timeout, ctx.config.control.request_timeout_s)
        client = AgentClient(address, timeout_s=hello_s, max_frame=ctx.config.control.max_frame)
        t0 = time.perf_counter()
        try:
            info, cred = self._hello(client, layout.chunk_fingerprint, hello_s)
            t1 = time.perf_counter()
            # the transport connection rides on this session (it proves the session key, no second
            # challenge), and the data plane names it: the peer serves only what it granted to it
            peer = transport.connect(info.transport_address, timeout=timeout, session=cred)
            transport.set_session(peer.peer_id, cred.handle)
            t2 = time.perf_counter()
        except BaseException:
            client.close()
            raise
        link = PeerLink(address, client, info.agent_id, peer.peer_id, info.transport_address,
                        created=now, used=now, session_handle=cred.handle)
        client.on_restart = lambda _inst, a=address: self.drop_link(a)
        with self._links_lock:
            old = self._links.get(address)
            if old is not None:  # another thread won the race
                client.close()
                return old
            self._links[address] = link
        ctx.metrics.peers.set(len(self._links))
        log.info("peer session with %s at %s (transport %s at %s): hello %.1f ms, connect %.1f ms", link.agent_id,
                 address, transport.name, link.transport_address, (t1 - t0) * 1e3, (t2 - t1) * 1e3)
        return link

    def _hello(self, client: AgentClient, chunk_fp: str, timeout: float) -> tuple[HelloReply, SessionCred]:
        nonce = os.urandom(16)
        challenge = b""
        args = HelloArgs(agent_id=self.ctx.agent_id, address=self.ctx.peer_address, chunk_fingerprint=chunk_fp,
                         nonce=nonce)
        reply: HelloReply = client.call(Op.PEER_HELLO, args, timeout)
        if reply.challenge:
            if not self.secret:
                raise AuthError(f"peer at {client.address} requires a shared secret and none is configured here")
            challenge = reply.challenge
            if not proof_ok(server_proof(self.secret, nonce, challenge), reply.proof):
                raise AuthError(f"peer at {client.address} failed the shared-secret challenge")
            ctx = self.ctx
            signature = b""
            if ctx.identity is not None:
                signature = ctx.identity.sign(hello_transcript(b"C", nonce, challenge, ctx.agent_id, ctx.peer_address))
            args = msgspec.structs.replace(args, server_nonce=challenge,
                                           proof=client_proof(self.secret, nonce, challenge), signature=signature)
            reply = client.call(Op.PEER_HELLO, args, timeout)
            self._check_identity(client.address, reply, nonce, challenge)
        elif self.secret:
            raise AuthError(f"a shared secret is configured here but the peer at {client.address} has none")
        if not reply.token:
            raise AgentError(f"peer at {client.address}: peer_hello answered no session token")
        client.auth = reply.token
        key = session_key(self.secret if challenge else "", nonce, challenge, reply.token)
        return reply, SessionCred(session_handle(reply.token), key)

    def _check_identity(self, address: str, reply: HelloReply, nonce: bytes, challenge: bytes) -> None:
        """The agent answering at ``address`` must be the one the deployment registered there, proven
        with its key (when the deployment published one)."""
        known = self._key_at(address)
        if known is None:
            return
        agent_id, key = known
        if reply.agent_id != agent_id or not identity_ok(
                key, reply.signature, hello_transcript(b"S", nonce, challenge, reply.agent_id, address)):
            self.ctx.metrics.peer_denied.labels(op="peer_hello").inc()
            raise PeerDenied(f"the agent at {address} is not {agent_id!r} (not signed with its registered key)")

    def bound(self, link: PeerLink) -> bool:
        """Whether the transport connection to the link's peer still carries the link's session. It
        does not once that connection was replaced (both agents dialled each other at once, as warm
        links make likely, or a reconnect): the peer would refuse every data op, so the link is
        opened again (a new hello, bound to the live connection)."""
        transport = self.ctx.transport
        if transport is None or not link.session_handle:
            return True
        return transport.session_bound(link.transport_peer, link.session_handle)

    def drop_link(self, address: str) -> None:
        with self._links_lock:
            link = self._links.pop(address, None)
        if link is not None:
            self.ctx.metrics.peers.set(len(self._links))
            threading.Thread(target=link.client.close, daemon=True).start()

    def links(self) -> list[dict[str, str]]:
        with self._links_lock:
            return [{"address": lk.address, "agent_id": lk.agent_id, "transport_address": lk.transport_address}
                    for lk in self._links.values()]

    def close(self) -> None:
        if self.warmer is not None:
            self.warmer.close()
        with self._links_lock:
            links, self._links = list(self._links.values()), {}
        for lk in links:
            lk.client.close()


#: first and longest wait before trying a peer that failed to warm again
WARM_RETRY_S = (0.5, 10.0)
#: warm attempts that may run at once (each bounded by the hello's and the connect's timeouts)
WARM_WORKERS = 2
#: how long before its session would lapse (``PeerLink.stale``) a warm link is renewed ...
RENEW_AHEAD_S = 30.0
#: ... once no job took it for this long
RENEW_IDLE_S = 5.0


class Warmer:
    """Opens and keeps open the links ``Links.want`` named (see the module docstring).

    One daemon thread decides what to do (started by the first ``want`` with an address); the hellos
    and connects run on ``WARM_WORKERS`` threads of their own. ``warm_count()``, ``want()`` and
    ``close()`` may be called from any thread.
    """

    def __init__(self, links: Links) -> None:
        self.links = links
        cfg = links.ctx.config
        self.max = cfg.transport.warm_links_max
        self.probe_s = cfg.transport.warm_probe_s
        self._wanted: list[str] = []
        self._busy: set[str] = set()
        self._retry: dict[str, tuple[float, float]] = {}  # address -> (not before, next back-off)
        self._probed: dict[str, float] = {}
        self._lock = threading.RLock()  # reentrant: ``wait_for`` predicates may call ``warm_count``
        #: notified after every attempt and probe (``wait_for``)
        self._done = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self.attempts = 0
        self.failures = 0

    def want(self, addresses: Iterable[str]) -> None:
        wanted = list(dict.fromkeys(a for a in addresses if a))[: self.max]
        with self._lock:
            if wanted == self._wanted:
                return
            gone = set(self._wanted) - set(wanted)
            self._wanted = wanted
            for a in gone:
                self._retry.pop(a, None)
                self._probed.pop(a, None)
            if wanted and self._thread is None and not self._stop.is_set():
                self._pool = ThreadPoolExecutor(WARM_WORKERS, thread_name_prefix="pdx-agent-warm")
                self._thread = threading.Thread(target=self._run, name="pdx-agent-warmer", daemon=True)
                self._thread.start()
        self._wake.set()

    def warm_count(self) -> int:
        with self._lock:
            wanted = list(self._wanted)
        return sum(1 for a in wanted if self.links.get(a) is not None)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        thread, pool = self._thread, self._pool
        if thread is not None:
            thread.join(5.0)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    # --- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self._tick(time.monotonic())
            except Exception:  # never let the warmer die: the links still open on first use
                log.exception("warming peer links")
                wait = 5.0
            self._wake.wait(wait)
            self._wake.clear()

    def _tick(self, now: float) -> float:
        """Start what is due; returns how long to sleep before the next check."""
        ctx = self.links.ctx
        if ctx.transport is None:
            return 0.5  # no engine registered yet: no transport to connect with
        with self._lock:
            wanted = [a for a in self._wanted if a != ctx.peer_address and a not in self._busy]
        wait = self.probe_s
        for address in wanted:
            link = self.links.get(address)
            if link is not None and (not link.stale(now + RENEW_AHEAD_S) or now - link.used < RENEW_IDLE_S):
                # fresh, or a job took it a moment ago (renewing would pull it from under that job)
                due = self._probed.get(address, 0.0) + self.probe_s
                if due <= now:
                    self._submit(address, self._probe, link)
                else:
                    wait = min(wait, due - now)
                continue
            not_before, _backoff = self._retry.get(address, (0.0, WARM_RETRY_S[0]))
            if not_before > now:
                wait = min(wait, not_before - now)
                continue
            self._submit(address, self._open, link)
        return max(0.05, wait)

    def _submit(self, address: str, fn: Callable[[str, PeerLink | None], None], link: PeerLink | None) -> None:
        pool = self._pool
        if pool is None:
            return
        with self._lock:
            self._busy.add(address)
        try:
            pool.submit(self._guarded, fn, address, link)
        except RuntimeError:  # shut down meanwhile
            with self._lock:
                self._busy.discard(address)

    def _guarded(self, fn: Callable[[str, PeerLink | None], None], address: str, link: PeerLink | None) -> None:
        try:
            fn(address, link)
        except Exception:
            log.exception("warming the link with %s", address)
        finally:
            with self._lock:
                self._busy.discard(address)
                self._done.notify_all()
            self._wake.set()

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Until ``predicate()`` holds, checked after each attempt or probe ends (tests, benches)."""
        with self._done:
            return self._done.wait_for(predicate, timeout)

    def _open(self, address: str, stale: PeerLink | None) -> None:
        """Open (or renew) the link with ``address``: hello, transport connect, data streams."""
        if self._stop.is_set():
            return
        ctx = self.links.ctx
        cfg = ctx.config
        timeout = max(cfg.control.request_timeout_s, cfg.transport.connect_timeout_s)
        self.attempts += 1
        t0 = time.perf_counter()
        try:
            if stale is not None:
                self.links.drop_link(address)
            link = self.links.link(address, timeout)
            transport = ctx.transport
            ready = transport.prepare(link.transport_peer, cfg.transport.connect_timeout_s) \
                if transport is not None else False
        except (PdxError, OSError) as exc:
            self.failures += 1
            with self._lock:
                _nb, backoff = self._retry.get(address, (0.0, WARM_RETRY_S[0]))
                if address in self._wanted:
                    self._retry[address] = (time.monotonic() + backoff, min(backoff * 2, WARM_RETRY_S[1]))
            log.log(logging.INFO if backoff <= WARM_RETRY_S[0] else logging.DEBUG,
                    "cannot warm the link with %s (retry in %.1fs): %s: %s", address, backoff,
                    type(exc).__name__, exc)
            return
        with self._lock:
            self._retry.pop(address, None)
            self._probed[address] = time.monotonic()
        log.info("warm link with %s (%s) in %.1f ms%s", address, link.agent_id, (time.perf_counter() - t0) * 1e3,
                 "" if ready else "; its data streams open on first use")

    def _probe(self, address: str, link: PeerLink | None) -> None:
        """Ping a warm link's peer: a restart (new instance) drops the link, silence drops it too."""
        if link is None or self._stop.is_set():
            return
        timeout = self.links.ctx.config.control.request_timeout_s
        with self._lock:
            self._probed[address] = time.monotonic()
        if not self.links.bound(link):
            log.info("warm link with %s: its transport connection was replaced: reconnecting", address)
            if self.links.get(address) is link:
                self.links.drop_link(address)
            return
        try:
            link.client.call(Op.PING, NoArgs(), timeout)
        except (PdxError, OSError) as exc:
            log.info("warm link with %s lost (%s: %s): reconnecting", address, type(exc).__name__, exc)
            if self.links.get(address) is link:
                self.links.drop_link(address)
