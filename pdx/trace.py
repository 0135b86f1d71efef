"""Request traces: the JSON-lines format of Mooncake's published traces, a generator, and the map
from hash ids to token ids.

One request per line::

    {"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, 48]}

* ``timestamp``: arrival time in milliseconds (non-decreasing down the file);
* ``input_length`` / ``output_length``: prompt and output token counts;
* ``hash_ids``: one id per ``block_tokens``-token block of the prompt (512 in Mooncake's
  traces). Two requests share a prefix exactly as far as their ``hash_ids`` agree.

Who uses it: ``pdx sim`` (``pdx.sim``) simulates a fleet over a trace, ``pdx-bench replay``
(``bench/replay.py``) sends one to a running deployment. ``read_trace`` raises ``TraceError``
naming the line and the field; ``generate`` writes synthetic traces (no trace is shipped
or downloaded); ``TokenMap`` turns hash ids into token ids deterministically; ``Oracle``
is the best any cache could do (infinite, shared by every worker).

Pure Python plus numpy; no I/O beyond the files named by the caller.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pdx.errors import PdxError

#: tokens per hash id in Mooncake's traces
DEFAULT_BLOCK_TOKENS = 512
#: longest line accepted (a 1M-token prompt in 512-token blocks is ~16 KiB of ids)
MAX_LINE_BYTES = 1 << 20
FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")


class TraceError(PdxError):
    """A trace file is malformed: the message names the file, the line and the field."""


@dataclass(frozen=True)
class TraceRequest:
    """One line of a trace."""

    timestamp: float  # arrival, ms
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]

    def full_blocks(self, block_tokens: int) -> int:
        """Blocks of the prompt that are whole (only those can be reused: partial ones differ)."""
        return min(len(self.hash_ids), self.input_length // block_tokens)

    def to_dict(self) -> dict[str, Any]:
        ts: float | int = int(self.timestamp) if float(self.timestamp).is_integer() else self.timestamp
        return {"timestamp": ts, "input_length": self.input_length,
                "output_length": self.output_length, "hash_ids": list(self.hash_ids)}


# --- reading and writing ---------------------------------------------------------------------


def _int_field(obj: dict[str, Any], name: str, where: str) -> int:
    value = obj.get(name)
    if value is None:
        raise TraceError(f"{where}: field {name!r} is missing")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TraceError(f"{where}: field {name!r}: expected a non-negative integer, got {value!r}")
    return value


def parse_line(text: str, where: str) -> TraceRequest:
    """One request from one line; ``where`` (``file:line``) prefixes every error."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise TraceError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    ts = obj.get("timestamp")
    if ts is None:
        raise TraceError(f"{where}: field 'timestamp' is missing")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts) or ts < 0:
        raise TraceError(f"{where}: field 'timestamp': expected a non-negative number of ms, got {ts!r}")
    input_length = _int_field(obj, "input_length", where)
    output_length = _int_field(obj, "output_length", where)
    ids = obj.get("hash_ids")
    if ids is None:
        raise TraceError(f"{where}: field 'hash_ids' is missing")
    if not isinstance(ids, list):
        raise TraceError(f"{where}: field 'hash_ids': expected a list of integers, got {type(ids).__name__}")
    for i, h in enumerate(ids):
        if isinstance(h, bool) or not isinstance(h, int) or h < 0:
            raise TraceError(f"{where}: field 'hash_ids'[{i}]: expected a non-negative integer, got {h!r}")
    if input_length == 0:
        raise TraceError(f"{where}: field 'input_length': a request needs at least one prompt token")
    return TraceRequest(float(ts), input_length, output_length, tuple(ids))


def iter_trace(path: str | Path) -> Iterator[TraceRequest]:
    """Requests of ``path`` in order; blank lines are skipped. Raises ``TraceError``."""
    p = Path(path)
    try:
        f = p.open("rb")
    except OSError as exc:
        raise TraceError(f"{p}: cannot open: {exc.strerror}") from None
    last = 0.0
    with f:
        for lineno, raw in enumerate(f, 1):
            where = f"{p.name}:{lineno}"
            if len(raw) > MAX_LINE_BYTES:
                raise TraceError(f"{where}: line longer than {MAX_LINE_BYTES} bytes")
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise TraceError(f"{where}: not UTF-8") from None
            if not text:
                continue
            req = parse_line(text, where)
            if req.timestamp < last:
                raise TraceError(f"{where}: field 'timestamp': {req.timestamp:g} is before the previous "
                                 f"line's {last:g} (a trace is in arrival order)")
            last = req.timestamp
            yield req


