"""Two pdx-proxy processes over the same workers: agents announce themselves to both (the
``registration.proxy_urls`` list), both route P/D, and killing one proxy loses only the
requests that were in flight through it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pdx.agent.metrics import AgentMetrics
from pdx.agent.registration import Announcer
from pdx.config import RegistrationConfig
from pdx.scheduler.messages import AgentAnnouncement, WorkerRole
from proxy.standin import StandinWorker, content_of_stream
from proxy.testing import BackgroundLoop, wait_until

MODEL = "standin-model"
TOKENS = 40


def _start_proxy(tmp_path: Path, name: str) -> tuple[subprocess.Popen[str], str]:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(f"port: 0\npolicy: least_loaded\nmodels: [{MODEL}]\nhealth_interval_s: 0.2\n")
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg),
                             "--log-level", "WARNING"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env={k: v for k, v in os.environ.items() if not k.startswith("PDX__")})
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the ready line (the process exits, and so EOF, on failure)
    if not line.startswith("pdx-proxy: serving on "):
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"proxy {name} did not start: {line!r}")
    return proc, line.split()[-1]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[dict[str, object]]:
    bg = BackgroundLoop()
    prefill, decode = StandinWorker("p0"), StandinWorker("d0")
    procs: list[subprocess.Popen[str]] = []
    announcers: list[Announcer] = []
    try:
        for w in (prefill, decode):
            bg.run(w.start())
        decode.behaviour.pace_s = 0.05  # streams last ~2 s: long enough to be in flight
        (pa, url_a), (pb, url_b) = _start_proxy(tmp_path, "a"), _start_proxy(tmp_path, "b")
        procs += [pa, pb]
        for w, role in ((prefill, WorkerRole.PREFILL), (decode, WorkerRole.DECODE)):
            seq = iter(range(1, 1 << 30))

            def snapshot(leaving: bool, w: StandinWorker = w, role: WorkerRole = role,
                         seq: Iterator[int] = seq) -> AgentAnnouncement:
                return AgentAnnouncement(agent_id=w.name, role=role, engine_url=w.url, models=(MODEL,),
                                         heartbeat_s=0.2, seq=next(seq), timestamp=time.time(), leaving=leaving)

            ann = Announcer(RegistrationConfig(proxy_url=url_a, proxy_urls=[url_b], heartbeat_s=0.2),
                            snapshot, AgentMetrics())
            ann.start()
            announcers.append(ann)

        def routable(url: str) -> bool:
            ws = httpx.get(url + "/admin/workers", timeout=5).json()["workers"]
            return sorted(w["id"] for w in ws if w["state"] == "healthy") == ["d0", "p0"]

        for url in (url_a, url_b):
            wait_until(lambda url=url: routable(url), timeout=20, what=f"{url} knows both workers")
        yield {"a": (pa, url_a), "b": (pb, url_b), "prefill": prefill, "decode": decode}
    finally:
        for ann in announcers:
            ann.stop(timeout=2.0)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
            if p.stdout is not None:
                p.stdout.close()
        for w in (prefill, decode):
            bg.run(w.stop())
        bg.close()


def _stream(url: str, rid: str, out: dict[str, object]) -> None:
    try:
        r = httpx.post(url + "/v1/completions", timeout=30, headers={"X-Request-Id": rid},
                       json={"model": MODEL, "prompt": "x", "max_tokens": TOKENS, "stream": True})
        out[rid] = content_of_stream(r.content) if r.content.endswith(b"data: [DONE]\n\n") else "incomplete"
    except httpx.HTTPError as exc:
        out[rid] = f"error: {exc.__class__.__name__}"


def test_both_proxies_route_and_one_dying_loses_only_its_own_requests(fleet: dict[str, object]) -> None:
    (pa, url_a), (_pb, url_b) = fleet["a"], fleet["b"]  # type: ignore[misc]
    prefill, decode = fleet["prefill"], fleet["decode"]
    assert isinstance(prefill, StandinWorker) and isinstance(decode, StandinWorker)
    for url in (url_a, url_b):
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3}, timeout=20)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == " w0 w1 w2"
    # both proxies ran the P/D flow over the announced workers
    assert len(prefill.received) == 2
    assert all(rec.body["kv_transfer_params"]["do_remote_prefill"] for rec in decode.received)

    results: dict[str, object] = {}
    threads = [threading.Thread(target=_stream, args=(url, f"{name}-{i}", results))
               for name, url in (("a", url_a), ("b", url_b)) for i in range(3)]
    for t in threads:
        t.start()
    ids = {f"{n}-{i}" for n in "ab" for i in range(3)}
    wait_until(lambda: ids <= {rec.request_id for rec in decode.received}, timeout=20,
               what="six streams in flight on the decode worker")
    os.kill(pa.pid, signal.SIGKILL)
    pa.wait(10)
    for t in threads:
        t.join(40)
    full = "".join(f" w{i}" for i in range(TOKENS))
    assert {rid: results[rid] for rid in sorted(ids) if rid.startswith("b")} == {f"b-{i}": full for i in range(3)}
    assert all(results[f"a-{i}"] != full for i in range(3)), results
    # the workers saw exactly proxy a's requests go away
    wait_until(lambda: {f"a-{i}" for i in range(3)} <= set(decode.aborted), timeout=10, what="a's aborts")
    assert not any(str(rid).startswith("b-") for rid in decode.aborted)
    # proxy b goes on serving
    r = httpx.post(url_b + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}, timeout=20)
    assert r.status_code == 200
