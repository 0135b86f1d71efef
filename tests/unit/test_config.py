"""Config errors name the key, the file and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdx.config import AgentConfig, Eviction, describe, load_config, parse_size
from pdx.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.yaml"
    p.write_text(text)
    return p


def test_defaults_and_sizes(tmp_path: Path) -> None:
    cfg = load_config(AgentConfig, write(tmp_path, "store:\n  l1:\n    capacity: 64MiB\n    eviction: lfu\n"), env={})
    assert cfg.store.l1.capacity == 64 * 2**20
    assert cfg.store.l1.eviction is Eviction.LFU
    assert cfg.store.chunk_tokens == 256
    assert cfg.transport.host == "127.0.0.1"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("store:\n  l1:\n    capcity: 1GiB\n", "unknown key store.l1.'capcity'; allowed: capacity"),
        ("store:\n  chunk_tokens: lots\n", "store.chunk_tokens: expected an integer, got 'lots'"),
        ("store:\n  l1:\n    eviction: random\n", "store.l1.eviction: expected one of 'lru', 'lfu', 's3fifo'"),
        ("role: router\n", "role: expected one of 'prefill', 'decode', 'both'"),
        ("store:\n  l1:\n    capacity: 12 apples\n", "store.l1.capacity: expected a size"),
        ("store: 3\n", "store: expected a mapping"),
        ("transport:\n  verify_checksums: 1\n", "transport.verify_checksums: expected true or false"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("store: [unclosed\n", "not valid YAML"),
    ],
)
def test_errors_name_key_and_file(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(AgentConfig, path, env={})
    assert str(path) in str(info.value)
    assert needle in str(info.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(AgentConfig, tmp_path / "nope.yaml", env={})


def test_env_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "store:\n  l1:\n    capacity: 64MiB\n")
    cfg = load_config(AgentConfig, path, env={
        "PDX__STORE__L1__CAPACITY": "2GiB",
        "PDX__TRANSPORT__BACKEND": "shm",
        "PDX__STORE__REDIS__ENABLED": "true",
        "UNRELATED": "x",
    })
    assert cfg.store.l1.capacity == 2 * 2**30
    assert cfg.transport.backend == "shm"
    assert cfg.store.redis.enabled is True


def test_env_override_of_unknown_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key store\.'nope'"):
        load_config(AgentConfig, write(tmp_path, "{}\n"), env={"PDX__STORE__NOPE": "1"})


def test_configs_are_frozen(tmp_path: Path) -> None:
    cfg = load_config(AgentConfig, write(tmp_path, "{}\n"), env={})
    with pytest.raises(AttributeError):
        cfg.role = "decode"  # type: ignore[misc]


def test_parse_size() -> None:
    assert parse_size("256KiB") == 262144
    assert parse_size("1GB") == 10**9
    assert parse_size(5) == 5
    for bad in ("-1", "1 XB", True, -3, 1.5):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_every_field_is_documented() -> None:
    lines = describe(AgentConfig)
    assert any(line.startswith("store.l1.capacity = '1.0GiB'") for line in lines)
    undocumented = [line for line in lines if line.endswith(": ")]
    assert not undocumented, undocumented
