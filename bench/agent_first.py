"""``pdx-bench agent``, first section: the first P/D fetch after two agents start, against later ones.

Rows (``--first-rounds`` rounds, each with two fresh ``pdx-agent`` processes on loopback, tcp, a
deployment secret, the decode agent knowing the prefill agent from ``transport.peers``, as
``pdx up`` has it from the proxy):

* ``first_fetch_ms``: warm links on (the default): both agents register a pool, the decode agent's
  link is waited for (its ``warm_links`` stat, as an engine's start-up would leave it time for), then
  the first fetch of ``--first-chunks`` chunks of ``--first-chunk-size`` is timed from the ``fetch``
  call to the ``wait`` reply. Baseline ``steady_fetch_ms``: the median of the next
  ``--first-steady`` fetches (fresh keys each) in the same rounds.
* ``first_fetch_cold_ms``: the same with ``transport.warm_links: false`` (the link opens on the
  first fetch). Baseline: the steady fetches of those rounds.

The figures are medians over the rounds. Agents are stopped by PID.
"""

from __future__ import annotations

import argparse
import os
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import Report, Result, median, progress
from pdx.config import parse_size

MiB = 1 << 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--first-rounds", type=int, default=3,
                   help="fresh agent pairs per mode for first_fetch (0: skip the section)")
    p.add_argument("--first-steady", type=int, default=5, help="steady fetches after the first, per round")
    p.add_argument("--first-chunks", type=int, default=4, help="chunks per fetch (4 = a 1k-token prompt)")
    p.add_argument("--first-chunk-size", default="8MiB",
                   help="bytes per chunk (8 MiB = 256 tokens of the small model in float32)")


def run(args: argparse.Namespace, report: Report, work: Path) -> None:
    if args.first_rounds <= 0:
        return
    chunk = parse_size(args.first_chunk_size)
    firsts: dict[bool, list[float]] = {True: [], False: []}
    steadies: dict[bool, list[float]] = {True: [], False: []}
    for r in progress(range(args.first_rounds), "first_fetch"):
        for warm in (False, True):  # interleaved: both modes see the same background load
            first, steady = _round(work / f"first-{r}-{int(warm)}", warm, args.first_chunks, chunk,
                                   args.first_steady)
            firsts[warm].append(first)
            steadies[warm].extend(steady)
    for warm, name in ((True, "first_fetch_ms"), (False, "first_fetch_cold_ms")):
        report.add(Result(name, median(firsts[warm]), "ms", baseline_name="steady_fetch_ms",
                          baseline=median(steadies[warm]), lower_is_better=True,
                          extra={"warm_links": warm, "rounds": len(firsts[warm]), "chunks": args.first_chunks,
                                 "bytes": args.first_chunks * chunk,
                                 "first_ms": [round(x, 2) for x in firsts[warm]],
                                 "steady_ms": [round(x, 2) for x in steadies[warm]]}))
    report.notes.append("first_fetch: two fresh agents per round (tcp, deployment secret, signed hellos); "
                        "the decode agent knows the prefill agent from transport.peers")


def _round(work: Path, warm: bool, n: int, chunk: int, steady: int) -> tuple[float, list[float]]:
    from bench.agent import _layout
    from pdx.deploy.process import AgentProcess
    from pdx.store.pool import attach

    work.mkdir(parents=True, exist_ok=True)
    secret = work / "secret"
    secret.write_text(secrets.token_hex(32) + "\n")
    secret.chmod(0o600)
    cap = f"{(steady + 2) * n * chunk // MiB + 16}MiB"
    transport: dict[str, Any] = {"backend": "tcp", "secret_file": str(secret), "warm_links": warm}
    base = {"store": {"l1": {"capacity": cap}}, "http": {"enabled": False}}
    src = AgentProcess(work, {**base, "role": "prefill", "transport": transport}, name="prefill").start()
    dst: Any = None
    cs = cd = pool = None
    try:
        dst = AgentProcess(work, {**base, "role": "decode",
                                  "transport": {**transport, "peers": [src.peer_address]}}, name="decode").start()
        cs, cd = src.client(30), dst.client(30)
        layout = _layout(chunk)
        reg = cs.register_engine(layout)
        cd.register_engine(layout)
        pool = attach(reg.shm_name)
        if warm:
            deadline = time.monotonic() + 30
            while cd.stats()["warm_links"] < 1:
                if time.monotonic() > deadline:
                    raise RuntimeError("the decode agent's link did not warm up within 30 s")
                time.sleep(0.02)
        fill = np.arange(chunk, dtype=np.uint8)

        def fetch(i: int) -> float:
            keys = [os.urandom(16) for _ in range(n)]
            res = cs.reserve(keys, reg.chunk_bytes)
            for row in res:
                pool.array(row.offset, row.nbytes)[:] = fill
            assert all(o.ok for o in cs.commit([row.id for row in res], reg.chunk_tokens, timeout=60))
            t0 = time.perf_counter()
            job = cd.fetch(src.peer_address, keys, f"first-{i}", deadline_s=60, pin=False)
            info = cd.wait(job, 60)
            dt = (time.perf_counter() - t0) * 1e3
            if not info.ok:
                raise RuntimeError(f"fetch failed: {info.error or info.chunks[0]}")
            return dt

        first = fetch(0)
        return first, [fetch(i + 1) for i in range(steady)]
    finally:
        if pool is not None:
            pool.close()
        for c in (cs, cd):
            if c is not None:
                c.close()
        if dst is not None:
            dst.stop()
        src.stop()
