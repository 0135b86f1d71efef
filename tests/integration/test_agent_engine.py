"""The agent supervises its engine: a crashed engine is restarted and the pool keeps its chunks.

The engine is ``agent_standin_engine.py``: it registers a layout, writes chunks
into the agent's pool and idles. The test kills it (SIGKILL, by PID), waits for
the agent to start a new one, and checks that the chunks of the first run are
still there, byte for byte, in the same pool. Then SIGTERM stops the agent,
which stops the engine and exits 0. (The real vLLM crash test belongs to the
connector's e2e suite.)
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from pdx.checksum import checksum
from pdx.deploy.process import AgentProcess
from pdx.store.pool import attach

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

STANDIN = Path(__file__).with_name("agent_standin_engine.py")
log = logging.getLogger(__name__)


def wait_for(path: Path, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return dict(json.loads(path.read_text()))
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear within {timeout}s")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def http_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return dict(json.loads(r.read()))


def test_engine_crash_restart_keeps_chunks(tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    env = dict(os.environ, STANDIN_DIR=str(marks), STANDIN_CHUNKS="4")
    cfg = {"store": {"l1": {"capacity": "16MiB"}},
           "engine": {"restart_backoff_s": 0.2, "stable_after_s": 60, "max_restarts": 3, "stop_timeout_s": 5}}
    agent = AgentProcess(tmp_path, cfg, engine=[sys.executable, str(STANDIN)], env=env, name="sup")
    agent.start()
    client = agent.client(5.0)
    try:
        first = wait_for(marks / "engine-0.json")
        assert first["created"] and first["errors"] == []
        keys0 = [bytes.fromhex(k) for k in first["keys"]]
        before = client.stats()
        assert before["engine"]["state"] == "running" and before["engine"]["pid"] == first["pid"]
        chunks_before = before["pool"]["chunks"]
        assert client.lookup(keys0).prefix_chunks == 4

        t_kill = time.monotonic()
        os.kill(first["pid"], signal.SIGKILL)  # the crash
        second = wait_for(marks / "engine-1.json")
        restarted_s = time.monotonic() - t_kill
        assert second["pid"] != first["pid"]
        assert not second["created"], "a restarted engine must get the existing pool"
        assert second["shm_name"] == first["shm_name"]

        after = client.stats()
        assert after["engine"]["restarts"] == 1 and after["engine"]["pid"] == second["pid"]
        assert after["pool"]["chunks"] == chunks_before + 4
        assert client.lookup(keys0).prefix_chunks == 4
        pins = client.pin(keys0, owner="check", lease_s=10)
        pool = attach(first["shm_name"])
        try:
            assert [checksum(pool.view(p.offset, p.nbytes)) for p in pins] == first["checksums"]
        finally:
            pool.close()
        client.release("check")
        status = http_json(agent.http_url + "/v1/status")
        assert status["engine"]["restarts"] == 1
        log.info("engine pid %d killed; new engine registered %.2fs later; chunks %d before, %d after",
                 first["pid"], restarted_s, chunks_before, after["pool"]["chunks"])
        print(f"crash/restart: killed engine pid {first['pid']}, restarted engine pid {second['pid']} "
              f"registered after {restarted_s:.2f}s; pool chunks before {chunks_before}, after "
              f"{after['pool']['chunks']} (first run's {len(keys0)} still present)")

        assert agent.terminate(30) == 0
        assert not pid_alive(second["pid"]), "the agent must stop its engine on SIGTERM"
        log_text = (agent.data_dir / "logs" / "engine-sup.log").read_text()
        assert log_text.count("pdx-agent: starting engine") == 2
    finally:
        client.close()
        agent.stop()


def test_engine_that_keeps_failing_is_given_up(tmp_path: Path) -> None:
    cfg = {"engine": {"restart_backoff_s": 0.05, "max_restarts": 2}}
    agent = AgentProcess(tmp_path, cfg, engine=[sys.executable, "-c", "import sys; sys.exit(3)"], name="bad")
    agent.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            engine = http_json(agent.http_url + "/v1/status")["engine"]
            if engine["state"] == "failed":
                break
            time.sleep(0.05)
        assert engine["state"] == "failed" and engine["restarts"] == 2 and engine["last_exit_code"] == 3
        with pytest.raises(urllib.error.HTTPError) as err:
            http_json(agent.http_url + "/readyz")
        assert err.value.code == 503
        assert agent.client().ping()["agent_id"] == "bad"  # the agent keeps serving its pool
    finally:
        agent.stop()
