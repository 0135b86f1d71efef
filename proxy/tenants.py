"""Who a client is: the API key check of the OpenAI endpoints, and the tenant's ``cache_salt``.

``ClientAuth.identify`` (called by ``app.py`` for every client request, on the event loop)
compares the bearer key with the proxy's ``api_key`` and every tenant's key in constant time
and returns the tenant, or None for the plain ``api_key`` (or when no key is configured); it
raises ``Unauthorized`` otherwise. ``apply_salt`` then makes the request's ``cache_salt`` the
tenant's (``tenant:<salt>``), whatever the client sent, before routing and before anything is
sent upstream: the connector and the proxy's cache-aware routing mix it into every chunk key,
so two tenants never share KV. A client that is not a tenant may send its own ``cache_salt``
(vLLM's own feature), but never one in the tenants' ``tenant:`` space.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Any

from pdx.config import TENANT_SALT_PREFIX, ProxyConfig, TenantConfig
from pdx.errors import BadRequest, Unauthorized

#: vLLM's limit on a cache_salt
MAX_SALT_CHARS = 128


class ClientAuth:
    def __init__(self, cfg: ProxyConfig) -> None:
        self._api_key = cfg.api_key.encode()
        self._tenants = [(t.api_key.encode(), t) for t in cfg.tenants]

    def identify(self, headers: Mapping[str, str]) -> TenantConfig | None:
        """The tenant whose key the request carries, or None (the plain API key, or no check
        configured). Raises ``Unauthorized``."""
        got = headers.get("Authorization", "")
        token = got[7:].strip().encode() if got.startswith("Bearer ") else b""
        found: TenantConfig | None = None
        plain = bool(token) and bool(self._api_key) and hmac.compare_digest(token, self._api_key)
        for key, tenant in self._tenants:  # every key is compared: the time does not tell which matched
            if hmac.compare_digest(token, key) and token:
                found = tenant
        if found is not None or plain:
            return found
        if not self._api_key:  # no API key configured: anyone may use the plain (unsalted) space
            return None
        raise Unauthorized("missing or wrong API key (send 'Authorization: Bearer <key>')")

    @staticmethod
    def apply_salt(body: dict[str, Any], tenant: TenantConfig | None) -> bool:
        """Set (tenant) or check (anyone else) ``body["cache_salt"]``. True when the body must be
        serialized again rather than forwarded as received: whenever it has a salt, since the
        raw bytes could hold duplicate ``cache_salt`` keys. Raises ``BadRequest`` naming ``cache_salt``."""
        if tenant is not None:
            body["cache_salt"] = tenant.salt
            return True
        salt = body.get("cache_salt")
        if salt is None:
            return "cache_salt" in body
        if not isinstance(salt, str) or not salt or len(salt) > MAX_SALT_CHARS:
            raise BadRequest(f"'cache_salt' must be a non-empty string of at most {MAX_SALT_CHARS} characters",
                             param="cache_salt", code="invalid_value")
        if salt.startswith(TENANT_SALT_PREFIX):
            raise BadRequest(f"'cache_salt' may not start with {TENANT_SALT_PREFIX!r} (reserved for the "
                             "proxy's tenants)", param="cache_salt", code="invalid_value")
        return True
