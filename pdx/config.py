"""Configs: YAML files loaded into frozen, documented dataclasses.

Validation lives here and only here: an unknown key, a wrong type or a bad value
raises ``ConfigError`` naming the key path, the file and what is allowed.

Environment overrides (the one place pdx reads configuration from the
environment): ``PDX__SECTION__KEY=value`` sets ``section.key``; the value is
parsed as a YAML scalar. Example: ``PDX__STORE__L1__CAPACITY=2GiB``. One
environment serves several processes (an agent and the engine it launches, the
connector inside it), so an override applies only to a config that has its first
key (``PDX__CONNECTOR__...`` is the connector's, never the agent's); below that
first key, an unknown name is an error like any other.

Every section is checked when it is loaded: a section class with a ``validate()``
method has it called by ``from_dict``, and the error names the key path and the
file. A top-level ``validate()`` is the caller's (``load_config`` calls it).
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from pdx.errors import ConfigError

T = TypeVar("T")

ENV_PREFIX = "PDX__"

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_size(value: object) -> int:
    """``"256KiB"`` -> 262144; plain integers pass through. Raises ``ValueError``."""
    if isinstance(value, bool):
        raise ValueError("a size, not a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])
    raise ValueError(f"expected a size like 1048576, '64MiB' or '2GB', got {value!r}")


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n}B"


def size_field(default: int | str, doc: str) -> Any:
    """A field holding a byte count, written in YAML as an int or ``"64MiB"``."""
    return field(default=parse_size(default), metadata={"doc": doc, "size": True})


def doc_field(default: Any, doc: str, **meta: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc, **meta})
    return field(default=default, metadata={"doc": doc, **meta})


# --- the configs -----------------------------------------------------------------------------


class Eviction(str, Enum):
    LRU = "lru"
    LFU = "lfu"
    S3FIFO = "s3fifo"


@dataclass(frozen=True)
class L1Config:
    """The shared-memory pool: fixed-size slabs, allocated once."""

    capacity: int = size_field("1GiB", "total bytes of the pool")
    slab_size: int = size_field(0, "bytes per slab; 0 = one packed chunk of the registered layout")
    eviction: Eviction = doc_field(Eviction.LRU, "eviction policy: lru, lfu or s3fifo")
    reservation_timeout_s: float = doc_field(30.0, "a reservation not committed by then is reclaimed")
    lease_s: float = doc_field(60.0, "default lifetime of a read pin before it expires")
    shm_name: str = doc_field("", "POSIX shm name of the pool; empty = generated per agent")
    prefault: bool = doc_field(True, "map every page of the pool at start so first writes do not fault")

    def validate(self) -> None:
        _positive(self, "capacity", "reservation_timeout_s", "lease_s")


@dataclass(frozen=True)
class DiskConfig:
    """L2: chunk files on local disk, written behind asynchronously."""

    enabled: bool = doc_field(False, "turn the disk tier on")
    path: str = doc_field("", "folder for chunk files; empty = <data dir>/disk-cache")
    capacity: int = size_field("10GiB", "bytes of chunk files kept before the oldest are deleted")
    write: Literal["evicted", "all"] = doc_field(
        "evicted", "'evicted': write chunks that leave L1; 'all': every committed chunk"
    )
    queue_depth: int = doc_field(64, "chunks waiting to be written before new ones are dropped")
    fsync: bool = doc_field(False, "fsync each chunk file before it becomes visible (slower, crash-safe)")

    def validate(self) -> None:
        _positive(self, "capacity")
        _not_negative(self, "queue_depth")


@dataclass(frozen=True)
class RedisConfig:
    """L3: a Redis/Valkey server shared by many hosts."""

    enabled: bool = doc_field(False, "turn the Redis tier on")
    url: str = doc_field("redis://127.0.0.1:6379/0", "server URL (redis:// or rediss://)")
    ttl_s: int = doc_field(0, "expiry of stored chunks in seconds; 0 = none")
    key_prefix: str = doc_field("pdx:", "prefix of every key pdx writes")
    socket_timeout_s: float = doc_field(1.0, "connect and read timeout of each call")
    max_connections: int = doc_field(8, "size of the connection pool")
    write: Literal["evicted", "all"] = doc_field("evicted", "as for the disk tier")
    retry_after_s: float = doc_field(2.0, "after a failure, calls are misses for this long")
    queue_depth: int = doc_field(64, "chunks waiting to be written before new ones are dropped")
    batch_size: int = doc_field(16, "chunks per pipelined write")
    lookup_timeout_s: float = doc_field(
        0.5, "the most a remote lookup waits for this tier; slower is a miss there while the other tiers "
        "still answer (keep it below the connector's lookup_timeout_s)")

    def validate(self) -> None:
        if not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"url: expected redis://HOST:PORT/DB, rediss://... or unix://PATH, got {self.url!r}")
        _positive(self, "socket_timeout_s", "max_connections", "batch_size", "lookup_timeout_s")
        _not_negative(self, "ttl_s", "retry_after_s", "queue_depth")


@dataclass(frozen=True)
class MooncakeConfig:
    """A Mooncake Store (master + metadata server) shared by a fleet; this agent contributes memory."""

    enabled: bool = doc_field(True, "false keeps the entry but turns the tier off")
    master: str = doc_field("127.0.0.1:50051", "host:port of mooncake_master's RPC service")
    metadata_server: str = doc_field("http://127.0.0.1:8080/metadata",
                                     "metadata server URL (the master's HTTP one, or etcd://...)")
    local_hostname: str = doc_field("127.0.0.1", "address other clients reach this agent's segment at")
    protocol: Literal["tcp", "rdma"] = doc_field("tcp", "transfer protocol: tcp, or rdma where the NICs have it")
    device_name: str = doc_field("", "RDMA device(s) for protocol rdma; empty = auto")
    global_segment_size: int = size_field("256MiB", "memory this agent contributes to the shared store")
    local_buffer_size: int = size_field("64MiB", "client buffer for puts and gets (registered once)")
    key_prefix: str = doc_field("pdx:", "prefix of every key pdx writes")
    write: Literal["evicted", "all"] = doc_field("all", "as for the disk tier")
    retry_after_s: float = doc_field(2.0, "after a failure, calls are misses for this long")
    queue_depth: int = doc_field(64, "chunks waiting to be written before new ones are dropped")
    batch_size: int = doc_field(16, "chunks per batched put or get")
    timeout_s: float = doc_field(5.0, "longest wait for one call to the store; longer is a miss")
    lookup_timeout_s: float = doc_field(
        0.5, "the most a remote lookup waits for this tier; slower is a miss there while the other tiers "
        "still answer (keep it below the connector's lookup_timeout_s)")

    def validate(self) -> None:
        _positive(self, "timeout_s", "batch_size", "lookup_timeout_s")
        _not_negative(self, "retry_after_s", "queue_depth")


@dataclass(frozen=True)
class S3Config:
    """S3-compatible object storage: one object per chunk under ``prefix`` in ``bucket``."""

    enabled: bool = doc_field(True, "false keeps the entry but turns the tier off")
    bucket: str = doc_field("", "bucket name (must exist)")
    prefix: str = doc_field("pdx/", "key prefix of every object pdx writes")
    endpoint_url: str = doc_field("", "S3 endpoint; empty = AWS's, from the usual AWS config")
    region: str = doc_field("", "region; empty = from the usual AWS environment or config")
    max_in_flight: int = doc_field(8, "requests in flight at once per tier")
    timeout_s: float = doc_field(5.0, "connect and read timeout of each request")
    write: Literal["evicted", "all"] = doc_field("evicted", "as for the disk tier")
    retry_after_s: float = doc_field(2.0, "after a failure, calls are misses for this long")
    queue_depth: int = doc_field(64, "chunks waiting to be written before new ones are dropped")
    batch_size: int = doc_field(16, "chunks per write batch (written concurrently)")
    lookup_timeout_s: float = doc_field(
        0.5, "the most a remote lookup waits for this tier; slower is a miss there while the other tiers "
        "still answer (keep it below the connector's lookup_timeout_s)")

    def validate(self) -> None:
        _positive(self, "timeout_s", "batch_size", "max_in_flight", "lookup_timeout_s")
        _not_negative(self, "retry_after_s", "queue_depth")


@dataclass(frozen=True)
class NixlStorageConfig(DiskConfig):
    """Chunk files on local storage, in the disk tier's format, moved by a NIXL storage plugin."""

    enabled: bool = doc_field(True, "false keeps the entry but turns the tier off")
    path: str = doc_field("", "folder for chunk files; empty = <data dir>/nixl-cache")
    plugin: Literal["POSIX", "GDS", "GDS_MT"] = doc_field(
        "POSIX", "NIXL storage plugin: POSIX (any host), GDS or GDS_MT (GPUDirect Storage, CUDA hosts)")


