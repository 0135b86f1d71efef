"""``pdx-proxy``: help, config listing, and a real ``serve`` process started and stopped by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from proxy.cli import main
from proxy.standin import StandinWorker
from proxy.testing import BackgroundLoop


def test_help_lists_commands_and_config(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "serve" in out and "config" in out and "/v1/chat/completions" in out
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for opt in ("--config", "--host", "--port", "--policy", "--model", "--worker", "--log-level"):
        assert opt in out


def test_config_lists_every_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    for key in ("host = '127.0.0.1'", "policy = 'prefix_affinity'", "max_body_size = '4.0MiB'",
                "cache_aware.max_imbalance = 8", "workers = []", "heartbeat_timeout_s = 5.0"):
        assert key in out


def test_bad_config_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "proxy.yaml"
    bad.write_text("port: 8000\nworkers:\n  - {url: 'not-a-url', role: decode}\n")
    assert main(["serve", "--config", str(bad)]) == 2
    assert "workers[0].url" in capsys.readouterr().err
    bad.write_text("polcy: round_robin\n")
    assert main(["serve", "--config", str(bad)]) == 2
    assert "unknown key 'polcy'" in capsys.readouterr().err
    assert main(["serve", "--policy", "fastest", "--port", "0"]) == 2
    assert "known: cache_aware, least_loaded, prefix_affinity, round_robin" in capsys.readouterr().err


@pytest.fixture
def standins() -> Iterator[tuple[StandinWorker, StandinWorker]]:
    bg = BackgroundLoop()
    p, d = StandinWorker("p"), StandinWorker("d")
    try:
        bg.run(p.start())
        bg.run(d.start())
        yield p, d
    finally:
        bg.run(p.stop())
        bg.run(d.stop())
        bg.close()


def test_serve_process_answers_and_stops_on_sigterm(standins: tuple[StandinWorker, StandinWorker],
                                                     tmp_path: Path) -> None:
    p, d = standins
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(f"port: 0\npolicy: round_robin\nworkers:\n  - {{role: prefill, url: '{p.url}'}}\n")
    env = {**os.environ, "PDX__MODELS": "[standin-model]"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg), "--worker", f"decode={d.url}",
         "--log-level", "WARNING"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("pdx-proxy: serving on http://127.0.0.1:"), line + proc.stderr.read()  # type: ignore[union-attr]
        url = line.split()[-1]
        r = httpx.post(url + "/v1/completions", json={"model": "standin-model", "prompt": "x", "max_tokens": 2},
                       timeout=20)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == " w0 w1"
        assert len(p.received) == 1 and len(d.received) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert "pdx-proxy: stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
