"""The control loop and the client, in one process with stand-in handlers (no store)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import zmq

from pdx.agent.client import AgentClient
from pdx.agent.loop import ControlLoop, Deferred
from pdx.agent.metrics import AgentMetrics
from pdx.agent.protocol import WIRE_VERSION, Op, encode_request
from pdx.agent.types import JobInfo, JobKind, JobState, PingInfo
from pdx.errors import AgentUnavailable, CapacityError, ConfigError, WireError

PONG = PingInfo(agent_id="a", instance="inst-a", role="both", wire_version=WIRE_VERSION, version="0", pid=1,
                uptime_s=0.0, registered=False, peer_address="")
FINISHED = JobInfo(1, JobKind.FETCH, JobState.DONE, "r", "p")
RUNNING = JobInfo(2, JobKind.FETCH, JobState.RUNNING, "r", "p")


class Fake:
    """Handlers for a few ops: ping answers, stats raises, wait defers."""

    def __init__(self) -> None:
        self.futures: list[Future[Any]] = []

    def handlers(self) -> dict[Op, Any]:
        return {Op.PING: lambda a: PONG, Op.STATS: self.stats, Op.WAIT: self.wait,
                Op.RELEASE: self.crash}

    def stats(self, a: dict[str, Any]) -> Any:
        raise CapacityError("pool full")

    def crash(self, a: dict[str, Any]) -> Any:
        raise RuntimeError("bug")

    def wait(self, a: dict[str, Any]) -> Deferred:
        fut: Future[Any] = Future()
        self.futures.append(fut)
        return Deferred(fut, a.timeout_s, on_timeout=lambda: RUNNING)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ControlLoop, Fake, str]]:
    fake = Fake()
    loop = ControlLoop("inst-a", AgentMetrics(), 1 << 20)
    ep = loop.bind("control", f"ipc://{tmp_path}/run/c.sock", fake.handlers())
    loop.start()
    yield loop, fake, ep.address
    loop.stop()


def test_replies_errors_and_deferred(served: tuple[ControlLoop, Fake, str]) -> None:
    loop, fake, address = served
    with AgentClient(address, 2.0) as c:
        assert c.call(Op.PING) == PONG and c.instance == "inst-a"
        with pytest.raises(CapacityError, match="pool full"):
            c.call(Op.STATS)
        with pytest.raises(Exception, match="internal error: RuntimeError: bug"):
            c.call(Op.RELEASE, {"owner": "x"})
        with pytest.raises(WireError, match="unknown message type"):
            c.call(Op.LOOKUP, {"keys": []})
        # a deferred reply: other requests are served while it waits
        result: list[Any] = []
        t = threading.Thread(target=lambda: result.append(c.call(Op.WAIT, {"job_id": 1, "timeout_s": 5.0})))
        t.start()
        deadline = time.monotonic() + 5
        while not fake.futures and time.monotonic() < deadline:
            time.sleep(0.01)
        assert c.call(Op.PING) == PONG and loop.pending == 1
        fake.futures[0].set_result(FINISHED)
        t.join(5)
        assert result == [FINISHED]
        assert c.call(Op.WAIT, {"job_id": 2, "timeout_s": 0.1}) == RUNNING
    assert loop.metrics.value("pdx_agent_control_requests_total", {"op": "ping", "result": "ok"}) == 2


def test_ipc_socket_is_owner_only(served: tuple[ControlLoop, Fake, str]) -> None:
    _loop, _fake, address = served
    path = Path(address[len("ipc://"):])
    assert path.parent.stat().st_mode & 0o777 == 0o700


def test_timeout_is_bounded_and_raises(tmp_path: Path) -> None:
    with AgentClient(f"ipc://{tmp_path}/nobody.sock", 0.2) as c:
        t0 = time.monotonic()
        with pytest.raises(AgentUnavailable, match="no reply"):
            c.ping()
        assert time.monotonic() - t0 < 5  # bounded (generous: a loaded CI box)


def test_restart_detection_on_the_same_address(tmp_path: Path) -> None:
    address = f"ipc://{tmp_path}/run/r.sock"
    seen: list[str] = []
    with AgentClient(address, 1.0, on_restart=seen.append) as c:
        for inst in ("one", "two"):
            loop = ControlLoop(inst, AgentMetrics(), 1 << 20)
            loop.bind("control", address, {Op.PING: lambda a: PONG})
            loop.start()
            # A request sent in the instant the previous server went away is lost (ZMQ had not
            # noticed yet): that call times out, the next one goes through a fresh socket.
            deadline = time.monotonic() + 20
            while True:
                try:
                    c.ping()
                    break
                except AgentUnavailable:
                    assert time.monotonic() < deadline
            loop.stop()
        assert c.instance == "two" and c.restarts_seen == 1 and seen == ["two"]


def test_req_framing_is_served(served: tuple[ControlLoop, Fake, str]) -> None:
    _loop, _fake, address = served
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(address)
        req.send(encode_request(5, Op.PING))
        assert req.poll(2000)
        req.recv()
        req.close(0)
    finally:
        ctx.term()


def test_bind_errors_are_config_errors(tmp_path: Path) -> None:
    loop = ControlLoop("x", AgentMetrics(), 1 << 20)
    try:
        with pytest.raises(ConfigError, match="limit"):
            loop.bind("control", "ipc://" + str(tmp_path / ("d" * 120) / "s.sock"), {})
        with pytest.raises(ConfigError, match="cannot bind"):
            loop.bind("control", "tcp://256.1.1.1:1", {})
    finally:
        loop.ctx.term()
