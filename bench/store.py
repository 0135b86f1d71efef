"""``pdx-bench store``: the chunk store's tiers beside the raw mechanism, measured in the same run.

Rows:

* ``l1_put_gbps`` — ``ChunkStore.put`` (reserve, copy into a shared-memory slab
  while hashing it, commit; evicting the previous round's chunks) against a plain
  numpy copy of the same chunks into a preallocated buffer.
* ``l1_get_gbps`` — ``get`` (pin) of the chunks, copy out of the slabs into a
  preallocated buffer, ``release_owner``; against the same numpy copy.
* ``lookup_us`` — ``lookup`` of a 32k-token prompt's 128 keys, all in L1 (keys
  computed beforehand: this is the figure the scheduler pays per probe); p99 in
  ``extra``. ``lookup_tokens_us`` adds hashing the token ids into keys.
* ``disk_put_gbps`` / ``disk_get_gbps`` (and ``nixl_posix_*`` with ``--tiers nixl_posix``: the same through
  the NIXL storage tier, POSIX plugin) — chunks written in place into reserved
  slabs (not timed), then committed (checksum) and written behind to the disk
  tier until ``flush`` returns, and promoted back into L1 by ``get`` on a
  restarted store (index rebuilt by scanning, checksums verified), against plain
  ``write``/``readinto`` of one file per chunk. No fsync on either side; every
  timed phase starts after ``sync`` so no earlier write-back runs during it;
  reads come from the page cache on both sides.
* ``redis_put_gbps`` / ``redis_get_gbps`` — the same through the Redis tier (get
  of fresh stores in batches of ``--redis-batch`` keys)
  (pipelined, batch size as configured) against raw redis-py pipelined SET/GET
  of the same payloads in the same batches, on a redis-server the bench starts
  on a free loopback port (or ``--redis-url``).
* ``rss_growth_pct`` — resident memory growth over ``--rss-cycles`` put/pin/unpin
  cycles that each evict a chunk, after a warm-up.

Every throughput is the median of ``--repeats`` rounds; GB = 1e9 bytes.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import Report, Result, gbps, median, percentile, progress
from pdx.config import DiskConfig, L1Config, NixlStorageConfig, RedisConfig, StoreConfig, parse_size
from pdx.keys import ChunkKey, chunk_keys
from pdx.store import ChunkStore, Reservation

FP = "bench0123456789a"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chunk-bytes", type=parse_size, default=parse_size("2MiB"),
                   help="bytes per chunk for the L1 and disk rows (default 2MiB)")
    p.add_argument("--l1-chunks", type=int, default=64, help="chunks per L1 round (default 64)")
    p.add_argument("--repeats", type=int, default=7, help="rounds per throughput row (default 7)")
    p.add_argument("--lookup-iters", type=int, default=5000, help="lookups timed (default 5000)")
    p.add_argument("--disk-chunks", type=int, default=48, help="chunks per disk round (default 48)")
    p.add_argument("--disk-dir", default="", help="folder for the disk rows (default: a temporary one)")
    p.add_argument("--redis-chunks", type=int, default=48, help="chunks per Redis round (default 48)")
    p.add_argument("--redis-chunk-bytes", type=parse_size, default=parse_size("1MiB"),
                   help="bytes per chunk for the Redis rows (default 1MiB)")
    p.add_argument("--redis-batch", type=int, default=16, help="chunks per pipeline (default 16)")
    p.add_argument("--redis-url", default="", help="use this server instead of starting redis-server")
    p.add_argument("--rss-cycles", type=int, default=100_000, help="put/evict cycles (default 100000)")
    p.add_argument("--tiers", default="disk,redis",
                   help="lower tiers to measure: disk,redis,mooncake,s3,nixl_posix (default disk,redis); "
                        "mooncake adds remote_lookup_us")
    from bench import store_shared

    store_shared.add_arguments(p)
    p.add_argument("--skip", default="", help="comma-separated rows groups to skip: l1,lookup,disk,redis,rss")


def run(args: argparse.Namespace) -> Report:
    report = Report("store")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    report.notes.append(
        f"chunks: {args.chunk_bytes} B (L1, disk), {args.redis_chunk_bytes} B (Redis); "
        f"median of {args.repeats} rounds; disk rows without fsync on both sides"
    )
    # RSS first, on a young process: its baseline is not inflated by the buffers
    # of the other rows, so growth shows up in full. Its row still comes last.
    rss = Report("store")
    if "rss" not in skip:
        bench_rss(args, rss)
    from bench import store_shared

    tiers = {t.strip() for t in args.tiers.split(",") if t.strip()}
    known = ("disk", "redis", "mooncake", "s3", "nixl_posix")
    unknown = tiers - set(known)
    if unknown:
        raise SystemExit(f"--tiers: unknown tier(s) {', '.join(sorted(unknown))}; known: {', '.join(known)}")
    groups: list[tuple[str, Callable[[argparse.Namespace, Report], None]]] = [
        ("l1", bench_l1), ("lookup", bench_lookup), ("disk", bench_disk), ("redis", bench_redis),
        ("mooncake", store_shared.bench_mooncake), ("s3", store_shared.bench_s3),
        ("nixl_posix", partial(bench_disk, kind="nixl_posix")),
    ]
    for name, fn in groups:
        if name in skip or (name in known and name not in tiers):
            continue
        if name == "redis" and not args.redis_url and shutil.which("redis-server") is None:
            report.notes.append("redis rows skipped: no redis-server binary (install it or pass --redis-url)")
            continue
        fn(args, report)
    report.results.extend(rss.results)
    return report


# --- helpers ---------------------------------------------------------------------------------


def keys_for(round_: int, n: int) -> list[ChunkKey]:
    return [ChunkKey(((round_ << 32) | i).to_bytes(16, "little")) for i in range(n)]


def chunks(n: int, nbytes: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, nbytes, dtype=np.uint8) for _ in range(n)]


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def store_config(capacity: int, **sections: Any) -> StoreConfig:
    return StoreConfig(l1=L1Config(capacity=capacity, lease_s=600.0), **sections)


PUT_INCLUDES = "commit of chunks written in place (checksum) + write-behind until flush"


def written_in_place(store: ChunkStore, keys: list[ChunkKey], src: list[np.ndarray]) -> list[Reservation]:
    """Reserve and fill slabs as the engine's connector would (not timed)."""
    out = []
    for k, c in zip(keys, src):
        res = store.reserve(k, c.nbytes)
        view = store.view(res)
        view[:] = c.data
        view.release()
        out.append(res)
    return out


