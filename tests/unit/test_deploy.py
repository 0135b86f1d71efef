"""`pdx up`'s deployment config and bookkeeping (no process is started here)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from pdx.config import load_config
from pdx.deploy import agent_engine, credentials
from pdx.deploy.cli import DEFAULT_CONFIG, main
from pdx.deploy.deployment import STATE_FILE, DeployConfig, Deployment, read_state, stop_running
from pdx.deploy.process import AgentProcess
from pdx.errors import ConfigError, PdxError

WORKERS = [{"name": "p", "role": "prefill"}, {"name": "d", "role": "decode"}]


def _cfg(**raw: Any) -> DeployConfig:
    return load_config(DeployConfig, data={"workers": WORKERS, **raw}, env={})


def test_the_shipped_config_loads() -> None:
    cfg = load_config(DeployConfig, DEFAULT_CONFIG, env={})
    assert [w.role for w in cfg.workers] == ["prefill", "decode"]
    assert cfg.proxy.policy == "prefix_affinity" and cfg.chunk_tokens % 128 == 0


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


@pytest.mark.parametrize("proxy", [{}, {"api_key": "k"}, {"api_key": "k", "admin_key": "a"}])
def test_the_proxy_always_gets_an_api_key_and_a_separate_admin_key(proxy: dict[str, str], tmp_path: Path) -> None:
    dep = Deployment(_cfg(proxy=proxy, workdir=str(tmp_path)))
    dep._prepare_credentials()
    if "api_key" in proxy:
        assert dep.api_key == "k"
    else:
        assert len(dep.api_key) >= 16
    assert dep.api_headers == {"Authorization": f"Bearer {dep.api_key}"}
    assert dep.admin_key and dep.admin_key != dep.api_key  # a client cannot register workers
    if "admin_key" in proxy:
        assert dep.admin_key == "a"
    assert (tmp_path / "api_key").read_text().strip() == dep.api_key
    dep.stop()
    assert not (tmp_path / "api_key").exists() and not (tmp_path / "secret").exists()


def test_credentials_are_fresh_and_owner_only(tmp_path: Path) -> None:
    old_umask = os.umask(0o000)  # the most permissive umask must not leak into the files' modes
    try:
        (tmp_path / "secret").write_text("old\n")
        os.chmod(tmp_path / "secret", 0o644)
        first = credentials.prepare(tmp_path)
        secret_1 = first.secret_file.read_text()
        second = credentials.prepare(tmp_path)
    finally:
        os.umask(old_umask)
    for path in (second.secret_file, second.api_key_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert secret_1 != "old\n" and second.secret_file.read_text() != secret_1
    assert len(secret_1.strip()) == 64 and first.api_key != second.api_key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["api_key", "secret"]  # no temp file left


def test_every_agent_gets_the_secret_file_and_the_admin_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[dict[str, Any]] = []

    class FakeEngine:
        """Records what the deployment hands each agent (no process is started)."""

        def __init__(self, name: str, *args: Any, **kwargs: Any) -> None:
            made.append({"name": name, **kwargs})
            self.url = f"http://127.0.0.1/{name}"
            self.agent = self

        def start(self) -> None:
            pass

        def wait_ready(self, timeout_s: float) -> None:
            pass

        def stop(self) -> None:
            pass

    monkeypatch.setattr(agent_engine, "AgentEngine", FakeEngine)
    workers = [{"name": "p", "role": "prefill", "transport": {"backend": "shm"}},
               {"name": "d", "role": "decode"},
               {"name": "x", "role": "both", "transport": {"secret_file": "/elsewhere"}}]
    dep = Deployment(_cfg(workers=workers, workdir=str(tmp_path)))
    dep._prepare_credentials()
    dep._start_workers(deadline=1e18)
    secret = str(tmp_path / "secret")
    assert [m["transport"] for m in made] == [{"backend": "shm", "secret_file": secret},
                                             {"secret_file": secret}, {"secret_file": "/elsewhere"}]
    assert all(m["agent"]["registration"]["admin_key"] == dep.admin_key for m in made)
    dep.stop()


def test_agent_config_files_are_owner_only(tmp_path: Path) -> None:
    proc = AgentProcess(tmp_path, {"registration": {"admin_key": "a"}}, name="a")
    assert stat.S_IMODE(proc.config_path.stat().st_mode) == 0o600
