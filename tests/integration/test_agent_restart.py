"""Agent restart: a client reconnects by itself, fast, and learns that the agent is new.

The agent is killed (SIGKILL: no clean-up, its ipc socket file is left behind)
and started again on the same address. Calls made while it is down fail with
``AgentUnavailable`` within their timeout; the first call after it is back
succeeds, reports the new instance and fires ``on_restart``. The time it took is
logged (a figure, not an assertion).
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import pytest

from pdx.agent.client import AgentClient
from pdx.deploy.process import AgentProcess
from pdx.errors import AgentUnavailable

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("kind", ["ipc", "tcp"])
def test_client_reconnects_after_agent_restart(kind: str, tmp_path: Path) -> None:
    cfg: dict[str, object] = {"http": {"enabled": False}}
    if kind == "tcp":
        cfg["control"] = {"address": f"tcp://127.0.0.1:{free_port()}"}
    agent = AgentProcess(tmp_path, cfg, name="rs")
    agent.start()
    restarts: list[str] = []
    client = AgentClient(agent.control_address, timeout_s=0.5, on_restart=restarts.append)
    try:
        first = client.ping()["instance"]
        assert client.instance == first
        agent.kill()
        with pytest.raises(AgentUnavailable):
            client.ping()
        t0 = time.monotonic()
        agent.start()
        ready_s = time.monotonic() - t0
        t1 = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            try:
                second = client.ping()["instance"]
                break
            except AgentUnavailable:
                assert time.monotonic() - t1 < 30, "client never reconnected"
        reconnect_s = time.monotonic() - t1
        log.info("%s: new agent ready %.2fs after start; client answered %.3fs later (%d attempt(s))",
                 kind, ready_s, reconnect_s, attempts)
        print(f"agent restart ({kind}): new agent ready after {ready_s:.2f}s, client reconnected "
              f"{reconnect_s * 1000:.1f} ms later in {attempts} attempt(s)")
        assert second != first
        assert client.instance == second and client.restarts_seen == 1 and restarts == [second]
    finally:
        client.close()
        agent.stop()
