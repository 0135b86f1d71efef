"""InfiniStore: why pdx has no tier for it (docs/store.md), kept honest by a test.

InfiniStore's server refuses to start without an RDMA device ("Failed to get RDMA
devices list"), even for TCP clients. Where a device exists, this starts its
server on loopback and round-trips one value with its own client over TCP, the
first thing an InfiniStore tier would need; where none exists it skips, saying so.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bench.servers import free_port

pytestmark = [pytest.mark.integration]

RDMA_DEVICES = Path("/sys/class/infiniband")


def rdma_devices() -> list[str]:
    try:
        return sorted(os.listdir(RDMA_DEVICES))
    except OSError:
        return []


def test_infinistore_server_round_trip(tmp_path: Path) -> None:
    if not rdma_devices():
        pytest.skip("InfiniStore's server needs an RDMA device (ibv_get_device_list finds none on this "
                    "host: 'Failed to get RDMA devices list'), even for TCP clients; see docs/store.md")
    infinistore = pytest.importorskip("infinistore", reason="pip install infinistore (RDMA hosts only)")
    manage, service = free_port(), free_port()
    log = open(tmp_path / "infinistore.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "-m", "infinistore.server", "--host", "127.0.0.1",
                             "--manage-port", str(manage), "--service-port", str(service),
                             "--prealloc-size", "1", "--link-type", "Ethernet"], stdout=log, stderr=log)
    try:
        cfg = infinistore.ClientConfig(host_addr="127.0.0.1", service_port=service,
                                       connection_type=infinistore.TYPE_TCP)
        conn = infinistore.InfinityConnection(cfg)
        deadline = time.monotonic() + 30
        while True:
            try:
                conn.connect()
                break
            except Exception:
                assert proc.poll() is None, (tmp_path / "infinistore.log").read_text(errors="replace")
                assert time.monotonic() < deadline, "InfiniStore's server did not accept a connection"
                time.sleep(0.2)
        data = np.full(4096, 7, dtype=np.uint8)
        conn.tcp_write_cache("pdx-probe", data.ctypes.data, data.nbytes)
        assert bytes(conn.tcp_read_cache("pdx-probe")) == data.tobytes()
        conn.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
