"""One exception hierarchy for pdx.

Library exceptions (redis, zmq, nixl, ucxx, OSError) are mapped to these at the
boundary with ``raise ... from``, so callers catch ``PdxError`` and nothing else.
Partial failure is data (which chunks failed), not an exception: see the result
types of the store and the transports.
"""

from __future__ import annotations


class PdxError(Exception):
    """Base of every error pdx raises on purpose."""


class ConfigError(PdxError):
    """A config file or override is invalid; the message names the key, the file and what is allowed."""


class BackendUnavailable(PdxError):
    """An optional backend's library is not installed; the message carries the install command."""


class UnknownName(PdxError):
    """A registry was asked for a name it does not know; the message lists the known names."""


class LayoutError(PdxError):
    """A KV layout is invalid or does not match what the operation expects."""


class SpanError(LayoutError, ValueError):
    """A pack/unpack argument does not fit: block id out of range, span past its block,
    overlapping destination spans, or a chunk buffer too small or misaligned."""


class ChunkFormatError(LayoutError):
    """Bytes are not a chunk header of this format: bad magic, version, size or header checksum."""


class WireError(PdxError):
    """A message on the wire is malformed, oversized or of another wire version."""


class TransferParamsError(WireError):
    """A request's ``kv_transfer_params`` for pdx are malformed or of another version.

    The connector logs it and recomputes the prompt; the message names the field.
    """


# --- transport -------------------------------------------------------------------------------


class TransportError(PdxError):
    """Base of transport failures."""


class ConnectError(TransportError):
    """A peer could not be reached or the connection broke."""


class TransferTimeout(TransportError):
    """A wait ran past its deadline."""


class PeerIncompatible(TransportError):
    """The peer speaks another wire version or holds another KV layout; the message shows both sides."""


class AuthError(TransportError):
    """The shared-secret challenge failed."""


class PeerDenied(AuthError):
    """An authenticated peer asked for something outside its grants (another session's ids, a range
    it was not granted, a key this agent did not ask for, more than its quota)."""


class TransferCancelled(TransportError):
    """The transfer was cancelled by the caller."""


# --- store -----------------------------------------------------------------------------------


class StoreError(PdxError):
    """Base of store failures."""


class CapacityError(StoreError):
    """No slab can be freed because every slab is pinned or reserved."""


class IntegrityError(StoreError):
    """A chunk's bytes do not match its checksum."""


class ReservationError(StoreError):
    """A reservation is unknown, expired or already committed."""


# --- model and engine ------------------------------------------------------------------------


class ModelError(PdxError):
    """The embedded model could not be built or found (bad preset, build failed, lock timed out)."""


class EngineError(PdxError):
    """An inference engine (vLLM) process failed to start, exited, or did not become ready in time."""


# --- agent -----------------------------------------------------------------------------------


class AgentError(PdxError):
    """The agent refused or failed a control request (the message says why)."""


class AgentUnavailable(AgentError):
    """No reply from the agent within the call's timeout (not running, restarting or overloaded)."""


class NotRegistered(AgentError):
    """A request needs the pool, but no engine has registered a layout with this agent yet."""


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
