"""One exception hierarchy for pdx.

Library exceptions (redis, zmq, nixl, ucxx, OSError) are mapped to these at the
boundary with ``raise ... from``, so callers catch ``PdxError`` and nothing else.
Partial failure is data (which chunks failed), not an exception: see the result
types of the store and the transports.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """What went wrong, as one number on the wire (agent error replies, per-chunk outcomes).

    Every ``PdxError`` class has its ``error_code``; an error reply carries the code and a message, and
    the receiving side raises ``error_class(code)``. Codes are never renumbered (new ones are
    added at the end of their group); nothing on either side interprets the message text.
    """

    OK = 0
    INTERNAL = 1  # not a pdx error: a bug on the answering side
    AGENT = 2
    UNAVAILABLE = 3
    NOT_REGISTERED = 4
    WIRE = 10
    TRANSFER_PARAMS = 11
    CONFIG = 12
    LAYOUT = 20
    SPAN = 21
    CHUNK_FORMAT = 22
    TRANSPORT = 30
    CONNECT = 31
    TIMEOUT = 32
    PEER_INCOMPATIBLE = 33
    AUTH = 34
    PEER_DENIED = 35
    CANCELLED = 36
    STORE = 40
    CAPACITY = 41
    INTEGRITY = 42
    RESERVATION = 43
    EXISTS = 44  # the chunk is already in the pool: nothing to reserve
    PRESENT = 45  # a peer's push of a chunk the receiver holds already
    ENGINE = 50
    MODEL = 51


class PdxError(Exception):
    """Base of every error pdx raises on purpose."""

    error_code: ErrorCode = ErrorCode.AGENT


class ConfigError(PdxError):
    """A config file or override is invalid; the message names the key, the file and what is allowed."""

    error_code = ErrorCode.CONFIG


class BackendUnavailable(PdxError):
    """An optional backend's library is not installed; the message carries the install command."""


class UnknownName(PdxError):
    """A registry was asked for a name it does not know; the message lists the known names."""


class LayoutError(PdxError):
    """A KV layout is invalid or does not match what the operation expects."""

    error_code = ErrorCode.LAYOUT


class SpanError(LayoutError, ValueError):
    """A pack/unpack argument does not fit: block id out of range, span past its block,
    overlapping destination spans, or a chunk buffer too small or misaligned."""

    error_code = ErrorCode.SPAN


class ChunkFormatError(LayoutError):
    """Bytes are not a chunk header of this format: bad magic, version, size or header checksum."""

    error_code = ErrorCode.CHUNK_FORMAT


class WireError(PdxError):
    """A message on the wire is malformed, oversized or of another wire version."""

    error_code = ErrorCode.WIRE


class TransferParamsError(WireError):
    """A request's ``kv_transfer_params`` for pdx are malformed or of another version.

    The connector logs it and recomputes the prompt; the message names the field.
    """

    error_code = ErrorCode.TRANSFER_PARAMS


# --- transport -------------------------------------------------------------------------------


class TransportError(PdxError):
    """Base of transport failures."""

    error_code = ErrorCode.TRANSPORT


class ConnectError(TransportError):
    """A peer could not be reached or the connection broke."""

    error_code = ErrorCode.CONNECT


class TransferTimeout(TransportError):
    """A wait ran past its deadline."""

    error_code = ErrorCode.TIMEOUT


class PeerIncompatible(TransportError):
    """The peer speaks another wire version or holds another KV layout; the message shows both sides."""

    error_code = ErrorCode.PEER_INCOMPATIBLE


class AuthError(TransportError):
    """The shared-secret challenge failed."""

    error_code = ErrorCode.AUTH


class PeerDenied(AuthError):
    """An authenticated peer asked for something outside its grants (another session's ids, a range
    it was not granted, a key this agent did not ask for, more than its quota)."""

    error_code = ErrorCode.PEER_DENIED


class TransferCancelled(TransportError):
    """The transfer was cancelled by the caller."""

    error_code = ErrorCode.CANCELLED


# --- store -----------------------------------------------------------------------------------