def read_trace(path: str | Path, limit: int | None = None) -> list[TraceRequest]:
    """The first ``limit`` (default all) requests of ``path``; raises ``TraceError``."""
    out: list[TraceRequest] = []
    for req in iter_trace(path):
        if limit is not None and len(out) >= limit:
            break
        out.append(req)
    if not out:
        raise TraceError(f"{Path(path).name}: no requests")
    return out


def write_trace(path: str | Path, requests: Iterable[TraceRequest]) -> int:
    """Write ``requests`` as JSON lines; returns how many."""
    n = 0
    with Path(path).open("w") as f:
        for req in requests:
            f.write(json.dumps(req.to_dict(), separators=(", ", ": ")) + "\n")
            n += 1
    return n


# --- the best possible cache -----------------------------------------------------------------


class Oracle:
    """An infinite cache shared by every worker: a block is a hit if the same prefix of blocks
    (the same ``hash_ids`` up to and including it) was in any earlier request.

    Keys are whole prefixes, not single ids, so a trace that reuses an id after another prefix
    is not over-counted. Feed requests in arrival order.
    """

    def __init__(self, block_tokens: int = DEFAULT_BLOCK_TOKENS) -> None:
        self.block_tokens = block_tokens
        self._seen: set[int] = set()
        self.hit_tokens = 0
        self.total_tokens = 0

    def prefix_keys(self, req: TraceRequest) -> list[int]:
        """One integer per whole block: a hash of the ids up to it (what a chunk key is to tokens)."""
        keys, h = [], 0
        for hid in req.hash_ids[: req.full_blocks(self.block_tokens)]:
            h = hash((h, hid))
            keys.append(h)
        return keys

    def see(self, req: TraceRequest) -> int:
        """Tokens of ``req`` the infinite cache holds; then it holds all of ``req``'s blocks."""
        keys = self.prefix_keys(req)
        hits = 0
        for k in keys:
            if k not in self._seen:
                break
            hits += 1
        self._seen.update(keys)
        tokens = hits * self.block_tokens
        self.hit_tokens += tokens
        self.total_tokens += req.input_length
        return tokens

    @property
    def hit_ratio(self) -> float:
        return self.hit_tokens / self.total_tokens if self.total_tokens else 0.0


def oracle_hit_ratio(requests: Iterable[TraceRequest], block_tokens: int = DEFAULT_BLOCK_TOKENS) -> float:
    o = Oracle(block_tokens)
    for r in requests:
        o.see(r)
    return o.hit_ratio


# --- hash ids -> token ids -------------------------------------------------------------------

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise (uint64 arithmetic wraps, as intended)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


class TokenMap:
    """Deterministic token ids for a trace's blocks: the same hash id always gives the same
    tokens (in every process, on every machine: plain integer arithmetic, no RNG state), so
    requests that share ``hash_ids`` share their token prefix.

    ``block_tokens`` is the block length after scaling (a trace's 512 scaled by 1/4 is 128).
    Token ids lie in ``[low, vocab)`` so special tokens (the lowest ids) never appear.
    Tokens past the last hash id, if any, are unique to the request (``salt``).
    """

    def __init__(self, block_tokens: int, vocab: int, *, low: int = 16, seed: int = 0) -> None:
        if block_tokens <= 0:
            raise ValueError(f"block_tokens must be positive, got {block_tokens}")
        if vocab - low < 2:
            raise ValueError(f"vocab {vocab} leaves no room above the {low} reserved ids")
        self.block_tokens = block_tokens
        self.vocab = vocab
        self.low = low
        self.seed = seed

    def _stream(self, ident: int, n: int, domain: int) -> np.ndarray:
        base = np.uint64((self.seed * 0x100000001B3 + domain * 0x1F3 + ident * 0x9E37) & 0xFFFFFFFFFFFFFFFF)
        with np.errstate(over="ignore"):
            x = _mix(base + (np.arange(n, dtype=np.uint64) + np.uint64(1)) * _GOLDEN + np.uint64(ident) * _M1)
        return (x % np.uint64(self.vocab - self.low) + np.uint64(self.low)).astype(np.int64)

    def block(self, hash_id: int) -> np.ndarray:
        """The ``block_tokens`` token ids of ``hash_id``."""
        return self._stream(hash_id, self.block_tokens, 1)

    def prompt(self, hash_ids: Sequence[int], length: int, salt: int = 0) -> list[int]:
        """``length`` token ids: the blocks of ``hash_ids`` in order, cut at ``length``, then
        tokens unique to ``salt`` if the blocks run out."""
        parts: list[np.ndarray] = []
        have = 0
        for hid in hash_ids:
            if have >= length:
                break
            parts.append(self.block(hid))
            have += self.block_tokens
        if have < length:
            parts.append(self._stream(salt, length - have, 2))
        out = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return [int(t) for t in out[:length]]


