"""The ``kv_transfer_params`` pdx reads and writes, validated.

vLLM carries a free-form ``kv_transfer_params`` dict from the HTTP request into
the engine (``Request.kv_transfer_params``) and from ``request_finished`` back
into the HTTP response. pdx uses vLLM's P/D convention for the two flags and
puts its own fields under the ``"pdx"`` key:

* A client (or pdx-proxy) sends a prompt to the prefill engine with
  ``{"do_remote_decode": true}``.
* The prefill engine's connector answers (``request_finished``) with
  ``{"do_remote_prefill": true, "do_remote_decode": false, "pdx": {...}}`` where
  ``pdx`` is a ``RemotePrefill``: the prefill agent's peer address, the chunk
  fingerprint, chunk size, namespace, how many leading tokens it holds and the
  chunk keys (hex), plus the wire version.
* The caller sends the same prompt with those params to the decode engine,
  whose connector fetches the chunks through its own agent.
* Peer-to-peer reuse: when pdx-proxy sends a request (without ``do_remote_prefill``) to a
  worker whose agent holds less of the prompt's prefix than another agent does, it adds
  ``{"pdx": {"v": 2, "hint": {"agent": <peer address>, "chunks": <n>, "agent_id": <id>}}}``
  (a ``PeerHint``): the worker's connector may fetch those leading chunks from that agent.

Everything here is pure data (no vLLM, no sockets): ``parse_request_params``
turns the raw dict into a typed ``RequestParams`` or raises
``TransferParamsError`` naming the offending field. The ``"pdx"`` block's schema is
the msgspec Struct ``RemotePrefillWire`` (field names, types and bounds), shared by
the prefill side that writes it and the decode side that decodes it strictly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from pdx.errors import TransferParamsError
from pdx.keys import KEY_BYTES, ChunkKey

#: version of the ``"pdx"`` block; a decode side rejects any other (2: a tail chunk may follow
#: the full ones).
PARAMS_VERSION = 2

#: the key under which pdx's own fields travel inside ``kv_transfer_params``.
PDX_KEY = "pdx"

#: bounds that keep a hostile or garbled dict from costing memory or time.
MAX_KEYS = 65536
MAX_STR = 1024

#: the agent's own bound on a lease or deadline (``pdx.agent.protocol.MAX_SECONDS``)
MAX_SECONDS = 86400.0

_Str = Annotated[str, Meta(max_length=MAX_STR)]


class RemotePrefillWire(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``"pdx"`` block as it travels (JSON inside vLLM's ``kv_transfer_params``)."""

    v: int
    agent: Annotated[str, Meta(min_length=1, max_length=MAX_STR)]  # the prefill agent's peer address
    fingerprint: _Str
    chunk_tokens: Annotated[int, Meta(ge=1, le=1 << 20)]
    num_tokens: Annotated[int, Meta(ge=0, le=1 << 40)]
    keys: Annotated[list[Annotated[str, Meta(pattern=f"^[0-9a-fA-F]{{{2 * KEY_BYTES}}}$")]],
                    Meta(max_length=MAX_KEYS)] = []
    namespace: _Str = ""
    request_id: _Str = ""
    lease_s: Annotated[float, Meta(ge=0.0, le=MAX_SECONDS)] = 0.0


