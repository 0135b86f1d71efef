"""Config errors name the key, the file and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pdx.config import (
    TRANSPORT_BACKENDS,
    AgentConfig,
    Eviction,
    ProxyConfig,
    connector_config,
    describe,
    load_config,
    parse_size,
)
from pdx.deploy.deployment import DeployConfig
from pdx.errors import ConfigError
from pdx.transport import TRANSPORTS


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


# --- overrides reach only the config that has their section ----------------------------------


def test_an_override_applies_only_to_a_config_with_that_section(tmp_path: Path) -> None:
    env = {"PDX__CONNECTOR__LOAD_TIMEOUT_S": "7", "PDX__PROXY__PORT": "9000", "PDX__PORT": "9001",
           "PDX__STORE__CHUNK_TOKENS": "512", "PDX__": "x"}
    agent = load_config(AgentConfig, write(tmp_path, "{}\n"), env=env)  # no connector, proxy or port key
    assert agent.store.chunk_tokens == 512
    assert connector_config({}, env=env).load_timeout_s == 7.0
    assert load_config(ProxyConfig, data={}, env=env).port == 9001
    deploy = load_config(DeployConfig, data={"workers": [{"name": "a", "role": "both"}]}, env=env)
    assert deploy.proxy.port == 9000


def test_a_bad_override_in_an_existing_section_names_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path, "{}\n")
    with pytest.raises(ConfigError, match=r"unknown key store\.'nope'.*PDX__STORE__NOPE"):
        load_config(AgentConfig, path, env={"PDX__STORE__NOPE": "1"})
    with pytest.raises(ConfigError, match=r"transport\.backend: expected one of .*PDX__TRANSPORT__BACKEND"):
        load_config(AgentConfig, path, env={"PDX__TRANSPORT__BACKEND": "carrier-pigeon"})
    with pytest.raises(ConfigError, match=r"store\.chunk_tokens: expected an integer, got '\[x'"):
        load_config(AgentConfig, path, env={"PDX__STORE__CHUNK_TOKENS": "[x"})  # not YAML: kept as text


# --- every section is checked at load ------------------------------------------------------------


@pytest.mark.parametrize(("text", "needle"), [
    ("transport:\n  backend: carrier-pigeon\n", "transport.backend: expected one of tcp, shm, nixl, ucx, cuda_ipc"),
    ("transport:\n  port: 70000\n", "transport.port: expected a port number"),
    ("transport:\n  connect_timeout_s: 0\n", "transport.connect_timeout_s: must be positive"),
    ("transport:\n  host: ''\n", "transport.host: must not be empty"),
    ("store:\n  l1:\n    capacity: 0\n", "store.l1.capacity: must be positive"),
    ("store:\n  disk:\n    queue_depth: -1\n", "store.disk.queue_depth: must not be negative"),
    ("store:\n  redis:\n    url: http://cache:6379\n", "store.redis.url: expected redis://"),
    ("store:\n  drain_s: -1\n", "store.drain_s: must not be negative"),
    ("http:\n  port: -1\n", "http.port: expected a port number"),
    ("control:\n  peer_port: 65536\n", "control.peer_port: expected a port number"),
    ("engine:\n  url: localhost:8000\n", "engine.url: expected an http:// or https:// URL"),
    ("registration:\n  proxy_url: ftp://proxy\n", "registration.proxy_url: expected an http:// or https:// URL"),
])
def test_every_section_is_checked_at_load(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(AgentConfig, path, env={})
    assert str(info.value).startswith(f"{path}: ") and needle in str(info.value), str(info.value)


def test_the_shipped_agent_and_proxy_configs_load() -> None:
    configs = Path(__file__).resolve().parents[2] / "configs"
    for path in sorted(configs.glob("*.yaml")):
        cls = ProxyConfig if path.stem.startswith("proxy") else (
            DeployConfig if path.stem.startswith("local") else AgentConfig)
        load_config(cls, path, env={})


def test_a_nested_section_error_names_its_path() -> None:
    with pytest.raises(ConfigError, match=r"<dict>: proxy\.port: expected a port number"):
        load_config(DeployConfig, data={"workers": [{"name": "a", "role": "both"}], "proxy": {"port": -2}}, env={})


@pytest.mark.parametrize(("worker", "needle"), [
    ({"transport": {"backend": "carrier-pigeon"}}, "workers[0].transport.backend: expected one of"),
    ({"transport": {"prot": 1}}, "unknown key workers[0].transport.'prot'"),
    ({"store": {"l1": {"capacity": "lots"}}}, "workers[0].store.l1.capacity: expected a size"),
])
def test_the_deployment_checks_its_agents_sections(tmp_path: Path, worker: dict[str, object], needle: str) -> None:
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump({"workers": [{"name": "a", "role": "both", **worker}]}))
    with pytest.raises(ConfigError) as info:
        load_config(DeployConfig, path, env={})
    assert str(info.value).startswith(f"{path}: ") and needle in str(info.value), str(info.value)


def test_the_backend_choices_are_the_registered_transports() -> None:
    assert sorted(TRANSPORT_BACKENDS) == sorted(TRANSPORTS.names())
