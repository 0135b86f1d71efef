"""Announcing to several proxies: each gets every heartbeat and the goodbye; a proxy that hangs
delays no other (one thread per proxy)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from pdx.agent.metrics import AgentMetrics
from pdx.agent.registration import Announcer, proxy_urls
from pdx.config import RegistrationConfig
from pdx.scheduler.messages import AgentAnnouncement, WorkerRole
from tests.unit.test_agent_registration import Proxy


@pytest.fixture
def two() -> Iterator[tuple[Proxy, Proxy]]:
    a, b = Proxy(), Proxy()
    yield a, b
    a.close()
    b.close()


def _msg(leaving: bool) -> AgentAnnouncement:
    return AgentAnnouncement(agent_id="a1", role=WorkerRole.DECODE, engine_url="http://127.0.0.1:1",
                             leaving=leaving)


def test_proxy_urls_merges_and_dedups() -> None:
    cfg = RegistrationConfig(proxy_url="http://a:1/", proxy_urls=["http://b:2", "http://a:1", " "])
    assert proxy_urls(cfg) == ["http://a:1", "http://b:2"]
    assert proxy_urls(RegistrationConfig()) == []


def test_every_proxy_gets_heartbeats_and_the_goodbye(two: tuple[Proxy, Proxy]) -> None:
    a, b = two
    ann = Announcer(RegistrationConfig(proxy_urls=[a.url, b.url], heartbeat_s=0.05), _msg, AgentMetrics())
    ann.start()
    deadline = time.monotonic() + 10
    while (len(a.bodies) < 3 or len(b.bodies) < 3) and time.monotonic() < deadline:
        time.sleep(0.01)
    ann.stop()
    for p in (a, b):
        assert len(p.bodies) >= 3
        assert AgentAnnouncement.from_dict(p.bodies[-1]["body"]).leaving  # type: ignore[arg-type]


def test_a_hanging_proxy_does_not_delay_the_others(two: tuple[Proxy, Proxy]) -> None:
    a, _ = two
    hang = socket.socket()  # accepts connections (backlog) and never answers
    hang.bind(("127.0.0.1", 0))
    hang.listen(8)
    try:
        url = f"http://127.0.0.1:{hang.getsockname()[1]}"
        metrics = AgentMetrics()
        cfg = RegistrationConfig(proxy_urls=[url, a.url], heartbeat_s=0.05, timeout_s=30)
        ann = Announcer(cfg, _msg, metrics)
        ann.start()
        deadline = time.monotonic() + 10
        while len(a.bodies) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        # a's heartbeats kept coming while the other proxy's first POST still hangs
        assert len(a.bodies) >= 5
        ann._stop.set()  # no goodbye: it would wait for the hanging proxy's timeout
    finally:
        hang.close()
