"""The scheduler half of ``PdxConnector``: decides what each step loads and stores.

Runs inside vLLM's scheduler (the EngineCore process), on its single thread;
not thread-safe and need not be. Every call here is on the scheduler's critical
path, so the only I/O is one short control-plane round trip to the local agent
(``lookup`` per new request, ``pin`` per finished P/D prefill), each with a
timeout; a slow or absent agent turns into "no hit", never a stall.

What it decides:

* ``matched_tokens`` (vLLM's ``get_num_new_matched_tokens``): how many leading
  prompt tokens pdx can supply beyond vLLM's own prefix cache: every token of the
  leading chunks it has but the last prompt token (vLLM must compute that one to
  sample; the chunk holding it is loaded in part). For a decode request whose
  ``kv_transfer_params`` carry a pdx ``RemotePrefill`` it is the prefill side's
  token count (after checking fingerprint, chunk size and keys), tail chunk
  included; with a proxy's ``PeerHint`` (peer-to-peer reuse) it is the hinted holder's
  leading chunks when they are more than the local store's (the load fetches them from that
  agent; chunks it fails to deliver are tried in the local store's tiers, then recomputed);
  otherwise the local store's leading run. Loads from a peer, disk or Redis are
  asynchronous (vLLM parks the request until the worker reports the load done);
  a hit entirely in L1 is loaded synchronously by the worker in the step that
  computes the rest of the prompt (``sync_l1_loads``).
* ``after_alloc``: turns the match into a ``LoadSpec`` over the blocks vLLM allocated.
* ``build_step``: the ``StepPlan`` of this step: pending loads, and the chunks
  whose KV this step's forward completes (stored by the worker in ``wait_for_save``).
* ``finished``: for a prefill request that asked for remote decode, pins its
  chunks in the agent under a lease and returns the ``kv_transfer_params`` for decode.

CacheBlend (``kv_transfer_params.pdx.blend``, see ``docs/cacheblend.md``): a storing request
(``store``) also plans its segment's pieces (``ChunkStore.start``) once its forward computed them; a
blending request whose pieces are all stored is offered its region as a synchronous load carrying a
``BlendLoad``, gets a ``cache_salt`` of its own (``take_resalt``, applied by the connector), and never
stores anything.

Tail chunks: a prompt whose length is not a multiple of the chunk size ends in a
partial chunk. A storing engine also stores that tail, less the last prompt token,
under ``pdx.keys.tail_key`` (keyed under its parent chunk, with its length and tokens),
once every full chunk before it is stored. A prefill for remote decode offers it, so the
decode side computes a single token instead of up to a whole chunk. Reuse finds tails
too: when the local store's leading run of full chunks stops short of ``max_load``, the
scheduler probes the agent (one more round trip, L1 and local tiers only, not counted in
the lookup metrics) for the longest stored tail under the last hit chunk whose tokens
begin the prompt's tokens there (``pdx.keys.tail_candidates``), and offers it: a repeated
prompt loads all but its last token, an extended one everything the earlier prompt stored.
A probe that finds nothing at a position is not repeated for the same request.
Peer-to-peer hints and remote tiers deal in full chunks only.

vLLM objects are read duck-typed (see the ``*Like`` protocols) so tests can pass
plain namespaces; nothing here imports vLLM.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pdx.connector.blend.errors import BlendRequestError
from pdx.connector.blend.request import (
    BlendRequest,
    anchor_id,
    blend_cache_salt,
    parse_blend,
    segment_key,
    segment_pieces,
)
from pdx.connector.metadata import (
    BlendLoad,
    BlendSegment,
    ChunkLoad,
    ChunkStore,
    LoadSpec,
    StepPlan,
    StoreSpec,
)
from pdx.connector.params import (
    NO_PARAMS,
    RemotePrefill,
    RequestParams,
    parse_request_params,
    response_params,
)
from pdx.errors import PdxError, TransferParamsError
from pdx.keys import ChunkKey, chunk_keys, tail_candidates, tail_key

log = logging.getLogger(__name__)


class SchedulerAgent(Protocol):
    """What the scheduler half needs from the local agent (``pdx.agent.client.AgentClient``)."""

    def lookup_prefix(self, keys: Sequence[bytes]) -> tuple[int, int]:
        """Leading keys present in the store (any tier), and leading keys in L1 (memory)."""

    def lookup_tails(self, keys: Sequence[bytes]) -> tuple[int, bool]:
        """The first of ``keys`` present in L1 or a local tier (its index or -1), and whether in L1."""

    def pin_prefix(self, keys: Sequence[bytes], owner: str, lease_s: float) -> int:
        """Pin the keys for a remote reader under ``owner``; returns the leading count pinned."""

    def release(self, owner: str) -> None:
        """Drop every pin held by ``owner``."""


class RequestLike(Protocol):
    """vLLM's ``Request``; its optional ``cache_salt`` (per tenant) is read with ``getattr``."""

    request_id: str
    prompt_token_ids: list[int] | None
    kv_transfer_params: dict[str, Any] | None


