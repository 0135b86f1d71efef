"""Links to peer agents: one cached session per peer address (the dialing side).

``Links.link(address)`` (called by the transfer jobs, on their threads) says ``peer_hello`` on
the peer's socket (the deployment secret's challenge-response when a secret is set; always a
session token), connects the transport to the address the hello named, and makes the transport
present the same session token with every data-plane op, so the peer serves only what it granted
to this session. A link is dropped when the peer is gone, restarted, or our session expired; the
next job dials again. Thread-safe (links are created under a lock; a race keeps one).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from pdx.agent.client import AgentClient
from pdx.agent.context import AgentContext
from pdx.agent.protocol import HelloArgs, Op
from pdx.agent.trust import SESSION_IDLE_S, SESSION_MAX_S
from pdx.agent.types import HelloReply
from pdx.errors import AgentError, AuthError, PeerDenied
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

    def link(self, address: str, timeout: float) -> PeerLink:
        """The session with the peer at ``address`` (hello + transport connect on first use)."""
        now = time.monotonic()
        with self._links_lock:
            link = self._links.get(address)
            if link is not None and not link.stale(now):
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
        try:
            info, cred = self._hello(client, layout.chunk_fingerprint, hello_s)
            # the transport connection rides on this session (it proves the session key, no second
            # challenge), and the data plane names it: the peer serves only what it granted to it
            peer = transport.connect(info.transport_address, timeout=timeout, session=cred)
            transport.set_session(peer.peer_id, cred.handle)
        except BaseException:
            client.close()
            raise
        link = PeerLink(address, client, info.agent_id, peer.peer_id, info.transport_address,
                        created=now, used=now)
        client.on_restart = lambda _inst, a=address: self.drop_link(a)
        with self._links_lock:
            old = self._links.get(address)
            if old is not None:  # another thread won the race
                client.close()
                return old
            self._links[address] = link
        ctx.metrics.peers.set(len(self._links))
        log.info("peer session with %s at %s (transport %s at %s)", link.agent_id, address, transport.name,
                 link.transport_address)
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
        with self._links_lock:
            links, self._links = list(self._links.values()), {}
        for lk in links:
            lk.client.close()
