"""Errors of the blend path (all ``PdxError``s)."""

from __future__ import annotations

from pdx.errors import PdxError


class BlendError(PdxError):
    """A blend request or pass that cannot be served as asked."""


class BlendUnsupported(BlendError):
    """The model or engine setting is one CacheBlend does not cover (RoPE type, architecture...)."""


class BlendRequestError(BlendError, ValueError):
    """``kv_transfer_params.pdx.blend`` is malformed (bad spans, options out of range)."""
