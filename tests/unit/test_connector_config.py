"""``ConnectorConfig``: vLLM's kv_connector_extra_config plus PDX__CONNECTOR__ overrides."""

from __future__ import annotations

import pytest

from pdx.config import ConnectorConfig, connector_config
from pdx.errors import ConfigError


def test_defaults_and_agent_address_from_environment() -> None:
    cfg = connector_config({}, env={"PDX_AGENT_ADDRESS": "ipc:///run/a.sock"})
    assert cfg.agent_address == "ipc:///run/a.sock"
    assert cfg == ConnectorConfig(agent_address="ipc:///run/a.sock")
    # the extra config wins over the launcher's variable
    cfg = connector_config({"agent_address": "tcp://127.0.0.1:5"}, env={"PDX_AGENT_ADDRESS": "ipc:///x"})
    assert cfg.agent_address == "tcp://127.0.0.1:5"


def test_environment_overrides_extra_config() -> None:
    cfg = connector_config({"agent_address": "ipc:///a", "load_timeout_s": 30},
                           env={"PDX__CONNECTOR__LOAD_TIMEOUT_S": "8", "PDX__CONNECTOR__REUSE": "false",
                                "PDX__STORE__CHUNK_TOKENS": "64"})
    assert cfg.load_timeout_s == 8.0 and cfg.reuse is False


@pytest.mark.parametrize(("extra", "env", "match"), [
    ({"colour": 1}, {}, "unknown key 'colour'"),
    ({"lease_s": 0}, {}, "lease_s: must be positive"),
    ({"lookup_remote": "yes"}, {}, "lookup_remote: expected true or false"),
    ({}, {"PDX__CONNECTOR__MIN_LOAD_TOKENS": "0"}, "min_load_tokens: must be at least 1"),
    ({}, {"PDX__CONNECTOR__IDLE_WAIT_MS": "-1"}, "idle_wait_ms: must not be negative"),
])
def test_bad_settings_name_the_key(extra: dict[str, object], env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        connector_config(extra, env=env)
    assert "kv_connector_extra_config" in str(info.value)
