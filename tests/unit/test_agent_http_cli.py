"""The HTTP endpoint of a live in-process agent, and the ``pdx-agent`` command line."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from pdx.agent.cli import build_parser, main, split_argv
from pdx.agent.client import AgentClient
from pdx.agent.http import HttpEndpoint
from pdx.agent.server import AgentServer
from pdx.config import AgentConfig, describe, load_config
from pdx.layout import KVDtype, KVLayout


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_http_endpoint(tmp_path: Path) -> None:
    cfg = load_config(AgentConfig, data={"role": "prefill", "name": "h", "data_dir": str(tmp_path),
                                         "store": {"l1": {"capacity": "4MiB"}}})
    server = AgentServer(cfg)
    server.start()
    http = HttpEndpoint("127.0.0.1", 0, server.metrics.registry, lambda: True, server.ready, server.status)
    server.http_url = http.url
    try:
        assert get(http.url + "/healthz") == (200, b"ok\n")
        code, body = get(http.url + "/readyz")
        assert code == 503 and "store not up" in json.loads(body)["problems"][0]
        with AgentClient(server.control_address, 5) as c:
            c.register_engine(KVLayout("m", KVDtype.FP32, 1, 1, 32, 16))
            c.lookup([b"k" * 16])
        assert get(http.url + "/readyz")[0] == 200
        code, text = get(http.url + "/metrics")
        metrics = text.decode()
        assert code == 200
        for series in ("pdx_agent_control_seconds_bucket", 'op="lookup"', "pdx_store_hits_total",
                       "pdx_store_expired_leases_total", "pdx_agent_transfer_jobs_active"):
            assert series in metrics
        code, body = get(http.url + "/v1/status")
        status: dict[str, Any] = json.loads(body)
        assert status["role"] == "prefill" and status["layout"]["model_id"] == "m"
        assert status["pool"]["slab_count"] > 0 and status["tiers"]["disk"]["enabled"] is False
        assert status["peers"] == [] and status["engine"] == {"state": "none"}
        assert status["transport"]["backend"] == "tcp" and status["control"]["http"] == http.url
        assert get(http.url + "/nope")[0] == 404
    finally:
        http.close()
        server.stop()


def test_help_explains_every_option_and_config_key(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "-- ENGINE COMMAND" in text and "SIGTERM" in text
    for line in describe(AgentConfig):
        assert line.split(" = ")[0] in text
    for action in build_parser()._actions:
        assert action.help, f"option {action.option_strings} has no help"


def test_split_and_print_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert split_argv(["--config", "x", "--", "vllm", "serve", "--", "y"]) == \
        (["--config", "x"], ["vllm", "serve", "--", "y"])
    cfg = tmp_path / "a.yaml"
    cfg.write_text("role: decode\ncontrol:\n  request_timeout_s: 2\n")
    assert main(["--config", str(cfg), "--name", "zz", "--http-port", "0", "--transport", "shm",
                 "--print-config"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["role"] == "decode" and out["name"] == "zz" and out["transport"]["backend"] == "shm"
    assert out["control"]["request_timeout_s"] == 2.0


def test_bad_config_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("control:\n  adress: tcp://127.0.0.1:1\n")
    assert main(["--config", str(cfg)]) == 2
    assert "unknown key control.'adress'" in capsys.readouterr().err
    cfg.write_text("control:\n  address: udp://x\n")
    assert main(["--config", str(cfg)]) == 2
    assert "control.address" in capsys.readouterr().err


@pytest.mark.parametrize("role", ["prefill", "decode", "both"])
def test_shipped_configs_load(role: str) -> None:
    root = Path(__file__).resolve().parents[2]
    cfg = load_config(AgentConfig, root / "configs" / f"{role}.yaml", env={})
    assert cfg.role == role


def test_http_server_bounds_its_threads() -> None:
    """Idle connections hold at most MAX_THREADS handler threads; the next one is closed at once,
    and once they go the endpoint answers again."""
    import socket

    from prometheus_client import CollectorRegistry

    from pdx.agent.http import MAX_THREADS

    http = HttpEndpoint("127.0.0.1", 0, CollectorRegistry(), lambda: True, lambda: [], lambda: {})
    host, port = http.url[len("http://"):].rsplit(":", 1)
    idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(MAX_THREADS)]
    try:
        extra = socket.create_connection((host, int(port)), timeout=5)
        extra.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        assert extra.recv(100) == b""  # closed without an answer
        extra.close()
    finally:
        for s in idle:
            s.close()
    try:
        ok = False
        for _ in range(50):  # the handler threads notice their clients left
            try:
                ok = get(http.url + "/healthz")[0] == 200
                break
            except OSError:
                continue
        assert ok
    finally:
        http.close()