# --- the generator ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceSpec:
    """Knobs of ``generate``. Lengths are means of exponential-ish (geometric) distributions,
    clipped to ``[min_tokens, max_input_tokens]``; sessions arrive as a Poisson process."""

    requests: int = 1000
    rate: float = 10.0  # requests per second, all sessions together
    block_tokens: int = DEFAULT_BLOCK_TOKENS
    system_prompts: int = 8  # shared system prompts (Zipf-popular)
    system_prompt_tokens: int = 1536
    documents: int = 200  # shared documents; a session starts with one with probability doc_share
    document_tokens: int = 3072
    doc_share: float = 0.5
    turns: float = 4.0  # mean turns per session (geometric); 1 = single-shot requests
    user_tokens: int = 256  # new user text per turn
    output_tokens: int = 192  # mean output_length; earlier outputs join the next turn's prompt
    think_s: float = 20.0  # mean time between a session's turns
    max_input_tokens: int = 32768
    zipf: float = 1.1  # popularity skew of system prompts and documents
    seed: int = 0

    def validate(self) -> None:
        if self.requests <= 0 or self.rate <= 0 or self.block_tokens <= 0:
            raise PdxError("requests, rate and block_tokens must be positive")
        if self.turns < 1:
            raise PdxError(f"turns: the mean number of turns is at least 1, got {self.turns}")
        if not 0 <= self.doc_share <= 1:
            raise PdxError(f"doc_share: a probability, got {self.doc_share}")
        if self.system_prompts < 1 or self.documents < 0:
            raise PdxError("system_prompts must be at least 1 and documents at least 0")


def _zipf_choice(rng: random.Random, n: int, alpha: float) -> int:
    weights = [1.0 / (i + 1) ** alpha for i in range(n)]
    return rng.choices(range(n), weights)[0]


def _length(rng: random.Random, mean: int, lo: int = 1) -> int:
    return max(lo, int(rng.expovariate(1.0 / mean))) if mean > 0 else 0


class _BlockIds:
    """Interns block contents, keyed by the previous block's id: ids are prefix-unique, as in
    Mooncake's traces (the same text after another prefix is another block of KV)."""

    def __init__(self) -> None:
        self._ids: dict[tuple[int, tuple[tuple[int, int, int], ...]], int] = {}

    def ids(self, segments: Sequence[tuple[int, int]], block: int) -> list[int]:
        """Ids of the blocks of the concatenation of ``segments`` ((segment uid, length), ...)."""
        out: list[int] = []
        prev = -1
        pieces: list[tuple[int, int, int]] = []
        fill = 0
        for uid, length in segments:
            pos = 0
            while pos < length:
                take = min(length - pos, block - fill)
                pieces.append((uid, pos, pos + take))
                pos += take
                fill += take
                if fill == block:
                    prev = self._intern(prev, pieces)
                    out.append(prev)
                    pieces, fill = [], 0
        if pieces:
            out.append(self._intern(prev, pieces))
        return out

    def _intern(self, prev: int, pieces: list[tuple[int, int, int]]) -> int:
        key = (prev, tuple(pieces))
        got = self._ids.get(key)
        if got is None:
            got = self._ids[key] = len(self._ids)
        return got