def request_salt(request: object) -> str:
    """The request's ``cache_salt`` (vLLM's, validated by its API server), or ``""``."""
    salt = getattr(request, "cache_salt", None)
    return salt if isinstance(salt, str) else ""


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
    #: layer-wise P/D: stream each layer to the decode agent a prefill request names (``pdx.push``)
    layerwise: bool = True

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
    hint_used: bool = False
    block_ids: list[int] = field(default_factory=list)
    #: next chunk index to store; chunks below it are stored or not ours to store
    store_next: int = 0
    #: key and size of the prompt's tail chunk (tokens ``[len(keys)*ct, prompt_len-1)``)
    tail: ChunkKey | None = None
    tail_tokens: int = 0
    tail_stored: bool = False
    #: the tail the current match offers: (chunk index, tokens, key)
    load_tail: tuple[int, int, ChunkKey] | None = None
    #: chunk index whose tail probe found nothing (not probed again)
    tail_miss_at: int = -1
    #: the prompt's token ids (tail probes, CacheBlend)
    tokens: list[int] = field(default_factory=list)
    #: CacheBlend (``kv_transfer_params.pdx.blend``): the request, each segment's pieces
    blend: BlendRequest | None = None
    pieces: list[list[tuple[bytes, int]]] = field(default_factory=list)
    #: the region was offered as blended: the request runs under its own salt and stores nothing
    blended: bool = False
    #: the cache_salt the connector must give the request (once, when it is first blended)
    resalt: str = ""
    #: the request's own cache_salt as it came (the tenant's; part of every key)
    salt: str = ""
    #: the last blend offer: (num_computed given, tokens offered)
    blend_match: tuple[int, int] | None = None
    #: a storing request's segment has been planned for storing
    segment_stored: bool = False

    @property
    def max_load(self) -> int:
        """Prompt tokens that may be loaded: all but the last, which vLLM computes to sample."""
        return max(0, self.prompt_len - 1)


