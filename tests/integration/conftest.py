"""Fixtures for integration tests: a real redis-server of our own on a free loopback port.

The server runs with persistence off (``--save '' --appendonly no``) in a
temporary folder and is stopped by PID. ``stop()`` / ``start()`` let a test take
Redis away mid-run and bring it back on the same port.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process; ``url`` stays the same across stop/start."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        assert self.proc is None, "already running"
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no",
             "--logfile", str(self.workdir / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.workdir / "redis.log").read_text(errors="replace")[-2000:]
                self.proc = None
                raise RuntimeError(f"redis-server exited at start:\n{log}")
            if self._ping():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout_s}s")

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A fresh redis-server for one test (skipped, saying why, when the binary is missing)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (Debian package redis-server); .ci/run installs it")
    server = RedisServer(binary, tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mooncake_master(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real ``mooncake_master`` with its HTTP metadata server, on free loopback ports."""
    from bench.servers import MooncakeMaster

    try:
        import mooncake.store  # noqa: F401  (needs libibverbs.so.1: ./dev installs libibverbs1)
        master = MooncakeMaster(tmp_path_factory.mktemp("mooncake"))
    except (ImportError, FileNotFoundError) as exc:
        pytest.skip(f"Mooncake is not installed ({exc}); ./dev installs pdx[mooncake] and libibverbs1")
    master.start()
    try:
        yield master
    finally:
        master.stop()


@pytest.fixture
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """moto's S3-compatible server on a free loopback port, with bucket ``pdx-test``."""
    from bench.servers import MotoS3

    try:
        import moto.server  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"moto[server] is not installed ({exc}); ./dev installs pdx[dev]")
    server = MotoS3(tmp_path_factory.mktemp("s3"))
    server.start()
    try:
        server.create_bucket("pdx-test")
        yield server
    finally:
        server.stop()