def generate(spec: TraceSpec) -> list[TraceRequest]:
    """A synthetic trace: sessions (a system prompt, maybe a document, then turns whose history
    grows by each user message and answer) arriving at ``spec.rate`` requests per second."""
    spec.validate()
    rng = random.Random(spec.seed)
    sys_len = [_length(rng, spec.system_prompt_tokens, 64) for _ in range(spec.system_prompts)]
    doc_len = [_length(rng, spec.document_tokens, 256) for _ in range(spec.documents)]
    session_rate = spec.rate / spec.turns
    arrivals: list[tuple[float, int, list[tuple[int, int]], int]] = []  # (ms, order, segments, output)
    uid = 1_000_000  # segment uids: system prompts and documents use small ones
    t = 0.0
    order = 0
    p_more = 1.0 - 1.0 / spec.turns
    while len(arrivals) < spec.requests * 2 and t < 1e12:
        t += rng.expovariate(session_rate)
        segments: list[tuple[int, int]] = [(rng.randrange(spec.system_prompts) if spec.zipf <= 0 else
                                            _zipf_choice(rng, spec.system_prompts, spec.zipf), 0)]
        segments[0] = (segments[0][0], sys_len[segments[0][0]])
        if spec.documents and rng.random() < spec.doc_share:
            d = _zipf_choice(rng, spec.documents, spec.zipf)
            segments.append((10_000 + d, doc_len[d]))
        turn_t = t
        while True:
            uid += 1
            segments.append((uid, _length(rng, spec.user_tokens, 8)))
            total = sum(n for _, n in segments)
            if total > spec.max_input_tokens:
                break
            out_len = _length(rng, spec.output_tokens, 1)
            arrivals.append((turn_t, order, list(segments), out_len))
            order += 1
            if rng.random() >= p_more:
                break
            uid += 1
            segments.append((uid, out_len))  # the answer joins the history
            turn_t += rng.expovariate(1.0 / spec.think_s) if spec.think_s > 0 else 0.0
    arrivals.sort(key=lambda a: (a[0], a[1]))
    blocks = _BlockIds()
    out = []
    for ts, _, segments, out_len in arrivals[: spec.requests]:
        ids = blocks.ids(segments, spec.block_tokens)
        out.append(TraceRequest(round(ts * 1000.0, 3), sum(n for _, n in segments), out_len, tuple(ids)))
    return out


# --- command line ----------------------------------------------------------------------------


def add_generator_arguments(p: argparse.ArgumentParser) -> None:
    """The generator's knobs as options (``pdx sim generate`` and ``python -m pdx.trace``)."""
    d = TraceSpec()
    p.add_argument("out", help="trace file to write (JSON lines)")
    p.add_argument("--requests", type=int, default=d.requests, help=f"requests (default {d.requests})")
    p.add_argument("--rate", type=float, default=d.rate, help=f"requests per second (default {d.rate})")
    p.add_argument("--block-tokens", type=int, default=d.block_tokens, help="tokens per hash id")
    p.add_argument("--system-prompts", type=int, default=d.system_prompts, help="shared system prompts")
    p.add_argument("--system-prompt-tokens", type=int, default=d.system_prompt_tokens, help="their mean length")
    p.add_argument("--documents", type=int, default=d.documents, help="shared documents")
    p.add_argument("--document-tokens", type=int, default=d.document_tokens, help="their mean length")
    p.add_argument("--doc-share", type=float, default=d.doc_share, help="share of sessions that start with one")
    p.add_argument("--turns", type=float, default=d.turns, help="mean turns per session (1 = single-shot)")
    p.add_argument("--user-tokens", type=int, default=d.user_tokens, help="mean new user tokens per turn")
    p.add_argument("--output-tokens", type=int, default=d.output_tokens, help="mean output length")
    p.add_argument("--think-s", type=float, default=d.think_s, help="mean seconds between a session's turns")
    p.add_argument("--max-input-tokens", type=int, default=d.max_input_tokens, help="longest prompt")
    p.add_argument("--zipf", type=float, default=d.zipf, help="popularity skew of prompts and documents")
    p.add_argument("--seed", type=int, default=d.seed)


def spec_from_args(args: argparse.Namespace) -> TraceSpec:
    return TraceSpec(
        requests=args.requests, rate=args.rate, block_tokens=args.block_tokens,
        system_prompts=args.system_prompts, system_prompt_tokens=args.system_prompt_tokens,
        documents=args.documents, document_tokens=args.document_tokens, doc_share=args.doc_share,
        turns=args.turns, user_tokens=args.user_tokens, output_tokens=args.output_tokens,
        think_s=args.think_s, max_input_tokens=args.max_input_tokens, zipf=args.zipf, seed=args.seed)


def generate_main(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    reqs = generate(spec)
    write_trace(args.out, reqs)
    span = (reqs[-1].timestamp - reqs[0].timestamp) / 1000.0
    mean_in = sum(r.input_length for r in reqs) / len(reqs)
    print(f"wrote {len(reqs)} requests to {args.out}: {span:.0f} s, mean prompt {mean_in:.0f} tokens, "
          f"oracle hit ratio {oracle_hit_ratio(reqs, spec.block_tokens):.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pdx.trace", description="write a synthetic trace")
    add_generator_arguments(p)
    try:
        return generate_main(p.parse_args(argv))
    except PdxError as exc:
        print(f"pdx.trace: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
