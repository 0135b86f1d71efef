"""The vLLM launcher: its command line and environment, and process handling against a fake server.

The fake stands in for ``python -m vllm.entrypoints.openai.api_server``: it parses ``--port``, serves
``/health`` and behaves as ``FAKE_MODE`` says. Real vLLM runs in tests/e2e.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest

from pdx.engine.vllm import (
    ServerState,
    VllmOptions,
    VllmServer,
    process_tree_rss,
    start_server,
    vllm_command,
)
from pdx.errors import EngineError

FAKE_SERVER = r'''
import http.server, json, os, signal, subprocess, sys, time
args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
mode = os.environ.get("FAKE_MODE", "ok")
with open(os.environ["FAKE_RECORD"], "w") as f:
    json.dump({"argv": args, "env": {k: v for k, v in os.environ.items()
                                     if k.startswith(("VLLM_", "HF_", "TMPDIR", "TORCHINDUCTOR", "DO_NOT"))}}, f)
print("fake vllm starting", flush=True)
if mode == "exit":
    print("boom: model not found", flush=True)
    sys.exit(3)
if mode == "stubborn":
    # A child that ignores SIGTERM, like a wedged engine core.
    subprocess.Popen([sys.executable, "-c",
                      "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if mode == "hang":
    time.sleep(600)
time.sleep(0.3)

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *a):
        pass

http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
'''


@pytest.fixture
def fake_python(tmp_path: Path) -> Path:
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    wrapper = tmp_path / "fakepython"
    # Drop "-m vllm.entrypoints.openai.api_server" and run the fake with the rest of the args.
    wrapper.write_text(f'#!/bin/sh\nshift 2\nexec "{sys.executable}" "{script}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return wrapper


def opts(fake_python: Path, tmp_path: Path, mode: str, **kw: object) -> VllmOptions:
    env = {"FAKE_MODE": mode, "FAKE_RECORD": str(tmp_path / "record.json")}
    return VllmOptions(model="/models/tiny", python=str(fake_python), extra_env=env, **kw)  # type: ignore[arg-type]


def test_command_line_and_environment(tmp_path: Path) -> None:
    o = VllmOptions(model="/m", max_model_len=2048, kv_cache_gib=2, seed=7, prefix_caching=False,
                    cpu_bind="1", served_model_name="tiny", block_size=128,
                    kv_transfer_config={"kv_connector": "PdxConnector", "kv_role": "kv_both"})
    argv, env = vllm_command(o, tmp_path, 8123, base_env={"PATH": "/bin", "VLLM_HOST_IP": "10.0.0.1"})
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    line = " ".join(argv)
    for part in ("--model /m", "--host 127.0.0.1", "--port 8123", "--dtype float32", "--max-model-len 2048",
                 "--seed 7", "--enforce-eager", "--no-enable-prefix-caching", "--served-model-name tiny",
                 "--block-size 128", "--enable-prompt-tokens-details"):
        assert part in line
    cfg = json.loads(argv[argv.index("--kv-transfer-config") + 1])
    assert cfg == {"kv_connector": "PdxConnector", "kv_role": "kv_both"}
    assert env["PATH"] == "/bin"
    assert env["VLLM_HOST_IP"] == "127.0.0.1"  # the base environment's external address is overridden
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_NO_USAGE_STATS"] == "1"
    for key in ("TMPDIR", "VLLM_RPC_BASE_PATH", "VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR"):
        assert env[key].startswith(str(tmp_path))
    assert Path(env["TMPDIR"]).is_dir()


def test_defaults_leave_prefix_caching_and_connector_alone(tmp_path: Path) -> None:
    argv, _ = vllm_command(VllmOptions(model="/m"), tmp_path, 1, base_env={})
    assert "--no-enable-prefix-caching" not in argv
    assert "--kv-transfer-config" not in argv


def test_bad_options_are_refused() -> None:
    with pytest.raises(EngineError, match="whole GiB"):
        VllmOptions(model="/m", kv_cache_gib=0)


def test_start_wait_stop(fake_python: Path, tmp_path: Path) -> None:
    server = start_server(opts(fake_python, tmp_path, "ok"), tmp_path / "run", timeout_s=30)
    try:
        assert server.state is ServerState.READY
        assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}"
        assert server.start_s > 0
        assert process_tree_rss(server.pid) > 0
        rec = json.loads((tmp_path / "record.json").read_text())
        assert rec["env"]["VLLM_HOST_IP"] == "127.0.0.1"
        assert "fake vllm starting" in server.log_tail()
        assert (tmp_path / "run" / "command.json").is_file()
    finally:
        rc = server.stop(timeout_s=10)
    assert rc is not None and server.state is ServerState.STOPPED
    assert server.stop() == rc  # idempotent
    assert process_tree_rss(server.pid) == 0


def test_exit_before_ready_fails_fast_with_the_log(fake_python: Path, tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(EngineError, match="exited with code 3") as err:
        start_server(opts(fake_python, tmp_path, "exit"), tmp_path / "run", timeout_s=60)
    assert "boom: model not found" in str(err.value)
    assert time.monotonic() - t0 < 30  # did not wait for the deadline


def test_not_ready_by_the_deadline(fake_python: Path, tmp_path: Path) -> None:
    server = VllmServer(opts(fake_python, tmp_path, "hang"), tmp_path / "run")
    server.start()
    try:
        with pytest.raises(EngineError, match="not ready after 1s"):
            server.wait_ready(timeout_s=1.0, poll_s=0.1)
        assert server.returncode() is None
    finally:
        server.stop(timeout_s=5)
    assert server.returncode() is not None


def test_sigterm_ignored_then_group_killed(fake_python: Path, tmp_path: Path) -> None:
    server = start_server(opts(fake_python, tmp_path, "stubborn"), tmp_path / "run", timeout_s=30)
    pid = server.pid
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not _children(pid):  # the wedged child is up
        time.sleep(0.05)
    kids = _children(pid)
    assert kids
    rc = server.stop(timeout_s=0.5)
    assert rc == -9
    for kid in kids:
        assert not Path(f"/proc/{kid}").exists() or _is_zombie(kid)


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if ppid == pid:
                out.append(int(entry.name))
    return out


def _is_zombie(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}") / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs Linux /proc")
def test_process_tree_rss_of_a_missing_pid() -> None:
    assert process_tree_rss(2**22 + 12345) == 0
