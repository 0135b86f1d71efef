"""``pdx-bench transfer``: chunk transfer per backend against the raw mechanism, two processes.

For each backend a peer process (this module with ``--peer``) registers a region
and listens; this process registers its own region, connects and WRITEs into the
peer. Rows:

* ``transfer_<backend>_<size>``: one op of ``size`` bytes per batch, GB/s (median).
  Baseline, measured in the same run and interleaved with pdx repeat by repeat:
  ``tcp``: a plain socket ``sendall`` into the peer's ``recv_into`` of a
  preallocated buffer (``MSG_WAITALL``), then a 1-byte ack;
  ``shm``: ``numpy.copyto`` of the same bytes between two buffers in this process;
  ``nixl``/``ucx``: ``bench.raw_nixl.measure`` / ``bench.raw_ucx.measure`` (bare library);
  with ``--memory cuda`` (and always for ``cuda_ipc``): a device-to-device copy of the same bytes.
* ``kvbatch_<backend>``: ``--kv-chunks`` chunks of ``--chunk-size`` as one batch;
  baseline: the same backend's 64 MiB large-message figure.

Transfers carry no checksums (the raw mechanisms have none). Peer processes
are stopped by PID; chunk bytes only move through the transport under test.
"""

from __future__ import annotations

import argparse
import importlib
import json
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from bench.report import Report, Result, gbps, median, progress
from pdx.config import TransportConfig, format_size, from_dict, parse_size
from pdx.transport import ucx_env

FINGERPRINT = "bench-transfer"
_MIB = 1 << 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backends", default="tcp,shm,nixl,ucx", help="comma-separated transport names")
    p.add_argument("--sizes", default="1MiB,16MiB,64MiB,256MiB", help="comma-separated message sizes")
    p.add_argument("--chunk-size", default="256KiB", help="chunk size of the kvbatch row")
    p.add_argument("--kv-chunks", type=int, default=256, help="chunks in the kvbatch row's batch")
    p.add_argument("--repeats", type=int, default=0,
                   help="timed repeats per figure (default: enough for ~2 GiB, between 9 and 60)")
    p.add_argument("--plot", metavar="PATH.png", help="also plot GB/s against size")
    p.add_argument("--config", default="{}", help="extra TransportConfig fields as JSON (both sides)")
    p.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--memory", choices=["host", "cuda"], default="host",
                   help="where both regions live; cuda: GPU buffers (cuda_ipc always uses them) and the "
                   "baseline is a device-to-device copy of the same bytes")
    p.add_argument("--nbytes", type=int, default=0, help=argparse.SUPPRESS)


