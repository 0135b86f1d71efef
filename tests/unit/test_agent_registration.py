"""Announcements to a proxy: the message the proxy parses, heartbeats, goodbye, a proxy that is down."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pdx.agent.metrics import AgentMetrics
from pdx.agent.registration import Announcer, build_announcement
from pdx.agent.server import AgentServer
from pdx.config import AgentConfig, RegistrationConfig, load_config
from pdx.layout import KVDtype, KVLayout
from pdx.scheduler.messages import AgentAnnouncement, WorkerRole


class Proxy:
    def __init__(self) -> None:
        self.bodies: list[dict[str, object]] = []
        proxy = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers["Content-Length"])
                proxy.bodies.append({"path": self.path, "body": json.loads(self.rfile.read(n))})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    p = Proxy()
    yield p
    p.close()


def test_heartbeats_and_goodbye(proxy: Proxy) -> None:
    seq = iter(range(1, 1000))
    msg = lambda leaving: AgentAnnouncement(agent_id="a1", role=WorkerRole.PREFILL,  # noqa: E731
                                            engine_url="http://127.0.0.1:1", seq=next(seq), leaving=leaving)
    metrics = AgentMetrics()
    ann = Announcer(RegistrationConfig(proxy_url=proxy.url, heartbeat_s=0.05), msg, metrics)
    ann.start()
    deadline = time.monotonic() + 5
    while len(proxy.bodies) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    ann.stop()
    parsed = [AgentAnnouncement.from_dict(b["body"]) for b in proxy.bodies]
    assert all(b["path"] == "/admin/register" for b in proxy.bodies)
    assert len(parsed) >= 3 and parsed[-1].leaving and not parsed[0].leaving
    assert [p.seq for p in parsed] == sorted(p.seq for p in parsed)
    assert metrics.value("pdx_agent_announcements_total", {"result": "ok"}) == len(parsed)


def test_proxy_down_is_counted_not_raised() -> None:
    metrics = AgentMetrics()
    msg = lambda leaving: AgentAnnouncement(agent_id="a", role=WorkerRole.BOTH,  # noqa: E731
                                            engine_url="http://127.0.0.1:1")
    ann = Announcer(RegistrationConfig(proxy_url="http://127.0.0.1:9", timeout_s=0.5), msg, metrics)
    assert ann.announce(False) is False
    assert metrics.value("pdx_agent_announcements_total", {"result": "error"}) == 1


def test_announcement_of_a_live_agent(tmp_path: Path) -> None:
    cfg = load_config(AgentConfig, data={
        "role": "decode", "name": "d1", "data_dir": str(tmp_path), "http": {"enabled": False},
        "control": {"address": f"ipc://{tmp_path}/c.sock"}, "store": {"l1": {"capacity": "4MiB"}},
        "engine": {"url": "http://127.0.0.1:8100"}, "registration": {"models": ["tiny"]}})
    server = AgentServer(cfg)
    server.start()
    try:
        server._register(KVLayout("m", KVDtype.FP32, 1, 1, 32, 16), 0, "")
        assert server.store is not None
        keys = [os.urandom(16) for _ in range(3)]
        for k in keys:
            server.store.put(k, b"x" * 1024)
        msg = build_announcement(server.ctx, 5, False, engine_url=server.engine_url,
                                 control_address=server.control_address, keys=server.store.keys)
        back = AgentAnnouncement.from_dict(json.loads(json.dumps(msg.to_dict())))
        assert back.role is WorkerRole.DECODE and back.engine_url == "http://127.0.0.1:8100"
        assert back.models == ("tiny",) and back.seq == 5 and back.control_address == server.control_address
        assert back.keys is not None and back.keys.prefix_len(keys) == 3
        assert back.load.pool_used_bytes == 3 * 1024 and back.chunk_fingerprint == server.layout.chunk_fingerprint
    finally:
        server.stop()


def test_the_register_reply_updates_the_known_peers() -> None:
    """The proxy's reply lists the deployment's agents; the announcer hands them to the agent."""
    got: list[list[tuple[str, str, str, str]]] = []

    class H(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"worker_id": "a1", "peers": [
                {"agent_id": "p1", "peer_address": "tcp://127.0.0.1:7001", "role": "prefill"},
                {"agent_id": "p2", "peer_address": "tcp://127.0.0.1:7002"}, {"bad": 1}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        msg = lambda leaving: AgentAnnouncement(agent_id="a1", role=WorkerRole.DECODE,  # noqa: E731
                                                engine_url="http://127.0.0.1:1")
        ann = Announcer(RegistrationConfig(proxy_url=f"http://127.0.0.1:{server.server_address[1]}"), msg,
                        AgentMetrics(), on_peers=got.append)
        assert ann.announce(leaving=False)
        # a proxy that names no role (older): "" (the agent may warm a link to it)
        assert got == [[("p1", "tcp://127.0.0.1:7001", "", "prefill"), ("p2", "tcp://127.0.0.1:7002", "", "")]]
    finally:
        server.shutdown()
        server.server_close()
