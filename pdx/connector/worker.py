"""The worker half of ``PdxConnector``: packs KV into the agent's pool and unpacks it back.

Runs in each vLLM worker process. Who calls what:

* ``register`` once (vLLM's ``register_kv_caches``): registers the engine's
  ``KVLayout`` with the local agent and maps the agent's pool (POSIX shm) by name.
* ``start_loads`` per step (``start_load_kv``): runs the step's synchronous
  ``LoadSpec``s (hits entirely in L1) inline and queues the others to one
  loader thread. A load asks the agent for the chunks (a ``fetch`` from the
  prefill agent for P/D, or a ``pin`` of local chunks for reuse, which promotes
  them from disk or Redis), verifies each chunk's checksum, unpacks the leading
  good ones into the request's blocks in one batch and drops its pins. Every
  wait has a deadline.
* A CacheBlend load (``LoadSpec.blend``) always runs inline: pin the segment pieces, check them,
  read the exact prefix out of the request's blocks, run the blend pass with the engine's model
  (``pdx.connector.blend.load``), unpack the region into the blocks; a failure is a load error.
* ``store`` per step (``wait_for_save``, after the forward pass): reserves one
  slab per chunk, packs the chunk straight into it, commits with the checksum.
  Synchronous: when it returns the chunks are in the store, so the scheduler
  half may hand their keys to a decode engine right away.
* ``finished`` / ``take_load_errors`` per step (``get_finished`` then
  ``get_block_ids_with_load_errors``): requests whose asynchronous load is
  over, and the blocks vLLM must recompute. A request's failed blocks are
  reported in the same step as the request itself (asynchronous), or in the
  step that ran the load (synchronous), as vLLM's contract asks.

A chunk that is missing, late, or fails its checksum is never unpacked: its
blocks (and the rest of that request's load) become load errors.

Buffers: the pool mapping is owned here; slab bytes may be written only between
``reserve`` and ``commit`` and read only while pinned. The KV tensors belong to
vLLM; the loader writes only blocks vLLM allocated to a request that is waiting
for this load (nothing else reads them meanwhile). Thread-safety: ``start_loads``,
``store``, ``finished`` and ``take_load_errors`` are called from vLLM's worker
thread; the loader thread shares only the locked result sets.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from pdx.agent.types import Outcome
from pdx.checksum import checksum
from pdx.connector.metadata import LoadSpec, StepPlan, StoreSpec, blocks_of, token_spans
from pdx.errors import ErrorCode, PdxError
from pdx.layout import KVLayout

log = logging.getLogger(__name__)


class WorkerAgent(Protocol):
    """The ``pdx.agent.client.AgentClient`` calls the worker half makes."""

    instance: str

    def register_engine(self, layout: KVLayout, pid: int = 0, engine_url: str = "",
                        timeout: float | None = None) -> Any: ...

    def reserve(self, keys: Sequence[bytes], nbytes: int | Sequence[int],
                timeout: float | None = None) -> list[Any]: ...

    def commit(self, ids: Sequence[int], num_tokens: int | Sequence[int], checksums: Sequence[int] = (),
               timeout: float | None = None) -> list[Outcome]: ...

    def abort(self, ids: Sequence[int], timeout: float | None = None) -> int: ...

    def pin(self, keys: Sequence[bytes], owner: str, lease_s: float | None = None,
            timeout: float | None = None) -> list[Any]: ...

    def unpin(self, lease_ids: Sequence[int], timeout: float | None = None) -> int: ...

    def release(self, owner: str, timeout: float | None = None) -> int: ...

    def fetch(self, peer: str, keys: Sequence[bytes], request_id: str, deadline_s: float | None = None,
              remote_owner: str = "", pin: bool = True, timeout: float | None = None) -> int: ...

    def wait(self, job_id: int, timeout_s: float) -> Any: ...

    def cancel(self, job_id: int, timeout: float | None = None) -> bool: ...

    def push_open(self, peer: str, request_id: str, keys: Sequence[bytes], offsets: Sequence[int],
                  nbytes: Sequence[int], num_layers: int, deadline_s: float | None = None,
                  timeout: float | None = None) -> int: ...

    def push_layer(self, push_id: int, layer: int, timeout: float | None = None) -> bool: ...

    def push_seal(self, push_id: int, checksums: Sequence[int], num_tokens: Sequence[int],
                  timeout: float | None = None) -> bool: ...


class Codec(Protocol):
    """Pack/unpack of one chunk between the engine's paged KV and a chunk buffer.

    ``spans`` are ``(block_id, first_slot, num_tokens)`` in token order; the
    buffer holds exactly their tokens in pdx's chunk format (``pdx.kernels.format``).
    """

    def pack(self, spans: Sequence[tuple[int, int, int]], out: np.ndarray) -> None: ...

    def unpack_batch(self, chunks: Sequence[tuple[Sequence[tuple[int, int, int]], np.ndarray]]) -> None:
        """Unpack several chunks (``(spans, data)`` each) in one call."""

    def pack_layer(self, layer: int, spans: Sequence[tuple[int, int, int]], out: np.ndarray) -> None:
        """Pack one layer of the tokens of ``spans`` into ``out``: that layer's part of the chunk
        format (K then V), which is the layer's contiguous byte range of a packed chunk."""


