"""The scheduler half of ``PdxConnector``: decides what each step loads and stores.

Runs inside vLLM's scheduler (the EngineCore process), on its single thread;
not thread-safe and need not be. Every call here is on the scheduler's critical
path, so the only I/O is one short control-plane round trip to the local agent
(``lookup`` per new request, ``pin`` per finished P/D prefill), each with a
timeout; a slow or absent agent turns into "no hit", never a stall.

What it decides:

* ``matched_tokens`` (vLLM's ``get_num_new_matched_tokens``): how many leading
  prompt tokens pdx can supply beyond vLLM's own prefix cache: full chunks only,
  never the last prompt token (vLLM must compute it to sample). For a decode
  request whose ``kv_transfer_params`` carry a pdx ``RemotePrefill`` it is the
  prefill side's token count (after checking fingerprint, chunk size and keys);
  otherwise the local store's leading run. Loads from a peer, disk or Redis are
  asynchronous (vLLM parks the request until the worker reports the load done);
  a hit entirely in L1 is loaded synchronously by the worker in the step that
  computes the rest of the prompt (``sync_l1_loads``).
* ``after_alloc``: turns the match into a ``LoadSpec`` over the blocks vLLM allocated.
* ``build_step``: the ``StepPlan`` of this step: pending loads, and the chunks
  whose KV this step's forward completes (stored by the worker in ``wait_for_save``).
* ``finished``: for a prefill request that asked for remote decode, pins its
  chunks in the agent under a lease and returns the ``kv_transfer_params`` for decode.

vLLM objects are read duck-typed (see the ``*Like`` protocols) so tests can pass
plain namespaces; nothing here imports vLLM.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pdx.connector.metadata import ChunkLoad, ChunkStore, LoadSpec, StepPlan, StoreSpec
from pdx.connector.params import (
    NO_PARAMS,
    RemotePrefill,
    RequestParams,
    parse_request_params,
    response_params,
)
from pdx.errors import PdxError, TransferParamsError
from pdx.keys import ChunkKey, chunk_keys

log = logging.getLogger(__name__)


class SchedulerAgent(Protocol):
    """What the scheduler half needs from the local agent (``pdx.agent.client.AgentClient``)."""

    def lookup_prefix(self, keys: Sequence[bytes]) -> tuple[int, int]:
        """Leading keys present in the store (any tier), and leading keys in L1 (memory)."""

    def pin_prefix(self, keys: Sequence[bytes], owner: str, lease_s: float) -> int:
        """Pin the keys for a remote reader under ``owner``; returns the leading count pinned."""

    def release(self, owner: str) -> None:
        """Drop every pin held by ``owner``."""


class RequestLike(Protocol):
    request_id: str
    prompt_token_ids: list[int] | None
    kv_transfer_params: dict[str, Any] | None


@dataclass(frozen=True)
class SchedulerSettings:
    """Fixed for the engine's lifetime."""

    chunk_tokens: int
    block_size: int
    chunk_fingerprint: str
    namespace: str = ""
    #: store the KV this engine computes (kv_producer, kv_both)
    store: bool = True
    #: look up the local store for reuse hits
    reuse: bool = True
    #: the agent's peer-facing address, put into kv_transfer_params for decode
    peer_address: str = ""
    #: lifetime of the pins a prefill leaves for its decode side
    lease_s: float = 120.0
    #: skip loads shorter than this many tokens (not worth a round trip)
    min_load_tokens: int = 1
    #: load hits that are all in L1 synchronously, in the step that computes the rest of the
    #: prompt (a memory copy; no extra scheduler round trip). Anything needing I/O (disk, Redis,
    #: a peer) is always loaded asynchronously.
    sync_l1_loads: bool = True

    def __post_init__(self) -> None:
        if self.chunk_tokens <= 0 or self.block_size <= 0:
            raise ValueError("chunk_tokens and block_size must be positive")
        if self.chunk_tokens % self.block_size:
            raise PdxError(
                f"store.chunk_tokens ({self.chunk_tokens}) must be a multiple of the engine's "
                f"block size ({self.block_size})")


