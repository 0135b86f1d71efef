"""`pdx up`'s deployment config and bookkeeping (no process is started here)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from pdx.config import load_config
from pdx.deploy.cli import DEFAULT_CONFIG, main
from pdx.deploy.deployment import STATE_FILE, DeployConfig, Deployment, read_state, stop_running
from pdx.errors import ConfigError, PdxError

WORKERS = [{"name": "p", "role": "prefill"}, {"name": "d", "role": "decode"}]


def _cfg(**raw: Any) -> DeployConfig:
    return load_config(DeployConfig, data={"workers": WORKERS, **raw}, env={})


def test_the_shipped_config_loads() -> None:
    cfg = load_config(DeployConfig, DEFAULT_CONFIG, env={})
    assert [w.role for w in cfg.workers] == ["prefill", "decode"]
    assert cfg.proxy.policy == "cache_aware" and cfg.chunk_tokens % 128 == 0


@pytest.mark.parametrize(("raw", "message"), [
    ({"workers": [{"name": "p", "role": "prefill"}]}, "at least one prefill"),
    ({"workers": [{"name": "a", "role": "both"}, {"name": "a", "role": "both"}]}, "unique name"),
    ({"workers": [{"name": "a", "role": "proxy"}]}, "workers[0].role"),
    ({"chunk_tokens": 0}, "chunk_tokens"),
    ({"proxy": {"port": 70000}}, "port"),
    ({"proxi": {}}, "unknown key 'proxi'"),
])
def test_bad_configs_name_the_key(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _cfg(**raw)


def test_env_overrides_apply_to_the_deployment_and_do_not_reach_children(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDX__PROXY__PORT", "8123")
    cfg = load_config(DeployConfig, data={"workers": WORKERS})
    assert cfg.proxy.port == 8123
    dep = Deployment(cfg)
    assert "PDX__PROXY__PORT" not in dep.child_env
    assert dep.child_env.get("PATH") == os.environ.get("PATH")


def test_state_file_of_a_dead_process_is_stale(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text(json.dumps({"pid": 2**22 + 12345, "url": "http://x"}))
    assert read_state(tmp_path) is None
    assert not (tmp_path / STATE_FILE).exists()
    assert stop_running(tmp_path) is None


def test_state_file_of_a_live_process_blocks_a_second_start(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text(json.dumps({"pid": os.getpid(), "url": "http://x"}))
    assert read_state(tmp_path) == {"pid": os.getpid(), "url": "http://x"}
    dep = Deployment(_cfg(workdir=str(tmp_path)))
    with pytest.raises(PdxError, match="already runs"):
        dep.start()


def test_unknown_model_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a model folder"):
        Deployment(_cfg(model="huge", workdir=str(tmp_path))).start()


def test_cli_help_config_lists_every_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["up", "--help-config"]) == 0
    out = capsys.readouterr().out
    for key in ("model =", "chunk_tokens =", "proxy.policy =", "workers[].cpu_bind ="):
        assert key in out


def test_cli_reports_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("workers: [{name: a, role: prefill}]\nmodle: tiny\n")
    assert main(["demo", "--config", str(bad)]) == 2
    assert "unknown key 'modle'" in capsys.readouterr().err


def test_down_without_a_deployment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"workdir: {tmp_path}\nworkers: [{{name: a, role: both}}]\n")
    assert main(["down", "--config", str(cfg)]) == 1
    assert "no deployment is running" in capsys.readouterr().out


@pytest.mark.parametrize(("proxy", "api", "admin"), [
    ({}, {}, ""),
    ({"api_key": "k"}, {"Authorization": "Bearer k"}, "k"),  # the admin endpoints fall back to the api key
    ({"api_key": "k", "admin_key": "a"}, {"Authorization": "Bearer k"}, "a"),
])
def test_keys_reach_the_demo_client_and_the_agents(proxy: dict[str, str], api: dict[str, str], admin: str) -> None:
    dep = Deployment(_cfg(proxy=proxy))
    assert dep.api_headers == api and dep.admin_key == admin