class KernelCodec:
    """``Codec`` over ``pdx.kernels`` for one worker's per-layer caches (torch imported lazily)."""

    def __init__(self, layers: Sequence[Any], layout: KVLayout, impl: str = "auto") -> None:
        self.layers = list(layers)
        self.layout = layout
        self.impl = impl

    def pack(self, spans: Sequence[tuple[int, int, int]], out: np.ndarray) -> None:
        from pdx.kernels import pack

        pack(self.layers, self.layout, spans, out, impl=self.impl)

    def unpack_batch(self, chunks: Sequence[tuple[Sequence[tuple[int, int, int]], np.ndarray]]) -> None:
        from pdx.kernels import unpack_batch

        unpack_batch(self.layers, self.layout, [(data, spans) for spans, data in chunks], impl=self.impl)

    def pack_layer(self, layer: int, spans: Sequence[tuple[int, int, int]], out: np.ndarray) -> None:
        import dataclasses

        from pdx.kernels import pack

        one = dataclasses.replace(self.layout, num_layers=1)
        pack([self.layers[layer]], one, spans, out, impl=self.impl)


class Pool(Protocol):
    """The attached pool (``pdx.store.pool.AttachedPool``)."""

    def array(self, offset: int, nbytes: int) -> np.ndarray: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class WorkerSettings:
    chunk_tokens: int
    block_size: int
    #: deadline of one request's load (fetch + unpack)
    load_timeout_s: float = 30.0
    #: lease of the pins a load holds while it unpacks
    lease_s: float = 60.0
    #: re-hash each chunk before unpacking it (catches anything that changed it in the pool)
    verify_checksums: bool = True


@dataclass
class WorkerStats:
    """Counters since start; read by tests, logs and the bench."""

    loads: int = 0
    loaded_chunks: int = 0
    loaded_tokens: int = 0
    loaded_bytes: int = 0
    load_seconds: float = 0.0
    failed_chunks: int = 0
    corrupt_chunks: int = 0
    #: loads whose pins did not all hold until their chunks were unpacked (recomputed)
    revoked_loads: int = 0
    stored_chunks: int = 0
    stored_bytes: int = 0
    store_skipped: int = 0
    store_errors: int = 0
    #: CacheBlend: regions blended, their tokens, tokens recomputed above the check layer,
    #: blends that failed (their tokens are recomputed by vLLM), time spent blending
    blend_loads: int = 0
    blend_tokens: int = 0
    blend_recomputed: int = 0
    blend_failures: int = 0
    blend_seconds: float = 0.0
    #: layer-wise P/D: chunks streamed to a decode agent layer by layer, pushes that could not start
    pushed_chunks: int = 0
    push_errors: int = 0


