"""Adapters between the connector halves and ``pdx.agent.client.AgentClient``.

``SchedulerPort`` gives the scheduler half the three calls it makes (leading-run
lookup, pin for a remote reader, release), each bounded by its own timeout so
the scheduler's loop never waits long on the agent. The worker half uses the
client directly (see ``pdx.connector.worker.WorkerAgent``).

``agent_info`` asks a running agent what the scheduler half must agree on with
the worker half and with peers: chunk size, chunk fingerprint, namespace and
the agent's peer address.

Thread-safety: as ``AgentClient`` (safe to share).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pdx.errors import AgentUnavailable


class SchedulerPort:
    """The scheduler half's view of the local agent (implements ``SchedulerAgent``)."""

    def __init__(self, client: Any, lookup_timeout_s: float, lookup_remote: bool,
                 call_timeout_s: float) -> None:
        self.client = client
        self.lookup_timeout_s = lookup_timeout_s
        self.lookup_remote = lookup_remote
        self.call_timeout_s = call_timeout_s

    def lookup_prefix(self, keys: Sequence[bytes]) -> tuple[int, int]:
        info = self.client.lookup(keys, remote=self.lookup_remote, timeout=self.lookup_timeout_s)
        in_l1 = 0
        for tier in info.tiers:
            if tier != "l1":
                break
            in_l1 += 1
        return int(info.prefix_chunks), in_l1

    def lookup_tails(self, keys: Sequence[bytes]) -> tuple[int, bool]:
        """The first of ``keys`` (candidate tails, longest first) present in L1 or a local tier:
        ``(its index or -1, whether it is in L1)``. Remote tiers are not probed (a probe asks for
        up to a chunk's worth of keys, nearly all absent)."""
        info = self.client.lookup(keys, remote=False, timeout=self.lookup_timeout_s, probe=True)
        for i, tier in enumerate(info.tiers):
            if tier is not None:
                return i, tier == "l1"
        return -1, False

    def pin_prefix(self, keys: Sequence[bytes], owner: str, lease_s: float) -> int:
        pins = self.client.pin(keys, owner=owner, lease_s=lease_s, timeout=self.call_timeout_s)
        n = 0
        for p in pins:
            if not p.found:
                break
            n += 1
        return n

    def release(self, owner: str) -> None:
        self.client.release(owner, timeout=self.call_timeout_s)


@dataclass(frozen=True)
class AgentInfo:
    """What the agent says about itself (from its status document)."""

    chunk_tokens: int
    peer_address: str
    chunk_fingerprint: str  # empty until an engine registered its layout
    namespace: str


def agent_info(client: Any, wait_registered_s: float = 0.0) -> AgentInfo:
    """Read the agent's status; wait up to ``wait_registered_s`` for an engine registration
    (the worker half registers before vLLM builds its scheduler, so this is normally at once).

    Raises ``AgentUnavailable`` when the agent does not answer.
    """
    deadline = time.monotonic() + wait_registered_s
    while True:
        doc = client.stats()
        fp = str(doc.get("chunk_fingerprint") or "")
        if fp or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    try:
        control = doc.get("control") or {}
        return AgentInfo(chunk_tokens=int(doc["chunk_tokens"]),
                         peer_address=str(control.get("peer_address") or ""),
                         chunk_fingerprint=fp,
                         namespace=str(doc.get("namespace") or ""))
    except (KeyError, TypeError, ValueError) as exc:
        raise AgentUnavailable(f"unexpected status document from the agent: {exc}") from None


__all__ = ["AgentInfo", "SchedulerPort", "agent_info"]
