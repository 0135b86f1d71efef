"""SIGTERM drains: an in-flight fetch finishes and is reported, new ones are refused, then exit 0.

To have a transfer reliably in flight when SIGTERM arrives, the fetching agent
reaches the source agent through a small relay (in this test process) that
holds the first peer request until the test releases it (once the agent is
draining). The relay only forwards control frames; the chunks move over the
real transport.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from pdx.agent.types import ChunkStatus, JobState
from pdx.checksum import checksum
from pdx.deploy.process import AgentProcess
from pdx.errors import AgentError
from pdx.layout import KVDtype, KVLayout
from pdx.store.pool import attach

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

LAYOUT = KVLayout("drain-test", KVDtype.FP32, num_layers=2, num_kv_heads=2, head_size=64, block_size=16)
#: the longest the relay holds the first request if the test never releases it
HOLD_MAX_S = 30.0


class DelayRelay:
    """ROUTER front -> one DEALER per client to ``target``; the first request waits until
    ``release`` is set (at most ``hold_s``); ``holding`` is set when it arrived."""

    def __init__(self, target: str, hold_s: float) -> None:
        self.holding = threading.Event()
        self.release = threading.Event()
        self.ctx = zmq.Context()
        self.front = self.ctx.socket(zmq.ROUTER)
        self.front.setsockopt(zmq.LINGER, 0)
        port = self.front.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.target = target
        self.hold_s = hold_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        backs: dict[bytes, zmq.Socket[bytes]] = {}
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        held = False
        while not self._stop.is_set():
            for sock, _ in poller.poll(50):
                if sock is self.front:
                    ident, payload = self.front.recv_multipart()
                    if not held:
                        held = True
                        self.holding.set()
                        self.release.wait(self.hold_s)
                    back = backs.get(ident)
                    if back is None:
                        back = backs[ident] = self.ctx.socket(zmq.DEALER)
                        back.setsockopt(zmq.LINGER, 0)
                        back.connect(self.target)
                        poller.register(back, zmq.POLLIN)
                    back.send(payload)
                else:
                    ident = next(i for i, b in backs.items() if b is sock)
                    self.front.send_multipart([ident, sock.recv()])
        for b in backs.values():
            b.close(0)

    def close(self) -> None:
        self.release.set()
        self._stop.set()
        self._thread.join(5)
        self.front.close(0)
        self.ctx.term()


def test_sigterm_drains_in_flight_transfers(tmp_path: Path) -> None:
    cfg = {"store": {"l1": {"capacity": "16MiB"}}, "http": {"enabled": False},
           "control": {"drain_timeout_s": 20}}
    src = AgentProcess(tmp_path, cfg, name="src")
    dst = AgentProcess(tmp_path, cfg, name="dst")
    relay: DelayRelay | None = None
    src.start()
    dst.start()
    cs, cd = src.client(10), dst.client(10)
    try:
        reg = cs.register_engine(LAYOUT)
        cd.register_engine(LAYOUT)
        keys = [os.urandom(16) for _ in range(4)]
        pool = attach(reg.shm_name)
        res = cs.reserve(keys, reg.chunk_bytes)
        sums = []
        for i, r in enumerate(res):
            arr = pool.array(r.offset, r.nbytes)
            arr[:] = np.full(r.nbytes, i + 1, dtype=np.uint8)
            sums.append(checksum(memoryview(arr)))
            del arr
        pool.close()
        assert all(o.ok for o in cs.commit([r.id for r in res], reg.chunk_tokens, sums))

        relay = DelayRelay(src.peer_address, HOLD_MAX_S)
        job = cd.fetch(relay.address, keys, "req-drain", deadline_s=30)
        assert relay.holding.wait(20), "the fetch never reached the source agent"
        assert cd.job_status(job).state is JobState.RUNNING  # waiting on the held peer request
        assert dst.proc is not None
        dst.proc.send_signal(15)
        deadline = time.monotonic() + 20
        while not cd.stats().get("draining"):
            assert time.monotonic() < deadline, "SIGTERM did not start the drain"
            time.sleep(0.05)
        with pytest.raises(AgentError, match="shutting down"):
            cd.fetch(src.peer_address, keys, "req-late")
        # the job's outcome is reported to a wait parked before it finishes (once it has finished,
        # the drained agent exits and answers nothing more)
        waited: list[Any] = []

        def wait_for_job() -> None:
            with dst.client(30) as c:
                waited.append(c.wait(job, 20))

        waiter = threading.Thread(target=wait_for_job, daemon=True)
        waiter.start()
        while cd.stats()["jobs"].get("waiting_calls", 0) < 1:
            assert time.monotonic() < deadline, "the wait call never reached the agent"
            time.sleep(0.05)
        relay.release.set()  # now the in-flight job may finish
        waiter.join(30)
        assert waited, "no reply to the wait"
        info = waited[0]
        assert info.state is JobState.DONE
        assert [c.status for c in info.chunks] == [ChunkStatus.DONE] * 4, info.error
        assert dst.proc.wait(30) == 0
        log_text = (dst.data_dir / "logs" / "agent-dst.log").read_text()
        assert "draining 1 in-flight transfer job(s)" in log_text
    finally:
        cs.close()
        cd.close()
        if relay is not None:
            relay.close()
        src.stop()
        dst.stop()
