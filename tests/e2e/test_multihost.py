"""Two hosts (network namespaces from ``bench/netns.py``), 2 prefill + 2 decode vLLM workers on
the tiny model, started by hand as ``docs/multihost.md`` shows: on host 0 the proxy and both
prefill workers, on host 1 both decode workers, so every P/D pair crosses the hosts' interfaces.
Pair 0 moves KV over tcp, pair 1 over ucx (UCX's tcp transport on eth0). Greedy output through
the proxy equals plain vLLM's, and each decode worker loaded the prompt's KV from across.

Heavy (four vLLM servers): one module-scoped deployment, shared by the tests.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.netns import NetnsHosts, netns_unavailable
from pdx.deploy.agent_engine import AgentEngine, Metrics
from pdx.engine.vllm import VllmServer
from pdx.model import BuiltModel
from pdx.model.text import paragraph

WHY = netns_unavailable()
pytestmark = pytest.mark.skipif(bool(WHY), reason=f"network namespaces: {WHY}")

CHUNK_TOKENS = 128
MAX_TOKENS = 16
PDX_HITS = "vllm:external_prefix_cache_hits_total"
#: name, role, host, transport backend, core
WORKERS = [("prefill-0", "prefill", 0, "tcp", "0"), ("prefill-1", "prefill", 0, "ucx", "1"),
           ("decode-0", "decode", 1, "tcp", "1"), ("decode-1", "decode", 1, "ucx", "0")]


API_KEY = "multihost-api-key"
ADMIN_KEY = "multihost-admin-key"
API = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@dataclass
class Fleet:
    hosts: NetnsHosts
    proxy_url: str
    workers: dict[str, AgentEngine]

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A request to the proxy, from host 0 (the proxy's address exists only there)."""
        import httpx

        def call() -> dict[str, Any]:
            r = httpx.post(self.proxy_url + path, json=body, headers=API, timeout=300)
            assert r.status_code == 200, r.text
            out: dict[str, Any] = r.json()
            return out

        return self.hosts.call(0, call)

    def metric(self, worker: str, name: str, agent: bool = False, **labels: str) -> float:
        w = self.workers[worker]
        host = next(h for n, _r, h, _b, _c in WORKERS if n == worker)
        url = f"{w.agent.http_url}/metrics" if agent else f"{w.url}/metrics"
        return self.hosts.call(host, lambda: Metrics.fetch(url).value(name, **labels))


