"""S3-compatible object storage: the fleet's cheap, durable cold tier, through obstore.

Each chunk is one object ``<prefix><key hex>`` in ``bucket``, holding the
remote-tier value format (``pdx.store.value``: header with checksum, then the
payload). Requests run concurrently on a pool of ``max_in_flight`` threads
(obstore's calls release the GIL): ``exists`` is one HEAD per key, ``read`` one
GET per key, a write batch one PUT per chunk. Why obstore and not boto3: see
docs/store.md (measured).

Credentials and region come from the usual AWS environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``, which obstore
reads), else from boto3's chain (``~/.aws`` profiles, instance roles) when boto3
is installed. ``endpoint_url`` points at any S3-compatible server.

Every batch runs under ``ServerHealth`` (``pdx.store.remote``): a server that
fails, refuses or answers slower than ``timeout_s`` is a miss and starts the
back-off; an absent object is a plain miss. A value whose header or checksum
does not match is a miss, counted, and deleted.

Thread-safety: every method may be called from any thread; writes run on the
tier's writer thread. Raises ``BackendUnavailable`` at creation when obstore is
missing and ``ConfigError`` for a config it cannot use.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from pdx.config import S3Config
from pdx.errors import BackendUnavailable, ConfigError
from pdx.keys import ChunkKey
from pdx.store.metrics import StoreMetrics
from pdx.store.remote import Refusal, RemoteTier, ServerHealth
from pdx.store.tier import WriteItem
from pdx.store.types import Tier
from pdx.store.value import pack_header

log = logging.getLogger(__name__)


def load_obstore() -> tuple[Any, Any, type[BaseException]]:
    """``(obstore, S3Store, NotFoundError)``; ``BackendUnavailable`` with the install command."""
    try:
        import obstore
        from obstore.exceptions import NotFoundError
        from obstore.store import S3Store
    except ImportError as exc:
        raise BackendUnavailable(f"store tier 's3' is unavailable ({exc}); install it with: "
                                 "pip install 'pdx[s3]'") from exc
    return obstore, S3Store, NotFoundError


def _credential_provider(environ_has_keys: bool) -> Any:
    """boto3's credential chain when the environment holds no keys and boto3 is installed."""
    if environ_has_keys:
        return None
    try:
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:
        return None
    try:
        return Boto3CredentialProvider()
    except Exception:  # no credentials anywhere: obstore will say so on the first request
        return None


class S3Tier(RemoteTier):
    """A remote tier on S3-compatible object storage. See the module docstring."""

    tier = Tier.S3
    _remove_verb = "deleting"

    def __init__(self, config: S3Config, *, chunk_fingerprint: str, data_dir: Path | None,
                 metrics: StoreMetrics, clock: Callable[[], float] = time.monotonic,
                 environ_has_keys: bool | None = None) -> None:
        obstore, store_cls, not_found = load_obstore()
        if not config.bucket:
            raise ConfigError("store.tiers: an s3 tier needs a bucket")
        super().__init__(metrics, config.queue_depth, batch_size=config.batch_size)
        self.lookup_timeout_s = config.lookup_timeout_s
        self._cfg = config
        self._ob = obstore
        # obstore raises FileNotFoundError for a 404 (its NotFoundError in some versions)
        self._not_found: tuple[type[BaseException], ...] = (FileNotFoundError, not_found)
        self._prefix = config.prefix
        timeout = timedelta(seconds=config.timeout_s)
        options: dict[str, Any] = {"timeout": timeout, "connect_timeout": timeout}
        kwargs: dict[str, Any] = {}
        if config.endpoint_url:
            kwargs["endpoint"] = config.endpoint_url
            options["allow_http"] = config.endpoint_url.startswith("http://")
        if config.region:
            kwargs["region"] = config.region
        if environ_has_keys is None:
            import os  # the AWS environment is the client's own configuration, read where it is used

            environ_has_keys = bool(os.environ.get("AWS_ACCESS_KEY_ID"))
        provider = _credential_provider(environ_has_keys)
        if provider is not None:
            kwargs["credential_provider"] = provider
        try:
            # pdx's back-off replaces the client's retries, so a dead server costs one timeout
            self._store = store_cls(config.bucket, client_options=options,
                                    retry_config={"max_retries": 0, "retry_timeout": timeout}, **kwargs)
        except Exception as exc:
            raise ConfigError(f"store.tiers: s3 tier: {exc}") from exc
        self._io = concurrent.futures.ThreadPoolExecutor(max(1, config.max_in_flight),
                                                         thread_name_prefix="pdx-s3-io")
        where = config.endpoint_url or "AWS S3"
        # The health pool's worker fans each batch out to _io and waits for it whole.
        self._health = ServerHealth(self._label, f"{where} bucket {config.bucket}", metrics, clock,
                                    config.retry_after_s, config.timeout_s * 2, (Exception,), workers=2)
        self._start_writer()

    def name_of(self, key: ChunkKey) -> str:
        return self._prefix + key.hex()

    # --- client calls (under ServerHealth; each batch fans out on the request pool) ---------------

    def _exists(self, names: list[Any]) -> list[bool]:
        def head(name: str) -> bool:
            try:
                self._ob.head(self._store, name)
            except self._not_found:
                return False
            return True

        return list(self._io.map(head, names))

    def _get(self, names: list[Any]) -> Sequence[bytes | None]:
        def get(name: str) -> bytes | None:
            try:
                return bytes(self._ob.get(self._store, name).bytes())
            except self._not_found:
                return None

        return list(self._io.map(get, names))

    def _remove(self, names: list[Any]) -> None:
        self._ob.delete(self._store, names)

    def _put(self, items: list[WriteItem]) -> list[Refusal]:
        def put(item: WriteItem) -> Refusal:
            # obstore takes one buffer: header and payload joined (one copy of the chunk)
            self._ob.put(self._store, self.name_of(item.key), b"".join((pack_header(item.meta), item.data)))
            return None

        return list(self._io.map(put, items))

    def close(self, drain_s: float = 5.0) -> None:
        super().close(drain_s)
        self._io.shutdown(wait=False, cancel_futures=True)
