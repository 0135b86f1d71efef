"""``pdx-bench fleet``: a 2P2D deployment over two "hosts" (network namespaces) on real vLLM.

Rows (each beside a baseline measured in the same run):

* ``ttft_p50_ms`` / ``ttft_p99_ms``: time to the first streamed byte of ``/v1/completions``
  through ``pdx-proxy`` (default policy, ``prefix_affinity``) for ``--prompts`` distinct prompts
  of ``--prompt-tokens`` tokens, sent one at a time from host 0: host 0 runs the proxy and two
  prefill workers, host 1 two decode workers, so every P/D pair moves its KV across the hosts'
  interfaces (tcp). Baseline: the same prompts streamed straight to one plain vLLM server (no
  connector, no proxy) on host 0, started before the fleet (and stopped before it starts).
* ``p2p_fetch_gbps``: ``--fetch-size`` of chunks (the tiny model's 128-token chunks, 128 KiB
  each) fetched by decode-0's agent (host 1) from prefill-0's agent (host 0) over the peer plane,
  timed from the ``fetch`` call to the ``wait`` reply: peer session, ``peer_pin`` (the holder's
  grants), slab reservations, the transfer and the checksum verification at commit: what a
  peer-to-peer reuse load costs before the unpack. Baseline: the bare tcp transport between the
  same two namespaces, one READ batch of the same chunks, no agent and no checksum.

Every figure is a median or percentile over this run only. Needs root (``ip netns``); the
workers are stopped by PID and the namespaces deleted at the end. Takes a few minutes on two
cores (four vLLM servers start one after the other).
"""

from __future__ import annotations

import argparse
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import Report, Result, gbps, median, percentile, progress
from pdx.config import parse_size