#: ``store.tiers`` entries by their ``type:`` tag.
TIER_CONFIGS: dict[str, type] = {"disk": DiskConfig, "redis": RedisConfig, "mooncake": MooncakeConfig,
                                 "s3": S3Config, "nixl": NixlStorageConfig}
LowerTierConfig = DiskConfig | RedisConfig | MooncakeConfig | S3Config | NixlStorageConfig

_TIERS_EXAMPLE = ("store:\n  tiers:\n    - {type: disk, capacity: 10GiB}\n"
                  "    - {type: redis, url: 'redis://host:6379/0'}")


@dataclass(frozen=True)
class StoreConfig:
    chunk_tokens: int = doc_field(256, "tokens per chunk; a multiple of the engine's block size")
    namespace: str = doc_field("", "tenant namespace mixed into every chunk key")
    l1: L1Config = field(default_factory=L1Config)
    tiers: tuple[LowerTierConfig, ...] = doc_field(
        (), "the tiers below L1, fastest first: a list of {type: disk|redis|mooncake|s3|nixl, ...}",
        tagged=TIER_CONFIGS)
    disk: DiskConfig = field(default_factory=DiskConfig, metadata={"doc": "old form of a disk entry in tiers"})
    redis: RedisConfig = field(default_factory=RedisConfig,
                               metadata={"doc": "old form of a redis entry in tiers"})
    drain_s: float = doc_field(5.0, "on shutdown, how long queued write-behind may still run")

    def validate(self) -> None:
        _positive(self, "chunk_tokens")
        _not_negative(self, "drain_s")

    def __post_init__(self) -> None:
        legacy = [n for n in ("disk", "redis") if getattr(self, n).enabled]
        if legacy and self.tiers:
            raise ValueError(f"store.{legacy[0]}.enabled and store.tiers are both set; list every tier in "
                             f"store.tiers only, e.g.\n{_TIERS_EXAMPLE}")
        seen: set[str] = set()
        for t in self.tiers:
            kind = tier_type(t)
            if kind in seen:
                raise ValueError(f"store.tiers: more than one tier of type {kind!r}")
            seen.add(kind)

    @property
    def lower_tiers(self) -> tuple[LowerTierConfig, ...]:
        """The enabled tiers below L1 in order: ``tiers``, or the old ``disk``/``redis`` sections."""
        if self.tiers:
            return tuple(t for t in self.tiers if t.enabled)
        return tuple(t for t in (self.disk, self.redis) if t.enabled)


