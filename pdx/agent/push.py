"""Layer-wise streaming for P/D: the prefill agent pushes each layer of a request's chunks to the
decode agent while the engine computes the next layers.

Both halves of one P/D pair, prefill side first:

* ``Pushes`` (the prefill agent). The engine's connector reserves the request's slabs as usual
  and, when the first layer of a step is computed, calls ``push_open`` (the decode agent's peer
  address, the request id, its reservations). A push thread says ``peer_stage`` to the decode
  agent, which reserves slabs for the chunks in its *staging area*. Every ``push_layer`` then posts
  one WRITE batch: that layer's byte range of every chunk (the chunk format is layer-major, so one
  layer of a chunk is one contiguous range). ``push_seal`` (after the step's commit, with the
  chunks' checksums) waits for the writes and says ``peer_staged`` with the checksums.
* ``Staging`` (the decode agent). Staged slabs are reservations: invisible to lookups, pins and
  other peers, never in the store. Only a ``fetch`` that names the same prefill agent and the same
  request (``remote_owner`` ``pd:<request id>``, as the decode engine's P/D load does) takes them:
  it waits for the seal (bounded by its deadline), then commits each staged chunk with the checksum
  the prefill agent sent; the store re-hashes it (``ChunkStore.commit``), so a damaged chunk is
  ``CORRUPT`` and dropped. Chunks not staged, not sealed in time or corrupt go the ordinary way
  (``peer_pin`` and a READ), and what cannot be had is recomputed by the engine.

Trust: ``peer_stage`` needs an authenticated session and counts against the peer's slab quota
like ``peer_reserve``; a stage is bound to the session's agent address, so one peer can neither
fill nor seal another's stage, and a staged chunk reaches the store only through the fetch of the
request that names it. Stages expire with their reservations (``store.l1.reservation_timeout_s``).

Thread-safety: ``Staging`` has its own lock and condition; ``Pushes`` hands each push to one
thread of its own pool and talks to it through a queue.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pdx.agent.context import AgentContext
from pdx.agent.links import Links
from pdx.agent.protocol import Op, StageArgs, StagedArgs
from pdx.agent.types import ReserveRow
from pdx.errors import PdxError, WireError
from pdx.transport.base import ChunkOp, OpKind, OpStatus

log = logging.getLogger("pdx.agent.push")

#: most pushes an agent keeps open at once (each holds a transfer thread while its prefill runs)
MAX_PUSHES = 64
#: sealed pushes remembered for the release of their hand-off pins
MAX_REMEMBERED = 4096


# --- the decode side: staged chunks ---------------------------------------------------------------


@dataclass
class StagedChunk:
    rid: int  # the local reservation
    nbytes: int
    checksum: int | None = None  # set by the seal
    num_tokens: int = 0


@dataclass
class Stage:
    address: str  # the prefill agent's peer address (its session's)
    stage_id: str
    created: float
    expires: float
    session: Any = None  # the session whose write grants cover the staged slabs
    chunks: dict[bytes, StagedChunk] = field(default_factory=dict)
    #: pushes staged here and not sealed yet (one per prefill step of the request)
    pending: int = 0

    @property
    def sealed(self) -> bool:
        return self.pending == 0


class Staging:
    """Staged chunks by ``(peer address, request id)`` (see the module docstring).

    ``settle(session, rid, abort)`` ends the session's write grant on a staged reservation and, with
    ``abort``, aborts it in the store. Only reservations whose writes are known to be over (a sealed
    chunk) are aborted; the others are left to expire with their grants, so a write still in flight
    can never land in a slab the store handed to someone else.
    """

    def __init__(self, settle: Callable[[Any, int, bool], None], clock: Callable[[], float] = time.monotonic) -> None:
        self._settle = settle
        self._clock = clock
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._stages: dict[tuple[str, str], Stage] = {}
        #: staged chunks handed to fetches (status, tests)
        self.taken = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._stages)

    def add(self, address: str, stage_id: str, keys: Sequence[bytes], rows: Sequence[ReserveRow],
            ttl_s: float, session: Any = None) -> None:
        """Record the reservations made for ``keys`` (rows with id 0 were refused)."""
        now = self._clock()
        with self._cond:
            self._expire(now)
            st = self._stages.get((address, stage_id))
            if st is None:
                st = self._stages[(address, stage_id)] = Stage(address, stage_id, now, now + ttl_s, session)
            st.expires = max(st.expires, now + ttl_s)
            st.pending += 1  # each push (a prefill step) seals once
            for k, row in zip(keys, rows):
                if row.id and bytes(k) not in st.chunks:
                    st.chunks[bytes(k)] = StagedChunk(row.id, row.nbytes)

    def seal(self, address: str, stage_id: str, ids: Sequence[int], checksums: Sequence[int],
             num_tokens: Sequence[int]) -> int:
        """Record the checksums of the chunks the prefill agent finished writing; returns how many
        of ``ids`` belong to this stage (others are ignored)."""
        with self._cond:
            st = self._stages.get((address, stage_id))
            if st is None:
                return 0
            by_rid = {c.rid: c for c in st.chunks.values()}
            n = 0
            for rid, csum, ntok in zip(ids, checksums, num_tokens):
                c = by_rid.get(rid)
                if c is not None:
                    c.checksum, c.num_tokens = int(csum), int(ntok)
                    n += 1
            st.pending = max(0, st.pending - 1)
            self._cond.notify_all()
            return n

    def has(self, address: str, stage_id: str) -> bool:
        with self._lock:
            return (address, stage_id) in self._stages

    def take(self, address: str, stage_id: str, keys: Sequence[bytes],
             wait_s: float) -> list[tuple[bytes, int, int, int]]:
        """The sealed staged chunks among ``keys`` as ``(key, reservation id, checksum, tokens)``,
        after waiting up to ``wait_s`` for the stage's seal. The stage is removed; its other
        reservations are aborted."""
        deadline = self._clock() + max(0.0, wait_s)
        settle: list[tuple[int, bool]] = []
        out: list[tuple[bytes, int, int, int]] = []
        with self._cond:
            st = self._stages.get((address, stage_id))
            if st is None:
                return []
            while not st.sealed:
                left = deadline - self._clock()
                if left <= 0 or not self._cond.wait(left):
                    break
            self._stages.pop((address, stage_id), None)
            want = {bytes(k) for k in keys}
            for k, c in st.chunks.items():
                if k in want and c.checksum is not None:
                    out.append((k, c.rid, c.checksum, c.num_tokens))
                    settle.append((c.rid, False))  # the caller commits it
                else:
                    settle.append((c.rid, c.checksum is not None))
            self.taken += len(out)
        for rid, abort in settle:
            self._settle(st.session, rid, abort)
        return out

    def sweep(self) -> int:
        """Forget expired stages (their reservations and grants expire on their own)."""
        with self._cond:
            return self._expire(self._clock())

    def _expire(self, now: float) -> int:
        old = [key for key, st in self._stages.items() if st.expires <= now]
        for key in old:
            del self._stages[key]
        return len(old)


# --- the prefill side: pushes ---------------------------------------------------------------------


@dataclass(frozen=True)
class LocalChunk:
    key: bytes
    offset: int  # of its reserved slab in this agent's pool
    nbytes: int


class _Push:
    def __init__(self, push_id: int, peer: str, stage_id: str, chunks: list[LocalChunk], num_layers: int,
                 deadline: float) -> None:
        self.id = push_id
        self.peer = peer
        self.stage_id = stage_id
        self.chunks = chunks
        self.num_layers = num_layers
        self.deadline = deadline
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.layers_sent = 0
        self.bytes_sent = 0
        self.error = ""
        self.link: Any = None


class Pushes:
    """The prefill agent's open pushes (see the module docstring)."""

    def __init__(self, ctx: AgentContext, links: Links, check_peer: Callable[[str], None]) -> None:
        self.ctx = ctx
        self.links = links
        self._check_peer = check_peer
        self._lock = threading.Lock()
        self._next = 1
        self._open: dict[int, _Push] = {}
        # A push waits for its prefill's layers for as long as the prefill computes: it runs on
        # threads of its own (made as needed), never holding the workers that serve fetches and
        # peer requests (``ctx.transfers``).
        self._pool = ThreadPoolExecutor(MAX_PUSHES, thread_name_prefix="pdx-agent-push")
        #: request id -> the decode agent its chunks were pushed to (sealed pushes, most recent last):
        #: that agent may release the request's hand-off pins here (``pd:<request>``) once it took them
        self._pushed: OrderedDict[str, str] = OrderedDict()
        #: counters (status, tests)
        self.opened = 0
        self.sealed = 0
        self.failed = 0
        self.layers = 0
        self.bytes = 0

    def open(self, peer: str, stage_id: str, chunks: Sequence[LocalChunk], num_layers: int,
             deadline_s: float) -> int:
        """Start a push; returns its id (0: not started, the caller goes on without it)."""
        if num_layers < 1 or not chunks:
            raise WireError("push_open: needs chunks and at least one layer")
        with self._lock:
            if len(self._open) >= MAX_PUSHES:
                log.warning("push for request %s not started: %d pushes open", stage_id, len(self._open))
                return 0
            pid = self._next
            self._next += 1
            push = _Push(pid, peer, stage_id, list(chunks), num_layers, time.monotonic() + deadline_s)
            self._open[pid] = push
            self.opened += 1
        try:
            self._pool.submit(self._run, push)
        except RuntimeError:  # shutting down
            with self._lock:
                self._open.pop(pid, None)
            return 0
        return pid

    def layer(self, push_id: int, layer: int) -> bool:
        """Layer ``layer`` of every chunk of the push is packed: send it."""
        push = self._get(push_id)
        if push is None:
            return False
        if not 0 <= layer < push.num_layers:
            raise WireError(f"push_layer: layer {layer} outside 0..{push.num_layers - 1}")
        push.events.put(("layer", layer))
        return True

    def seal(self, push_id: int, checksums: Sequence[int], num_tokens: Sequence[int]) -> bool:
        """Every layer was pushed and the chunks committed here with ``checksums``: seal the stage."""
        push = self._get(push_id)
        if push is None:
            return False
        if len(checksums) != len(push.chunks) or len(num_tokens) != len(push.chunks):
            raise WireError(f"push_seal: {len(checksums)} checksums / {len(num_tokens)} token counts for "
                            f"{len(push.chunks)} chunks")
        push.events.put(("seal", (list(checksums), list(num_tokens))))
        return True

    def abandon(self, push_id: int) -> bool:
        push = self._get(push_id)
        if push is None:
            return False
        push.events.put(("abandon", None))
        return True

    def close(self) -> None:
        """Abandon every open push (the decode sides fetch or recompute) and join their threads."""
        with self._lock:
            pushes = list(self._open.values())
        for push in pushes:
            push.events.put(("abandon", None))
        self._pool.shutdown(wait=True, cancel_futures=True)

    def pushed_to(self, stage_id: str) -> str:
        """The peer address the chunks of request ``stage_id`` were pushed to ('' if none)."""
        with self._lock:
            return self._pushed.get(stage_id, "")

    def active(self) -> int:
        with self._lock:
            return len(self._open)

    def _get(self, push_id: int) -> _Push | None:
        with self._lock:
            return self._open.get(push_id)

    def _run(self, push: _Push) -> None:
        try:
            self._stream(push)
        except (PdxError, OSError) as exc:
            push.error = f"{type(exc).__name__}: {exc}"
            self.failed += 1
            log.warning("push %d of request %s to %s failed after %d layers: %s (the decode side fetches "
                        "or recomputes)", push.id, push.stage_id, push.peer, push.layers_sent, push.error)
            self._seal_nothing(push)
        except Exception as exc:  # never leave a push open on a bug
            push.error = f"internal error: {type(exc).__name__}: {exc}"
            self.failed += 1
            log.exception("push %d failed", push.id)
            self._seal_nothing(push)
        finally:
            with self._lock:
                self._open.pop(push.id, None)

    def _seal_nothing(self, push: _Push) -> None:
        """After a failure: an empty seal, so the decode side's fetch stops waiting and pulls."""
        if push.link is None:
            return
        try:
            push.link.client.call(Op.PEER_STAGED, StagedArgs(push.stage_id, [], [], []), 2.0)
        except PdxError as exc:
            log.debug("push %d: empty seal not delivered: %s", push.id, exc)

    def _left(self, push: _Push) -> float:
        left = push.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"push {push.id}: deadline passed")
        return left

    def _stream(self, push: _Push) -> None:
        _store, transport, _layout = self.ctx.require_store()
        self._check_peer(push.peer)
        link = push.link = self.links.link(push.peer, self._left(push))
        rows: list[ReserveRow] = link.client.call(
            Op.PEER_STAGE, StageArgs(push.stage_id, [c.key for c in push.chunks], [c.nbytes for c in push.chunks]),
            self._left(push))
        if len(rows) != len(push.chunks):
            raise WireError(f"peer_stage: {len(rows)} rows for {len(push.chunks)} chunks")
        # (local chunk, remote offset) of the chunks the peer reserved; refused ones are not pushed
        targets = [(c, r) for c, r in zip(push.chunks, rows) if r.id and r.nbytes == c.nbytes]
        handles: list[Any] = []
        while True:
            try:
                kind, arg = push.events.get(timeout=self._left(push))
            except queue.Empty:
                raise TimeoutError(f"push {push.id}: no seal before the deadline") from None
            if kind == "abandon":
                for h in handles:
                    h.cancel()
                return
            if kind == "layer":
                ops = []
                for c, r in targets:
                    per = c.nbytes // push.num_layers
                    ops.append(ChunkOp(c.offset + arg * per, r.offset + arg * per, per))
                if ops:
                    handles.append(transport.post(link.transport_peer, OpKind.WRITE, ops))
                    push.bytes_sent += sum(o.nbytes for o in ops)
                push.layers_sent += 1
                self.layers += 1
                continue
            # seal: every layer's writes must have landed before the checksums are worth sending
            sums, ntoks = arg
            ok = {id(c) for c, _ in targets}
            for h in handles:
                batch = h.wait(timeout=self._left(push))
                for i, st in enumerate(batch.status):
                    if st is not OpStatus.DONE:
                        ok.clear()  # which chunk a failed op belonged to is not worth tracking: seal none
                        log.info("push %d: a write failed (%s); sealing nothing", push.id,
                                 batch.errors.get(i, st.value))
                        break
            if push.layers_sent != push.num_layers:
                ok.clear()
            ids, csums, toks = [], [], []
            idx = {id(c): i for i, c in enumerate(push.chunks)}
            for c, r in targets:
                if id(c) in ok:
                    ids.append(r.id)
                    csums.append(sums[idx[id(c)]])
                    toks.append(ntoks[idx[id(c)]])
            link.client.call(Op.PEER_STAGED, StagedArgs(push.stage_id, ids, csums, toks), self._left(push))
            self.sealed += 1
            self.bytes += push.bytes_sent
            with self._lock:
                self._pushed[push.stage_id] = push.peer
                self._pushed.move_to_end(push.stage_id)
                while len(self._pushed) > MAX_REMEMBERED:
                    self._pushed.popitem(last=False)
            log.debug("push %d of request %s: %d chunks, %d bytes in %d layers sealed at %s", push.id,
                      push.stage_id, len(ids), push.bytes_sent, push.layers_sent, push.peer)
            return
