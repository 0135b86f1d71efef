"""``pdx-bench proxy``: time to first byte added by pdx-proxy, and its highest request rate.

Four processes on this host, so the load generator does not share an event loop
(or, with pinning, a core) with the proxy:

* **prefill** and **decode**: stand-in workers (``proxy.standin``), one process each;
  decode streams ``--tokens`` tokens, one every ``--pace-ms``; prefill answers at once.
* **proxy**: a ``ProxyServer`` over those two workers (the full P/D flow: one
  prefill call, then the decode stream forwarded), set up as ``pdx-proxy serve`` does.
* **load** (this process): for each concurrency, ``c`` closed-loop clients (a minimal
  HTTP/1.1 client, cheap in CPU) send streaming completions for ``--duration``
  seconds, alternately straight to the decode worker (the baseline) and through the
  proxy, ``--rounds`` times each. Clients start staggered over one stream's length.

With 2+ cores (and no ``--no-pin``) the proxy runs alone on the last core, both
stand-ins and the load generator on the others (``--layout prefill-with-proxy``: the
prefill stand-in on the proxy's core, as earlier runs had it).

Figures, per concurrency: ``proxy_added_ms_p50``/``_p99`` = TTFB percentile
through the proxy minus the same percentile straight to the decode worker (the
added time includes the prefill hop the P/D flow needs); baseline = the direct
TTFB; ratio = direct TTFB / proxied TTFB. ``proxy_rps_max``: non-streaming
requests answered per second through the proxy at ``--rps-concurrency`` clients,
against the same requests sent straight to the decode worker, with (in ``extra`` and
the notes) every process's CPU time per request in both phases. Also reported: the
proxy's CPU time per stream / per request, and (in ``extra``) the share of time the
proxy was runnable but waiting for a CPU: other work on the host shows up there,
and in the tail latencies with it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from bench.report import Report, Result, percentile

MODEL = "standin-model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concurrency", default="1,32,128", help="comma-separated stream counts (default 1,32,128)")
    p.add_argument("--duration", type=float, default=2.0, help="seconds per measured phase (default 2)")
    p.add_argument("--warmup", type=float, default=0.5,
                   help="seconds at the start of each phase not counted (default 0.5)")
    p.add_argument("--rounds", type=int, default=3,
                   help="direct/proxy phase pairs per concurrency, alternated (default 3)")
    p.add_argument("--tokens", type=int, default=16, help="tokens per streamed answer (default 16)")
    p.add_argument("--pace-ms", type=float, default=20.0,
                   help="ms between streamed tokens of the stand-in decode worker (default 20)")
    p.add_argument("--rps-concurrency", type=int, default=64,
                   help="clients of the request-rate phase (default 64)")
    p.add_argument("--policy", default="least_loaded", help="the proxy's routing policy (default least_loaded)")
    p.add_argument("--no-pin", action="store_true",
                   help="do not pin the proxy to its own core (default on hosts with 2+ cores: proxy on "
                   "the last core, workers and load generator on the others)")
    p.add_argument("--layout", choices=("proxy-alone", "prefill-with-proxy"), default="proxy-alone",
                   help="with pinning: the proxy alone on the last core (default), or the prefill "
                   "stand-in with it (the layout of earlier runs)")


def _run_loop(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(main())


# --- the helper processes ------------------------------------------------------------------------


def _worker_main(conn: Connection, name: str, pace_s: float, tokens: int) -> None:
    """One stand-in worker in this process (prefill and decode are separate, as in a deployment)."""
    from proxy.standin import StandinBehaviour, StandinWorker

    async def main() -> None:
        w = StandinWorker(name, MODEL, StandinBehaviour(pace_s=pace_s, tokens=tokens))
        await w.start()
        conn.send(w.url)
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        await w.stop()

    _run_loop(main)


def _proxy_main(conn: Connection, prefill_url: str, decode_url: str, policy: str) -> None:
    from pdx.config import ProxyConfig, ProxyWorkerConfig
    from proxy.app import ProxyServer

    cfg = ProxyConfig(port=0, policy=policy, models=[MODEL], max_inflight=4096, max_queue=4096,
                      health_interval_s=5.0,
                      workers=[ProxyWorkerConfig(url=prefill_url, role="prefill"),
                               ProxyWorkerConfig(url=decode_url, role="decode")])

    async def main() -> None:
        server = ProxyServer(cfg)
        await server.start()
        gc.collect()  # as pdx-proxy serve does
        gc.freeze()
        conn.send(server.url)
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        await server.stop()

    _run_loop(main)


class _Helper:
    """A child process answering one message once ready; stopped by ``close`` (then by PID)."""

    def __init__(self, target: Callable[..., None], *args: Any, cpus: set[int] | None = None) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child, *args), daemon=True)
        self.proc.start()
        if cpus and self.proc.pid is not None:
            os.sched_setaffinity(self.proc.pid, cpus)
        if not self.conn.poll(60):
            self.close()
            raise RuntimeError(f"{target.__name__} did not start within 60 s")
        self.ready = self.conn.recv()

    def schedstat(self) -> tuple[float, float]:
        """``(seconds on a CPU, seconds runnable but waiting for one)`` so far (Linux
        /proc/PID/schedstat, ns precision; /proc/PID/stat's tick-sampled times are too coarse).
        The wait shows how much other processes on the host delayed this one."""
        try:
            with open(f"/proc/{self.proc.pid}/schedstat") as f:
                ran, waited = f.read().split()[:2]
            return int(ran) / 1e9, int(waited) / 1e9
        except (OSError, IndexError, ValueError):
            return float("nan"), float("nan")

    def cpu_seconds(self) -> float:
        return self.schedstat()[0]

    def close(self) -> None:
        try:
            self.conn.send("stop")
        except (OSError, BrokenPipeError):
            pass
        self.proc.join(15)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


def _own_cpu_seconds() -> float:
    """This process's CPU time (the load generator), ns precision as ``_Helper.schedstat``."""
    try:
        with open("/proc/self/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, IndexError, ValueError):
        return time.process_time()


# --- the load ------------------------------------------------------------------------------------


@dataclass
class _Phase:
    ttfb_s: list[float] = field(default_factory=list)
    ok: int = 0
    errors: int = 0
    done: int = 0
    total: int = 0  # requests finished in the phase, warm-up included (for CPU per request)
    seconds: float = 0.0


class _Client(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection of the load generator.

    Deliberately minimal, so the load generator spends little CPU (it shares cores
    with the workers): no parsing beyond the status, the framing (chunked or
    Content-Length) and the first ``data:`` of an SSE answer, timed on arrival.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.done: asyncio.Future[bool] | None = None
        self.header_end = -1
        self.chunked = False
        self.length = 0
        self.first = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if self.header_end < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.header_end = end + 4
            head = bytes(buf[:end]).lower()
            self.chunked = b"transfer-encoding: chunked" in head
            i = head.find(b"content-length:")
            if i >= 0:
                self.length = int(head[i + 15:].split(b"\r\n", 1)[0])
        if not self.first and buf.find(b"data:", self.header_end) >= 0:
            self.first = time.perf_counter()
        complete = buf.endswith(b"0\r\n\r\n") if self.chunked else \
            len(buf) >= self.header_end + self.length
        if complete and self.done is not None and not self.done.done():
            self.done.set_result(buf[9:12] == b"200")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("connection lost"))

    async def request(self, raw: bytes) -> tuple[bool, float]:
        """Send one request, wait for the whole answer: ``(status 200, first data time)``."""
        assert self.transport is not None
        self.buf = bytearray()
        self.header_end, self.chunked, self.length, self.first = -1, False, 0, 0.0
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        ok = await asyncio.wait_for(self.done, 60)
        return ok, self.first


def _raw_request(url: str, body: bytes) -> tuple[str, int, bytes]:
    from urllib.parse import urlsplit

    u = urlsplit(url)
    head = (f"POST {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return u.hostname or "127.0.0.1", u.port or 80, head + body


async def _phase(url: str, body: bytes, clients: int, duration: float, warmup: float,
                 streaming: bool, stagger_s: float = 0.0) -> _Phase:
    """``clients`` closed-loop clients, each on its own keep-alive connection; client ``i``
    starts ``i/clients * stagger_s`` late so that equal-length streams do not all start (and
    end) in the same instant."""
    out = _Phase()
    host, port, raw = _raw_request(url, body)
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    count_from = start + warmup
    end = count_from + duration

    async def client(i: int) -> None:
        conn: _Client | None = None
        await asyncio.sleep(stagger_s * i / clients)
        while True:
            t = time.perf_counter()
            if t >= end:
                break
            try:
                if conn is None or conn.transport is None or conn.transport.is_closing():
                    _, conn = await loop.create_connection(_Client, host, port)
                t = time.perf_counter()
                ok, first = await conn.request(raw)
                ttfb = first - t if first else 0.0
                ok = ok and (bool(first) or not streaming)
            except (OSError, TimeoutError):
                ok, ttfb, conn = False, 0.0, None
            out.total += 1
            if t >= count_from and time.perf_counter() <= end:
                out.done += 1
                if ok:
                    out.ok += 1
                    out.ttfb_s.append(ttfb)
                else:
                    out.errors += 1
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    out.seconds = duration
    return out


def _ms(x: float) -> float:
    return x * 1e3


def run(args: argparse.Namespace) -> Report:
    levels = [int(c) for c in str(args.concurrency).split(",") if c.strip()]
    report = Report("proxy")
    report.notes.append(
        f"4 processes on {os.cpu_count()} cores: stand-in prefill, stand-in decode, proxy, "
        f"load generator (this one); "
        f"decode streams {args.tokens} tokens at {args.pace_ms:g} ms each; prefill answers at once; "
        f"{args.rounds} alternated direct/proxy phases of {args.duration:g} s per level")
    report.notes.append("proxy_added_ms = TTFB percentile via the proxy (prefill hop + decode) minus "
                        "the same percentile direct to decode; ratio = direct TTFB / proxied TTFB")
    report.notes.append("proxy_runnable_wait_fraction (extra) = share of the phase the proxy waited for a "
                        "CPU while runnable: contention from other processes on the host")
    ncpu = len(os.sched_getaffinity(0))
    pin = not args.no_pin and ncpu >= 2
    cpus = sorted(os.sched_getaffinity(0))
    proxy_cpus, other_cpus = ({cpus[-1]}, set(cpus[:-1])) if pin else (None, None)
    stream_s = args.tokens * args.pace_ms / 1e3
    warmup = max(args.warmup, stream_s + 0.2)
    if not pin:
        report.notes.append("no cpu pinning")
    elif args.layout == "prefill-with-proxy":
        report.notes.append(f"proxy and prefill stand-in pinned to cpu {sorted(proxy_cpus or ())}, decode "
                            f"stand-in and load generator to cpu {sorted(other_cpus or ())}")
    else:
        report.notes.append(f"proxy pinned alone to cpu {sorted(proxy_cpus or ())}, prefill and decode "
                            f"stand-ins and load generator to cpu {sorted(other_cpus or ())}")
    report.notes.append(f"clients start staggered over one stream ({stream_s:g} s); "
                        f"{warmup:g} s of warm-up per phase not counted")
    if pin:
        os.sched_setaffinity(0, other_cpus or set(cpus))
    helpers: list[_Helper] = []
    proxy: _Helper | None = None
    try:
        # proxy-alone: the proxy has its core to itself, so what is measured is the proxy (the
        # prefill stand-in costs about half the proxy's CPU per request: on the proxy's core it
        # caps the request rate and delays the proxy). prefill-with-proxy: the earlier layout.
        prefill_cpus = proxy_cpus if args.layout == "prefill-with-proxy" else other_cpus
        helpers.append(_Helper(_worker_main, "prefill", 0.0, 1, cpus=prefill_cpus))
        helpers.append(_Helper(_worker_main, "decode", args.pace_ms / 1e3, args.tokens, cpus=other_cpus))
        prefill_url, decode_url = helpers[0].ready, helpers[1].ready
        proxy = _Helper(_proxy_main, prefill_url, decode_url, args.policy, cpus=proxy_cpus)
        targets = {"direct": decode_url + "/v1/completions", "proxy": proxy.ready + "/v1/completions"}
        stream_body = json.dumps({"model": MODEL, "prompt": "benchmark prompt", "max_tokens": args.tokens,
                                  "stream": True}).encode()

        async def measure() -> None:
            assert proxy is not None
            for c in levels:
                phases: dict[str, list[_Phase]] = {"direct": [], "proxy": []}
                cpu = waited = 0.0
                proxied_total = 0
                for _ in range(args.rounds):
                    for name, url in targets.items():
                        cpu0, wait0 = proxy.schedstat()
                        phases[name].append(await _phase(url, stream_body, c, args.duration, warmup,
                                                         streaming=True, stagger_s=stream_s))
                        if name == "proxy":
                            cpu1, wait1 = proxy.schedstat()
                            cpu += cpu1 - cpu0
                            waited += wait1 - wait0
                            proxied_total += phases[name][-1].total
                    print(f"proxy bench: {c} streams, round done", file=sys.stderr)
                span = args.rounds * (args.duration + warmup)
                _report_level(report, c, phases, cpu / span, cpu / max(proxied_total, 1), waited / span)
            plain_body = json.dumps({"model": MODEL, "prompt": "benchmark prompt", "max_tokens": 1}).encode()
            rps: dict[str, float] = {}
            errors = 0
            cpu_per_request = float("nan")
            # CPU per request of every process, per phase: where the request rate goes
            procs: dict[str, Callable[[], float]] = {
                "proxy": proxy.cpu_seconds, "prefill_standin": helpers[0].cpu_seconds,
                "decode_standin": helpers[1].cpu_seconds, "load_generator": _own_cpu_seconds}
            per_request: dict[str, dict[str, float]] = {}
            for name, url in targets.items():
                at = {k: f() for k, f in procs.items()}
                ph = await _phase(url, plain_body, args.rps_concurrency, args.duration, args.warmup,
                                  streaming=False)
                per_request[name] = {k: round((f() - at[k]) / max(ph.total, 1) * 1e6, 1)
                                     for k, f in procs.items()}
                if name == "proxy":
                    cpu_per_request = (proxy.cpu_seconds() - at["proxy"]) / max(ph.total, 1)
                rps[name] = ph.ok / ph.seconds
                errors += ph.errors
            report.add(Result("proxy_rps_max", rps["proxy"], "req/s", baseline_name="direct_rps_max",
                              baseline=rps["direct"],
                              extra={"clients": args.rps_concurrency, "errors": errors,
                                     "cpu_us_per_request": per_request,
                                     "layout": args.layout if pin else "not pinned"}))
            for name, us in per_request.items():
                report.notes.append(f"CPU us per non-streamed request, {name} phase: "
                                    + ", ".join(f"{k} {v:g}" for k, v in us.items()))
            report.add(Result("proxy_cpu_us_per_request", cpu_per_request * 1e6, "us",
                              extra={"what": "proxy CPU (user+sys) per non-streamed request, "
                                             "prefill and decode calls included"}))

        _run_loop(measure)
    finally:
        if proxy is not None:
            proxy.close()
        for h in helpers:
            h.close()
        if pin:
            os.sched_setaffinity(0, set(cpus))
    return report


def _report_level(report: Report, c: int, phases: dict[str, list[_Phase]], proxy_cpu: float,
                  cpu_per_stream: float, proxy_wait: float) -> None:
    direct = [t for p in phases["direct"] for t in p.ttfb_s]
    proxied = [t for p in phases["proxy"] for t in p.ttfb_s]
    errors = sum(p.errors for ps in phases.values() for p in ps)
    streams = {k: sum(p.done for p in ps) for k, ps in phases.items()}
    for q in (50, 99):
        d, p = percentile(direct, q), percentile(proxied, q)
        report.add(Result(f"proxy_added_ms_p{q}@{c}", _ms(p - d), "ms", baseline_name=f"direct_ttfb_ms_p{q}",
                          baseline=_ms(d), ratio=d / p if p else None, lower_is_better=True,
                          extra={"proxied_ttfb_ms": _ms(p), "streams": streams, "errors": errors,
                                 "proxy_cpu_fraction": round(proxy_cpu, 3),
                                 "proxy_runnable_wait_fraction": round(proxy_wait, 4)}))
    report.add(Result(f"proxy_stream_errors@{c}", float(errors), "count",
                      extra={"streams": streams}))
    report.add(Result(f"proxy_cpu_us_per_stream@{c}", cpu_per_stream * 1e6, "us",
                      extra={"proxy_cpu_fraction": round(proxy_cpu, 3),
                             "proxy_runnable_wait_fraction": round(proxy_wait, 4)}))
