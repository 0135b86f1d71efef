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

The schema is the msgspec Structs below, shared by the agent (which builds and sends
them) and the proxy (which decodes them strictly): bounds (string lengths, counts,
non-negative integers, a positive heartbeat, finite times) live in the field types.
Compatibility: ``wire_version`` must equal ``WIRE_VERSION``; fields are added only
with a version bump, and an unknown field is an error (so a typo is not silently
ignored). ``from_dict`` raises ``WireError`` naming the field.

Frozen Structs: immutable, safe to share between threads.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from pdx.errors import WireError
from pdx.scheduler.summary import KeySummary

#: 2: ``identity_key``
WIRE_VERSION = 2

#: longest accepted string field (URLs, ids, fingerprints).
MAX_STR = 2048
#: most model names in one announcement.
MAX_MODELS = 64

_Str = Annotated[str, Meta(max_length=MAX_STR)]
_Name = Annotated[str, Meta(min_length=1, max_length=MAX_STR)]
_Count = Annotated[int, Meta(ge=0)]
#: seconds since the epoch or a period: finite (NaN and infinities are refused)
_Time = Annotated[float, Meta(ge=-1e15, le=1e15)]


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


class AgentLoad(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The engine's load as its agent sees it (all requests, not only this proxy's)."""

    requests: _Count = 0  # requests running or waiting in the engine
    tokens: _Count = 0  # their prompt + max new tokens, as far as the agent knows
    pool_used_bytes: _Count = 0
    pool_capacity_bytes: _Count = 0


class AgentAnnouncement(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One registration / heartbeat from an agent.

    ``engine_url`` (the engine's OpenAI HTTP server) identifies the worker: a
    worker listed statically in the proxy config with the same URL is the same
    worker. ``chunk_fingerprint``, ``chunk_tokens`` and ``namespace`` are what
    ``pdx.keys.chunk_keys`` needs to compute keys comparable with ``keys``.
    ``timestamp`` is the sender's wall clock (seconds since the epoch), for logs;
    liveness is judged by the proxy's own clock at receipt.
    """

    agent_id: _Name
    role: WorkerRole
    engine_url: Annotated[str, Meta(pattern="^https?://", max_length=MAX_STR)]
    agent_url: _Str = ""  # the agent's HTTP endpoint (/healthz, /readyz, /metrics)
    control_address: _Str = ""  # the agent's ZMQ control plane (tcp:// or ipc://)
    transport_address: _Str = ""  # its peer socket (other agents dial it)
    models: Annotated[tuple[_Name, ...], Meta(max_length=MAX_MODELS)] = ()
    load: AgentLoad = msgspec.field(default_factory=AgentLoad)
    chunk_fingerprint: _Str = ""
    chunk_tokens: _Count = 0
    namespace: _Str = ""
    keys: KeySummary | None = None  # chunks held (all tiers the agent can serve quickly)
    #: ids of the shared tiers the agent writes every chunk to (``pdx.config.shared_tier_ids``):
    #: a chunk any worker with that tier computed is one this worker can load
    shared_tiers: Annotated[tuple[_Name, ...], Meta(max_length=MAX_MODELS)] = ()
    #: the agent's Ed25519 public key (base64): peers check its ``peer_hello`` signatures against it
    identity_key: Annotated[str, Meta(max_length=64)] = ""
    heartbeat_s: Annotated[float, Meta(gt=0.0, le=1e9)] = 1.0  # the sender's announcement period
    seq: _Count = 0  # increases with every announcement of one agent process
    timestamp: _Time = 0.0
    leaving: bool = False
    wire_version: int = WIRE_VERSION

    def to_dict(self) -> dict[str, Any]:
        """JSON- and msgpack-safe (the summary's bits as base64 text)."""
        out: dict[str, Any] = msgspec.to_builtins(self)
        return out

    @classmethod
    def from_dict(cls, raw: Any) -> AgentAnnouncement:
        """Validate and build (strictly: ``msgspec.convert``); raises ``WireError`` naming the
        first bad field."""
        if not isinstance(raw, Mapping):
            raise WireError(f"announcement: expected a mapping, got {type(raw).__name__}")
        version = raw.get("wire_version")
        if version != WIRE_VERSION:
            raise WireError(f"announcement: wire_version {version!r}, this proxy speaks {WIRE_VERSION}")
        fields = dict(raw)
        keys_raw = fields.pop("keys", None)
        # the summary has its own checks (size of the filter, number of hashes)
        keys = KeySummary.from_dict(keys_raw) if keys_raw is not None else None
        try:
            msg = msgspec.convert(fields, cls, strict=True)
        except msgspec.ValidationError as exc:
            raise WireError(f"announcement: {exc}") from None
        return msgspec.structs.replace(msg, keys=keys) if keys is not None else msg