def shared_tier_ids(store: StoreConfig) -> list[str]:
    """Ids of the remote tiers every chunk is written to (``write: all``), as the proxy compares them.

    Two agents with the same id share that tier: what one computed, the other can load.
    """
    out = []
    for t in store.lower_tiers:
        if t.write != "all":
            continue
        if isinstance(t, RedisConfig):
            out.append(f"redis:{t.url}#{t.key_prefix}")
        elif isinstance(t, MooncakeConfig):
            out.append(f"mooncake:{t.metadata_server}#{t.key_prefix}")
        elif isinstance(t, S3Config):
            out.append(f"s3:{t.endpoint_url}/{t.bucket}/{t.prefix}")
    return out


def tier_type(cfg: object) -> str:
    """The ``type:`` tag of a tier config."""
    for name, cls in TIER_CONFIGS.items():
        if type(cfg) is cls:
            return name
    raise ValueError(f"not a tier config: {type(cfg).__name__}")


#: the transport backends (``pdx.transport.TRANSPORTS`` registers one module for each)
TRANSPORT_BACKENDS = ("tcp", "shm", "nixl", "ucx", "cuda_ipc")


def _positive(cfg: object, *names: str) -> None:
    for name in names:
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"{name}: must be positive, got {getattr(cfg, name)!r}")


def _not_negative(cfg: object, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name}: must not be negative, got {getattr(cfg, name)!r}")


