"""Agent identity in ``peer_hello``: an agent that holds the deployment secret still cannot speak as
another registered agent. Real ``PeerService`` (the answering side) and ``Links`` (the dialing side),
every message through the wire schema; only the socket is replaced by a direct call."""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest

from pdx.agent.context import AgentContext
from pdx.agent.jobs import JobTable
from pdx.agent.links import Links
from pdx.agent.metrics import AgentMetrics
from pdx.agent.peers import PeerService
from pdx.agent.protocol import Op, decode_reply, decode_request, encode_error, encode_reply, encode_request
from pdx.agent.types import HelloReply
from pdx.config import AgentConfig, L1Config, RegistrationConfig, StoreConfig
from pdx.errors import AuthError, PdxError, PeerDenied
from pdx.store.store import ChunkStore
from pdx.transport.base import SessionCred
from pdx.transport.handshake import Identity, hello_transcript, identity_ok

SECRET = "s" * 32
FP = "fp-identity"
SLAB = 4096


@dataclass
class _Layout:
    chunk_fingerprint: str = FP
    fingerprint: str = "layout-fp"


class _Transport:
    name = "tcp"


class Agent:
    """One agent's context, peer service and links (no sockets)."""

    def __init__(self, agent_id: str, address: str, secret: str = SECRET, proxy: bool = True) -> None:
        cfg = AgentConfig(store=StoreConfig(chunk_tokens=16, l1=L1Config(capacity=8 * SLAB)),
                          registration=RegistrationConfig(proxy_url="http://127.0.0.1:1" if proxy else ""))
        self.store = ChunkStore(cfg.store, SLAB, FP)
        self.ctx = AgentContext(
            config=cfg, agent_id=agent_id, instance=f"inst-{agent_id}", secret=secret, metrics=AgentMetrics(),
            jobs=JobTable(60.0, 10), transfers=ThreadPoolExecutor(1), control=ThreadPoolExecutor(1),
            store=self.store, transport=_Transport(), layout=_Layout(),  # type: ignore[arg-type]
            transport_address="127.0.0.1:9", peer_address=address, identity=Identity())
        self.peers = PeerService(self.ctx, ping=lambda _a: None)
        self.links = Links(self.ctx, key_at=self.peers.known.key_at)

    def denied(self, op: str = "peer_hello") -> float:
        return self.ctx.metrics.value("pdx_agent_peer_denied_total", {"op": op})

    def close(self) -> None:
        self.store.close()
        self.ctx.transfers.shutdown()
        self.ctx.control.shutdown()


class Wire:
    """A client of ``server``'s peer socket: every request and reply goes through the wire schema."""

    def __init__(self, server: Agent, address: str) -> None:
        self.server = server
        self.address = address
        self.auth = b""

    def call(self, op: Op, args: Any = None, timeout: float | None = None) -> Any:
        req = decode_request(encode_request(1, op, args, self.auth))
        try:
            result = self.server.peers.h_hello(req.args, None)
            frame = encode_reply(1, result, "i")
        except PdxError as exc:
            frame = encode_error(1, exc, "i")
        reply = decode_reply(frame)
        if reply.error is not None:
            raise reply.error
        return reply.result(op)


PREFILL, DECODE, ROGUE = "tcp://10.0.0.1:7001", "tcp://10.0.0.2:7002", "tcp://10.0.0.3:7003"


@pytest.fixture
def fleet() -> Iterator[tuple[Agent, Agent, Agent]]:
    """A prefill and a decode agent registered with the proxy, and a rogue that holds the secret."""
    prefill, decode, rogue = Agent("prefill-0", PREFILL), Agent("decode-0", DECODE), Agent("rogue", ROGUE)
    registered = [("prefill-0", PREFILL, prefill.ctx.identity.public),  # type: ignore[union-attr]
                  ("decode-0", DECODE, decode.ctx.identity.public)]  # type: ignore[union-attr]
    for a in (prefill, decode, rogue):
        a.peers.known.update(registered)
    yield prefill, decode, rogue
    for a in (prefill, decode, rogue):
        a.close()


def hello_cred(dialer: Agent, server: Agent, address: str) -> tuple[HelloReply, SessionCred]:
    client = Wire(server, address)
    return dialer.links._hello(client, FP, 5.0)  # type: ignore[arg-type]


def hello(dialer: Agent, server: Agent, address: str) -> HelloReply:
    return hello_cred(dialer, server, address)[0]


def test_registered_agents_prove_who_they_are_both_ways(fleet: tuple[Agent, Agent, Agent]) -> None:
    prefill, decode, _rogue = fleet
    reply, cred = hello_cred(decode, prefill, PREFILL)
    assert reply.token and reply.agent_id == "prefill-0" and reply.signature
    # both ends derived the same session key; the transport finds it by the handle, not the token
    assert prefill.peers.sessions.lookup(cred.handle) == (cred.key, reply.token)
    assert cred.handle != reply.token and prefill.peers.sessions.lookup(reply.token) is None
    assert identity_ok(prefill.ctx.identity.public, reply.signature,  # type: ignore[union-attr]
                       hello_transcript(b"S", b"x", b"y", "prefill-0", PREFILL)) is False  # bound to the nonces
    assert prefill.denied() == 0 and decode.denied() == 0


def test_the_secret_does_not_let_one_agent_speak_as_another(fleet: tuple[Agent, Agent, Agent]) -> None:
    prefill, _decode, rogue = fleet
    # the rogue holds the secret, claims the decode agent's name and address, signs with its own key
    rogue.ctx.agent_id, rogue.ctx.peer_address = "decode-0", DECODE
    with pytest.raises(PeerDenied, match="not signed with the key registered for 'decode-0'"):
        hello(rogue, prefill, PREFILL)
    # the same name from its own address
    rogue.ctx.peer_address = ROGUE
    with pytest.raises(PeerDenied, match=re.escape("'decode-0' is registered at tcp://10.0.0.2:7002")):
        hello(rogue, prefill, PREFILL)
    # no signature at all
    rogue.ctx.peer_address, rogue.ctx.identity = DECODE, None
    with pytest.raises(PeerDenied, match="not signed"):
        hello(rogue, prefill, PREFILL)
    # the decode agent's address under another name
    rogue.ctx.agent_id, rogue.ctx.identity = "someone", Identity()
    with pytest.raises(PeerDenied, match="registered under another agent id"):
        hello(rogue, prefill, PREFILL)
    assert prefill.denied() == 4
    assert not prefill.peers.sessions._by_token  # no session opened


def test_an_agent_answering_at_a_registered_address_must_be_that_agent(fleet: tuple[Agent, Agent, Agent]) -> None:
    _prefill, decode, rogue = fleet
    # the rogue answers at the prefill agent's address (holding the secret) under the prefill's name
    rogue.ctx.agent_id, rogue.ctx.peer_address = "prefill-0", PREFILL
    with pytest.raises(PeerDenied, match=re.escape("the agent at tcp://10.0.0.1:7001 is not 'prefill-0'")):
        hello(decode, rogue, PREFILL)
    assert decode.denied() == 1


def test_unregistered_names_and_the_secret(fleet: tuple[Agent, Agent, Agent]) -> None:
    """A name the deployment did not register claims nobody's identity: it gets a session (and only
    its own grants); the secret is still required."""
    prefill, _decode, rogue = fleet
    assert hello(rogue, prefill, PREFILL).token
    outsider = Agent("outsider", "tcp://10.0.0.9:1", secret="wrong")
    try:
        with pytest.raises(AuthError):
            hello(outsider, prefill, PREFILL)
    finally:
        outsider.close()