@dataclass
class _Req:
    """What the scheduler half remembers about one live request."""

    req_id: str
    keys: list[ChunkKey]
    prompt_len: int
    params: RequestParams
    #: chunks the store already holds (no need to store them again)
    stored_chunks: int = 0
    #: how the last match was answered: (num_computed given, tokens offered, peer or "", sync)
    match: tuple[int, int, str, bool] | None = None
    remote_used: bool = False
    block_ids: list[int] = field(default_factory=list)
    #: next chunk index to store; chunks below it are stored or not ours to store
    store_next: int = 0

    def max_load_chunks(self, chunk_tokens: int) -> int:
        """Full chunks that leave at least one prompt token to compute."""
        return min(len(self.keys), (self.prompt_len - 1) // chunk_tokens) if self.prompt_len else 0


@dataclass
class SchedulerStats:
    """Counters since start (read by tests and logs)."""

    lookups: int = 0
    lookup_errors: int = 0
    hit_tokens: int = 0
    remote_tokens: int = 0
    bad_params: int = 0
    stored_chunks_planned: int = 0
    pins: int = 0
    pin_errors: int = 0


class PdxSchedulerSide:
    """See the module docstring. One per engine, created by ``PdxConnector`` in the scheduler role."""

    def __init__(self, settings: SchedulerSettings, agent: SchedulerAgent | None) -> None:
        self.settings = settings
        self._agent = agent
        self._reqs: dict[str, _Req] = {}
        self._pending_loads: list[LoadSpec] = []
        self.stats = SchedulerStats()
        self._last_agent_warning = 0.0

    # --- vLLM: get_num_new_matched_tokens ------------------------------------------------------

    def matched_tokens(self, request: RequestLike, num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens beyond ``num_computed_tokens`` that pdx will load asynchronously."""
        st = self._state(request)
        ct = self.settings.chunk_tokens
        limit = st.max_load_chunks(ct)
        offered, peer = 0, ""
        remote = st.params.remote
        if remote is not None and not st.remote_used:
            offered = self._remote_chunks(st, remote, limit)
            if offered:
                peer = remote.agent
        local, in_l1 = self._local_chunks(st) if self.settings.reuse or remote is not None else (0, 0)
        st.stored_chunks = max(st.stored_chunks, local)
        if min(local, limit) >= offered:
            offered, peer = min(local, limit), ""
        tokens = offered * ct - num_computed_tokens
        if tokens < max(1, self.settings.min_load_tokens):
            st.match = None
            return 0, False
        sync = not peer and self.settings.sync_l1_loads and in_l1 >= offered
        st.match = (num_computed_tokens, tokens, peer, sync)
        return tokens, not sync

    def _state(self, request: RequestLike) -> _Req:
        st = self._reqs.get(request.request_id)
        if st is not None:
            return st
        tokens = list(request.prompt_token_ids or [])
        try:
            params = parse_request_params(request.kv_transfer_params)
        except TransferParamsError as exc:
            self.stats.bad_params += 1
            log.warning("request %s: ignoring its kv_transfer_params, recomputing: %s",
                        request.request_id, exc)
            params = NO_PARAMS
        s = self.settings
        keys = chunk_keys(tokens, s.chunk_fingerprint, s.chunk_tokens, s.namespace) if tokens else []
        st = _Req(req_id=request.request_id, keys=keys, prompt_len=len(tokens), params=params)
        self._reqs[request.request_id] = st
        return st

    def _remote_chunks(self, st: _Req, remote: RemotePrefill, limit: int) -> int:
        """Chunks the prefill side offers that this engine can use, or 0 with a log line."""
        s = self.settings
        problem = ""
        if remote.fingerprint != s.chunk_fingerprint:
            problem = (f"chunk fingerprint {remote.fingerprint!r} differs from this engine's "
                       f"{s.chunk_fingerprint!r} (another model, dtype or head split)")
        elif remote.chunk_tokens != s.chunk_tokens:
            problem = f"chunk_tokens {remote.chunk_tokens} differs from this engine's {s.chunk_tokens}"
        elif remote.namespace != s.namespace:
            problem = f"namespace {remote.namespace!r} differs from this engine's {s.namespace!r}"
        if problem:
            self.stats.bad_params += 1
            st.remote_used = True  # do not warn again for this request
            log.warning("request %s: kv_transfer_params from prefill agent %s unusable: %s; recomputing",
                        st.req_id, remote.agent, problem)
            return 0
        n = min(remote.num_chunks, limit)
        if remote.keys:
            same = 0
            for mine, theirs in zip(st.keys[:n], remote.keys[:n]):
                if mine != theirs:
                    break
                same += 1
            if same < n:
                log.warning("request %s: only %d of %d chunk keys from prefill agent %s match this "
                            "prompt; loading those, recomputing the rest", st.req_id, same, n, remote.agent)
            n = same
        return n

    def _local_chunks(self, st: _Req) -> tuple[int, int]:
        """(leading chunks in the local store, leading chunks of those in L1)."""
        if not st.keys or self._agent is None:
            return 0, 0
        self.stats.lookups += 1
        try:
            present, in_l1 = self._agent.lookup_prefix(st.keys)
            present = max(0, min(len(st.keys), present))
            return present, min(present, in_l1)
        except PdxError as exc:
            self.stats.lookup_errors += 1
            now = time.monotonic()
            if now - self._last_agent_warning > 10.0:
                self._last_agent_warning = now
                log.warning("pdx agent lookup failed (treated as a miss): %s", exc)
            return 0, 0

    def pending_peer(self, req_id: str) -> str:
        """The peer the last match of ``req_id`` would load from ("" = the local store)."""
        st = self._reqs.get(req_id)
        return st.match[2] if st is not None and st.match is not None else ""

    # --- vLLM: update_state_after_alloc --------------------------------------------------------

    def after_alloc(self, request: RequestLike, block_ids: Sequence[int], num_external_tokens: int) -> None:
        """Remember the request's blocks; plan the load vLLM accepted (``num_external_tokens``)."""
        st = self._state(request)
        st.block_ids = list(block_ids)
        match, st.match = st.match, None
        if num_external_tokens <= 0 or match is None:
            self._init_store(st, 0)
            return
        start, offered, peer, sync = match
        end = start + num_external_tokens
        if num_external_tokens != offered:
            log.debug("request %s: vLLM accepted %d of %d offered tokens", st.req_id,
                      num_external_tokens, offered)
        ct = self.settings.chunk_tokens
        chunks = []
        for i in range(start // ct, -(-end // ct)):
            lo, hi = max(start, i * ct), min(end, (i + 1) * ct)
            if hi > lo:
                chunks.append(ChunkLoad(index=i, key=st.keys[i], start=lo, end=hi))
        remote = st.params.remote
        spec = LoadSpec(req_id=st.req_id, block_ids=tuple(st.block_ids), chunks=tuple(chunks),
                        peer=peer, remote_request_id=remote.request_id if (peer and remote) else "",
                        sync=sync)
        if peer:
            st.remote_used = True
            self.stats.remote_tokens += num_external_tokens
        else:
            self.stats.hit_tokens += num_external_tokens
        self._pending_loads.append(spec)
        # Everything loaded will be in the local store afterwards (a fetch commits there).
        self._init_store(st, -(-end // ct))

    def _init_store(self, st: _Req, loaded_chunks: int) -> None:
        st.store_next = max(st.store_next, st.stored_chunks, loaded_chunks)

    # --- vLLM: build_connector_meta ------------------------------------------------------------

    def build_step(self, scheduler_output: Any) -> StepPlan:
        """The plan for this step; resets the pending loads. Reads ``scheduler_output`` only."""
        s = self.settings
        plan = StepPlan(chunk_tokens=s.chunk_tokens, block_size=s.block_size)
        plan.loads, self._pending_loads = self._pending_loads, []
        if not s.store:
            return plan
        scheduled: Mapping[str, int] = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0])
            self._plan_store(plan, st, new.num_computed_tokens + scheduled.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        resumed: Iterable[str] = getattr(cached, "resumed_req_ids", ()) or ()
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if new_blocks is not None:
                if req_id in resumed:
                    st.block_ids = list(new_blocks[0])
                else:
                    st.block_ids.extend(new_blocks[0])
            self._plan_store(plan, st, cached.num_computed_tokens[i] + scheduled.get(req_id, 0))
        return plan

    def _plan_store(self, plan: StepPlan, st: _Req, computed_after_step: int) -> None:
        ct = self.settings.chunk_tokens
        last = min(len(st.keys), computed_after_step // ct)
        if last <= st.store_next:
            return
        chunks = tuple(ChunkStore(index=i, key=st.keys[i]) for i in range(st.store_next, last))
        need_blocks = -(-(last * ct) // self.settings.block_size)
        if len(st.block_ids) < need_blocks:  # should not happen; never pack from unknown blocks
            log.warning("request %s: %d blocks known, %d needed to store %d chunks; not storing",
                        st.req_id, len(st.block_ids), need_blocks, last)
            return
        plan.stores.append(StoreSpec(req_id=st.req_id, block_ids=tuple(st.block_ids), chunks=chunks))
        self.stats.stored_chunks_planned += len(chunks)
        st.store_next = last

    # --- vLLM: request_finished ----------------------------------------------------------------

    def finished(self, request: RequestLike, completed: bool) -> tuple[bool, dict[str, Any] | None]:
        """Forget the request; for a completed remote-decode prefill, pin its chunks and
        return the params for the decode side. Never delays freeing blocks: stores are
        synchronous, so the chunks already live in the agent's pool."""
        st = self._reqs.pop(request.request_id, None)
        if st is None:  # finished before it was ever matched (e.g. aborted while queued)
            return False, None
        if not (st.params.remote_decode and completed and self.settings.store):
            return False, None
        s = self.settings
        n = 0
        keys = st.keys[: st.store_next] if st.store_next else []
        if keys and self._agent is not None:
            try:
                n = self._agent.pin_prefix(keys, owner=f"pd:{st.req_id}", lease_s=s.lease_s)
                self.stats.pins += 1
            except PdxError as exc:
                self.stats.pin_errors += 1
                log.warning("request %s: could not pin its chunks for the decode side (%s); "
                            "decode will recompute", st.req_id, exc)
                n = 0
        remote = RemotePrefill(agent=s.peer_address, fingerprint=s.chunk_fingerprint,
                               chunk_tokens=s.chunk_tokens, num_tokens=n * s.chunk_tokens,
                               keys=tuple(keys[:n]), namespace=s.namespace, request_id=st.req_id,
                               lease_s=s.lease_s)
        return False, response_params(remote)

    def num_live_requests(self) -> int:
        return len(self._reqs)
