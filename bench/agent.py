"""``pdx-bench agent``: the agent's control-plane round trip and agent-to-agent fetches.

Rows (each beside a baseline measured in the same run):

* ``ctrl_rtt_us`` (p50, and ``ctrl_rtt_us_p99``): one ``lookup`` of ``--lookup-keys``
  keys through ``AgentClient`` to a real ``pdx-agent`` over ``ipc://``. Baseline:
  a bare ZMQ REQ/REP echo, over ``ipc://`` to another process, of a message of the
  same size as the lookup request. Runs alternate in blocks so both see the same noise.
* ``agent_transfer_gbps_<backend>``: a 64 MiB fetch (``--fetch-size`` in chunks of
  ``--chunk-size``) between two ``pdx-agent`` processes, timed from the ``fetch``
  call to the ``wait`` reply: peer pin, slab reservations, the transfer and the
  checksum verification of every chunk at commit. Baseline: the same transport
  used directly between two processes, the same ops (one READ batch of the same
  chunks), no agent and no checksum.
* ``first_fetch_ms`` (baseline ``steady_fetch_ms``) and ``first_fetch_cold_ms``: the first fetch
  between two fresh agents against later ones, with warm links on and off (``bench/agent_first.py``).

Agents and the peer processes are stopped by PID.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import agent_first
from bench.report import Report, Result, gbps, median, percentile, progress
from pdx.config import parse_size
from pdx.transport import ucx_env

MiB = 1 << 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lookups", type=int, default=4000, help="timed lookups (and echoes) for ctrl_rtt")
    p.add_argument("--lookup-keys", type=int, default=16, help="keys per lookup (16 = a 4k-token prompt)")
    p.add_argument("--backends", default="tcp,nixl", help="transports for agent_transfer (skipped if absent)")
    p.add_argument("--fetch-size", default="64MiB", help="bytes per fetch")
    p.add_argument("--chunk-size", default="1MiB", help="bytes per chunk (one slab)")
    p.add_argument("--repeats", type=int, default=11,
                   help="timed fetches per backend, each followed by one bare batch")
    agent_first.add_arguments(p)
    p.add_argument("--breakdown", action="store_true",
                   help="run the fetching agent at DEBUG and report the median time of each stage of its "
                        "fetch jobs (control ops, the move, verification, finishing)")
    p.add_argument("--echo-server", metavar="ADDR", help=argparse.SUPPRESS)
    p.add_argument("--bare-peer", metavar="BACKEND", help=argparse.SUPPRESS)
    p.add_argument("--nbytes", type=int, default=0, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> Report:
    if args.echo_server:
        _echo_server(args.echo_server)
        sys.exit(0)
    if args.bare_peer:
        _bare_peer(args.bare_peer, args.nbytes)
        sys.exit(0)
    report = Report("agent")
    work = Path(tempfile.mkdtemp(prefix="pdx-bench-agent-"))
    _ctrl_rtt(args, report, work)
    for backend in [b for b in args.backends.split(",") if b]:
        _transfer(args, report, work, backend)
    agent_first.run(args, report, work)
    report.notes.append(f"cpus: {os.cpu_count()}; agents and peers are separate processes on this host")
    return report


# --- ctrl_rtt ----------------------------------------------------------------------------------


def _layout(chunk_bytes: int) -> Any:
    from pdx.layout import KVDtype, KVLayout

    # 256 tokens x 2 (K,V) x layers x heads x head_size x 4 bytes = chunk_bytes
    per_layer = 256 * 2 * 2 * 64 * 4
    layers = max(1, chunk_bytes // per_layer)
    return KVLayout("bench-agent", KVDtype.FP32, num_layers=layers, num_kv_heads=2, head_size=64,
                    block_size=16)


def _ctrl_rtt(args: argparse.Namespace, report: Report, work: Path) -> None:
    import zmq

    from pdx.agent.protocol import Op, encode_request
    from pdx.deploy.process import AgentProcess

    agent = AgentProcess(work, {"store": {"l1": {"capacity": "64MiB"}}, "http": {"enabled": False}},
                         name="rtt").start()
    echo_addr = f"ipc://{work}/echo.sock"
    echo = subprocess.Popen([sys.executable, "-m", "bench.cli", "agent", "--echo-server", echo_addr],
                            stdin=subprocess.DEVNULL)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        client = agent.client(5.0)
        reg = client.register_engine(_layout(256 * 1024))
        keys = [os.urandom(16) for _ in range(args.lookup_keys)]
        res = client.reserve(keys[: args.lookup_keys // 2], reg.chunk_bytes)
        client.commit([r.id for r in res], reg.chunk_tokens)  # half the keys hit
        size = len(encode_request(1, Op.LOOKUP, {"keys": keys, "remote": False}))
        payload = os.urandom(size)
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(echo_addr)
        req.send(payload)
        if not req.poll(10_000):
            raise RuntimeError("the echo server did not answer")
        req.recv()
        agent_us: list[float] = []
        echo_us: list[float] = []
        block = 200
        for _ in range(200):  # warm-up
            client.lookup(keys)
        for _ in progress(range(max(1, args.lookups // block)), "ctrl_rtt"):
            for _ in range(block):
                t0 = time.perf_counter()
                client.lookup(keys)
                agent_us.append((time.perf_counter() - t0) * 1e6)
            for _ in range(block):
                t0 = time.perf_counter()
                req.send(payload)
                req.recv()
                echo_us.append((time.perf_counter() - t0) * 1e6)
        req.close(0)
        client.close()
        for q, suffix in ((50, ""), (99, "_p99")):
            report.add(Result(f"ctrl_rtt_us{suffix}", percentile(agent_us, q), "us",
                              baseline_name=f"zmq_req_rep_echo_us{suffix}", baseline=percentile(echo_us, q),
                              lower_is_better=True,
                              extra={"lookup_keys": args.lookup_keys, "message_bytes": size,
                                     "samples": len(agent_us)}))
    finally:
        echo.kill()
        echo.wait(10)
        agent.stop()
        ctx.term()


def _echo_server(address: str) -> None:
    import zmq

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    rep = ctx.socket(zmq.REP)
    rep.bind(address)
    while True:
        rep.send(rep.recv())


# --- agent_transfer ----------------------------------------------------------------------------


def _transfer(args: argparse.Namespace, report: Report, work: Path, backend: str) -> None:
    from pdx.transport import TRANSPORTS

    if backend not in TRANSPORTS.available():
        report.notes.append(f"agent_transfer_gbps_{backend}: skipped, transport unavailable on this host")
        return
    total = parse_size(args.fetch_size)
    chunk = parse_size(args.chunk_size)
    n = max(1, total // chunk)
    agents = _AgentPair(work, backend, n, chunk, debug=args.breakdown)
    bare = _BarePair(backend, n, chunk)
    agent_s: list[float] = []
    bare_s: list[float] = []
    try:
        agents.fetch()  # warm-up: peer sessions, first-touch of both pools
        bare.read()
        for _ in progress(range(args.repeats), f"agent_transfer {backend}"):
            agent_s.append(agents.fetch())  # interleaved: both see the same background load
            bare_s.append(bare.read())
    finally:
        agents.close()
        bare.close()
    extra: dict[str, Any] = {"bytes": n * chunk, "chunks": n, "repeats": len(agent_s),
                             "agent_ms": [round(s * 1e3, 2) for s in agent_s],
                             "bare_ms": [round(s * 1e3, 2) for s in bare_s]}
    if args.breakdown:
        stages = agents.stages()
        extra["stages_ms"] = stages
        report.notes.append(f"agent_transfer_gbps_{backend} stages (median ms over the timed fetches, "
                            f"agent at DEBUG): " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    report.add(Result(f"agent_transfer_gbps_{backend}", gbps(n * chunk, median(agent_s)), "GB/s",
                      baseline_name=f"bare_{backend}_read_gbps", baseline=gbps(n * chunk, median(bare_s)),
                      extra=extra))


class _AgentPair:
    """Two agents; ``fetch()`` writes fresh chunks into the source (untimed) and times one fetch."""

    def __init__(self, work: Path, backend: str, n: int, chunk: int, debug: bool = False) -> None:
        from pdx.deploy.process import AgentProcess
        from pdx.store.pool import attach

        cap = f"{3 * n * chunk // MiB + 16}MiB"
        cfg = {"store": {"l1": {"capacity": cap}}, "http": {"enabled": False},
               "transport": {"backend": backend, "transfer_timeout_s": 60}}
        self.n = n
        self.src = AgentProcess(work, cfg, name=f"src-{backend}")
        self.dst = AgentProcess(work, cfg, name=f"dst-{backend}", log_level="DEBUG" if debug else "INFO")
        self.src.start()
        self.dst.start()
        self.cs, self.cd = self.src.client(30), self.dst.client(30)
        layout = _layout(chunk)
        self.reg = self.cs.register_engine(layout)
        self.cd.register_engine(layout)
        self.pool = attach(self.reg.shm_name)
        self.fill = np.arange(chunk, dtype=np.uint8)
        self.count = 0
        self.client_ms: list[float] = []  # fetch call to wait reply, less the job's own lifetime

    def fetch(self) -> float:
        keys = [os.urandom(16) for _ in range(self.n)]
        res = self.cs.reserve(keys, self.reg.chunk_bytes)
        for r in res:
            self.pool.array(r.offset, r.nbytes)[:] = self.fill
        errs = self.cs.commit([r.id for r in res], self.reg.chunk_tokens, timeout=60)
        assert all(e.ok for e in errs), errs[:3]
        self.count += 1
        t0 = time.perf_counter()
        job = self.cd.fetch(self.src.peer_address, keys, f"bench-{self.count}", deadline_s=60, pin=False)
        info = self.cd.wait(job, 60)
        dt = time.perf_counter() - t0
        if not info.ok:
            raise RuntimeError(f"fetch failed: {info.error or info.chunks[0]}")
        self.client_ms.append((dt - info.elapsed_s) * 1e3)
        return dt

    def stages(self) -> dict[str, float]:
        """Median milliseconds per stage of the timed fetch jobs, from the fetching agent's log."""
        import re

        rows: list[dict[str, float]] = []
        for path in sorted((self.dst.data_dir / "logs").glob("*.log")):
            for line in path.read_text(errors="replace").splitlines():
                m = re.search(r"fetch job (\d+) stages \(ms\): (.*)$", line)
                if m and int(m.group(1)) > 1:  # job 1 is the warm-up
                    rows.append({k: float(v) for k, v in (kv.split("=") for kv in m.group(2).split())})
        out = {"client_rpc": median(self.client_ms[1:])} if len(self.client_ms) > 1 else {}
        for key in dict.fromkeys(k for r in rows for k in r):
            out[key] = median([r.get(key, 0.0) for r in rows])
        return out

    def close(self) -> None:
        self.pool.close()
        self.cs.close()
        self.cd.close()
        self.src.stop()
        self.dst.stop()


