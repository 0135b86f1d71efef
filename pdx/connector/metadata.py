"""What the scheduler half hands the worker half each step (vLLM's connector metadata).

``PdxSchedulerSide.build_step`` returns one ``StepPlan`` per engine step; vLLM
ships it to every worker (pickled by its executor) and the worker half executes
it: ``loads`` start in ``start_load_kv`` and finish in the background,
``stores`` run in ``wait_for_save`` after the step's forward pass wrote the KV.

Pure data: ints, strings and bytes only, no tensors, no vLLM types, so it is
cheap to pickle and easy to build in tests.

Token positions are absolute positions in the request's token sequence; the
blocks that hold them are ``block_ids[pos // block_size]`` at offset
``pos % block_size``. Chunk ``i`` covers ``[i * chunk_tokens, (i + 1) * chunk_tokens)``; a tail
chunk covers the first ``num_tokens`` of that range.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdx.keys import ChunkKey


@dataclass(frozen=True)
class ChunkLoad:
    """Load chunk ``index`` (key ``key``) and write tokens ``[start, end)`` of it.

    ``start``/``end`` are absolute token positions inside the chunk's range; the
    range is shorter than the chunk when vLLM's own prefix cache already holds the
    chunk's first tokens. ``num_tokens`` is what the chunk holds: 0 for a full
    chunk, else a tail chunk of that many tokens (``pdx.keys.tail_key``).
    """

    index: int
    key: ChunkKey
    start: int
    end: int
    num_tokens: int = 0


@dataclass(frozen=True)
class LoadSpec:
    """Load the KV of one request's leading chunks into its blocks, asynchronously.

    ``peer`` empty: the chunks are in the local agent's store (a reuse hit);
    otherwise the local agent first fetches them from the agent at ``peer``
    (P/D). An asynchronous load is reported through ``get_finished`` when done;
    a ``sync`` one is done before the step's forward pass. Either way the blocks
    of every chunk that could not be loaded go to ``get_block_ids_with_load_errors``
    (so vLLM recomputes them).
    """

    req_id: str
    block_ids: tuple[int, ...]
    chunks: tuple[ChunkLoad, ...]
    peer: str = ""
    remote_request_id: str = ""
    #: load inline, before this step's forward pass, and report nothing through
    #: ``get_finished`` (vLLM scheduled the request already): an L1 hit
    sync: bool = False
    #: ``peer`` comes from the proxy's hint (peer-to-peer reuse), not from a P/D prefill: chunks
    #: the peer does not deliver are then looked for in the local store's tiers before recompute
    hint: bool = False
    #: a CacheBlend load (``chunks`` is empty): assemble + blend, write ``[blend.start, blend.end)``
    blend: BlendLoad | None = None

    @property
    def num_tokens(self) -> int:
        return sum(c.end - c.start for c in self.chunks)


@dataclass(frozen=True)
class BlendSegment:
    """A cached segment of a blend load: prompt tokens ``[start, end)``, whose KV was computed at
    positions ``base, base+1, ...`` and is stored as ``pieces`` (``(key, tokens)`` in order)."""

    start: int
    end: int
    base: int
    pieces: tuple[tuple[bytes, int], ...]


@dataclass(frozen=True)
class BlendLoad:
    """What the worker needs to blend a request's region (``pdx.connector.blend``).

    ``token_ids`` are the prompt's tokens ``[0, region_end)``; tokens ``[0, start)`` are already in
    the request's blocks (vLLM's own prefix cache: exact); the pass produces ``[start, end)``.
    Tokens of the region outside every segment (the rest of the anchor, gaps) have no cached KV
    and are computed by the pass. Options as ``BlendOptions`` (policy by name).
    """

    token_ids: tuple[int, ...]
    start: int
    end: int
    segments: tuple[BlendSegment, ...]
    recompute_ratio: float
    check_layer: int
    policy: str
    seed: int = 0


@dataclass(frozen=True)
class ChunkStore:
    """Pack chunk ``index``: tokens ``[index*chunk_tokens, (index+1)*chunk_tokens)``, or only
    the first ``num_tokens`` of them for a tail chunk (0 = a full chunk).

    ``start >= 0``: the tokens are ``[start, start + num_tokens)`` instead (a CacheBlend segment
    piece, stored under its own key; ``index`` is then only a label).
    """

    index: int
    key: ChunkKey
    num_tokens: int = 0
    start: int = -1


@dataclass(frozen=True)
class StoreSpec:
    """Pack and commit chunks of one request whose KV this step's forward completed.

    ``block_ids`` is the request's whole block table (group 0) as of this step.
    """

    req_id: str
    block_ids: tuple[int, ...]
    chunks: tuple[ChunkStore, ...]
    #: layer-wise P/D: the decode agent (peer address) each layer is streamed to as it is computed
    push: str = ""


@dataclass
class StepPlan:
    """Everything the worker half does in one engine step."""

    chunk_tokens: int
    block_size: int
    loads: list[LoadSpec] = field(default_factory=list)
    stores: list[StoreSpec] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not self.loads and not self.stores


def token_spans(block_ids: tuple[int, ...] | list[int], block_size: int, start: int,
                end: int) -> list[tuple[int, int, int]]:
    """Tokens ``[start, end)`` as ``(block_id, first_slot, num_tokens)`` runs, in order.

    Raises ``IndexError`` if the range needs a block the table does not have.
    """
    out: list[tuple[int, int, int]] = []
    pos = start
    while pos < end:
        b, off = divmod(pos, block_size)
        if b >= len(block_ids):
            raise IndexError(f"token {pos} needs block #{b}, the request has {len(block_ids)}")
        n = min(block_size - off, end - pos)
        out.append((block_ids[b], off, n))
        pos += n
    return out


def blocks_of(block_ids: tuple[int, ...] | list[int], block_size: int, start: int,
              end: int) -> set[int]:
    """Block ids holding any token of ``[start, end)`` (those that exist)."""
    if end <= start:
        return set()
    first, last = start // block_size, (end - 1) // block_size
    return {block_ids[b] for b in range(first, min(last + 1, len(block_ids)))}