def _port(cfg: object, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and not 0 <= value <= 65535:
            raise ConfigError(f"{name}: expected a port number 0..65535, got {value}")


@dataclass(frozen=True)
class TransportConfig:
    """How this agent moves chunks to and from peer agents."""

    backend: str = doc_field("tcp", "tcp, shm, nixl, ucx or cuda_ipc")
    host: str = doc_field("127.0.0.1", "address peers connect to; loopback unless configured")
    port: int = doc_field(0, "port of the handshake listener; 0 = any free port")
    secret: str = doc_field("", "deployment secret for the peer challenge (prefer secret_file); empty = none: "
                            "then the agent refuses to bind a non-loopback host")
    secret_file: str = doc_field("", "file holding the deployment secret (must not be readable by group or "
                                 "others); used when secret is empty")
    peers: list[str] = doc_field([], "peer-socket addresses (tcp://host:port) this agent may fetch from, "
                                 "besides the agents registered with the same proxy")
    max_streams_per_peer: int = doc_field(16, "data streams one peer may hold open to this agent (tcp)")
    stream_idle_s: float = doc_field(300.0, "a data stream that carries nothing this long is closed (tcp)")
    connect_timeout_s: float = doc_field(5.0, "limit on connecting and the handshake")
    transfer_timeout_s: float = doc_field(30.0, "default deadline of one batch")
    heartbeat_s: float = doc_field(1.0, "peer liveness probe interval")
    verify_checksums: bool = doc_field(True, "receivers verify chunk checksums")
    connections_per_peer: int = doc_field(1, "parallel streams per peer (tcp)")
    warm_links: bool = doc_field(True, "open the session, transport connection and data streams to the agents "
                                 "this one will fetch from as soon as it learns of them (transport.peers, "
                                 "the proxy's list), in the background, instead of on the first fetch")
    warm_links_max: int = doc_field(64, "most peers kept warm at once (the rest connect on their first fetch)")
    warm_probe_s: float = doc_field(2.0, "how often a warm link's peer is pinged (a restarted peer is re-warmed)")
    debug_corrupt_every: int = doc_field(
        0, "testing only: flip one byte in every Nth chunk this agent receives (0 = off); "
        "lets integrity tests prove that corruption is detected")

    def validate(self) -> None:
        if self.backend not in TRANSPORT_BACKENDS:
            raise ConfigError(f"backend: expected one of {', '.join(TRANSPORT_BACKENDS)}, got {self.backend!r}")
        if not self.host:
            raise ConfigError("host: must not be empty")
        _port(self, "port")
        _positive(self, "connect_timeout_s", "transfer_timeout_s", "heartbeat_s", "connections_per_peer",
                  "warm_probe_s")
        _not_negative(self, "warm_links_max")
        _not_negative(self, "debug_corrupt_every")


@dataclass(frozen=True)
class ControlConfig:
    """The agent's ZMQ control plane: local clients (the connector) and peer agents."""

    address: str = doc_field(
        "", "local control socket: ipc://PATH (folder made owner-only) or tcp://127.0.0.1:PORT; "
        "empty = ipc://<data dir>/run/agent-<name>.sock"
    )
    request_timeout_s: float = doc_field(5.0, "clients' default limit on one call (reply included)")
    max_frame: int = size_field("8MiB", "largest control message accepted; a bigger frame drops the connection")
    peer_enabled: bool = doc_field(True, "serve peer agents (pin/reserve for their transfers) on transport.host")
    peer_port: int = doc_field(0, "port of the peer-facing control socket on transport.host; 0 = any free port")
    workers: int = doc_field(4, "threads that run data-moving jobs (fetch, send) and peer requests")
    job_retention_s: float = doc_field(300.0, "finished jobs stay queryable (job_status, wait) this long")
    max_jobs: int = doc_field(4096, "jobs kept at most (oldest finished ones are dropped first)")
    drain_timeout_s: float = doc_field(30.0, "on SIGTERM, how long in-flight transfers may take to finish")
    peer_max_share: float = doc_field(0.5, "most of the pool one peer may hold pinned or reserved at once "
                                      "(0 < share <= 1); the rest stays for the local engine and other peers")

    def validate(self) -> None:
        _port(self, "peer_port")
        _positive(self, "max_jobs")
        _not_negative(self, "job_retention_s", "drain_timeout_s")


@dataclass(frozen=True)
class HttpConfig:
    """The small HTTP endpoint: /healthz, /readyz, /metrics, /v1/status."""

    enabled: bool = doc_field(True, "serve the HTTP endpoint")
    host: str = doc_field("127.0.0.1", "bind address; loopback unless configured")
    port: int = doc_field(0, "port; 0 = any free port (logged at start-up)")

    def validate(self) -> None:
        _port(self, "port")


@dataclass(frozen=True)
class EngineConfig:
    """The engine (vLLM) the agent launches and supervises."""

    command: list[str] = doc_field(
        [], "engine command line; `pdx-agent ... -- CMD ...` replaces it; empty = no engine"
    )
    env: dict[str, str] = doc_field({}, "extra environment variables for the engine")
    url: str = doc_field("", "the engine's OpenAI HTTP base URL, announced to the proxy")
    inject_kv_config: bool = doc_field(
        True, "add --kv-transfer-config loading PdxConnector (pointed at this agent) to a vLLM "
        "command that has none"
    )
    restart: bool = doc_field(True, "restart the engine when it exits unexpectedly")
    restart_backoff_s: float = doc_field(1.0, "delay before the first restart; doubles each time")
    restart_backoff_max_s: float = doc_field(30.0, "longest delay between restarts")
    max_restarts: int = doc_field(10, "restarts in a row (without a stable run) before giving up")
    stable_after_s: float = doc_field(60.0, "an engine up this long resets the backoff and the count")
    stop_timeout_s: float = doc_field(20.0, "after SIGTERM, how long the engine may take before SIGKILL")

    def validate(self) -> None:
        if self.url and not re.match(r"^https?://[^/\s]+", self.url):
            raise ConfigError(f"url: expected an http:// or https:// URL, got {self.url!r}")
        _positive(self, "stop_timeout_s", "stable_after_s")


@dataclass(frozen=True)
class RegistrationConfig:
    """Announcing this agent to a pdx-proxy (see pdx.scheduler.messages)."""

    proxy_url: str = doc_field("", "base URL of pdx-proxy; empty = do not announce")
    proxy_urls: list[str] = doc_field(
        [], "base URLs of more pdx-proxies of the deployment: the agent announces itself to each")
    heartbeat_s: float = doc_field(2.0, "period of the announcement (each one is a heartbeat)")
    timeout_s: float = doc_field(2.0, "limit on one announcement's HTTP call")
    models: list[str] = doc_field([], "model names the engine serves, as the proxy should route them")
    summary_fp_rate: float = doc_field(0.01, "false-positive rate of the key summary (Bloom filter)")
    admin_key: str = doc_field(
        "", "bearer key for the proxy's admin endpoints (its admin_key, or its api_key when that is "
        "empty); empty = send none")

    def validate(self) -> None:
        if self.proxy_url and not re.match(r"^https?://[^/\s]+", self.proxy_url):
            raise ConfigError(f"proxy_url: expected an http:// or https:// URL, got {self.proxy_url!r}")
        _positive(self, "timeout_s")


@dataclass(frozen=True)
class LeaseConfig:
    """Pins are leases: they expire unless released first."""

    remote_s: float = doc_field(120.0, "lease of pins held for a remote reader (a decode agent)")
    max_s: float = doc_field(900.0, "longest lease a client may ask for")
    sweep_s: float = doc_field(0.5, "how often expired leases and reservations are reclaimed")


@dataclass(frozen=True)
class AgentConfig:
    """Everything one ``pdx-agent`` needs. Sections grow with the agent."""

    role: Literal["prefill", "decode", "both"] = doc_field("both", "what this worker does")
    name: str = doc_field("", "agent id (logs, sockets, registration); empty = <role>-<host>-<pid>")
    data_dir: str = doc_field("", "folder for logs, sockets and caches; empty = ~/.cache/pdx")
    store: StoreConfig = field(default_factory=StoreConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    registration: RegistrationConfig = field(default_factory=RegistrationConfig)
    leases: LeaseConfig = field(default_factory=LeaseConfig)

    def validate(self) -> None:
        if self.store.chunk_tokens <= 0:
            raise ConfigError("store.chunk_tokens: must be positive")
        addr = self.control.address
        if addr and not addr.startswith(("ipc://", "tcp://")):
            raise ConfigError(f"control.address: expected ipc://PATH or tcp://HOST:PORT, got {addr!r}")
        if self.control.request_timeout_s <= 0:
            raise ConfigError("control.request_timeout_s: must be positive")
        if self.control.workers <= 0:
            raise ConfigError("control.workers: must be positive")
        if self.control.max_frame < 4096:
            raise ConfigError("control.max_frame: must be at least 4KiB")
        if self.engine.restart_backoff_s < 0 or self.engine.restart_backoff_max_s < 0:
            raise ConfigError("engine.restart_backoff_s: must not be negative")
        if self.engine.max_restarts < 0:
            raise ConfigError("engine.max_restarts: must not be negative")
        if self.registration.heartbeat_s <= 0:
            raise ConfigError("registration.heartbeat_s: must be positive")
        if not 0 < self.registration.summary_fp_rate < 1:
            raise ConfigError("registration.summary_fp_rate: must be between 0 and 1")
        if self.leases.remote_s <= 0 or self.leases.max_s <= 0 or self.leases.sweep_s <= 0:
            raise ConfigError("leases: remote_s, max_s and sweep_s must be positive")
        if not 0 < self.control.peer_max_share <= 1:
            raise ConfigError("control.peer_max_share: must be above 0 and at most 1")
        if self.transport.max_streams_per_peer < 1:
            raise ConfigError("transport.max_streams_per_peer: must be at least 1")
        if self.transport.stream_idle_s <= 0:
            raise ConfigError("transport.stream_idle_s: must be positive")
        for addr in self.transport.peers:
            if not addr.startswith("tcp://"):
                raise ConfigError(f"transport.peers: expected tcp://HOST:PORT peer-socket addresses, got {addr!r}")


@dataclass(frozen=True)
class ConnectorConfig:
    """``PdxConnector`` settings: vLLM's ``kv_connector_extra_config`` (``pdx-agent`` writes it)."""

    agent_address: str = doc_field(
        "", "the local agent's control socket; empty = the PDX_AGENT_ADDRESS environment variable")
    agent_timeout_s: float = doc_field(5.0, "limit on one control call to the agent")
    lookup_timeout_s: float = doc_field(
        1.0, "limit on the scheduler's store lookup (a slower agent counts as a miss)")
    lookup_remote: bool = doc_field(True, "lookups also ask the remote tier (Redis) when the agent has one")
    load_timeout_s: float = doc_field(
        30.0, "deadline of one request's load (fetch from the prefill agent and unpack); "
        "what is not loaded by then is recomputed")
    lease_s: float = doc_field(
        120.0, "how long a prefill engine's agent keeps a finished request's chunks pinned for decode")
    reuse: bool = doc_field(True, "load prompt prefixes found in the local store (prefix reuse)")
    store: bool | None = doc_field(
        None, "store computed KV; none = by role (kv_producer and kv_both store, kv_consumer does not)")
    min_load_tokens: int = doc_field(1, "hits shorter than this are recomputed instead of loaded")
    model_id: str = doc_field(
        "", "model identity mixed into chunk keys; empty = the model name or path vLLM was given")
    verify_checksums: bool = doc_field(True, "re-hash every chunk before unpacking it")
    kernel_impl: str = doc_field("auto", "pack/unpack implementation: auto, cpu, reference or triton")
    sync_l1_loads: bool = doc_field(
        True, "load hits held entirely in L1 within the step that computes the rest of the prompt; "
        "false = every load is asynchronous")
    layerwise: bool = doc_field(
        True, "layer-wise P/D: when a prefill request names its decode agent (the proxy's "
        "pd_layerwise), stream each layer's KV to it as soon as the layer is computed; false = the "
        "decode side fetches the whole prompt after prefill")
    idle_wait_ms: float = doc_field(
        2.0, "in a step without a forward pass, wait up to this long for a load in flight to finish "
        "(stops vLLM's polling from starving the loader on few cores); 0 = never wait")

    def validate(self) -> None:
        for name in ("agent_timeout_s", "lookup_timeout_s", "load_timeout_s", "lease_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive")
        if self.min_load_tokens < 1:
            raise ConfigError("min_load_tokens: must be at least 1")
        if self.idle_wait_ms < 0:
            raise ConfigError("idle_wait_ms: must not be negative")


CONNECTOR_AGENT_ENV = "PDX_AGENT_ADDRESS"


def connector_config(extra: Mapping[str, Any] | None,
                     env: Mapping[str, str] | None = None) -> ConnectorConfig:
    """``ConnectorConfig`` from vLLM's ``kv_connector_extra_config``, then the environment's
    ``PDX__CONNECTOR__KEY=value`` overrides (e.g. ``PDX__CONNECTOR__LOAD_TIMEOUT_S=10``). The agent
    address falls back to ``PDX_AGENT_ADDRESS`` (set by ``pdx-agent`` for the engine it launches)."""
    environ = os.environ if env is None else env
    source = "kv_connector_extra_config"
    scoped = {ENV_PREFIX + k[len(ENV_PREFIX + "CONNECTOR__"):]: v for k, v in environ.items()
              if k.startswith(ENV_PREFIX + "CONNECTOR__")}
    raw = _apply_env(dict(extra or {}), scoped, source)
    if not raw.get("agent_address"):
        raw["agent_address"] = environ.get(CONNECTOR_AGENT_ENV, "")
    cfg = from_dict(ConnectorConfig, raw, source)
    try:
        cfg.validate()
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return cfg


# --- data folder ---------------------------------------------------------------------------

DATA_DIR_ENV = "PDX_DATA_DIR"


def data_dir(configured: str | os.PathLike[str] = "", env: Mapping[str, str] | None = None) -> Path:
    """The folder for pdx's caches, logs and the embedded models.

    Precedence: ``configured`` (a config field or a command-line argument), then the
    ``PDX_DATA_DIR`` environment variable, then ``~/.cache/pdx``. Does not create it.
    """
    if str(configured):
        return Path(configured).expanduser()
    value = (os.environ if env is None else env).get(DATA_DIR_ENV, "")
    if value:
        return Path(value).expanduser()
    return Path.home() / ".cache" / "pdx"


# --- proxy -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProxyWorkerConfig:
    """One engine worker the proxy knows without any agent registration."""

    url: str = doc_field("", "base URL of the engine's OpenAI server, e.g. http://127.0.0.1:8100")
    role: Literal["prefill", "decode", "both"] = doc_field(
        "both", "prefill, decode or both (a 'both' worker can serve either side)")
    agent_url: str = doc_field(
        "", "HTTP address of the worker's pdx-agent (health via /readyz); empty = none")
    id: str = doc_field("", "name in logs, metrics and /admin/workers; empty = host:port of url")


@dataclass(frozen=True)
class CacheAwareConfig:
    """Settings of the ``cache_aware`` routing policy."""

    tokenizer: str = doc_field(
        "", "folder (or tokenizer.json) of the model's Hugging Face tokenizer; empty = byte-level "
        "stand-in, which only matches the proxy's own routing hints, not agents' key summaries")
    chunk_tokens: int = doc_field(
        256, "chunk size used for workers whose agent has not announced one")
    max_imbalance: int = doc_field(
        8, "a cached worker is preferred only while it has at most this many more outstanding "
        "requests than the least-loaded one")
    skip_prefill: bool = doc_field(
        True, "send a request straight to a decode worker that already holds all its full chunks")
    hint_keys: int = doc_field(
        65536, "chunk keys the proxy remembers per worker from its own routing; 0 = none")


@dataclass(frozen=True)
class PeerReuseConfig:
    """Peer-to-peer reuse in the proxy: when to hint a worker to fetch a prefix from another agent
    (docs/proxy.md, "Peer-to-peer reuse"). Fetch when its estimated cost is below recompute's."""

    enabled: bool = doc_field(True, "send peer hints (kv_transfer_params.pdx.hint)")
    link_gbps: float = doc_field(
        10.0, "bandwidth of the peer plane between agents, Gbit/s (e.g. pdx-bench fleet's p2p_fetch_gbps, "
        "which is in GB/s, x 8)")
    fetch_fixed_ms: float = doc_field(
        5.0, "fixed cost of one fetch, ms: the peer_pin round trip, the transfer set-up, the release, "
        "and the engine step the asynchronous load waits for")
    prefill_tokens_per_s: float = doc_field(
        10000.0, "prefill rate assumed until the proxy has measured one (from its prefill calls)")
    bytes_per_token: int = size_field(
        0, "KV bytes per token of a chunk; 0 = from the holder's announcement (pool bytes / chunks), "
        "else 128 KiB (an 8B model in 16 bits)")
    min_chunks: int = doc_field(1, "hint only when the holder has at least this many more chunks")

    def validate(self) -> None:
        if self.link_gbps <= 0 or self.prefill_tokens_per_s <= 0:
            raise ConfigError("link_gbps, prefill_tokens_per_s: must be positive")
        if self.fetch_fixed_ms < 0 or self.bytes_per_token < 0:
            raise ConfigError("fetch_fixed_ms, bytes_per_token: must not be negative")
        if self.min_chunks < 1:
            raise ConfigError("min_chunks: must be at least 1")


#: the prefix of every cache_salt the proxy sets for a tenant; clients may not send one
TENANT_SALT_PREFIX = "tenant:"
_SALT_FORBIDDEN = ("@", "/", "\\", "\0")  # vLLM refuses these in a cache_salt


@dataclass(frozen=True)
class TenantConfig:
    """A client of the proxy with its own API key and its own KV (docs/security.md, Tenants)."""

    name: str = doc_field("", "the tenant's name (logs); also its salt when cache_salt is empty")
    api_key: str = doc_field("", "the tenant's bearer key for the OpenAI endpoints")
    cache_salt: str = doc_field(
        "", "mixed into the chunk keys of every request of this tenant (sent to vLLM as "
        "cache_salt 'tenant:<salt>'); keep it secret; empty = the name")

    @property
    def salt(self) -> str:
        """The ``cache_salt`` workers see for this tenant's requests."""
        return TENANT_SALT_PREFIX + (self.cache_salt or self.name)


@dataclass(frozen=True)
class ProxyConfig:
    """Everything ``pdx-proxy serve`` needs."""

    host: str = doc_field("127.0.0.1", "address the OpenAI endpoint listens on")
    port: int = doc_field(8000, "port of the OpenAI endpoint; 0 = any free port")
    admin_port: int | None = doc_field(
        None, "port of the admin endpoints (/admin/...); none = on the main port; 0 = any free port")
    admin_host: str = doc_field("127.0.0.1", "address of the admin listener when admin_port is set")
    models: list[str] = doc_field(
        [], "model names served; empty = learned from the workers' /v1/models")
    policy: str = doc_field("prefix_affinity", "routing policy: round_robin, least_loaded, cache_aware or "
                            "prefix_affinity (the default: see docs/proxy.md, 'Choosing the default')")
    workers: list[ProxyWorkerConfig] = doc_field([], "static workers (more can register at runtime)")
    api_key: str = doc_field("", "clients must send 'Authorization: Bearer <key>'; empty = no check")
    admin_key: str = doc_field(
        "", "key for the admin endpoints; empty = the api_key (no check when both are empty)")
    upstream_api_key: str = doc_field("", "bearer key sent to the workers; empty = none")
    tenants: list[TenantConfig] = doc_field(
        [], "clients with their own key: a request with a tenant's key is served with the tenant's "
        "cache_salt, so tenants never share KV")
    max_body_size: int = size_field("4MiB", "largest request body accepted (413 above)")
    max_upstream_body_size: int = size_field(
        "64MiB", "largest answer read whole from a worker (prefill, non-streamed decode); a bigger one "
        "fails that worker's call")
    max_inflight: int = doc_field(256, "requests served at once; more wait in the queue")
    max_queue: int = doc_field(1024, "requests waiting for a slot; more get 429")
    queue_timeout_s: float = doc_field(10.0, "a request waiting longer than this gets 503")
    retry_after_s: int = doc_field(1, "Retry-After seconds sent with 429 and 503")
    connect_timeout_s: float = doc_field(3.0, "limit on connecting to a worker")
    prefill_timeout_s: float = doc_field(300.0, "limit on a whole prefill call")
    first_token_timeout_s: float = doc_field(300.0, "limit from sending to decode until its first byte")
    read_timeout_s: float = doc_field(60.0, "longest gap between two pieces of a decode answer")
    prefill_retries: int = doc_field(1, "other prefill workers tried after one fails")
    decode_retries: int = doc_field(1, "other decode workers tried when one fails before its first byte")
    prefill_fallback: bool = doc_field(
        True, "when no prefill worker answers, the decode worker computes the prompt itself")
    decode_fallback: bool = doc_field(
        True, "when no decode worker is healthy or answers before its first byte, a prefill worker "
        "serves the whole request (colocated)")
    health_interval_s: float = doc_field(2.0, "period of health checks (GET /health, agent /readyz)")
    health_timeout_s: float = doc_field(2.0, "limit on one health check")
    unhealthy_after: int = doc_field(2, "failed health checks in a row before a worker leaves the pool")
    heartbeat_timeout_s: float = doc_field(
        5.0, "a worker whose agent announced itself leaves the pool after this long without a heartbeat")
    pd_layerwise: bool = doc_field(
        False, "layer-wise P/D: name the decode worker's agent in the prefill request, so that the "
        "prefill streams each layer's KV to it while the next layers compute (docs/connector.md)")
    log_requests: bool = doc_field(False, "log one line per request (id, workers, status, timings)")
    shutdown_grace_s: float = doc_field(
        5.0, "on stop, requests in flight get this long to finish before they are cancelled")
    cache_aware: CacheAwareConfig = field(default_factory=CacheAwareConfig)
    p2p: PeerReuseConfig = field(default_factory=PeerReuseConfig)

    def validate(self) -> None:
        for name in ("port", "admin_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise ConfigError(f"{name}: expected a port number 0..65535, got {value}")
        for name in ("max_inflight", "unhealthy_after", "retry_after_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive")
        for name in ("max_queue", "prefill_retries", "decode_retries"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: cannot be negative")
        for name in ("queue_timeout_s", "connect_timeout_s", "prefill_timeout_s",
                     "first_token_timeout_s", "read_timeout_s", "health_interval_s",
                     "health_timeout_s", "heartbeat_timeout_s", "shutdown_grace_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be a positive number of seconds")
        if self.max_body_size <= 0 or self.max_upstream_body_size <= 0:
            raise ConfigError("max_body_size, max_upstream_body_size: must be positive")
        if self.cache_aware.chunk_tokens <= 0:
            raise ConfigError("cache_aware.chunk_tokens: must be positive")
        if self.cache_aware.max_imbalance < 0 or self.cache_aware.hint_keys < 0:
            raise ConfigError("cache_aware.max_imbalance and hint_keys cannot be negative")
        self._validate_tenants()
        seen: set[str] = set()
        for i, w in enumerate(self.workers):
            for name in ("url", "agent_url"):
                value = getattr(w, name)
                if (value or name == "url") and not re.match(r"^https?://[^/\s]+", value):
                    raise ConfigError(
                        f"workers[{i}].{name}: expected an http:// or https:// URL, got {value!r}")
            key = w.url.rstrip("/")
            if key in seen:
                raise ConfigError(f"workers[{i}].url: {w.url!r} is listed twice")
            seen.add(key)

    def _validate_tenants(self) -> None:
        names: set[str] = set()
        salts: set[str] = set()
        keys = {k for k in (self.api_key, self.admin_key) if k}
        for i, tenant in enumerate(self.tenants):
            if not tenant.name or tenant.name in names:
                raise ConfigError(f"tenants[{i}].name: every tenant needs a unique name")
            names.add(tenant.name)
            if not tenant.api_key or tenant.api_key in keys:
                raise ConfigError(f"tenants[{i}].api_key: needs a key of its own (not empty, not another "
                                  "tenant's, not the api_key or admin_key)")
            keys.add(tenant.api_key)
            salt = tenant.cache_salt or tenant.name
            if len(tenant.salt) > 128 or any(c in salt for c in _SALT_FORBIDDEN):
                raise ConfigError(f"tenants[{i}].cache_salt: at most {128 - len(TENANT_SALT_PREFIX)} "
                                  "characters, none of '@', '/', '\\' or NUL")
            if tenant.salt in salts:
                raise ConfigError(f"tenants[{i}].cache_salt: the same as another tenant's (they would share KV)")
            salts.add(tenant.salt)


# --- loading ---------------------------------------------------------------------------------


def load_config(cls: type[T], path: str | os.PathLike[str] | None = None,
                data: Mapping[str, Any] | None = None,
                env: Mapping[str, str] | None = None) -> T:
    """Load ``cls`` from a YAML file (or a mapping), then apply ``PDX__`` overrides."""
    source = str(path) if path is not None else "<dict>"
    raw: Any = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    elif data is not None:
        raw = data
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(raw).__name__}")
    environ = os.environ if env is None else env
    ours = {name: value for name, value in environ.items() if _env_first_key(name) in _field_names(cls)}
    merged = _apply_env(dict(raw), ours, source)
    try:
        cfg = from_dict(cls, merged, source)
        validate = getattr(cfg, "validate", None)
        if callable(validate):
            try:
                validate()
            except ConfigError as exc:
                raise ConfigError(f"{source}: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(_blame_env(str(exc), ours)) from None
    return cfg


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]


def _env_first_key(name: str) -> str:
    if not name.startswith(ENV_PREFIX):
        return ""
    return name[len(ENV_PREFIX):].split("__", 1)[0].lower()


def _blame_env(message: str, overrides: Mapping[str, str]) -> str:
    """Add which environment variable set the key an error names (the file did not)."""
    for name in overrides:
        parts = [p.lower() for p in name[len(ENV_PREFIX):].split("__") if p]
        key = ".".join(parts)
        unknown = "unknown key " + "".join(f"{p}." for p in parts[:-1]) + repr(parts[-1])
        if f" {key}:" in message or unknown in message:
            return f"{message} (set by the environment variable {name})"
    return message


def _apply_env(raw: dict[str, Any], env: Mapping[str, str], source: str) -> dict[str, Any]:
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX):].split("__") if p]
        if not path:
            continue
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: env {name} overrides {part!r}, which is not a section")
            node = child
        try:
            node[path[-1]] = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            node[path[-1]] = value  # not a YAML scalar: the string itself, checked like any other
    return raw


