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


class WireError(PdxError):
    """A message on the wire is malformed, oversized or of another wire version."""


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