class PeerHintWire(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A peer hint as it travels (``{"pdx": {"v": ..., "hint": <this>}}``)."""

    agent: Annotated[str, Meta(min_length=1, max_length=MAX_STR)]  # the holder's peer address
    chunks: Annotated[int, Meta(ge=1, le=MAX_KEYS)]
    agent_id: _Str = ""


@dataclass(frozen=True)
class RemotePrefill:
    """Where a prefill engine left a prompt's KV, and how to name its chunks.

    ``num_tokens`` counts the leading prompt tokens offered: whole chunks, then, when
    it is not a multiple of ``chunk_tokens``, a tail chunk of the remainder
    (``pdx.keys.tail_key``). ``keys`` (one per chunk, the tail's last; may be empty:
    the decode side then trusts its own computation) lets the decode side check
    that it hashes the same prompt the same way before it loads anything.
    """

    agent: str  # the prefill agent's peer (transport) address
    fingerprint: str  # KVLayout.chunk_fingerprint of the prefill engine
    chunk_tokens: int
    num_tokens: int
    keys: tuple[ChunkKey, ...] = ()
    namespace: str = ""
    request_id: str = ""  # the prefill engine's request id (logs, lease release)
    lease_s: float = 0.0  # how long the prefill agent keeps the chunks pinned
    version: int = PARAMS_VERSION

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (keys as hex strings) for the HTTP response."""
        wire = RemotePrefillWire(v=self.version, agent=self.agent, fingerprint=self.fingerprint,
                                 chunk_tokens=self.chunk_tokens, num_tokens=self.num_tokens,
                                 keys=[k.hex() for k in self.keys], namespace=self.namespace,
                                 request_id=self.request_id, lease_s=self.lease_s)
        out: dict[str, Any] = msgspec.to_builtins(wire)
        return out

    @classmethod
    def from_dict(cls, raw: object) -> RemotePrefill:
        """Validate the ``"pdx"`` block against ``RemotePrefillWire``; ``TransferParamsError`` names
        the bad field."""
        if not isinstance(raw, Mapping):
            raise TransferParamsError(f"kv_transfer_params.pdx: expected an object, got {_kind(raw)}")
        if "v" in raw and raw["v"] != PARAMS_VERSION:  # another version may have other fields
            raise TransferParamsError(
                f"kv_transfer_params.pdx.v: this engine speaks version {PARAMS_VERSION}, got {raw['v']!r}")
        try:
            w = msgspec.convert(dict(raw), RemotePrefillWire, strict=True)
        except msgspec.ValidationError as exc:
            raise TransferParamsError(f"kv_transfer_params.pdx: {exc}") from None
        chunks = -(-w.num_tokens // w.chunk_tokens)
        if w.keys and len(w.keys) != chunks:
            raise TransferParamsError(
                f"kv_transfer_params.pdx.keys: {len(w.keys)} keys for {chunks} chunks")
        return cls(
            agent=w.agent, fingerprint=w.fingerprint, chunk_tokens=w.chunk_tokens, num_tokens=w.num_tokens,
            keys=tuple(ChunkKey(bytes.fromhex(k)) for k in w.keys), namespace=w.namespace,
            request_id=w.request_id, lease_s=float(w.lease_s), version=w.v,
        )


@dataclass(frozen=True)
class PeerHint:
    """The proxy's hint: the agent at ``agent`` (a peer address) holds the prompt's first
    ``chunks`` chunks; a worker holding fewer may fetch them from it (peer-to-peer reuse).
    Advice only: the worker checks nothing it cannot verify (the holder's session, fingerprint
    and checksums are checked by the fetch), and a fetch that fails is recomputed."""

    agent: str
    chunks: int
    agent_id: str = ""  # for logs

    def to_dict(self) -> dict[str, Any]:
        return {"agent": self.agent, "chunks": self.chunks, "agent_id": self.agent_id}

    @classmethod
    def from_dict(cls, raw: object) -> PeerHint:
        """Validate a ``hint`` object against ``PeerHintWire``."""
        if not isinstance(raw, Mapping):
            raise TransferParamsError(f"kv_transfer_params.pdx.hint: expected an object, got {_kind(raw)}")
        try:
            w = msgspec.convert(dict(raw), PeerHintWire, strict=True)
        except msgspec.ValidationError as exc:
            raise TransferParamsError(f"kv_transfer_params.pdx.hint: {exc}") from None
        return cls(agent=w.agent, chunks=w.chunks, agent_id=w.agent_id)


def hint_params(hint: PeerHint, remote_decode: bool = False) -> dict[str, Any]:
    """The ``kv_transfer_params`` the proxy sends with a peer hint (``remote_decode``: a P/D
    prefill request, which also keeps its chunks for the decode side)."""
    out: dict[str, Any] = {"do_remote_decode": True} if remote_decode else {}
    out[PDX_KEY] = {"v": PARAMS_VERSION, "hint": hint.to_dict()}
    return out


@dataclass(frozen=True)
class RequestParams:
    """What a request's ``kv_transfer_params`` asks of pdx.

    ``remote_decode``: this (prefill) engine should keep the prompt's chunks for
    a decode engine and answer with a ``RemotePrefill``. ``remote``: this
    (decode) engine should load the prompt's KV from the prefill side it names.
    ``hint``: another agent holds the prompt's leading chunks (peer-to-peer reuse).
    """

    remote_decode: bool = False
    remote: RemotePrefill | None = None
    hint: PeerHint | None = None
    #: layer-wise P/D: the decode agent (peer address) this prefill streams each layer to as it is
    #: computed (``{"pdx": {"v": 2, "push": {"agent": ...}}}`` beside ``do_remote_decode``)
    push: str = ""


NO_PARAMS = RequestParams()


def parse_request_params(raw: object) -> RequestParams:
    """Parse ``Request.kv_transfer_params`` (may be ``None``).

    Unknown top-level keys are ignored (other connectors and proxies add theirs);
    the ``"pdx"`` block itself is strict. ``do_remote_prefill`` without a
    ``"pdx"`` block means the params came from another connector: an error, so
    the caller can log it and recompute instead of guessing.
    """
    if raw is None:
        return NO_PARAMS
    if not isinstance(raw, Mapping):
        raise TransferParamsError(f"kv_transfer_params: expected an object, got {_kind(raw)}")
    remote_decode = _flag(raw, "do_remote_decode")
    remote_prefill = _flag(raw, "do_remote_prefill")
    block = raw.get(PDX_KEY)
    remote = None
    if remote_prefill:
        if block is None:
            raise TransferParamsError(
                "kv_transfer_params: do_remote_prefill is set but there is no 'pdx' block "
                "(params from another connector?)")
        remote = RemotePrefill.from_dict(block)
    hint = None
    if remote is None and isinstance(block, Mapping) and "hint" in block:
        hint = _hint_block(block)
    push = ""
    if remote is None and isinstance(block, Mapping) and "push" in block:
        push = _push_block(block)
    return RequestParams(remote_decode=remote_decode, remote=remote, hint=hint, push=push)


class PushWire(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A layer-wise push target as it travels (``{"pdx": {"v": ..., "push": <this>}}``)."""

    agent: Annotated[str, Meta(min_length=1, max_length=MAX_STR)]  # the decode agent's peer address


def push_params(agent: str) -> dict[str, Any]:
    """The ``"pdx"`` field a prefill request carries for layer-wise P/D (merged beside a hint)."""
    return {"push": {"agent": agent}}


def _check_block(block: Mapping[str, Any], beside: str) -> None:
    """The ``"pdx"`` block's version and field names (``beside``: what it carries, for the error)."""
    if block.get("v", PARAMS_VERSION) != PARAMS_VERSION:
        raise TransferParamsError(
            f"kv_transfer_params.pdx.v: this engine speaks version {PARAMS_VERSION}, got {block.get('v')!r}")
    unknown = sorted(set(block) - {"v", "hint", "push"})
    if unknown:
        raise TransferParamsError(f"kv_transfer_params.pdx: unknown field {unknown[0]!r} beside {beside}; "
                                  "allowed: hint, push, v")


def _push_block(block: Mapping[str, Any]) -> str:
    _check_block(block, "push")
    try:
        return msgspec.convert(block["push"], PushWire, strict=True).agent
    except msgspec.ValidationError as exc:
        raise TransferParamsError(f"kv_transfer_params.pdx.push: {exc}") from None


def _hint_block(block: Mapping[str, Any]) -> PeerHint:
    _check_block(block, "a hint")
    return PeerHint.from_dict(block["hint"])


def response_params(remote: RemotePrefill) -> dict[str, Any]:
    """The ``kv_transfer_params`` a prefill engine returns for its decode side."""
    return {"do_remote_prefill": True, "do_remote_decode": False, PDX_KEY: remote.to_dict()}


# --- helpers ---------------------------------------------------------------------------------


def _kind(v: object) -> str:
    return type(v).__name__


def _flag(raw: Mapping[str, Any], name: str) -> bool:
    v = raw.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise TransferParamsError(f"kv_transfer_params.{name}: expected true or false, got {v!r}")
    return v