CHUNK_TOKENS = 128
API_KEY = "fleet-bench-api-key"
ADMIN_KEY = "fleet-bench-admin-key"
#: name, role, host, core
WORKERS = [("prefill-0", "prefill", 0, "0"), ("prefill-1", "prefill", 0, "1"),
           ("decode-0", "decode", 1, "1"), ("decode-1", "decode", 1, "0")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = __doc__.split("\n", 2)[2] if __doc__ else None
    p.add_argument("--model", default="tiny", help="embedded model preset (default tiny)")
    p.add_argument("--prompts", type=int, default=12, help="distinct prompts timed on each side (default 12)")
    p.add_argument("--prompt-tokens", type=int, default=1024, help="tokens per prompt (default 1024)")
    p.add_argument("--fetch-size", default="32MiB", help="bytes moved per p2p fetch (default 32MiB)")
    p.add_argument("--repeats", type=int, default=5, help="timed p2p fetches (and bare reads) (default 5)")
    p.add_argument("--rate", default="", help="shape each host's link with tc tbf, e.g. 1gbit (default: none)")
    p.add_argument("--workdir", default="", help="folder for logs and run files (default: a temp folder)")
    p.add_argument("--data-dir", default="", help="pdx data folder holding the built models")


def run(args: argparse.Namespace) -> Report:
    from bench.netns import NetnsHosts, netns_unavailable
    from pdx.model import ensure_model

    why = netns_unavailable()
    if why:
        raise SystemExit(f"pdx-bench fleet: network namespaces are needed: {why}")
    report = Report("fleet")
    model = ensure_model(args.model, args.data_dir)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pdx-bench-fleet-"))
    workdir.mkdir(parents=True, exist_ok=True)
    prompts = _prompts(model.path, args.prompt_tokens, args.prompts + 4)
    warm, timed = prompts[:4], prompts[4:]
    with NetnsHosts(2, "bfleet", rate=args.rate) as hosts:
        _log("baseline: plain vLLM on host 0")
        plain_ms = _plain_ttft(hosts, model, workdir, args, warm, timed)
        fleet = _Fleet(hosts, model, workdir, args)
        try:
            _log("fleet: proxy, 2 prefill workers on host 0, 2 decode workers on host 1")
            fleet.start()
            for ids in warm:  # each worker once (sessions, first-touch of pools)
                fleet.ttft(ids)
            fleet_ms = [fleet.ttft(ids) for ids in progress(timed, "fleet TTFT")]
            fetch_s, bare_s, nbytes = _p2p(fleet, args)
        finally:
            fleet.stop()
    report.add(Result("ttft_p50_ms", median(fleet_ms), "ms", "plain_vllm_ttft_p50_ms", median(plain_ms),
                      lower_is_better=True, extra={"samples": fleet_ms, "baseline_samples": plain_ms}))
    report.add(Result("ttft_p99_ms", percentile(fleet_ms, 99), "ms", "plain_vllm_ttft_p99_ms",
                      percentile(plain_ms, 99), lower_is_better=True))
    report.add(Result("p2p_fetch_gbps", gbps(nbytes, median(fetch_s)), "GB/s", "bare_tcp_read_gbps",
                      gbps(nbytes, median(bare_s)),
                      extra={"bytes": nbytes, "fetch_ms": [round(s * 1e3, 2) for s in fetch_s],
                             "bare_ms": [round(s * 1e3, 2) for s in bare_s]}))
    report.notes.extend([
        f"model {args.model}, float32, vLLM CPU; {args.prompt_tokens}-token distinct prompts, one at a time, "
        f"streamed, max_tokens=4; {len(timed)} timed per side after {len(warm)} warm-ups",
        "2 hosts = network namespaces joined by a bridge (veth, tcp between hosts"
        + (f", each link shaped to {args.rate} with tc tbf" if args.rate else ", unshaped") + "); "
        "4 vLLM workers on 2 cores (one prefill and one decode worker per core); the baseline server "
        "had core 0 alone",
        f"p2p: {nbytes} bytes in {nbytes // fleet.chunk_bytes} chunks of {fleet.chunk_bytes} bytes, "
        f"median of {len(fetch_s)}; agents verify every chunk's checksum, the bare transport does not",
        f"logs: {workdir}",
    ])
    return report


def _log(msg: str) -> None:
    sys.stderr.write(f"fleet: {msg}\n")
    sys.stderr.flush()


def _prompts(model_path: Path, n: int, count: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from pdx.model import paragraph

    tok = AutoTokenizer.from_pretrained(str(model_path))
    out = []
    for seed in range(count):
        words = n
        while True:
            ids = list(tok.encode(paragraph(5100 + seed, words), add_special_tokens=False))
            if len(ids) >= n:
                out.append(ids[:n])
                break
            words = int(words * 1.5)
    return out


def _stream_ttft(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> float:
    """Milliseconds from sending ``body`` (streamed) to the first byte of the answer; the rest is
    read to the end."""
    import httpx

    t0 = time.perf_counter()
    first = 0.0
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, headers=headers,
                      timeout=600.0) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"{url}: {r.status_code} {r.text[:500]}")
        for chunk in r.iter_bytes():
            if chunk and not first:
                first = time.perf_counter() - t0
    return first * 1e3


def _body(name: str, ids: list[int]) -> dict[str, Any]:
    return {"model": name, "prompt": ids, "max_tokens": 4, "temperature": 0.0}


def _plain_ttft(hosts: Any, model: Any, workdir: Path, args: argparse.Namespace, warm: list[list[int]],
                timed: list[list[int]]) -> list[float]:
    from pdx.engine.vllm import VllmOptions, start_server

    opts = VllmOptions(model=str(model.path), cpu_bind="0", host=hosts[0].address, served_model_name="tiny",
                       kv_cache_gib=1, max_model_len=4096)
    server = hosts.call(0, start_server, opts, workdir / "plain", timeout_s=600.0)
    try:
        def measure() -> list[float]:
            for ids in warm:
                _stream_ttft(server.url, _body("tiny", ids))
            return [_stream_ttft(server.url, _body("tiny", ids)) for ids in progress(timed, "plain TTFT")]

        out: list[float] = hosts.call(0, measure, timeout_s=1200.0)
        return out
    finally:
        server.stop()


class _Fleet:
    """The proxy and the four workers, started as ``docs/multihost.md`` shows."""

    def __init__(self, hosts: Any, model: Any, workdir: Path, args: argparse.Namespace) -> None:
        self.hosts = hosts
        self.model = model
        self.root = workdir
        self.args = args
        self.proxy: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.workers: dict[str, Any] = {}
        self.secret = ""
        self.chunk_bytes = 0

    def start(self) -> None:
        import yaml

        from pdx.deploy.agent_engine import AgentEngine

        secret = self.root / "secret"
        if not secret.exists():
            fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(os.urandom(32).hex())
        self.secret = secret.read_text().strip()
        cfg = self.root / "proxy.yaml"
        cfg.write_text(yaml.safe_dump({
            "host": self.hosts[0].address, "port": 0, "models": ["tiny"], "health_interval_s": 1.0,
            "api_key": API_KEY, "admin_key": ADMIN_KEY,
            "cache_aware": {"tokenizer": str(self.model.path), "chunk_tokens": CHUNK_TOKENS}}))
        log = (self.root / "proxy.log").open("ab")
        self.proxy = self.hosts.popen(0, [sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg)],
                                      stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        self.url = self._proxy_url()
        for name, role, host, core in WORKERS:
            addr = self.hosts[host].address

            def start(name: str = name, role: str = role, addr: str = addr, core: str = core) -> Any:
                engine = AgentEngine(
                    name, self.model.path, role, self.root, cpu_bind=core, served_model_name="tiny", host=addr,
                    store={"chunk_tokens": CHUNK_TOKENS, "l1": {"capacity": "256MiB"}},
                    transport={"backend": "tcp", "host": addr, "secret_file": str(secret),
                               "transfer_timeout_s": 60},
                    vllm={"kv_cache_gib": 1, "max_model_len": 4096},
                    agent={"http": {"host": addr}, "registration": {
                        "proxy_url": self.url, "heartbeat_s": 1, "admin_key": ADMIN_KEY}})
                engine.agent.start(60.0)
                return engine

            self.workers[name] = self.hosts.call(host, start)
        for name, _role, host, _core in progress(WORKERS, "workers ready"):
            self.hosts.call(host, self.workers[name].wait_ready, 400.0, timeout_s=420.0)
        self._wait_routable()

    def _proxy_url(self) -> str:
        proc = self.proxy
        assert proc is not None and proc.stdout is not None
        buf = b""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                buf += os.read(proc.stdout.fileno(), 4096)
                for line in buf.decode(errors="replace").splitlines():
                    if line.startswith("pdx-proxy: serving on "):
                        return line.split()[-1]
        raise RuntimeError(f"the proxy did not start; see {self.root / 'proxy.log'}")

    def _wait_routable(self) -> None:
        import httpx

        def healthy() -> bool:
            doc = httpx.get(self.url + "/admin/workers", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                            timeout=5).json()
            return sorted(w["id"] for w in doc["workers"] if w["state"] == "healthy") == sorted(self.workers)

        deadline = time.monotonic() + 120
        while not self.hosts.call(0, healthy):
            if time.monotonic() > deadline:
                raise RuntimeError("the proxy does not route to every worker")
            time.sleep(0.5)

    def ttft(self, ids: list[int]) -> float:
        ms: float = self.hosts.call(0, _stream_ttft, self.url, _body("tiny", ids),
                                    {"Authorization": f"Bearer {API_KEY}"})
        return ms

    def stop(self) -> None:
        for w in self.workers.values():
            w.stop()
        if self.proxy is not None:
            self.proxy.terminate()
            try:
                self.proxy.wait(15)
            except subprocess.TimeoutExpired:
                self.proxy.kill()
                self.proxy.wait(10)
            if self.proxy.stdout is not None:
                self.proxy.stdout.close()


def _p2p(fleet: _Fleet, args: argparse.Namespace) -> tuple[list[float], list[float], int]:
    """Timed agent fetches (decode-0 from prefill-0) and bare tcp reads of the same bytes."""
    from pdx.store.pool import attach

    src, dst = fleet.workers["prefill-0"], fleet.workers["decode-0"]
    status = src.status()
    chunk = int(status["pool"]["slab_size"])
    fleet.chunk_bytes = chunk
    n = max(1, parse_size(args.fetch_size) // chunk)
    pool = attach(status["pool"]["shm_name"])
    cs, cd = src.agent.client(timeout_s=30.0), dst.agent.client(timeout_s=30.0)
    fill = np.arange(chunk, dtype=np.uint8)
    peer = src.agent.peer_address
    bare = _BareTcp(fleet.hosts, n, chunk, fleet.secret)

    def agent_fetch(i: int) -> float:
        keys = [os.urandom(16) for _ in range(n)]  # fresh chunks in the holder's pool (untimed)
        res = cs.reserve(keys, chunk)
        for r in res:
            if not r.id:
                raise RuntimeError(f"holder pool: {r.error}")
            pool.array(r.offset, r.nbytes)[:] = fill
        errs = cs.commit([r.id for r in res], CHUNK_TOKENS, timeout=60)
        if any(errs):
            raise RuntimeError(f"holder commit: {errs[0]}")
        t0 = time.perf_counter()
        job = cd.fetch(peer, keys, f"bench-p2p-{i}", deadline_s=60, pin=False)
        info = cd.wait(job, 60)
        dt = time.perf_counter() - t0
        if not info.ok:
            raise RuntimeError(f"p2p fetch failed: {info.error or info.chunks[0]}")
        return dt

    fetch_s: list[float] = []
    bare_s: list[float] = []
    try:
        bare.start()
        agent_fetch(0)  # warm-up: the peer session, first touch of the slabs
        bare.read()
        for i in progress(range(1, args.repeats + 1), "p2p fetch"):
            fetch_s.append(agent_fetch(i))  # interleaved: both see the same background load
            bare_s.append(bare.read())
    finally:
        bare.close()
        cs.close()
        cd.close()
        pool.close()
    return fetch_s, bare_s, n * chunk


class _BareTcp:
    """The bare tcp transport between the hosts: host 0 serves a region, host 1 READs it."""

    def __init__(self, hosts: Any, n: int, chunk: int, secret: str) -> None:
        self.hosts = hosts
        self.n, self.chunk, self.secret = n, chunk, secret
        self.server: Any = None
        self.client: Any = None
        self.peer_id: Any = None
        self._bufs: list[np.ndarray] = []

    def _transport(self, host: int) -> Any:
        from pdx.config import TransportConfig
        from pdx.transport import create
        from pdx.transport.base import MemoryKind, MemoryRegion

        nbytes = self.n * self.chunk
        buf = np.ones(nbytes, dtype=np.uint8)  # every page touched, as the agents' pools are
        self._bufs.append(buf)
        cfg = TransportConfig(backend="tcp", host=self.hosts[host].address, secret=self.secret,
                              transfer_timeout_s=60)
        t = create("tcp", cfg, "bench-fleet")
        t.register(MemoryRegion(nbytes, MemoryKind.HOST, buf))
        return t

    def start(self) -> None:
        def serve() -> str:
            self.server = self._transport(0)
            address: str = self.server.listen()
            return address

        address = self.hosts.call(0, serve)

        def connect() -> None:
            self.client = self._transport(1)
            self.client.listen()
            self.peer_id = self.client.connect(address).peer_id

        self.hosts.call(1, connect)

    def read(self) -> float:
        from pdx.transport.base import ChunkOp, OpKind

        ops = [ChunkOp(i * self.chunk, i * self.chunk, self.chunk) for i in range(self.n)]

        def once() -> float:
            t0 = time.perf_counter()
            result = self.client.post(self.peer_id, OpKind.READ, ops).wait(60)
            dt = time.perf_counter() - t0
            if not result.ok:
                raise RuntimeError(f"bare read failed: {result.errors}")
            return dt

        dt: float = self.hosts.call(1, once)
        return dt

    def close(self) -> None:
        for t in (self.client, self.server):
            if t is not None:
                t.close()