class PdxWorkerSide:
    """See the module docstring. One per worker process."""

    def __init__(self, settings: WorkerSettings, agent: WorkerAgent, codec: Codec, pool: Pool,
                 layout: KVLayout, chunk_bytes: int,
                 reattach: Callable[[], tuple[Codec, Pool, int]] | None = None,
                 blend_model: Callable[[], Any] | None = None) -> None:
        self.settings = settings
        self.layout = layout
        self.stats = WorkerStats()
        self._agent = agent
        self._codec = codec
        self._pool = pool
        self._chunk_bytes = chunk_bytes
        self._reattach = reattach
        self._blend_model = blend_model
        self._instance = agent.instance
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._finished: set[str] = set()
        self._errors_pending: dict[str, set[int]] = {}
        self._errors_ready: set[int] = set()
        self._inflight: set[str] = set()
        self._queue: queue.Queue[LoadSpec | None] = queue.Queue()
        self._closed = False
        # layer-wise P/D: the step whose layers are being pushed, and each pushed request's slabs
        self._push_plan: StepPlan | None = None
        self._pushes: dict[str, _LayerPush] = {}
        self._thread = threading.Thread(target=self._loader, name="pdx-loader", daemon=True)
        self._thread.start()

    # --- agent restarts --------------------------------------------------------------------------

    def _check_agent(self) -> None:
        """After an agent restart the pool is a new segment: register again and re-map it."""
        if self._agent.instance == self._instance or self._reattach is None:
            return
        with self._lock:
            if self._agent.instance == self._instance:
                return
            log.warning("pdx agent restarted (instance %s -> %s): registering again",
                        self._instance, self._agent.instance)
            old = self._pool
            self._codec, self._pool, self._chunk_bytes = self._reattach()
            self._instance = self._agent.instance
        old.close()

    # --- loads ---------------------------------------------------------------------------------

    def start_loads(self, plan: StepPlan) -> None:
        """Run the plan's synchronous loads (L1 hits: memory copies, bounded by the load
        deadline) and queue the asynchronous ones to the loader thread."""
        for spec in plan.loads:
            if spec.blend is not None:
                self._blend(spec)
                continue
            if spec.sync:
                t0 = time.perf_counter()
                try:
                    bad_from = self._load(spec)
                except Exception as exc:
                    log.exception("request %s: load failed: %s", spec.req_id, exc)
                    bad_from = 0
                self._finish_load(spec, bad_from, time.perf_counter() - t0)
                continue
            with self._lock:
                self._inflight.add(spec.req_id)
            self._queue.put(spec)

    def _loader(self) -> None:
        while True:
            spec = self._queue.get()
            if spec is None:
                return
            t0 = time.perf_counter()
            try:
                bad_from = self._load(spec)
            except Exception as exc:  # never let a bug leave a request waiting forever
                log.exception("request %s: load failed: %s", spec.req_id, exc)
                bad_from = 0
            self._finish_load(spec, bad_from, time.perf_counter() - t0)

    def _finish_load(self, spec: LoadSpec, bad_from: int | None, seconds: float) -> None:
        bs = self.settings.block_size
        bad: set[int] = set()
        if bad_from is not None and spec.chunks:
            first = spec.chunks[bad_from]
            bad = blocks_of(spec.block_ids, bs, first.start, spec.chunks[-1].end)
            self.stats.failed_chunks += len(spec.chunks) - bad_from
        good = spec.chunks[: bad_from if bad_from is not None else len(spec.chunks)]
        tokens = sum(c.end - c.start for c in good)
        self.stats.loads += 1
        self.stats.loaded_chunks += len(good)
        self.stats.loaded_tokens += tokens
        self.stats.loaded_bytes += tokens * self.layout.token_bytes()
        self.stats.load_seconds += seconds
        if bad:
            log.warning("request %s: %d of %d chunks not loaded from %s; vLLM recomputes %d blocks",
                        spec.req_id, len(spec.chunks) - len(good), len(spec.chunks),
                        spec.peer or "the local store", len(bad))
        else:
            log.info("request %s: loaded %d tokens (%d chunks) from %s in %.1f ms", spec.req_id, tokens,
                     len(good), spec.peer or "the local store", seconds * 1e3)
        with self._lock:
            if spec.sync:  # vLLM wants these in the step that ran the load, and no "finished"
                self._errors_ready |= bad
                return
            if bad:
                self._errors_pending.setdefault(spec.req_id, set()).update(bad)
            self._inflight.discard(spec.req_id)
            self._finished.add(spec.req_id)
            self._done.notify_all()

    def _load(self, spec: LoadSpec) -> int | None:
        """Load ``spec``; return the index of the first chunk not loaded, or None if all were."""
        if not spec.chunks:
            return None
        self._check_agent()
        owner = f"load:{spec.req_id}"
        keys = [c.key for c in spec.chunks]
        deadline = time.monotonic() + self.settings.load_timeout_s
        try:
            pins = self._pins_remote(spec, keys, owner, deadline) if spec.peer else \
                self._agent.pin(keys, owner=owner, lease_s=self.settings.lease_s)
        except PdxError as exc:
            log.warning("request %s: cannot get its chunks from %s: %s", spec.req_id,
                        spec.peer or "the local agent", exc)
            if not spec.hint:
                return 0
            pins = []
        if spec.hint:
            pins = self._fill_from_store(spec, keys, list(pins), owner)
        try:
            batch: list[tuple[list[tuple[int, int, int]], np.ndarray]] = []
            leases: list[int] = []
            bad_from: int | None = None if len(pins) >= len(spec.chunks) else len(pins)
            for i, (chunk, pin) in enumerate(zip(spec.chunks, pins)):
                item = self._checked_chunk(spec, chunk, pin) if pin.found else None
                if item is None or time.monotonic() > deadline:
                    bad_from = i
                    break
                batch.append(item)
                leases.append(pin.lease_id)
            if batch:
                self._codec.unpack_batch(batch)
                if not self._pins_held(spec, leases):
                    return 0
            return bad_from
        finally:
            try:
                self._agent.release(owner)
            except PdxError as exc:
                log.debug("release %s: %s (the lease expires on its own)", owner, exc)

    def _fill_from_store(self, spec: LoadSpec, keys: Sequence[bytes], pins: list[Any], owner: str) -> list[Any]:
        """Peer-to-peer reuse: the chunks the hinted peer did not deliver (from the first one
        missing on) are looked for in the local store, whose ``pin`` promotes them from its lower
        tiers (disk, the shared tiers); what is found nowhere is recomputed."""
        first = next((i for i, p in enumerate(pins) if not p.found), len(pins))
        if first >= len(keys):
            return pins
        try:
            more = self._agent.pin(keys[first:], owner=owner, lease_s=self.settings.lease_s)
        except PdxError as exc:
            log.info("request %s: the local store has none of the %d chunks the peer did not deliver: %s",
                     spec.req_id, len(keys) - first, exc)
            return pins[:first]
        got = sum(1 for _ in itertools.takewhile(lambda p: p.found, more))
        if got:
            log.info("request %s: %d chunks the peer %s did not deliver came from the local store",
                     spec.req_id, got, spec.peer)
        return [*pins[:first], *more]

    # --- CacheBlend ----------------------------------------------------------------------------

    def _blend(self, spec: LoadSpec) -> None:
        """Blend ``spec``'s region inline (before this step's forward). Any failure (a piece missing
        or corrupt, a model the pass does not support, an error) reports the range's blocks as load
        errors: vLLM recomputes them exactly, nothing approximate or wrong is decoded."""
        b = spec.blend
        assert b is not None
        t0 = time.perf_counter()
        recomputed: int | None = None
        try:
            recomputed = self._blend_load(spec)
        except Exception as exc:
            log.warning("request %s: blending failed (%s: %s); vLLM computes the prompt exactly", spec.req_id,
                        type(exc).__name__, exc, exc_info=not isinstance(exc, PdxError))
        seconds = time.perf_counter() - t0
        if recomputed is None:
            self.stats.blend_failures += 1
            bad = blocks_of(spec.block_ids, self.settings.block_size, b.start, b.end)
            with self._lock:
                self._errors_ready |= bad
            return
        self.stats.blend_loads += 1
        self.stats.blend_tokens += b.end - b.start
        self.stats.blend_recomputed += recomputed
        self.stats.blend_seconds += seconds
        log.info("request %s: blended %d tokens (%d segments, %s r=%.2f, %d tokens recomputed) in %.1f ms",
                 spec.req_id, b.end - b.start, len(b.segments), b.policy, b.recompute_ratio, recomputed,
                 seconds * 1e3)

    def _blend_load(self, spec: LoadSpec) -> int | None:
        """Pin and check the segment pieces, blend, write ``[start, end)``; None when not possible."""
        from pdx.connector.blend.load import ModelHandle, blend_region, cat_kv, kv_payload, payload_kv

        b = spec.blend
        assert b is not None
        if self._blend_model is None:
            self._blend_model = ModelHandle().get
        model = self._blend_model()
        self._check_agent()
        ct, bs = self.settings.chunk_tokens, self.settings.block_size
        owner = f"blend:{spec.req_id}"
        keys = [k for seg in b.segments for k, _ in seg.pieces]
        pins = self._agent.pin(keys, owner=owner, lease_s=self.settings.lease_s)
        segments = []
        try:
            it = iter(pins)
            for seg in b.segments:
                parts = []
                for key, n in seg.pieces:
                    pin = next(it, None)
                    if pin is None or not pin.found:
                        log.info("request %s: segment piece %s is no longer stored", spec.req_id, key.hex()[:12])
                        return None
                    if pin.nbytes != self._bytes_of(n) or pin.num_tokens not in (0, n):
                        log.warning("request %s: segment piece %s is %d bytes / %d tokens, expected %d / %d",
                                    spec.req_id, key.hex()[:12], pin.nbytes, pin.num_tokens, self._bytes_of(n), n)
                        return None
                    data = self._pool.array(pin.offset, pin.nbytes)
                    if self.settings.verify_checksums and checksum(data.data) != pin.checksum:
                        self.stats.corrupt_chunks += 1
                        log.warning("request %s: segment piece %s failed its checksum", spec.req_id, key.hex()[:12])
                        return None
                    parts.append(payload_kv(self.layout, data, n))
                segments.append(cat_kv(parts))
        finally:
            try:
                self._agent.release(owner)
            except PdxError as exc:
                log.debug("release %s: %s (the lease expires on its own)", owner, exc)
        prefix = None
        if b.start > 0:  # exact KV vLLM's own prefix cache gave the request: read it from its blocks
            parts = []
            for a in range(0, b.start, ct):
                e = min(a + ct, b.start)
                buf = np.empty(self._bytes_of(e - a), dtype=np.uint8)
                self._codec.pack(token_spans(spec.block_ids, bs, a, e), buf)
                parts.append(payload_kv(self.layout, buf, e - a))
            prefix = cat_kv(parts)
        kv, recomputed = blend_region(model, b, prefix, segments)
        batch = [(token_spans(spec.block_ids, bs, a, min(a + ct, b.end)), kv_payload(self.layout, kv, a, min(a + ct, b.end)))
                 for a in range(b.start, b.end, ct)]
        self._codec.unpack_batch(batch)
        return recomputed

    def _pins_held(self, spec: LoadSpec, leases: list[int]) -> bool:
        """True when every pin of the unpacked chunks was still held after the unpack.

        A pinned slab is never reused, so the bytes unpacked are the bytes verified unless a
        pin ended while the engine read them (its lease ran out): ``unpin`` answers how many
        of the leases were still live. If one was not, the load is refused (vLLM recomputes
        its blocks), counted in ``revoked_loads``.
        """
        try:
            held = self._agent.unpin(leases)
        except PdxError as exc:
            log.warning("request %s: cannot confirm the pins of its chunks (%s); recomputing", spec.req_id, exc)
            held = -1
        if held == len(leases):
            return True
        if held >= 0:
            log.warning("request %s: %d of %d pins ended while their chunks were unpacked (lease %.0fs); "
                        "recomputing", spec.req_id, len(leases) - held, len(leases), self.settings.lease_s)
        self.stats.revoked_loads += 1
        return False

    def _pins_remote(self, spec: LoadSpec, keys: Sequence[bytes], owner: str, deadline: float) -> list[Any]:
        """Fetch the chunks from the prefill agent into the local pool, pinned for ``owner``."""
        left = max(0.1, deadline - time.monotonic())
        job = self._agent.fetch(spec.peer, keys, request_id=owner, deadline_s=left,
                                remote_owner=f"pd:{spec.remote_request_id}" if spec.remote_request_id else "",
                                pin=True)
        info = self._agent.wait(job, timeout_s=max(0.1, deadline - time.monotonic()))
        if not info.done:
            try:
                self._agent.cancel(job)
            except PdxError:
                pass
            log.warning("request %s: fetch from %s not done by its deadline (%.1fs)", spec.req_id,
                        spec.peer, self.settings.load_timeout_s)
        if info.error:
            log.warning("request %s: fetch from %s: %s", spec.req_id, spec.peer, info.error)
        out = []
        for c in info.chunks:
            if not c.status.usable or not c.lease_id:
                if c.status.value == "corrupt":
                    self.stats.corrupt_chunks += 1
                log.info("request %s: chunk %s from %s: %s %s", spec.req_id, c.key.hex()[:12], spec.peer,
                         c.status.value, c.reason)
            out.append(_Pinned(found=c.status.usable and c.lease_id != 0, offset=c.offset, nbytes=c.nbytes,
                               checksum=c.checksum, num_tokens=c.num_tokens, lease_id=c.lease_id))
        return out

    def _checked_chunk(self, spec: LoadSpec, chunk: Any,
                       pin: Any) -> tuple[list[tuple[int, int, int]], np.ndarray] | None:
        """(spans, bytes) to unpack for one pinned chunk, or None if it must not be used."""
        ct, bs = self.settings.chunk_tokens, self.settings.block_size
        n = chunk.num_tokens or ct
        if pin.nbytes != self._bytes_of(n) or pin.num_tokens not in (0, n):
            log.warning("request %s: chunk %s is %d bytes / %d tokens, expected %d / %d", spec.req_id,
                        chunk.key.hex()[:12], pin.nbytes, pin.num_tokens, self._bytes_of(n), n)
            return None
        data = self._pool.array(pin.offset, pin.nbytes)
        if self.settings.verify_checksums and checksum(data.data) != pin.checksum:
            self.stats.corrupt_chunks += 1
            log.warning("request %s: chunk %s failed its checksum; recomputing it", spec.req_id,
                        chunk.key.hex()[:12])
            return None
        first = chunk.index * ct
        if chunk.start > first or chunk.end < first + n:
            data = slice_payload(self.layout, data, n, chunk.start - first, chunk.end - first)
        return token_spans(spec.block_ids, bs, chunk.start, chunk.end), data

    def wait_idle(self, timeout_s: float) -> None:
        """Block up to ``timeout_s`` while loads are in flight and none has finished.

        For steps without a forward pass: vLLM's engine loop then only polls for finished
        loads, and on a few cores that spinning would starve the loader and the agent."""
        with self._done:
            if self._inflight and not self._finished:
                self._done.wait(timeout_s)

    def finished(self) -> set[str]:
        """Requests whose load ended since the last call; their load errors become reportable."""
        with self._lock:
            done, self._finished = self._finished, set()
            for req_id in done:
                self._errors_ready |= self._errors_pending.pop(req_id, set())
        return done

    def take_load_errors(self) -> set[int]:
        """Blocks vLLM must recompute (reported once)."""
        with self._lock:
            out, self._errors_ready = self._errors_ready, set()
        return out

    def loads_in_flight(self) -> int:
        with self._lock:
            return len(self._inflight)

    # --- stores --------------------------------------------------------------------------------

    def save_layer(self, plan: StepPlan, layer: int) -> None:
        """Layer-wise P/D (vLLM's ``save_kv_layer``): layer ``layer`` of this step is computed. For
        each store of the plan that names a decode agent (``StoreSpec.push``), the first call of the
        step reserves the chunks' slabs and opens a push with the local agent; every call packs that
        layer of each chunk into its slab (one contiguous range of the chunk format) and hands it to
        the agent, which streams it while the next layers compute. ``store`` then finishes these
        chunks (checksum, commit, seal). Failures are logged: the store then runs as usual and the
        decode side fetches (or recomputes) what was not pushed."""
        if plan is not self._push_plan:
            self._drop_pushes()
            self._push_plan = plan
            for spec in plan.stores:
                if spec.push:
                    self._open_push(spec)
        for lp in self._pushes.values():
            if layer in lp.packed or not 0 <= layer < self.layout.num_layers:
                continue
            try:
                self._push_layer(lp, layer)
            except Exception as exc:  # never fail the forward pass: store() packs what is missing
                self.stats.push_errors += 1
                log.warning("request %s: pushing layer %d failed: %s", lp.spec.req_id, layer, exc)
                lp.push_id = 0

    def _open_push(self, spec: StoreSpec) -> None:
        ct = self.settings.chunk_tokens
        tokens = [c.num_tokens or ct for c in spec.chunks]
        try:
            self._check_agent()
            rows = self._agent.reserve([c.key for c in spec.chunks], [self._bytes_of(n) for n in tokens])
        except PdxError as exc:
            self.stats.push_errors += 1
            log.warning("request %s: cannot reserve its chunks for a layer-wise push: %s", spec.req_id, exc)
            return
        lp = _LayerPush(spec, [(c, n, r) for c, n, r in zip(spec.chunks, tokens, rows) if r.id],
                        [(c, r) for c, r in zip(spec.chunks, rows) if not r.id])
        self._pushes[spec.req_id] = lp
        if not lp.chunks:
            return
        try:
            lp.push_id = self._agent.push_open(
                spec.push, spec.req_id, [c.key for c, _n, _r in lp.chunks], [r.offset for _c, _n, r in lp.chunks],
                [self._bytes_of(n) for _c, n, _r in lp.chunks], self.layout.num_layers,
                deadline_s=self.settings.load_timeout_s)
        except PdxError as exc:
            self.stats.push_errors += 1
            log.warning("request %s: layer-wise push to %s not started: %s", spec.req_id, spec.push, exc)

    def _push_layer(self, lp: _LayerPush, layer: int) -> None:
        ct, bs = self.settings.chunk_tokens, self.settings.block_size
        for chunk, n, res in lp.chunks:
            per = self._bytes_of(n) // self.layout.num_layers
            first = chunk.start if chunk.start >= 0 else chunk.index * ct
            self._codec.pack_layer(layer, token_spans(lp.spec.block_ids, bs, first, first + n),
                                   self._pool.array(res.offset + layer * per, per))
        lp.packed.add(layer)
        if lp.push_id:
            self._agent.push_layer(lp.push_id, layer)

    def _drop_pushes(self) -> None:
        """Abort the slabs of pushes whose step never reached ``store`` (not expected from vLLM)."""
        ids = [r.id for lp in self._pushes.values() for _c, _n, r in lp.chunks]
        self._pushes = {}
        self._push_plan = None
        if ids:
            try:
                self._agent.abort(ids)
            except PdxError:
                pass  # reservations expire on their own

    def store(self, plan: StepPlan) -> None:
        """Pack and commit the plan's chunks; blocks until committed. Failures are logged, not raised
        (a chunk that is not stored is a future miss, never an error for the request)."""
        if not plan.stores:
            return
        pushes: dict[str, _LayerPush] = {}
        if plan is self._push_plan:
            pushes, self._pushes, self._push_plan = self._pushes, {}, None
        try:
            self._check_agent()
        except PdxError as exc:
            log.warning("pdx agent unavailable, not storing: %s", exc)
            return
        for spec in plan.stores:
            try:
                lp = pushes.pop(spec.req_id, None)
                if lp is not None:
                    self._store_pushed(lp)
                else:
                    self._store_one(spec)
            except PdxError as exc:
                self.stats.store_errors += 1
                log.warning("request %s: storing %d chunks failed: %s", spec.req_id, len(spec.chunks), exc)

    def _store_pushed(self, lp: _LayerPush) -> None:
        """Finish a layer-wise push: pack the layers ``save_layer`` did not see, checksum and commit
        each chunk here, then seal the push with the same checksums."""
        self.stats.store_skipped += len(lp.refused)
        if not lp.chunks:
            return
        try:
            for layer in range(self.layout.num_layers):
                if layer not in lp.packed:
                    self._push_layer(lp, layer)
            sums = [checksum(self._pool.array(r.offset, self._bytes_of(n)).data) for _c, n, r in lp.chunks]
        except BaseException:
            self._agent.abort([r.id for _c, _n, r in lp.chunks])
            raise
        kept = [n for _c, n, _r in lp.chunks]
        self._commit(lp.spec, [r.id for _c, _n, r in lp.chunks], sums, kept)
        if lp.push_id:
            try:
                self._agent.push_seal(lp.push_id, sums, kept)
                self.stats.pushed_chunks += len(kept)
            except PdxError as exc:
                self.stats.push_errors += 1
                log.warning("request %s: sealing its layer-wise push failed: %s", lp.spec.req_id, exc)

    def _store_one(self, spec: StoreSpec) -> None:
        ct, bs = self.settings.chunk_tokens, self.settings.block_size
        keys = [c.key for c in spec.chunks]
        tokens = [c.num_tokens or ct for c in spec.chunks]
        reservations = self._agent.reserve(keys, [self._bytes_of(n) for n in tokens])
        ids: list[int] = []
        sums: list[int] = []
        kept: list[int] = []  # tokens of each chunk in ids
        try:
            for chunk, n, res in zip(spec.chunks, tokens, reservations):
                if not res.id:
                    self.stats.store_skipped += 1
                    if res.code not in (ErrorCode.OK, ErrorCode.EXISTS, ErrorCode.RESERVATION):
                        log.debug("request %s: chunk %d not stored: %s", spec.req_id, chunk.index, res.error)
                    continue
                out = self._pool.array(res.offset, self._bytes_of(n))
                first = chunk.start if chunk.start >= 0 else chunk.index * ct
                spans = token_spans(spec.block_ids, bs, first, first + n)
                self._codec.pack(spans, out)
                ids.append(res.id)
                sums.append(checksum(out.data))
                kept.append(n)
        except BaseException:
            if ids or any(r.id for r in reservations):
                self._agent.abort([r.id for r in reservations if r.id])
            raise
        if not ids:
            return
        self._commit(spec, ids, sums, kept)

    def _commit(self, spec: StoreSpec, ids: list[int], sums: list[int], kept: list[int]) -> None:
        outcomes = self._agent.commit(ids, num_tokens=kept, checksums=sums)
        failed = [o for o in outcomes if not o.ok]
        self.stats.stored_chunks += len(ids) - len(failed)
        self.stats.stored_bytes += sum(self._bytes_of(n) for n, o in zip(kept, outcomes) if o.ok)
        if failed:
            self.stats.store_errors += len(failed)
            log.warning("request %s: %d chunks not committed: %s: %s", spec.req_id, len(failed),
                        failed[0].code.name, failed[0].msg)

    def _bytes_of(self, num_tokens: int) -> int:
        """Payload bytes of a chunk of ``num_tokens`` tokens (a full chunk is ``chunk_bytes``)."""
        return self._chunk_bytes // self.settings.chunk_tokens * num_tokens

    # --- life cycle ----------------------------------------------------------------------------

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the loader (after the load in progress) and unmap the pool. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._drop_pushes()
        self._queue.put(None)
        self._thread.join(timeout_s)
        self._pool.close()