@dataclass
class SchedulerStats:
    """Counters since start (read by tests and logs)."""

    lookups: int = 0
    lookup_errors: int = 0
    hit_tokens: int = 0
    remote_tokens: int = 0
    hint_tokens: int = 0
    bad_params: int = 0
    #: reuse hits that offered a stored tail (tail probes that found one)
    tail_hits: int = 0
    stored_chunks_planned: int = 0
    pins: int = 0
    pin_errors: int = 0
    #: CacheBlend: requests asking to blend, regions offered as blended (and their tokens),
    #: blends refused because a segment was not stored (or the request could not blend)
    blend_requests: int = 0
    blend_offers: int = 0
    blend_tokens: int = 0
    blend_misses: int = 0
    segment_pieces_planned: int = 0


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
        st.blend_match = None
        if st.blend is not None and not st.blend.store:
            n = self._blend_tokens(st, num_computed_tokens)
            if n:
                st.match = None
                return n, False  # the worker blends inline, before this step's forward
        ct = self.settings.chunk_tokens
        offered, peer = 0, ""  # tokens from the start of the prompt
        remote = st.params.remote
        if remote is not None and not st.remote_used:
            offered = self._remote_tokens(st, remote)
            if offered:
                peer = remote.agent
        hint = st.params.hint if remote is None and not st.hint_used else None
        local, in_l1, answered = self._local_chunks(st) if (self.settings.reuse or remote is not None
                                                            or hint is not None) else (0, 0, False)
        st.stored_chunks = max(st.stored_chunks, local)
        st.load_tail = None
        if min(local * ct, st.max_load) >= offered:
            offered, peer = min(local * ct, st.max_load), ""
            if answered and self.settings.reuse and remote is None and local * ct < st.max_load:
                found = self._local_tail(st, local)
                if found is not None and min(local * ct + found[1], st.max_load) > offered:
                    st.load_tail = found[:3]
                    offered = min(local * ct + found[1], st.max_load)
                    if found[3] and in_l1 >= local:
                        in_l1 = local + 1  # every chunk offered, the tail included, is in L1
        if hint is not None and hint.chunks > local:
            # peer-to-peer reuse: the holder named by the proxy has more of the prefix than we do
            hinted = min(min(hint.chunks, len(st.keys)) * ct, st.max_load)
            if hinted > offered:
                offered, peer = hinted, hint.agent
        if peer:
            st.load_tail = None
        tokens = offered - num_computed_tokens
        if tokens < max(1, self.settings.min_load_tokens):
            st.match = None
            st.load_tail = None
            return 0, False
        sync = not peer and self.settings.sync_l1_loads and in_l1 * ct >= offered
        st.match = (num_computed_tokens, tokens, peer, sync)
        return tokens, not sync

    def _local_tail(self, st: _Req, index: int) -> tuple[int, int, ChunkKey, bool] | None:
        """The longest stored tail under chunk ``index - 1`` that begins the prompt's tokens at
        chunk ``index``: ``(index, tokens, key, in L1)``, or None."""
        if self._agent is None or not st.tokens or st.tail_miss_at == index:
            return None
        s = self.settings
        cands = tail_candidates(st.tokens, index, s.chunk_fingerprint, s.chunk_tokens, s.namespace, st.keys,
                                salt=st.salt)
        if not cands:
            return None
        try:
            i, in_l1 = self._agent.lookup_tails([k for _, k in cands])
        except PdxError as exc:
            self.stats.lookup_errors += 1
            log.debug("request %s: tail probe failed (treated as a miss): %s", st.req_id, exc)
            return None
        if not 0 <= i < len(cands):
            st.tail_miss_at = index
            return None
        self.stats.tail_hits += 1
        n, key = cands[i]
        return index, n, key, in_l1

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
        # vLLM's per-request cache_salt (the proxy sets one per tenant) is part of every key, so
        # requests with different salts never load each other's KV, locally or from a peer.
        salt = request_salt(request)
        keys = chunk_keys(tokens, s.chunk_fingerprint, s.chunk_tokens, s.namespace, salt=salt) if tokens else []
        st = _Req(req_id=request.request_id, keys=keys, prompt_len=len(tokens), params=params,
                  tokens=tokens, salt=salt)
        # A tail when the loadable tokens end inside a chunk the prompt does not fill
        # (with a full last chunk, that chunk is loaded in part instead).
        if st.max_load > len(keys) * s.chunk_tokens:
            st.tail = tail_key(tokens, st.max_load, s.chunk_fingerprint, s.chunk_tokens, s.namespace, keys,
                               salt=salt)
            st.tail_tokens = st.max_load - len(keys) * s.chunk_tokens
        if isinstance(request.kv_transfer_params, Mapping):
            self._parse_blend(st, request.kv_transfer_params.get("pdx"), tokens, salt)
        self._reqs[request.request_id] = st
        return st

    # --- CacheBlend ----------------------------------------------------------------------------

    def _parse_blend(self, st: _Req, block: object, tokens: list[int], salt: str) -> None:
        """Read ``pdx.blend``; a bad block is a log line and an ordinary (exact) request."""
        if not isinstance(block, Mapping) or "blend" not in block:
            return
        s = self.settings
        try:
            req = parse_blend(block, len(tokens))
        except BlendRequestError as exc:
            self.stats.bad_params += 1
            log.warning("request %s: ignoring its pdx.blend block, computing the prompt exactly: %s",
                        st.req_id, exc)
            return
        if req is None:
            return
        if st.params.remote is not None or st.params.remote_decode:
            log.warning("request %s: pdx.blend is not combined with P/D transfers; computing exactly",
                        st.req_id)
            return
        anchor = anchor_id(tokens[:req.anchor])
        # The tenant's salt is part of every segment key, as of every chunk key.
        namespace = f"{s.namespace}|{salt}" if salt else s.namespace
        st.blend = req
        st.tokens = tokens
        st.salt = salt
        st.pieces = [segment_pieces(segment_key(s.chunk_fingerprint, anchor, tokens[a:b], namespace), b - a,
                                    s.chunk_tokens) for a, b in req.segments]
        if not req.store:
            self.stats.blend_requests += 1

    def _blend_tokens(self, st: _Req, num_computed_tokens: int) -> int:
        """Tokens of the blend region beyond ``num_computed_tokens`` when every segment is stored."""
        b = st.blend
        assert b is not None
        if num_computed_tokens >= b.region_end or self._agent is None:
            return 0
        keys = [k for seg in st.pieces for k, _ in seg]
        try:
            present, _ = self._agent.lookup_prefix(keys)
        except PdxError as exc:
            self.stats.lookup_errors += 1
            log.warning("request %s: segment lookup failed (%s); computing exactly", st.req_id, exc)
            return 0
        if present < len(keys):
            self.stats.blend_misses += 1
            log.info("request %s: %d of %d segment pieces stored; not blending, computing exactly",
                     st.req_id, present, len(keys))
            return 0
        if not st.blended:
            st.blended = True
            st.resalt = blend_cache_salt(st.req_id, st.salt)
        n = b.region_end - num_computed_tokens
        st.blend_match = (num_computed_tokens, n)
        return n

    def take_resalt(self, req_id: str) -> str:
        """The ``cache_salt`` a just-blended request must get now (once), or ``""``.

        The connector sets it on vLLM's request and re-hashes its blocks before vLLM allocates
        them: vLLM's prefix cache then never hands a block of this request to another one."""
        st = self._reqs.get(req_id)
        if st is None or not st.resalt:
            return ""
        salt, st.resalt = st.resalt, ""
        return salt

    def cancel_blend(self, req_id: str) -> None:
        """The connector could not give the request its own salt: never blend it."""
        st = self._reqs.get(req_id)
        if st is not None:
            st.blend = None
            st.blend_match = None

    def _blend_load(self, st: _Req, start: int, end: int) -> BlendLoad:
        b = st.blend
        assert b is not None
        segs = tuple(BlendSegment(start=a, end=e, base=b.anchor, pieces=tuple(p))
                     for (a, e), p in zip(b.segments, st.pieces))
        o = b.options
        return BlendLoad(token_ids=tuple(st.tokens[:b.region_end]), start=start, end=end, segments=segs,
                         recompute_ratio=o.recompute_ratio, check_layer=o.check_layer, policy=o.policy.value,
                         seed=o.seed)

    def _remote_tokens(self, st: _Req, remote: RemotePrefill) -> int:
        """Leading prompt tokens the prefill side offers that this engine can use (at most
        ``max_load``), or 0 with a log line."""
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
        n = min(remote.num_tokens // s.chunk_tokens, len(st.keys))
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
        tokens = n * s.chunk_tokens
        tail = remote.num_tokens % s.chunk_tokens
        if tail and n == len(st.keys) and tail == st.tail_tokens and (not remote.keys or remote.keys[-1] == st.tail):
            tokens += tail
        return min(tokens, st.max_load)

    def _local_chunks(self, st: _Req) -> tuple[int, int, bool]:
        """(leading chunks in the local store, leading chunks of those in L1, the agent answered)."""
        if self._agent is None:
            return 0, 0, False
        if not st.keys:
            return 0, 0, True
        self.stats.lookups += 1
        try:
            present, in_l1 = self._agent.lookup_prefix(st.keys)
            present = max(0, min(len(st.keys), present))
            return present, min(present, in_l1), True
        except PdxError as exc:
            self.stats.lookup_errors += 1
            now = time.monotonic()
            if now - self._last_agent_warning > 10.0:
                self._last_agent_warning = now
                log.warning("pdx agent lookup failed (treated as a miss): %s", exc)
            return 0, 0, False

    def pending_peer(self, req_id: str) -> str:
        """The peer the last match of ``req_id`` would load from ("" = the local store)."""
        st = self._reqs.get(req_id)
        return st.match[2] if st is not None and st.match is not None else ""

    # --- vLLM: update_state_after_alloc --------------------------------------------------------

    def after_alloc(self, request: RequestLike, block_ids: Sequence[int], num_external_tokens: int) -> None:
        """Remember the request's blocks; plan the load vLLM accepted (``num_external_tokens``)."""
        st = self._state(request)
        st.block_ids = list(block_ids)
        if st.blend_match is not None:
            start, offered = st.blend_match
            st.blend_match, st.match = None, None
            if num_external_tokens > 0:
                end = start + min(num_external_tokens, offered)
                self._pending_loads.append(LoadSpec(req_id=st.req_id, block_ids=tuple(st.block_ids), chunks=(),
                                                    sync=True, blend=self._blend_load(st, start, end)))
                self.stats.blend_offers += 1
                self.stats.blend_tokens += end - start
            return
        match, st.match = st.match, None
        load_tail, st.load_tail = st.load_tail, None
        if num_external_tokens <= 0 or match is None:
            self._init_store(st, 0)
            return
        start, offered, peer, sync = match
        end = start + num_external_tokens
        if num_external_tokens != offered:
            log.debug("request %s: vLLM accepted %d of %d offered tokens", st.req_id,
                      num_external_tokens, offered)
        ct = self.settings.chunk_tokens
        remote = st.params.remote
        if load_tail is None and st.tail is not None and peer and remote is not None:
            load_tail = (len(st.keys), st.tail_tokens, st.tail)  # P/D: the prefill side's tail
        chunks = []
        full_loaded = 0  # chunks loaded whole or in part from a full chunk (stored already)
        for i in range(start // ct, -(-end // ct)):
            lo, hi = max(start, i * ct), min(end, (i + 1) * ct)
            if hi <= lo:
                continue
            if load_tail is not None and i == load_tail[0] and hi <= i * ct + load_tail[1]:
                # matched_tokens offered this tail (a reuse hit's, or the prefill side's)
                chunks.append(ChunkLoad(index=i, key=load_tail[2], start=lo, end=hi, num_tokens=load_tail[1]))
            elif i < len(st.keys) and (load_tail is None or i < load_tail[0]):
                chunks.append(ChunkLoad(index=i, key=st.keys[i], start=lo, end=hi))
                full_loaded = i + 1
            else:  # vLLM accepted more than was offered: never load what no chunk holds
                log.warning("request %s: no chunk holds tokens [%d, %d); loading up to %d", st.req_id, lo, hi, lo)
                end = lo
                break
        from_hint = bool(peer) and remote is None
        spec = LoadSpec(req_id=st.req_id, block_ids=tuple(st.block_ids), chunks=tuple(chunks),
                        peer=peer, remote_request_id=remote.request_id if (peer and remote) else "",
                        sync=sync, hint=from_hint)
        if chunks and chunks[-1].num_tokens and chunks[-1].key == st.tail:
            st.tail_stored = True  # the load commits it to the local store
        if from_hint:
            st.hint_used = True
            self.stats.hint_tokens += end - start
        elif peer:
            st.remote_used = True
            self.stats.remote_tokens += end - start
        else:
            self.stats.hit_tokens += end - start
        self._pending_loads.append(spec)
        # Everything loaded will be in the local store afterwards (a fetch commits there). A chunk
        # loaded from a tail is not: this request stores it whole once its forward completes it.
        self._init_store(st, full_loaded)

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
        if st.blended:
            return  # approximate KV (and all computed on top of it) is never stored
        ct = self.settings.chunk_tokens
        last = min(len(st.keys), computed_after_step // ct)
        chunks = [ChunkStore(index=i, key=st.keys[i]) for i in range(st.store_next, last)]
        end = last * ct
        b = st.blend
        if b is not None and b.store and not st.segment_stored and computed_after_step >= b.region_end:
            # A storing request: its segment's exact KV, right after its anchor, under the segment's keys.
            at = b.segments[0][0]
            for i, (key, n) in enumerate(st.pieces[0]):
                chunks.append(ChunkStore(index=-1 - i, key=ChunkKey(key), num_tokens=n, start=at))
                at += n
            st.segment_stored = True
            self.stats.segment_pieces_planned += len(st.pieces[0])
            end = max(end, b.region_end)
        # Every storing request also leaves its tail (for its decode side, for reuse), once every
        # full chunk is stored.
        tail = (st.tail is not None and not st.tail_stored
                and max(last, st.store_next) >= len(st.keys) and computed_after_step >= st.max_load)
        if tail:
            assert st.tail is not None
            chunks.append(ChunkStore(index=len(st.keys), key=st.tail, num_tokens=st.tail_tokens))
            end = st.max_load
        if not chunks:
            return
        need_blocks = -(-end // self.settings.block_size)
        if len(st.block_ids) < need_blocks:  # should not happen; never pack from unknown blocks
            log.warning("request %s: %d blocks known, %d needed to store tokens up to %d; not storing",
                        st.req_id, len(st.block_ids), need_blocks, end)
            return
        push = st.params.push if st.params.remote_decode and self.settings.layerwise else ""
        plan.stores.append(StoreSpec(req_id=st.req_id, block_ids=tuple(st.block_ids), chunks=tuple(chunks),
                                     push=push))
        self.stats.stored_chunks_planned += len(chunks)
        st.store_next = max(st.store_next, last)
        st.tail_stored = st.tail_stored or tail

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
        if st.tail is not None and st.tail_stored and len(keys) == len(st.keys):
            keys = [*keys, st.tail]
        if keys and self._agent is not None:
            try:
                n = self._agent.pin_prefix(keys, owner=f"pd:{st.req_id}", lease_s=s.lease_s)
                self.stats.pins += 1
            except PdxError as exc:
                self.stats.pin_errors += 1
                log.warning("request %s: could not pin its chunks for the decode side (%s); "
                            "decode will recompute", st.req_id, exc)
                n = 0
        tokens = min(n, len(st.keys)) * s.chunk_tokens + (st.tail_tokens if n > len(st.keys) else 0)
        remote = RemotePrefill(agent=s.peer_address, fingerprint=s.chunk_fingerprint,
                               chunk_tokens=s.chunk_tokens, num_tokens=tokens,
                               keys=tuple(keys[:n]), namespace=s.namespace, request_id=st.req_id,
                               lease_s=s.lease_s)
        return False, response_params(remote)

    def num_live_requests(self) -> int:
        return len(self._reqs)