def commit_and_flush(store: ChunkStore, reserved: list[Reservation]) -> None:
    for res in reserved:
        store.commit(res.id)
    assert store.flush(60)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --- L1 --------------------------------------------------------------------------------------


def bench_l1(args: argparse.Namespace, report: Report) -> None:
    n, size = args.l1_chunks, args.chunk_bytes
    src = chunks(n, size)
    dst = np.empty((n, size), dtype=np.uint8)
    dst.fill(1)  # touch every page before timing
    store = ChunkStore(store_config(n * size), size, FP)
    try:
        def memcpy() -> None:
            for i in range(n):
                np.copyto(dst[i], src[i])

        put_s, base_s, get_s = [], [], []
        for r in progress(range(args.repeats + 1), "store l1"):
            keys = keys_for(r, n)

            def put(keys: list[ChunkKey] = keys) -> None:
                for k, c in zip(keys, src):
                    store.put(k, c)

            def get(keys: list[ChunkKey] = keys) -> None:
                pins = store.get(keys, owner="bench")
                for i, p in enumerate(pins):
                    assert p is not None
                    v = store.view(p)
                    np.copyto(dst[i], np.frombuffer(v, dtype=np.uint8))
                    v.release()
                store.release_owner("bench")

            base = timed(memcpy)
            p = timed(put)
            g = timed(get)
            if r:  # round 0 warms up
                base_s.append(base)
                put_s.append(p)
                get_s.append(g)
        total = n * size
        base = gbps(total, median(base_s))
        report.add(Result("l1_put_gbps", gbps(total, median(put_s)), "GB/s", "numpy_memcpy_gbps", base,
                          extra={"chunks": n, "chunk_bytes": size, "target_ratio": 0.7}))
        report.add(Result("l1_get_gbps", gbps(total, median(get_s)), "GB/s", "numpy_memcpy_gbps", base,
                          extra={"chunks": n, "chunk_bytes": size, "target_ratio": 0.7}))
    finally:
        store.close()


# --- lookup ----------------------------------------------------------------------------------


