"""Engine command building and supervision (real child processes, tiny commands)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from pdx.agent.launcher import (
    AGENT_ADDRESS_ENV,
    EngineState,
    EngineSupervisor,
    engine_command,
    is_vllm_command,
)
from pdx.config import EngineConfig

VLLM = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "m"]


def test_vllm_command_gets_the_connector_and_cpu_environment(tmp_path: Path) -> None:
    assert is_vllm_command(VLLM) and is_vllm_command(["/usr/bin/vllm", "serve", "m"])
    assert not is_vllm_command([sys.executable, "engine.py"])
    argv, env = engine_command(VLLM, role="prefill", control_address="ipc:///x/a.sock", request_timeout_s=3.0,
                               config=EngineConfig(env={"EXTRA": "1"}), run_dir=tmp_path / "run",
                               base_env={"PATH": "/bin"})
    kv = json.loads(argv[argv.index("--kv-transfer-config") + 1])
    assert kv["kv_connector"] == "PdxConnector" and kv["kv_connector_module_path"] == "pdx.connector.vllm"
    assert kv["kv_role"] == "kv_producer"
    assert kv["kv_load_failure_policy"] == "recompute"
    assert kv["kv_connector_extra_config"] == {"agent_address": "ipc:///x/a.sock", "agent_timeout_s": 3.0}
    assert env[AGENT_ADDRESS_ENV] == "ipc:///x/a.sock" and env["EXTRA"] == "1"
    assert env["VLLM_HOST_IP"] == "127.0.0.1" and "VLLM_CPU_KVCACHE_SPACE" in env
    # an explicit config wins; other engines are run as given
    mine = [*VLLM, "--kv-transfer-config", "{}"]
    argv, _ = engine_command(mine, role="both", control_address="a", request_timeout_s=1, config=EngineConfig(),
                             run_dir=tmp_path / "run")
    assert argv == mine
    other = [sys.executable, "engine.py"]
    argv, env = engine_command(other, role="both", control_address="a", request_timeout_s=1,
                               config=EngineConfig(), run_dir=tmp_path / "run", base_env={})
    assert argv == other and env == {AGENT_ADDRESS_ENV: "a"}


def wait_state(sup: EngineSupervisor, state: EngineState, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while sup.status().state is not state and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sup.status().state is state, sup.status()


def test_restarts_with_backoff_then_gives_up(tmp_path: Path) -> None:
    exits: list[int] = []
    cfg = EngineConfig(restart_backoff_s=0.05, max_restarts=2)
    sup = EngineSupervisor([sys.executable, "-c", "import sys; sys.exit(7)"], dict(os.environ), cfg,
                           tmp_path / "engine.log", on_exit=exits.append)
    sup.start()
    wait_state(sup, EngineState.FAILED)
    st = sup.status()
    assert st.restarts == 2 and st.last_exit_code == 7 and exits == [7, 7, 7]
    assert (tmp_path / "engine.log").read_text().count("starting engine") == 3
    sup.stop()


def test_stop_terminates_the_engine_and_its_group(tmp_path: Path) -> None:
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    sup = EngineSupervisor([sys.executable, "-c", code], dict(os.environ), EngineConfig(stop_timeout_s=5),
                           tmp_path / "engine.log")
    sup.start()
    pid = sup.status().pid
    assert pid and sup.running
    sup.stop()
    assert sup.status().state is EngineState.STOPPED
    try:
        os.killpg(pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive


def test_no_restart_when_disabled(tmp_path: Path) -> None:
    sup = EngineSupervisor([sys.executable, "-c", "pass"], dict(os.environ), EngineConfig(restart=False),
                           tmp_path / "engine.log")
    sup.start()
    wait_state(sup, EngineState.FAILED)
    assert sup.status().restarts == 0 and sup.status().last_exit_code == 0
    sup.stop()
