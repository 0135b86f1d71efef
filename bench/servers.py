"""Real servers of the shared tiers, started on free loopback ports: ``mooncake_master``, moto's S3.

Used by the test fixtures (tests/integration/conftest.py, tests/e2e) and by
``pdx-bench store``. Each server keeps its ports across ``stop()``/``start()``
so a test can take it away mid-run and bring it back; everything is stopped by
PID. ``start`` waits (bounded) until the server answers and raises
``RuntimeError`` with the end of its log otherwise.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class _Server:
    name = "server"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{self.name}.log"

    def argv(self) -> list[str]:
        raise NotImplementedError

    def ports(self) -> list[int]:
        raise NotImplementedError

    def start(self, timeout_s: float = 20.0) -> None:
        assert self.proc is None, "already running"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.workdir)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"{self.name} exited at start:\n{self.log_tail()}")
            if all(_listening(p) for p in self.ports()):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not listen on {self.ports()} within {timeout_s}s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self, kill: bool = False) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if kill:
            proc.kill()
        else:
            proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class MooncakeMaster(_Server):
    """``mooncake_master`` with its HTTP metadata server; RPC, metadata and admin ports all free ones."""

    name = "mooncake_master"

    def __init__(self, workdir: Path, binary: str | None = None, extra: list[str] | None = None) -> None:
        super().__init__(workdir)
        found = binary or shutil.which("mooncake_master") or str(Path(sys.executable).parent / "mooncake_master")
        if not Path(found).exists():
            raise FileNotFoundError("mooncake_master is not installed: pip install 'pdx[mooncake]'")
        self.binary = found
        self.rpc_port = free_port()
        self.http_port = free_port()
        self.admin_port = free_port()  # the metrics/admin server, 9003 by default
        self.extra = list(extra or [])

    @property
    def master(self) -> str:
        return f"127.0.0.1:{self.rpc_port}"

    @property
    def metadata_server(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/metadata"

    def argv(self) -> list[str]:
        return [self.binary, f"--rpc_port={self.rpc_port}", "--rpc_address=127.0.0.1",
                "--enable_http_metadata_server=true", "--http_metadata_server_host=127.0.0.1",
                f"--http_metadata_server_port={self.http_port}", "--metrics_host=127.0.0.1",
                f"--metrics_port={self.admin_port}", *self.extra]

    def ports(self) -> list[int]:
        return [self.rpc_port, self.http_port]


class MotoS3(_Server):
    """moto's S3-compatible HTTP server (in memory) on a free loopback port."""

    name = "moto_server"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.port = free_port()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def ports(self) -> list[int]:
        return [self.port]

    def create_bucket(self, bucket: str) -> None:
        """Create ``bucket`` (moto forgets everything when stopped)."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                              aws_access_key_id="test", aws_secret_access_key="test")
        client.create_bucket(Bucket=bucket)
        client.close()