def from_dict(cls: type[T], raw: Mapping[str, Any], source: str = "<dict>", prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``raw``, checking every key and type."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'}: expected a mapping, "
                          f"got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {prefix}{unknown[0]!r}; allowed: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _convert(hints[name], value, fields[name], source, f"{prefix}{name}")
    try:
        cfg = cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'}: {exc}") from exc
    validate = getattr(cfg, "validate", None)
    if prefix and callable(validate):  # a section; the top level is the caller's (load_config)
        try:
            validate()
        except ConfigError as exc:
            raise ConfigError(f"{source}: {prefix}{exc}") from None
    return cfg


def _convert(tp: Any, value: Any, f: dataclasses.Field[Any], source: str, key: str) -> Any:
    def bad(allowed: str) -> ConfigError:
        return ConfigError(f"{source}: {key}: expected {allowed}, got {value!r}")

    if f.metadata.get("size"):
        try:
            return parse_size(value)
        except ValueError as exc:
            raise ConfigError(f"{source}: {key}: {exc}") from None
    origin = typing.get_origin(tp)
    tagged = f.metadata.get("tagged")
    if tagged and isinstance(value, Mapping):
        return _convert_tagged(tagged, value, source, key)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, f"{key}.")  # type: ignore[arg-type]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise bad("one of " + ", ".join(map(repr, choices)))
        return value
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            return tp(value)
        except ValueError:
            raise bad("one of " + ", ".join(repr(m.value) for m in tp)) from None
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, f, source, key)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise bad("a list")
        (item,) = typing.get_args(tp)[:1]
        out = [_convert(item, v, f, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, Mapping):
            raise bad("a mapping")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    return value


def _convert_tagged(classes: Mapping[str, type], value: Mapping[str, Any], source: str, key: str) -> Any:
    """One entry of a ``type:``-tagged list (``store.tiers``): the dataclass its tag names."""
    kind = value.get("type")
    if not isinstance(kind, str) or kind not in classes:
        raise ConfigError(f"{source}: {key}.type: expected one of {', '.join(map(repr, classes))}, "
                          f"got {kind!r}")
    body = {k: v for k, v in value.items() if k != "type"}
    body.setdefault("enabled", True)  # listed = on (the old sections needed enabled: true)
    return from_dict(classes[kind], body, source, f"{key}.")


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per key with its default and doc, for ``--help`` and the docs."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.extend(describe(tp, f"{prefix}{f.name}."))  # type: ignore[arg-type]
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if isinstance(default, Enum):
            default = default.value
        if f.metadata.get("size") and isinstance(default, int):
            default = format_size(default) if default else 0
        lines.append(f"{prefix}{f.name} = {default!r}: {f.metadata.get('doc', '')}")
    return lines