@dataclass
class _LayerPush:
    """One request's chunks being pushed layer by layer in this step."""

    spec: StoreSpec
    chunks: list[tuple[Any, int, Any]]  # (chunk, tokens, reservation row) of the slabs reserved
    refused: list[tuple[Any, Any]]  # (chunk, row) the store would not reserve (held already, full)
    push_id: int = 0
    packed: set[int] = field(default_factory=set)  # layers packed into the slabs


@dataclass(frozen=True)
class _Pinned:
    """A fetched chunk as the loader needs it (same fields as ``PinInfo``)."""

    found: bool
    offset: int
    nbytes: int
    checksum: int
    num_tokens: int
    lease_id: int = 0


def slice_payload(layout: KVLayout, payload: np.ndarray, num_tokens: int, start: int, end: int) -> np.ndarray:
    """The chunk payload of tokens ``[start, end)`` of a packed chunk of ``num_tokens`` tokens.

    Follows the chunk format of ``pdx.kernels.format``: per layer, K as
    ``[heads][head_size][tokens]`` then V as ``[heads][tokens][head_size]``. Returns a
    new contiguous buffer (used when vLLM's own cache already holds a chunk's first tokens).
    """
    if not 0 <= start < end <= num_tokens:
        raise ValueError(f"token range [{start}, {end}) outside a chunk of {num_tokens}")
    heads, d, item = layout.heads_per_rank, layout.head_size, layout.dtype.itemsize
    raw = np.asarray(payload, dtype=np.uint8)
    if raw.nbytes != num_tokens * layout.token_bytes():
        raise ValueError(f"payload of {raw.nbytes} bytes is not a chunk of {num_tokens} tokens")
    parts = raw.reshape(layout.num_layers, 2, heads * d * num_tokens * item)
    k = parts[:, 0].reshape(layout.num_layers, heads, d, num_tokens, item)[:, :, :, start:end]
    v = parts[:, 1].reshape(layout.num_layers, heads, num_tokens, d, item)[:, :, start:end]
    n = end - start
    out = np.empty((layout.num_layers, 2, heads * d * n * item), dtype=np.uint8)
    out[:, 0] = k.reshape(layout.num_layers, -1)
    out[:, 1] = v.reshape(layout.num_layers, -1)
    return out.reshape(-1)