def _repeats(args: argparse.Namespace, size: int) -> int:
    return args.repeats or max(9, min(60, (2 << 30) // max(size, 1)))


# --- memory ------------------------------------------------------------------------------------


class _Shm:
    """A region in POSIX shared memory, prefaulted."""

    def __init__(self, nbytes: int) -> None:
        self.shm = shared_memory.SharedMemory(create=True, size=nbytes)
        buf = self.shm.buf
        assert buf is not None
        self.buf = buf
        self.array = np.ndarray((nbytes,), dtype=np.uint8, buffer=buf)
        self.array[:] = np.arange(nbytes, dtype=np.uint64).astype(np.uint8)  # touch every page

    def region(self) -> Any:
        from pdx.transport.base import MemoryRegion

        return MemoryRegion(nbytes=self.array.nbytes, buffer=self.buf, name=self.shm.name)

    def close(self) -> None:
        del self.array
        try:
            self.buf.release()
            self.shm.close()
        except BufferError:
            pass  # a view is still alive; the mapping goes with the process
        self.shm.unlink()


class _Cuda:
    """A region in GPU memory (torch); the baseline copies device to device."""

    def __init__(self, nbytes: int) -> None:
        import torch

        self.torch = torch
        self.tensor = torch.ones(nbytes, dtype=torch.uint8, device="cuda")

    def region(self) -> Any:
        from pdx.transport.base import MemoryKind, MemoryRegion

        return MemoryRegion(nbytes=self.tensor.numel(), kind=MemoryKind.CUDA, ptr=self.tensor.data_ptr(),
                            device=self.tensor.device.index or 0)

    def close(self) -> None:
        del self.tensor


def _memory(kind: str, nbytes: int) -> _Shm | _Cuda:
    return _Cuda(nbytes) if kind == "cuda" else _Shm(nbytes)


# --- the peer process --------------------------------------------------------------------------


def _raw_tcp_server(sock: socket.socket, nbytes: int) -> None:
    """Baseline receiver: header of 8 bytes, ``recv_into`` a preallocated buffer, ack 1 byte."""
    buf = memoryview(bytearray(nbytes))
    conn, _ = sock.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        while True:
            head = conn.recv(8, socket.MSG_WAITALL)
            if len(head) < 8:
                return
            n, got = int.from_bytes(head, "big"), 0
            while got < n:
                k = conn.recv_into(buf[got:n], n - got, socket.MSG_WAITALL)
                if k == 0:
                    return
                got += k
            conn.sendall(b"k")


def _peer_main(args: argparse.Namespace) -> int:
    from pdx.transport import create

    config = from_dict(TransportConfig, json.loads(args.config))
    mem = _memory(args.memory, args.nbytes)
    t = create(args.backend, config, FINGERPRINT)
    raw = socket.socket()
    raw.bind(("127.0.0.1", 0))
    raw.listen(1)
    try:
        t.register(mem.region())
        hello = {"addr": t.listen(), "raw": raw.getsockname()[1]}
        if args.backend == "tcp":
            threading.Thread(target=_raw_tcp_server, args=(raw, args.nbytes), daemon=True).start()
        print(json.dumps(hello), flush=True)
        sys.stdin.read()  # until the bench closes our stdin
    finally:
        raw.close()
        t.close()
        del t
        mem.close()
    return 0


class _Peer:
    def __init__(self, backend: str, nbytes: int, config: str, memory: str) -> None:
        env = ucx_env.child_env()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.transfer", "--peer", "--backend", backend, "--nbytes", str(nbytes),
             "--config", config, "--memory", memory],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        lines: queue.Queue[str] = queue.Queue()
        assert self.proc.stdout is not None
        stdout = self.proc.stdout
        threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
        try:
            line = lines.get(timeout=120)
        except queue.Empty:
            self.close()
            raise RuntimeError(f"{backend} peer did not start within 120 s") from None
        if not line:
            self.close()
            raise RuntimeError(f"{backend} peer exited with {self.proc.wait()}")
        hello = json.loads(line)
        self.addr: str = hello["addr"]
        self.raw_port: int = hello["raw"]

    def close(self) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# --- measuring ---------------------------------------------------------------------------------


def _timed(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _raw_baseline(backend: str, peer: _Peer, mem: _Shm | _Cuda,
                  ) -> tuple[str, Callable[[int], Callable[[], None]] | None, Callable[[], None]]:
    """(baseline name, factory size -> one timed raw transfer, cleanup); factory None = external."""
    if isinstance(mem, _Cuda):
        torch, gsrc = mem.torch, mem.tensor
        gdst = torch.zeros_like(gsrc)

        def d2d(size: int) -> Callable[[], None]:
            def once() -> None:
                gdst[:size].copy_(gsrc[:size])
                torch.cuda.synchronize()
            return once
        return "d2d_copy_torch", d2d, lambda: None
    src = mem.array
    if backend == "tcp":
        sock = socket.create_connection(("127.0.0.1", peer.raw_port), timeout=60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        view = src.data

        def tcp(size: int) -> Callable[[], None]:
            def once() -> None:
                sock.sendall(size.to_bytes(8, "big"))
                sock.sendall(view[:size])
                if sock.recv(1) != b"k":
                    raise RuntimeError("raw tcp peer went away")
            return once
        return "socket_sendall_recv_into", tcp, sock.close
    if backend == "shm":
        # Into POSIX shared memory like pdx's own copies: anonymous memory gets transparent huge
        # pages on many hosts while /dev/shm does not, which alone can make a memcpy ~1.7x faster.
        dst_shm = _Shm(src.nbytes)
        dst = dst_shm.array

        def copy(size: int) -> Callable[[], None]:
            return lambda: np.copyto(dst[:size], src[:size])
        return "memcpy_numpy_1thread_shm", copy, dst_shm.close
    if backend in ("nixl", "ucx"):
        # The bare library between this process and a helper process, measured interleaved with pdx
        # (same noise); without it, measured on its own afterwards (_external_baseline).
        try:
            session = importlib.import_module(f"bench.raw_{backend}").Session(src.nbytes, "shm")
        except Exception:
            return f"raw_{backend}", None, lambda: None

        def bare(size: int) -> Callable[[], None]:
            def once() -> None:
                session.once(size)
            return once
        return f"raw_{backend}", bare, session.close
    return f"raw_{backend}", None, lambda: None


def _external_baseline(backend: str, size: int, repeats: int, notes: list[str]) -> float | None:
    """GB/s of the bare library from ``bench.raw_<backend>.measure(size, repeats)``, if present."""
    try:
        module = importlib.import_module(f"bench.raw_{backend}")
        out = module.measure(size, repeats)
    except Exception as exc:  # a missing or failing baseline is reported, not fatal
        notes.append(f"{backend}: no bare-library baseline at {format_size(size)}: {type(exc).__name__}: {exc}")
        return None
    if isinstance(out, dict):
        out = out.get("gbps", out.get("value"))
    if isinstance(out, (list, tuple)):  # seconds per repeat
        return gbps(size, median(out))
    return float(out) if out is not None else None


def _bench_backend(args: argparse.Namespace, backend: str, sizes: list[int], report: Report,
                   curves: dict[str, dict[int, float]]) -> None:
    from pdx.transport import TRANSPORTS, create
    from pdx.transport.base import ChunkOp, OpKind

    try:
        TRANSPORTS.get(backend)
    except Exception as exc:
        report.notes.append(f"{backend}: skipped: {exc}")
        return
    chunk = parse_size(args.chunk_size)
    kv_bytes = chunk * args.kv_chunks
    need = max([*sizes, kv_bytes, 64 * _MIB])
    config = json.loads(args.config)
    memory = "cuda" if backend == "cuda_ipc" else args.memory
    local_mem = _memory(memory, need)
    peer = _Peer(backend, need, args.config, memory)
    t = create(backend, from_dict(TransportConfig, config), FINGERPRINT)
    base_name, raw, cleanup = "", None, lambda: None
    try:
        t.register(local_mem.region())
        pid = t.connect(peer.addr).peer_id
        base_name, raw, cleanup = _raw_baseline(backend, peer, local_mem)

        def pdx_once(ops: list[Any]) -> Callable[[], None]:
            def once() -> None:
                res = t.post(pid, OpKind.WRITE, ops).wait(120)
                if not res.ok:
                    raise RuntimeError(f"{backend} transfer failed: {res.errors}")
            return once

        kv_ops = [ChunkOp(i * chunk, i * chunk, chunk) for i in range(args.kv_chunks)]
        kv_samples: list[float] = []
        fig64: float | None = None
        for size in progress(sorted(set(sizes) | {64 * _MIB}), f"transfer {backend}"):
            reps = _repeats(args, size)
            fns = [pdx_once([ChunkOp(0, 0, size)])] + ([raw(size)] if raw else [])
            if size == 64 * _MIB:  # kvbatch is measured beside its baseline, the 64 MiB message
                fns.append(pdx_once(kv_ops))
            for fn in fns:  # warm-up: connections, page faults, caches
                fn()
                fn()
            samples: list[list[float]] = [[] for _ in fns]
            for r in range(reps):  # interleaved (order alternating) to share the noise
                order = list(enumerate(fns)) if r % 2 == 0 else list(enumerate(fns))[::-1]
                for k, fn in order:
                    samples[k].append(_timed(fn))
            value = gbps(size, median(samples[0]))
            extra: dict[str, Any] = {"repeats": reps, "best_gbps": round(gbps(size, min(samples[0])), 3)}
            if raw:
                extra["baseline_best_gbps"] = round(gbps(size, min(samples[1])), 3)
                extra["paired_ratio"] = round(median(b / a for a, b in zip(samples[0], samples[1])), 3)
            if size == 64 * _MIB:
                fig64 = value
                kv_samples = samples[-1]
            if size not in sizes:
                continue
            base = gbps(size, median(samples[1])) if raw else _external_baseline(backend, size, reps, report.notes)
            name = f"transfer_{backend}_{format_size(size).replace('.0', '')}"
            report.add(Result(name, value, "GB/s", baseline_name=base_name if base else None, baseline=base,
                              extra=extra))
            curves.setdefault(f"{backend}|pdx {backend}", {})[size] = value
            if base:
                curves.setdefault(f"{backend}|{base_name}", {})[size] = base
        report.add(Result(f"kvbatch_{backend}", gbps(kv_bytes, median(kv_samples)), "GB/s",
                          baseline_name=f"transfer_{backend}_64MiB", baseline=fig64,
                          extra={"chunks": args.kv_chunks, "chunk_bytes": chunk, "repeats": len(kv_samples),
                                 "best_gbps": round(gbps(kv_bytes, min(kv_samples)), 3)}))
    finally:
        cleanup()
        t.close()
        peer.close()
        local_mem.close()


def _plot(path: str, curves: dict[str, dict[int, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors: dict[str, str] = {}
    for key, points in sorted(curves.items()):
        backend, label = key.split("|", 1)
        color = colors.setdefault(backend, f"C{len(colors)}")
        xs = sorted(points)
        ax.plot([x / _MIB for x in xs], [points[x] for x in xs], marker="o", color=color,
                linestyle="-" if label.startswith("pdx") else "--", label=label)
    ax.set_yscale("log")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size (MiB)")
    ax.set_ylabel("GB/s (1e9 B/s)")
    ax.set_title("pdx-bench transfer: pdx (solid) vs raw mechanism (dashed)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> Report:
    report = Report("transfer")
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    curves: dict[str, dict[int, float]] = {}
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        try:
            _bench_backend(args, backend, sizes, report, curves)
        except Exception as exc:
            report.notes.append(f"{backend}: failed: {type(exc).__name__}: {exc}")
    report.notes.append("direction: WRITE (push into the peer's region); tcp baseline uses MSG_WAITALL "
                        "like pdx; shm baseline copies shm to shm within one process; nixl/ucx baselines are the bare "
                        "library to a helper process, interleaved with pdx; extra.paired_ratio = median "
                        "over repeats of baseline_time/pdx_time measured back to back")
    if args.plot:
        _plot(args.plot, curves)
        report.notes.append(f"plot written to {args.plot}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.transfer")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.peer:
        return _peer_main(args)
    print(run(args).table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