def bench_lookup(args: argparse.Namespace, report: Report) -> None:
    tokens = np.random.default_rng(1).integers(0, 32000, 32768, dtype=np.int64)
    store = ChunkStore(store_config(256 * 4096), 4096, FP)
    try:
        keys = chunk_keys(tokens, FP, store.chunk_tokens)
        assert len(keys) == 128
        for k in keys:
            store.put(k, b"\0" * 64)
        assert store.lookup(keys).prefix_chunks == 128
        lookup_ns, hashed_ns = [], []
        clock = time.perf_counter_ns
        for _ in progress(range(10), "store lookup"):
            for _ in range(args.lookup_iters // 10):
                t0 = clock()
                store.lookup(keys)
                t1 = clock()
                store.lookup_tokens(tokens)
                t2 = clock()
                lookup_ns.append(t1 - t0)
                hashed_ns.append(t2 - t1)
        us = [x / 1000 for x in lookup_ns]
        hus = [x / 1000 for x in hashed_ns]
        report.add(Result("lookup_us", percentile(us, 50), "us", lower_is_better=True,
                          extra={"p99_us": percentile(us, 99), "chunks": 128, "tokens": 32768,
                                 "includes": "lookup of precomputed keys, all in L1",
                                 "target_p50_us": 50}))
        report.add(Result("lookup_tokens_us", percentile(hus, 50), "us", lower_is_better=True,
                          extra={"p99_us": percentile(hus, 99),
                                 "includes": "hashing 32768 token ids into 128 keys + lookup"}))
    finally:
        store.close()


# --- disk ------------------------------------------------------------------------------------


def bench_disk(args: argparse.Namespace, report: Report, kind: str = "disk") -> None:
    """The disk rows; ``kind="nixl_posix"``: the same through the NIXL storage tier (POSIX plugin)."""
    n, size = args.disk_chunks, args.chunk_bytes
    label = "disk" if kind == "disk" else "nixl"
    src = chunks(n, size, seed=2)
    root = Path(args.disk_dir) if args.disk_dir else Path(tempfile.mkdtemp(prefix="pdx-bench-disk-"))
    root.mkdir(parents=True, exist_ok=True)
    dst = np.empty((n, size), dtype=np.uint8)  # as many distinct bytes as the store reads into
    dst.fill(1)
    put_s, get_s, wbase_s, rbase_s = [], [], [], []
    try:
        for r in progress(range(args.repeats + 1), f"store {kind}"):
            data_dir = root / f"store-{r}"
            plain = root / f"plain-{r}"
            plain.mkdir()
            keys = keys_for(r, n)
            tier_cls = DiskConfig if kind == "disk" else NixlStorageConfig
            cfg = store_config(n * size, tiers=(tier_cls(enabled=True, write="all", queue_depth=n,
                                                         capacity=4 * n * size),))

            def plain_write(plain: Path = plain) -> None:
                for i, c in enumerate(src):
                    with open(plain / f"{i}.bin", "wb", buffering=0) as f:
                        f.write(c.data)

            def plain_read(plain: Path = plain) -> None:
                for i in range(n):
                    with open(plain / f"{i}.bin", "rb", buffering=0) as f:
                        f.readinto(dst[i].data)

            # Dirty pages of earlier phases would be written back by the kernel
            # while the next phase runs: start every timed phase clean.
            os.sync()
            wbase = timed(plain_write)
            store = ChunkStore(cfg, size, FP, data_dir)
            try:
                reserved = written_in_place(store, keys, src)
                os.sync()
                p = timed(partial(commit_and_flush, store, reserved))
                assert store.metrics.value("pdx_store_write_drops_total", {"tier": label}) == 0
            finally:
                store.close()
            os.sync()
            rbase = timed(plain_read)
            store = ChunkStore(cfg, size, FP, data_dir)  # restart: index from the files
            try:
                def get(store: ChunkStore = store, keys: list[ChunkKey] = keys) -> None:
                    pins = store.get(keys, owner="bench")
                    assert all(pin is not None for pin in pins)
                    store.release_owner("bench")

                g = timed(get)
            finally:
                store.close()
            shutil.rmtree(data_dir)
            shutil.rmtree(plain)
            if r:
                put_s.append(p)
                get_s.append(g)
                wbase_s.append(wbase)
                rbase_s.append(rbase)
    finally:
        if not args.disk_dir:
            shutil.rmtree(root, ignore_errors=True)
    total = n * size
    extra = {"chunks": n, "chunk_bytes": size, "fsync": False, "target_ratio": 0.7}
    report.add(Result(f"{kind}_put_gbps", gbps(total, median(put_s)), "GB/s", "plain_file_write_gbps",
                      gbps(total, median(wbase_s)),
                      extra={**extra, "includes": PUT_INCLUDES}))
    report.add(Result(f"{kind}_get_gbps", gbps(total, median(get_s)), "GB/s", "plain_file_read_gbps",
                      gbps(total, median(rbase_s)),
                      extra={**extra, "includes": "read into L1 slabs + checksum + pin (page cache warm)"}))


# --- Redis -----------------------------------------------------------------------------------


@contextmanager
def redis_server(url: str) -> Iterator[str]:
    """``url`` if given, else a redis-server of our own on a free port (stopped by PID)."""
    if url:
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found: install it or pass --redis-url")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="pdx-bench-redis-")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", workdir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


def bench_redis(args: argparse.Namespace, report: Report) -> None:
    import redis

    n, size, batch = args.redis_chunks, args.redis_chunk_bytes, args.redis_batch
    src = chunks(n, size, seed=3)
    with redis_server(args.redis_url) as url:
        raw = redis.Redis.from_url(url)
        cfg = store_config(n * size, redis=RedisConfig(enabled=True, url=url, write="all", queue_depth=n,
                                                       batch_size=batch, key_prefix="pdxbench:"))
        put_s, get_s, wbase_s, rbase_s = [], [], [], []
        try:
            for r in progress(range(args.repeats + 1), "store redis"):
                raw.flushdb()
                names = [f"raw:{r}:{i}".encode() for i in range(n)]

                def raw_set(names: list[bytes] = names) -> None:
                    for a in range(0, n, batch):
                        pipe = raw.pipeline(transaction=False)
                        for i in range(a, min(n, a + batch)):
                            pipe.set(names[i], src[i].data)
                        pipe.execute()

                def raw_get(names: list[bytes] = names) -> None:
                    for a in range(0, n, batch):
                        pipe = raw.pipeline(transaction=False)
                        for i in range(a, min(n, a + batch)):
                            pipe.get(names[i])
                        pipe.execute()

                keys = keys_for(r, n)
                wbase = timed(raw_set)
                store = ChunkStore(cfg, size, FP)
                try:
                    reserved = written_in_place(store, keys, src)
                    p = timed(partial(commit_and_flush, store, reserved))
                    assert store.metrics.value("pdx_store_write_drops_total", {"tier": "redis"}) == 0
                finally:
                    store.close()
                rbase = timed(raw_get)
                store = ChunkStore(cfg, size, FP)  # a fresh host: empty L1
                try:
                    def get(store: ChunkStore = store, keys: list[ChunkKey] = keys) -> None:
                        for a in range(0, n, batch):
                            pins = store.get(keys[a : a + batch], owner="bench")
                            assert all(pin is not None for pin in pins)
                        store.release_owner("bench")

                    g = timed(get)
                finally:
                    store.close()
                if r:
                    put_s.append(p)
                    get_s.append(g)
                    wbase_s.append(wbase)
                    rbase_s.append(rbase)
        finally:
            raw.flushdb()
            raw.close()
    total = n * size
    extra = {"chunks": n, "chunk_bytes": size, "batch": batch, "target_ratio": 0.8}
    report.add(Result("redis_put_gbps", gbps(total, median(put_s)), "GB/s", "redis_py_pipelined_set_gbps",
                      gbps(total, median(wbase_s)),
                      extra={**extra, "includes": PUT_INCLUDES}))
    report.add(Result("redis_get_gbps", gbps(total, median(get_s)), "GB/s", "redis_py_pipelined_get_gbps",
                      gbps(total, median(rbase_s)),
                      extra={**extra, "includes": "get into L1 slabs + checksum + pin"}))


# --- RSS -------------------------------------------------------------------------------------


def bench_rss(args: argparse.Namespace, report: Report) -> None:
    size, slabs = 16 * 1024, 64
    store = ChunkStore(store_config(slabs * size), size, FP)
    data = np.random.default_rng(4).integers(0, 256, size, dtype=np.uint8)
    cycles = args.rss_cycles
    warm = max(slabs * 4, cycles // 10)
    try:
        def cycle(i: int) -> None:
            k = ChunkKey(i.to_bytes(16, "little"))
            store.put(k, data)
            (pin,) = store.pin([k], lease_s=1.0)
            if pin is not None:
                store.unpin(pin.lease_id)

        for i in range(warm):
            cycle(i)
        gc.collect()
        start = rss_bytes()
        t0 = time.perf_counter()
        step = max(1, cycles // 20)
        for part in progress(range(0, cycles, step), "store rss"):
            for i in range(part, min(cycles, part + step)):
                cycle(warm + i)
        elapsed = time.perf_counter() - t0
        gc.collect()
        end = rss_bytes()
        evictions = store.metrics.value("pdx_store_evictions_total", {"tier": "l1"})
    finally:
        store.close()
    report.add(Result("rss_growth_pct", 100.0 * (end - start) / start, "%", lower_is_better=True,
                      extra={"cycles": cycles, "rss_start_bytes": start, "rss_end_bytes": end,
                             "evictions": evictions, "cycle_us": elapsed / cycles * 1e6,
                             "target_pct": 5}))
