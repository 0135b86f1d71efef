"""Configs: YAML files loaded into frozen, documented dataclasses.

Validation lives here and only here: an unknown key, a wrong type or a bad value
raises ``ConfigError`` naming the key path, the file and what is allowed.

Environment overrides (the one place pdx reads configuration from the
environment): ``PDX__SECTION__KEY=value`` sets ``section.key``; the value is
parsed as a YAML scalar. Example: ``PDX__STORE__L1__CAPACITY=2GiB``.
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


@dataclass(frozen=True)
class StoreConfig:
    chunk_tokens: int = doc_field(256, "tokens per chunk; a multiple of the engine's block size")
    namespace: str = doc_field("", "tenant namespace mixed into every chunk key")
    l1: L1Config = field(default_factory=L1Config)
    disk: DiskConfig = field(default_factory=DiskConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)


@dataclass(frozen=True)
class TransportConfig:
    """How this agent moves chunks to and from peer agents."""

    backend: str = doc_field("tcp", "tcp, shm, nixl, ucx or cuda_ipc")
    host: str = doc_field("127.0.0.1", "address peers connect to; loopback unless configured")
    port: int = doc_field(0, "port of the handshake listener; 0 = any free port")
    secret: str = doc_field("", "shared secret for the peer challenge; empty = no challenge")
    connect_timeout_s: float = doc_field(5.0, "limit on connecting and the handshake")
    transfer_timeout_s: float = doc_field(30.0, "default deadline of one batch")
    heartbeat_s: float = doc_field(1.0, "peer liveness probe interval")
    verify_checksums: bool = doc_field(True, "receivers verify chunk checksums")
    connections_per_peer: int = doc_field(1, "parallel streams per peer (tcp)")


@dataclass(frozen=True)
class AgentConfig:
    """Everything one ``pdx-agent`` needs. Sections grow with the agent."""

    role: Literal["prefill", "decode", "both"] = doc_field("both", "what this worker does")
    data_dir: str = doc_field("", "folder for logs, sockets and caches; empty = ~/.cache/pdx")
    store: StoreConfig = field(default_factory=StoreConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)

    def validate(self) -> None:
        if self.store.chunk_tokens <= 0:
            raise ConfigError("store.chunk_tokens: must be positive")


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
    merged = _apply_env(dict(raw), os.environ if env is None else env, source)
    cfg = from_dict(cls, merged, source)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    return cfg


def _apply_env(raw: dict[str, Any], env: Mapping[str, str], source: str) -> dict[str, Any]:
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX):].split("__") if p]
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: env {name} overrides {part!r}, which is not a section")
            node = child
        node[path[-1]] = yaml.safe_load(value) if value != "" else ""
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
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'}: {exc}") from exc


def _convert(tp: Any, value: Any, f: dataclasses.Field[Any], source: str, key: str) -> Any:
    def bad(allowed: str) -> ConfigError:
        return ConfigError(f"{source}: {key}: expected {allowed}, got {value!r}")

    if f.metadata.get("size"):
        try:
            return parse_size(value)
        except ValueError as exc:
            raise ConfigError(f"{source}: {key}: {exc}") from None
    origin = typing.get_origin(tp)
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