class _BarePair:
    """The same transport used directly: a peer process serves its region, this one READs it."""

    def __init__(self, backend: str, n: int, chunk: int) -> None:
        from multiprocessing import shared_memory

        from pdx.config import TransportConfig
        from pdx.transport import create
        from pdx.transport.base import ChunkOp, MemoryKind, MemoryRegion

        nbytes = n * chunk
        self.peer = subprocess.Popen([sys.executable, "-m", "bench.cli", "agent", "--bare-peer", backend,
                                      "--nbytes", str(nbytes)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=ucx_env.child_env())
        assert self.peer.stdout is not None
        self.shm = shared_memory.SharedMemory(create=True, size=nbytes)
        self.transport: Any = None
        address = self.peer.stdout.readline().decode().strip()
        if not address:
            self.close()
            raise RuntimeError(f"bare {backend} peer did not start")
        buf = self.shm.buf
        assert buf is not None
        np.ndarray((nbytes,), np.uint8, buf)[:] = 1  # touch every page, as the agent's prefaulted pool
        self.transport = create(backend, TransportConfig(backend=backend, transfer_timeout_s=60), "bench-agent")
        self.transport.register(MemoryRegion(nbytes, MemoryKind.HOST, buf, name=self.shm.name))
        self.transport.listen()
        self.peer_id = self.transport.connect(address).peer_id
        self.ops = [ChunkOp(i * chunk, i * chunk, chunk) for i in range(n)]
        del buf

    def read(self) -> float:
        from pdx.transport.base import OpKind

        t0 = time.perf_counter()
        result = self.transport.post(self.peer_id, OpKind.READ, self.ops).wait(60)
        dt = time.perf_counter() - t0
        if not result.ok:
            raise RuntimeError(f"bare read failed: {result.errors}")
        return dt

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self.peer.stdin is not None:
            self.peer.stdin.close()
        try:
            self.peer.wait(15)
        except subprocess.TimeoutExpired:
            self.peer.kill()
            self.peer.wait(10)
        self.shm.close()
        self.shm.unlink()


def _bare_peer(backend: str, nbytes: int) -> None:
    from multiprocessing import shared_memory

    from pdx.config import TransportConfig
    from pdx.transport import create
    from pdx.transport.base import MemoryKind, MemoryRegion

    shm = shared_memory.SharedMemory(create=True, size=nbytes)
    buf = shm.buf
    assert buf is not None
    np.ndarray((nbytes,), np.uint8, buf)[:] = np.arange(nbytes, dtype=np.uint64).astype(np.uint8)
    transport = create(backend, TransportConfig(backend=backend, transfer_timeout_s=60), "bench-agent")
    transport.register(MemoryRegion(nbytes, MemoryKind.HOST, buf, name=shm.name))
    print(transport.listen(), flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    transport.close()
    del buf
    shm.close()
    shm.unlink()
