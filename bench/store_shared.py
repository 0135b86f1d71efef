"""``pdx-bench store --tiers mooncake,s3``: the fleet's shared tiers beside their raw clients, same run.

Rows (GB = 1e9 bytes, medians of ``--repeats`` rounds):

* ``mooncake_put_gbps`` / ``mooncake_get_gbps`` — chunks written in place into
  L1 slabs (not timed), committed and written behind to the Mooncake tier until
  ``flush`` (zero-copy: ``batch_put_from_multi_buffers`` of header arena + slab,
  both registered with the client); then ``get`` on a second agent's store (empty L1) in batches of
  ``--shared-batch``, promoting into its slabs with checksums. Baseline: the raw
  ``MooncakeDistributedStore`` client ``put_batch`` / ``get_batch`` of the same
  payloads in the same batches, against the same ``mooncake_master`` (started
  on free loopback ports, protocol tcp).
* ``remote_lookup_us`` — ``lookup(remote=True)`` of 128 keys held only in the
  Mooncake tier (a second agent's scheduler probe); baseline: raw
  ``batch_is_exist`` of the same 128 names. p50; p99 in ``extra``.
* ``s3_put_gbps`` / ``s3_get_gbps`` — the same through the S3 tier against raw
  obstore PUT/GET of the same payloads with the same concurrency
  (``max_in_flight``), on moto's S3 server on loopback (an in-memory Python
  server: its own speed bounds both sides).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from bench.report import Report, Result, gbps, median, percentile, progress
from bench.servers import MooncakeMaster, MotoS3
from bench.store import FP, chunks, commit_and_flush, keys_for, store_config, timed, written_in_place
from pdx.checksum import checksum
from pdx.config import MooncakeConfig, S3Config
from pdx.keys import ChunkKey
from pdx.store import ChunkStore
from pdx.store.types import ChunkMeta
from pdx.store.value import pack_header

PUT_INCLUDES = "commit of chunks written in place (checksum) + write-behind until flush"
GET_INCLUDES = "get into a second agent's L1 slabs + header + checksum + pin"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shared-chunks", type=int, default=32, help="chunks per Mooncake/S3 round (default 32)")
    p.add_argument("--shared-chunk-bytes", type=int, default=1 << 20,
                   help="bytes per chunk for the Mooncake and S3 rows (default 1MiB)")
    p.add_argument("--shared-batch", type=int, default=16, help="chunks per batched call (default 16)")
    p.add_argument("--lookup-repeats", type=int, default=200, help="remote lookups timed (default 200)")


def _values(src: list[Any]) -> list[bytes]:
    """The exact bytes pdx stores per chunk (header + payload), so both sides move the same amount."""
    return [pack_header(ChunkMeta(c.nbytes, checksum(c.data), 16)) + c.tobytes() for c in src]


def _get_all(store: ChunkStore, keys: list[ChunkKey], batch: int) -> None:
    for a in range(0, len(keys), batch):
        pins = store.get(keys[a : a + batch], owner="bench")
        assert all(pin is not None for pin in pins), "a chunk was missing"
    store.release_owner("bench")


def bench_mooncake(args: argparse.Namespace, report: Report) -> None:
    from mooncake.store import MooncakeDistributedStore

    n, size, batch = args.shared_chunks, args.shared_chunk_bytes, args.shared_batch
    src = chunks(n, size, seed=5)
    values = _values(src)
    seg = max(256 << 20, 4 * n * (size + 4096))
    with tempfile.TemporaryDirectory(prefix="pdx-bench-mooncake-") as tmp:
        master = MooncakeMaster(Path(tmp))
        master.start()
        try:
            # two raw clients, as two agents: one puts, the other gets (as pdx's writer and reader do)
            raw, raw_reader = MooncakeDistributedStore(), MooncakeDistributedStore()
            for client in (raw, raw_reader):
                assert client.setup("127.0.0.1", master.metadata_server, seg, 64 << 20, "tcp", "",
                                    master.master) == 0
            mcfg = MooncakeConfig(master=master.master, metadata_server=master.metadata_server, write="all",
                                  global_segment_size=seg, local_buffer_size=64 << 20, queue_depth=n,
                                  batch_size=batch, key_prefix="pdxbench:")
            cfg = store_config(n * (size + 4096), tiers=(mcfg,))
            put_s, get_s, wbase_s, rbase_s = [], [], [], []
            lookup_s: list[float] = []
            base_lookup_s: list[float] = []
            # Two agents for the whole run, like the raw clients: each round's new keys evict the
            # previous round's chunks from L1, so the reader's gets always come from the shared tier.
            writer = ChunkStore(cfg, size, FP)
            reader = ChunkStore(cfg, size, FP)
            try:
                for r in progress(range(args.repeats + 1), "store mooncake"):
                    names = [f"raw:{r}:{i}" for i in range(n)]

                    def raw_put(names: list[str] = names) -> None:
                        for a in range(0, n, batch):
                            assert raw.put_batch(names[a : a + batch], values[a : a + batch]) == 0

                    def raw_get(names: list[str] = names) -> None:
                        for a in range(0, n, batch):
                            got = raw_reader.get_batch(names[a : a + batch])
                            assert all(len(g) for g in got)

                    keys = keys_for(r, n)
                    wbase_s.append(timed(raw_put))
                    reserved = written_in_place(writer, keys, src)
                    put_s.append(timed(partial(commit_and_flush, writer, reserved)))
                    assert writer.metrics.value("pdx_store_write_drops_total", {"tier": "mooncake"}) == 0
                    rbase_s.append(timed(raw_get))
                    assert reader.lookup(keys).prefix_chunks == 0  # not in its L1: from the shared tier
                    get_s.append(timed(partial(_get_all, reader, keys, batch)))
                    if r == args.repeats:  # the 128-key probe, on keys the reader's L1 does not hold
                        reserved = written_in_place(writer, keys_for(r + 1, n), src)
                        commit_and_flush(writer, reserved)
                        probe = (keys_for(r + 1, n) * (128 // n + 1))[:128]
                        pnames = [reader.tiers[0].name_of(k) for k in probe]  # type: ignore[attr-defined]
                        assert reader.lookup(probe, True).prefix_chunks == 128
                        for _ in range(args.lookup_repeats):
                            lookup_s.append(timed(partial(reader.lookup, probe, True)))
                            base_lookup_s.append(timed(partial(raw_reader.batch_is_exist, pnames)))
            finally:
                reader.close()
                writer.close()
            raw.close()
            raw_reader.close()
        finally:
            master.stop()
    # the first round warms connections up: drop it
    put_s, get_s, wbase_s, rbase_s = put_s[1:], get_s[1:], wbase_s[1:], rbase_s[1:]
    total = n * size
    extra = {"chunks": n, "chunk_bytes": size, "batch": batch, "protocol": "tcp", "target_ratio": 0.8}
    report.add(Result("mooncake_put_gbps", gbps(total, median(put_s)), "GB/s", "mooncake_raw_put_batch_gbps",
                      gbps(total, median(wbase_s)),
                      extra={**extra, "includes": PUT_INCLUDES,
                             "put_path": "batch_put_from_multi_buffers from the registered L1 pool"}))
    report.add(Result("mooncake_get_gbps", gbps(total, median(get_s)), "GB/s", "mooncake_raw_get_batch_gbps",
                      gbps(total, median(rbase_s)), extra={**extra, "includes": GET_INCLUDES}))
    report.add(Result("remote_lookup_us", median(lookup_s) * 1e6, "us", "mooncake_raw_batch_is_exist_us",
                      median(base_lookup_s) * 1e6, lower_is_better=True,
                      extra={"keys": 128, "p99_us": percentile(lookup_s, 99) * 1e6, "target_p50_us": 2000,
                             "iters": len(lookup_s)}))


def bench_s3(args: argparse.Namespace, report: Report) -> None:
    import obstore
    from obstore.store import S3Store

    n, size, batch = args.shared_chunks, args.shared_chunk_bytes, args.shared_batch
    src = chunks(n, size, seed=6)
    values = _values(src)
    in_flight = 8
    with tempfile.TemporaryDirectory(prefix="pdx-bench-s3-") as tmp:
        server = MotoS3(Path(tmp))
        server.start()
        try:
            server.create_bucket("pdx-bench")
            raw = S3Store("pdx-bench", endpoint=server.endpoint_url, client_options={"allow_http": True},
                          access_key_id="bench", secret_access_key="bench", region="us-east-1")
            pool = concurrent.futures.ThreadPoolExecutor(in_flight)
            scfg = S3Config(bucket="pdx-bench", endpoint_url=server.endpoint_url, region="us-east-1", write="all",
                            max_in_flight=in_flight, batch_size=batch, queue_depth=n, timeout_s=30.0,
                            prefix="pdxbench/")
            cfg = store_config(n * (size + 4096), tiers=(scfg,))
            put_s, get_s, wbase_s, rbase_s = [], [], [], []
            # the tier takes its credentials from the usual AWS environment (moto accepts any)
            os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
            os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
            for r in progress(range(args.repeats + 1), "store s3"):
                names = [f"raw/{r}/{i}" for i in range(n)]

                def each(fn: Callable[[int], Any]) -> None:
                    for a in range(0, n, batch):
                        list(pool.map(fn, range(a, min(n, a + batch))))

                def put_one(j: int, names: list[str] = names) -> None:
                    obstore.put(raw, names[j], values[j])

                def get_one(j: int, names: list[str] = names) -> None:
                    bytes(obstore.get(raw, names[j]).bytes())

                raw_put = partial(each, put_one)
                raw_get = partial(each, get_one)

                keys = keys_for(r, n)
                wbase_s.append(timed(raw_put))
                store = ChunkStore(cfg, size, FP)
                try:
                    reserved = written_in_place(store, keys, src)
                    put_s.append(timed(partial(commit_and_flush, store, reserved)))
                    assert store.metrics.value("pdx_store_write_drops_total", {"tier": "s3"}) == 0
                finally:
                    store.close()
                rbase_s.append(timed(raw_get))
                store = ChunkStore(cfg, size, FP)
                try:
                    get_s.append(timed(partial(_get_all, store, keys, batch)))
                finally:
                    store.close()
            pool.shutdown()
        finally:
            server.stop()
    put_s, get_s, wbase_s, rbase_s = put_s[1:], get_s[1:], wbase_s[1:], rbase_s[1:]
    total = n * size
    extra = {"chunks": n, "chunk_bytes": size, "batch": batch, "in_flight": in_flight, "server": "moto",
             "target_ratio": 0.8}
    report.add(Result("s3_put_gbps", gbps(total, median(put_s)), "GB/s", "obstore_raw_put_gbps",
                      gbps(total, median(wbase_s)), extra={**extra, "includes": PUT_INCLUDES}))
    report.add(Result("s3_get_gbps", gbps(total, median(get_s)), "GB/s", "obstore_raw_get_gbps",
                      gbps(total, median(rbase_s)), extra={**extra, "includes": GET_INCLUDES}))

