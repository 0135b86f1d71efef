"""The agent -> proxy announcement: who a worker is, how loaded, which chunks it holds.

Every ``pdx-agent`` that has a proxy address in its config POSTs an
``AgentAnnouncement`` to the proxy's ``/admin/register`` when it starts and then
every ``heartbeat_s`` seconds. There is no separate registration step: each
heartbeat is a full announcement, so a proxy that restarts learns every agent
again within one period, and an agent that restarts simply announces itself anew.
An agent that stops sends one last announcement with ``leaving=True``.

Body encodings accepted by the proxy: JSON (``application/json``) or msgpack
(``application/msgpack``) of ``to_dict()``; both carry only str/int/float/bool/
list/dict/None. Never pickle.

Compatibility: ``wire_version`` must equal ``WIRE_VERSION``; fields are added only
with a version bump, and an unknown field is an error (so a typo is not silently
ignored). ``from_dict`` raises ``WireError`` naming the field.

Frozen dataclasses: immutable, safe to share between threads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from pdx.errors import WireError
from pdx.scheduler.summary import KeySummary

WIRE_VERSION = 1

#: longest accepted string field (URLs, ids, fingerprints).
MAX_STR = 2048
#: most model names in one announcement.
MAX_MODELS = 64


class WorkerRole(str, Enum):
    """What a worker does in the P/D split. ``BOTH`` can take either side."""

    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"

    @property
    def prefills(self) -> bool:
        return self is not WorkerRole.DECODE

    @property
    def decodes(self) -> bool:
        return self is not WorkerRole.PREFILL


@dataclass(frozen=True)
class AgentLoad:
    """The engine's load as its agent sees it (all requests, not only this proxy's)."""

    requests: int = 0  # requests running or waiting in the engine
    tokens: int = 0  # their prompt + max new tokens, as far as the agent knows
    pool_used_bytes: int = 0
    pool_capacity_bytes: int = 0


@dataclass(frozen=True)
class AgentAnnouncement:
    """One registration / heartbeat from an agent.

    ``engine_url`` (the engine's OpenAI HTTP server) identifies the worker: a
    worker listed statically in the proxy config with the same URL is the same
    worker. ``chunk_fingerprint``, ``chunk_tokens`` and ``namespace`` are what
    ``pdx.keys.chunk_keys`` needs to compute keys comparable with ``keys``.
    ``timestamp`` is the sender's wall clock (seconds since the epoch), for logs;
    liveness is judged by the proxy's own clock at receipt.
    """

    agent_id: str
    role: WorkerRole
    engine_url: str
    agent_url: str = ""  # the agent's HTTP endpoint (/healthz, /readyz, /metrics)
    control_address: str = ""  # the agent's ZMQ control plane (tcp:// or ipc://)
    transport_address: str = ""  # host:port of its peer transport handshake
    models: tuple[str, ...] = ()
    load: AgentLoad = field(default_factory=AgentLoad)
    chunk_fingerprint: str = ""
    chunk_tokens: int = 0
    namespace: str = ""
    keys: KeySummary | None = None  # chunks held (all tiers the agent can serve quickly)
    #: ids of the shared tiers the agent writes every chunk to (``pdx.config.shared_tier_ids``):
    #: a chunk any worker with that tier computed is one this worker can load
    shared_tiers: tuple[str, ...] = ()
    heartbeat_s: float = 1.0  # the sender's announcement period
    seq: int = 0  # increases with every announcement of one agent process
    timestamp: float = 0.0
    leaving: bool = False
    wire_version: int = WIRE_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "wire_version": self.wire_version,
            "agent_id": self.agent_id,
            "role": self.role.value,
            "engine_url": self.engine_url,
            "agent_url": self.agent_url,
            "control_address": self.control_address,
            "transport_address": self.transport_address,
            "models": list(self.models),
            "load": {"requests": self.load.requests, "tokens": self.load.tokens,
                     "pool_used_bytes": self.load.pool_used_bytes,
                     "pool_capacity_bytes": self.load.pool_capacity_bytes},
            "chunk_fingerprint": self.chunk_fingerprint,
            "chunk_tokens": self.chunk_tokens,
            "namespace": self.namespace,
            "keys": self.keys.to_dict() if self.keys is not None else None,
            "shared_tiers": list(self.shared_tiers),
            "heartbeat_s": self.heartbeat_s,
            "seq": self.seq,
            "timestamp": self.timestamp,
            "leaving": self.leaving,
        }

    @classmethod
    def from_dict(cls, raw: Any) -> AgentAnnouncement:
        """Validate and build; raises ``WireError`` naming the first bad field."""
        if not isinstance(raw, Mapping):
            raise WireError(f"announcement: expected a mapping, got {type(raw).__name__}")
        version = raw.get("wire_version")
        if version != WIRE_VERSION:
            raise WireError(f"announcement: wire_version {version!r}, this proxy speaks {WIRE_VERSION}")
        unknown = sorted(str(k) for k in set(raw) - _FIELDS)
        if unknown:
            raise WireError(f"announcement: unknown field {unknown[0]!r}")
        role_raw = _req(raw, "role", str)
        try:
            role = WorkerRole(role_raw)
        except ValueError:
            raise WireError(f"role: expected one of prefill, decode, both, got {role_raw!r}") from None
        engine_url = _req(raw, "engine_url", str)
        if not engine_url.startswith(("http://", "https://")):
            raise WireError(f"engine_url: expected an http:// URL, got {engine_url!r}")
        models = raw.get("models", [])
        if not isinstance(models, (list, tuple)) or len(models) > MAX_MODELS \
                or not all(isinstance(m, str) and 0 < len(m) <= MAX_STR for m in models):
            raise WireError(f"models: expected a list of at most {MAX_MODELS} names")
        load_raw = raw.get("load")
        if load_raw is None:
            load_raw = {}
        if not isinstance(load_raw, Mapping):
            raise WireError("load: expected a mapping")
        extra = sorted(str(k) for k in set(load_raw) - {"requests", "tokens", "pool_used_bytes",
                                                         "pool_capacity_bytes"})
        if extra:
            raise WireError(f"load: unknown field {extra[0]!r}")
        load = AgentLoad(**{k: _count(load_raw, k, f"load.{k}") for k in load_raw})
        shared = raw.get("shared_tiers", [])
        if not isinstance(shared, (list, tuple)) or len(shared) > MAX_MODELS \
                or not all(isinstance(t, str) and 0 < len(t) <= MAX_STR for t in shared):
            raise WireError(f"shared_tiers: expected a list of at most {MAX_MODELS} ids")
        keys_raw = raw.get("keys")
        keys = KeySummary.from_dict(keys_raw) if keys_raw is not None else None
        heartbeat_s = _num(raw, "heartbeat_s", 1.0)
        if not heartbeat_s > 0:
            raise WireError(f"heartbeat_s: must be positive, got {heartbeat_s}")
        return cls(
            agent_id=_req(raw, "agent_id", str),
            role=role,
            engine_url=engine_url,
            agent_url=_opt_str(raw, "agent_url"),
            control_address=_opt_str(raw, "control_address"),
            transport_address=_opt_str(raw, "transport_address"),
            models=tuple(models),
            load=load,
            chunk_fingerprint=_opt_str(raw, "chunk_fingerprint"),
            chunk_tokens=_count(raw, "chunk_tokens", "chunk_tokens"),
            namespace=_opt_str(raw, "namespace"),
            keys=keys,
            shared_tiers=tuple(shared),
            heartbeat_s=heartbeat_s,
            seq=_count(raw, "seq", "seq"),
            timestamp=_num(raw, "timestamp", 0.0),
            leaving=_bool(raw, "leaving"),
        )


def _req(raw: Mapping[str, Any], name: str, tp: type) -> Any:
    value = raw.get(name)
    if value is None or value == "":
        raise WireError(f"{name}: missing")
    if not isinstance(value, tp):
        raise WireError(f"{name}: expected {tp.__name__}, got {type(value).__name__}")
    if isinstance(value, str) and len(value) > MAX_STR:
        raise WireError(f"{name}: longer than {MAX_STR} characters")
    return value


def _opt_str(raw: Mapping[str, Any], name: str) -> str:
    value = raw.get(name, "")
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > MAX_STR:
        raise WireError(f"{name}: expected a string of at most {MAX_STR} characters")
    return value


def _count(raw: Mapping[str, Any], name: str, where: str) -> int:
    value = raw.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise WireError(f"{where}: expected a non-negative integer, got {value!r}")
    return value


def _num(raw: Mapping[str, Any], name: str, default: float) -> float:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise WireError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def _bool(raw: Mapping[str, Any], name: str) -> bool:
    value = raw.get(name, False)
    if not isinstance(value, bool):
        raise WireError(f"{name}: expected true or false, got {value!r}")
    return value


_FIELDS = frozenset(AgentAnnouncement(agent_id="x", role=WorkerRole.BOTH, engine_url="http://x").to_dict())