def _start_proxy(hosts: NetnsHosts, root: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``pdx-proxy serve`` on host 0, as the docs show; returns (process, URL)."""
    cfg = root / "proxy.yaml"
    cfg.write_text(yaml.safe_dump({"host": hosts[0].address, "port": 0, "policy": "round_robin",
                                   "models": ["tiny"], "health_interval_s": 1.0, "log_requests": True,
                                   "api_key": API_KEY, "admin_key": ADMIN_KEY}))
    log = (root / "proxy.log").open("ab")
    proc = hosts.popen(0, [sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg)],
                       stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
    log.close()
    assert proc.stdout is not None
    buf = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            buf += os.read(proc.stdout.fileno(), 4096)
            for line in buf.decode(errors="replace").splitlines():
                if line.startswith("pdx-proxy: serving on "):
                    return proc, line.split()[-1]
    proc.kill()
    proc.wait(10)
    raise AssertionError(f"the proxy did not start:\n{(root / 'proxy.log').read_text()[-3000:]}")


def _secret(root: Path) -> Path:
    """The deployment secret every agent shares (agents off loopback refuse to start without one)."""
    path = root / "secret"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(os.urandom(32).hex())
    return path


def _worker(hosts: NetnsHosts, root: Path, model: BuiltModel, proxy_url: str, name: str, role: str,
            host: int, backend: str, core: str) -> AgentEngine:
    """``pdx-agent --config <name>.yaml -- <vLLM>`` on ``host``, every address that host's own."""
    addr = hosts[host].address
    env = dict(os.environ)
    if backend == "ucx":  # UCX over the hosts' network, not shared memory between the namespaces
        env.update({"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "eth0", "UCX_WARN_UNUSED_ENV_VARS": "n"})

    def start() -> AgentEngine:  # in the host's namespace: its port is picked and bound there
        engine = AgentEngine(
            name, model.path, role, root, cpu_bind=core, served_model_name="tiny", host=addr,
            store={"chunk_tokens": CHUNK_TOKENS, "l1": {"capacity": "64MiB"}},
            transport={"backend": backend, "host": addr, "secret_file": str(_secret(root))},
            vllm={"kv_cache_gib": 1, "max_model_len": 4096},
            agent={"http": {"host": addr}, "registration": {"proxy_url": proxy_url, "heartbeat_s": 1,
                                                                 "admin_key": ADMIN_KEY}},
            env=env)
        engine.agent.start(60.0)
        return engine

    return hosts.call(host, start)


@pytest.fixture(scope="module")
def fleet(tiny_model: BuiltModel, stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    stack.stop_all()  # four vLLM servers of our own: nothing else of the suite runs meanwhile
    root = tmp_path_factory.mktemp("multihost")
    workers: dict[str, AgentEngine] = {}
    proxy: subprocess.Popen[bytes] | None = None
    with NetnsHosts(2, "fleet") as hosts:
        try:
            proxy, url = _start_proxy(hosts, root)
            for name, role, host, backend, core in WORKERS:
                workers[name] = _worker(hosts, root, tiny_model, url, name, role, host, backend, core)
            for name, _role, host, _b, _c in WORKERS:
                hosts.call(host, workers[name].wait_ready, 400.0, timeout_s=420.0)
            fleet = Fleet(hosts, url, workers)

            def routable() -> bool:
                import httpx

                doc = httpx.get(url + "/admin/workers", headers=ADMIN, timeout=5).json()
                return sorted(w["id"] for w in doc["workers"] if w["state"] == "healthy") == sorted(workers)

            deadline = time.monotonic() + 120
            while not hosts.call(0, routable):
                assert time.monotonic() < deadline, "the proxy does not route to every worker"
                time.sleep(0.5)
            yield fleet
        finally:
            for w in workers.values():
                w.stop()
            if proxy is not None:
                proxy.terminate()
                try:
                    proxy.wait(15)
                except subprocess.TimeoutExpired:
                    proxy.kill()
                    proxy.wait(10)
                if proxy.stdout is not None:
                    proxy.stdout.close()


def _plain(server: VllmServer, prompt: str) -> str:
    import httpx

    r = httpx.post(f"{server.url}/v1/completions", timeout=300, json={
        "model": server.model_name, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0})
    return str(r.json()["choices"][0]["text"])


def test_pd_across_hosts_over_tcp_and_ucx_equals_plain_vllm(fleet: Fleet, plain_server: VllmServer) -> None:
    before = {d: fleet.metric(d, PDX_HITS) for d in ("decode-0", "decode-1")}
    prompts = [paragraph(seed=700 + i, num_words=500) for i in range(4)]
    for prompt in prompts:  # round_robin: pairs (prefill-0, decode-0) and (prefill-1, decode-1) in turn
        out = fleet.post("/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS,
                                             "temperature": 0.0})
        assert out["choices"][0]["text"] == _plain(plain_server, prompt)
    for d in ("decode-0", "decode-1"):
        loaded = fleet.metric(d, PDX_HITS) - before[d]
        assert loaded >= 2 * 3 * CHUNK_TOKENS, f"{d} loaded {loaded} tokens from across the hosts"
        # the KV came from the other host, over this pair's transport
        assert fleet.metric(d, "pdx_agent_transfer_bytes_total", agent=True) > 0


def test_chat_across_hosts_equals_plain_vllm(fleet: Fleet, plain_server: VllmServer) -> None:
    import httpx

    messages = [{"role": "user", "content": paragraph(seed=790, num_words=400)}]
    body = {"model": "tiny", "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0.0}
    want = httpx.post(f"{plain_server.url}/v1/chat/completions", timeout=300,
                      json={**body, "model": plain_server.model_name}).json()["choices"][0]["message"]["content"]
    for _ in range(2):  # both pairs
        got = fleet.post("/v1/chat/completions", body)["choices"][0]["message"]["content"]
        assert got == want
