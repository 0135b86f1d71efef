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
``TransferParamsError`` naming the offending field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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

_REMOTE_FIELDS = {"v", "agent", "fingerprint", "chunk_tokens", "num_tokens", "keys", "namespace",
                  "request_id", "lease_s"}
_REQUIRED = {"v", "agent", "fingerprint", "chunk_tokens", "num_tokens"}
_HINT_BLOCK_FIELDS = {"v", "hint"}
_HINT_FIELDS = {"agent", "chunks", "agent_id"}


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
        return {
            "v": self.version,
            "agent": self.agent,
            "fingerprint": self.fingerprint,
            "chunk_tokens": self.chunk_tokens,
            "num_tokens": self.num_tokens,
            "keys": [k.hex() for k in self.keys],
            "namespace": self.namespace,
            "request_id": self.request_id,
            "lease_s": self.lease_s,
        }

    @classmethod
    def from_dict(cls, raw: object) -> RemotePrefill:
        """Validate the ``"pdx"`` block; ``TransferParamsError`` names the bad field."""
        if not isinstance(raw, Mapping):
            raise TransferParamsError(f"kv_transfer_params.pdx: expected an object, got {_kind(raw)}")
        if "v" in raw and raw["v"] != PARAMS_VERSION:  # another version may have other fields
            raise TransferParamsError(
                f"kv_transfer_params.pdx.v: this engine speaks version {PARAMS_VERSION}, got {raw['v']!r}")
        unknown = sorted(set(raw) - _REMOTE_FIELDS)
        if unknown:
            raise TransferParamsError(
                f"kv_transfer_params.pdx: unknown field {unknown[0]!r}; "
                f"allowed: {', '.join(sorted(_REMOTE_FIELDS))}")
        missing = sorted(_REQUIRED - set(raw))
        if missing:
            raise TransferParamsError(f"kv_transfer_params.pdx: missing field {missing[0]!r}")
        version = _int(raw, "v")
        if version != PARAMS_VERSION:
            raise TransferParamsError(
                f"kv_transfer_params.pdx.v: this engine speaks version {PARAMS_VERSION}, got {version}")
        agent = _str(raw, "agent")
        if not agent:
            raise TransferParamsError("kv_transfer_params.pdx.agent: empty address")
        fingerprint = _str(raw, "fingerprint")
        chunk_tokens = _int(raw, "chunk_tokens")
        if chunk_tokens <= 0:
            raise TransferParamsError(f"kv_transfer_params.pdx.chunk_tokens: must be positive, got {chunk_tokens}")
        num_tokens = _int(raw, "num_tokens")
        if num_tokens < 0:
            raise TransferParamsError(f"kv_transfer_params.pdx.num_tokens: must not be negative, got {num_tokens}")
        keys = _keys(raw.get("keys", []))
        chunks = -(-num_tokens // chunk_tokens)
        if keys and len(keys) != chunks:
            raise TransferParamsError(
                f"kv_transfer_params.pdx.keys: {len(keys)} keys for {chunks} chunks")
        lease = raw.get("lease_s", 0.0)
        if isinstance(lease, bool) or not isinstance(lease, (int, float)) or lease < 0:
            raise TransferParamsError(f"kv_transfer_params.pdx.lease_s: expected a number >= 0, got {lease!r}")
        return cls(
            agent=agent, fingerprint=fingerprint, chunk_tokens=chunk_tokens, num_tokens=num_tokens,
            keys=keys, namespace=_str(raw, "namespace", ""), request_id=_str(raw, "request_id", ""),
            lease_s=float(lease), version=version,
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
        if not isinstance(raw, Mapping):
            raise TransferParamsError(f"kv_transfer_params.pdx.hint: expected an object, got {_kind(raw)}")
        unknown = sorted(set(raw) - _HINT_FIELDS)
        if unknown:
            raise TransferParamsError(f"kv_transfer_params.pdx.hint: unknown field {unknown[0]!r}; "
                                      f"allowed: {', '.join(sorted(_HINT_FIELDS))}")
        agent = _str(raw, "agent", "")
        if not agent:
            raise TransferParamsError("kv_transfer_params.pdx.hint.agent: missing or empty")
        chunks = _int(raw, "chunks")
        if not 0 < chunks <= MAX_KEYS:
            raise TransferParamsError(
                f"kv_transfer_params.pdx.hint.chunks: expected 1..{MAX_KEYS}, got {chunks}")
        return cls(agent=agent, chunks=chunks, agent_id=_str(raw, "agent_id", ""))


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
    return RequestParams(remote_decode=remote_decode, remote=remote, hint=hint)


def _hint_block(block: Mapping[str, Any]) -> PeerHint:
    if block.get("v", PARAMS_VERSION) != PARAMS_VERSION:
        raise TransferParamsError(
            f"kv_transfer_params.pdx.v: this engine speaks version {PARAMS_VERSION}, got {block.get('v')!r}")
    unknown = sorted(set(block) - _HINT_BLOCK_FIELDS)
    if unknown:
        raise TransferParamsError(f"kv_transfer_params.pdx: unknown field {unknown[0]!r} beside a hint; "
                                  f"allowed: {', '.join(sorted(_HINT_BLOCK_FIELDS))}")
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


def _int(raw: Mapping[str, Any], name: str) -> int:
    v = raw.get(name)
    if isinstance(v, bool) or not isinstance(v, int):
        raise TransferParamsError(f"kv_transfer_params.pdx.{name}: expected an integer, got {v!r}")
    return v


def _str(raw: Mapping[str, Any], name: str, default: str | None = None) -> str:
    v = raw.get(name, default)
    if not isinstance(v, str):
        raise TransferParamsError(f"kv_transfer_params.pdx.{name}: expected a string, got {_kind(v)}")
    if len(v) > MAX_STR:
        raise TransferParamsError(f"kv_transfer_params.pdx.{name}: longer than {MAX_STR} characters")
    return v


def _keys(v: object) -> tuple[ChunkKey, ...]:
    if not isinstance(v, list):
        raise TransferParamsError(f"kv_transfer_params.pdx.keys: expected a list of hex strings, got {_kind(v)}")
    if len(v) > MAX_KEYS:
        raise TransferParamsError(f"kv_transfer_params.pdx.keys: more than {MAX_KEYS} keys")
    out = []
    for i, item in enumerate(v):
        try:
            if not isinstance(item, str):
                raise ValueError
            key = bytes.fromhex(item)
            if len(key) != KEY_BYTES:
                raise ValueError
        except ValueError:
            raise TransferParamsError(
                f"kv_transfer_params.pdx.keys[{i}]: expected {2 * KEY_BYTES} hex digits, got {item!r}"
            ) from None
        out.append(ChunkKey(key))
    return tuple(out)