class StoreError(PdxError):
    """Base of store failures."""

    error_code = ErrorCode.STORE


class CapacityError(StoreError):
    """No slab can be freed because every slab is pinned or reserved."""

    error_code = ErrorCode.CAPACITY


class IntegrityError(StoreError):
    """A chunk's bytes do not match its checksum."""

    error_code = ErrorCode.INTEGRITY


class ReservationError(StoreError):
    """A reservation is unknown, expired or already committed."""

    error_code = ErrorCode.RESERVATION


# --- model and engine ------------------------------------------------------------------------


class ModelError(PdxError):
    """The embedded model could not be built or found (bad preset, build failed, lock timed out)."""

    error_code = ErrorCode.MODEL


class EngineError(PdxError):
    """An inference engine (vLLM) process failed to start, exited, or did not become ready in time."""

    error_code = ErrorCode.ENGINE


# --- agent -----------------------------------------------------------------------------------


class AgentError(PdxError):
    """The agent refused or failed a control request (the message says why)."""

    error_code = ErrorCode.AGENT


class AgentUnavailable(AgentError):
    """No reply from the agent within the call's timeout (not running, restarting or overloaded)."""

    error_code = ErrorCode.UNAVAILABLE


class NotRegistered(AgentError):
    """A request needs the pool, but no engine has registered a layout with this agent yet."""

    error_code = ErrorCode.NOT_REGISTERED


def error_class(code: int) -> type[PdxError]:
    """The class a receiver raises for an error reply with ``code`` (``AgentError`` for a code it
    does not know: a newer peer)."""
    return _BY_CODE.get(code, AgentError)


def code_of(exc: BaseException) -> ErrorCode:
    """The wire code of ``exc`` (``INTERNAL`` for anything that is not a ``PdxError``)."""
    return exc.error_code if isinstance(exc, PdxError) else ErrorCode.INTERNAL


# --- proxy -----------------------------------------------------------------------------------


class ProxyError(PdxError):
    """A client's request to pdx-proxy cannot be served.

    Carries what the client gets: ``status`` (HTTP), ``error_type`` and ``code`` (the
    OpenAI error body), ``param`` (the request field at fault, if any) and
    ``retry_after`` (seconds, becomes a ``Retry-After`` header).
    """

    status: int = 500
    error_type: str = "server_error"
    code: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.retry_after = retry_after


class BadRequest(ProxyError):
    """Malformed JSON, a missing or mistyped field (``param`` names it)."""

    status = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class Unauthorized(ProxyError):
    """Missing or wrong API key."""

    status = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class NotFound(ProxyError):
    """Unknown model or path."""

    status = 404
    error_type = "invalid_request_error"
    code = "not_found"


class PayloadTooLarge(ProxyError):
    """The request body is over the configured size."""

    status = 413
    error_type = "invalid_request_error"
    code = "body_too_large"


class Overloaded(ProxyError):
    """The admission queue is full (429) or a queued request waited too long (503)."""

    status = 429
    error_type = "rate_limit_error"
    code = "overloaded"


class NoWorkers(ProxyError):
    """No healthy worker can take the request."""

    status = 503
    error_type = "service_unavailable"
    code = "no_healthy_workers"


class UpstreamError(ProxyError):
    """Every worker tried failed (unreachable, 5xx, broken stream)."""

    status = 502
    error_type = "upstream_error"
    code = "upstream_failed"


class UpstreamTimeout(UpstreamError):
    """Every worker tried ran past its connect, first-token or read timeout."""

    status = 504
    code = "upstream_timeout"


_BY_CODE: dict[int, type[PdxError]] = {
    cls.error_code: cls for cls in (
        ConfigError, LayoutError, SpanError, ChunkFormatError, WireError, TransferParamsError,
        TransportError, ConnectError, TransferTimeout, PeerIncompatible, AuthError, PeerDenied,
        TransferCancelled, StoreError, CapacityError, IntegrityError, ReservationError, ModelError,
        EngineError, AgentError, AgentUnavailable, NotRegistered)
}
