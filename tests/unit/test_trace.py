"""The trace format (errors name the line and the field), the generator, the hash id -> tokens
map (deterministic, prefix-preserving) and the oracle on hand-made cases."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pdx.trace import (
    Oracle,
    TokenMap,
    TraceError,
    TraceRequest,
    TraceSpec,
    generate,
    oracle_hit_ratio,
    read_trace,
    write_trace,
)

GOOD = {"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, 48]}


def _write(tmp_path: Path, lines: list[str]) -> Path:
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_reads_the_mooncake_format(tmp_path: Path) -> None:
    p = _write(tmp_path, [json.dumps(GOOD), "", json.dumps({**GOOD, "timestamp": 27500.5, "extra": 1})])
    reqs = read_trace(p)
    assert reqs == [TraceRequest(27482.0, 6955, 52, (46, 47, 48)), TraceRequest(27500.5, 6955, 52, (46, 47, 48))]


def test_write_then_read_round_trips(tmp_path: Path) -> None:
    reqs = generate(TraceSpec(requests=50, seed=3))
    write_trace(tmp_path / "g.jsonl", reqs)
    assert read_trace(tmp_path / "g.jsonl") == reqs


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", r"t.jsonl:2: not valid JSON"),
    ("[1, 2]", r"t.jsonl:2: expected a JSON object"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "hash_ids"}), r"t.jsonl:2: field 'hash_ids' is missing"),
    (json.dumps({**GOOD, "input_length": -1}), r"t.jsonl:2: field 'input_length': expected a non-negative"),
    (json.dumps({**GOOD, "output_length": "52"}), r"t.jsonl:2: field 'output_length'"),
    (json.dumps({**GOOD, "timestamp": True}), r"t.jsonl:2: field 'timestamp'"),
    (json.dumps({**GOOD, "hash_ids": "46,47"}), r"t.jsonl:2: field 'hash_ids': expected a list"),
    (json.dumps({**GOOD, "hash_ids": [1, 2.5]}), r"t.jsonl:2: field 'hash_ids'\[1\]"),
    (json.dumps({**GOOD, "input_length": 0}), r"t.jsonl:2: field 'input_length'"),
    (json.dumps({**GOOD, "timestamp": 100}), r"t.jsonl:2: field 'timestamp': 100 is before"),
])
def test_errors_name_line_and_field(tmp_path: Path, line: str, message: str) -> None:
    p = _write(tmp_path, [json.dumps(GOOD), line])
    with pytest.raises(TraceError, match=message):
        read_trace(p)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot open"):
        read_trace(tmp_path / "absent.jsonl")
    with pytest.raises(TraceError, match="no requests"):
        read_trace(_write(tmp_path, [""]))


def test_token_map_is_deterministic_and_keeps_prefixes() -> None:
    a = TokenMap(128, vocab=1000)
    b = TokenMap(128, vocab=1000)
    assert a.block(7).tolist() == b.block(7).tolist()
    assert a.block(7).tolist() != a.block(8).tolist()
    p1 = a.prompt([1, 2, 3], 300, salt=1)
    p2 = a.prompt([1, 2, 4], 330, salt=2)
    assert len(p1) == 300 and len(p2) == 330
    assert p1[:256] == p2[:256] and p1[256:300] != p2[256:300]
    assert all(16 <= t < 1000 for t in p1 + p2)
    # past the last hash id the tokens are the request's own
    assert a.prompt([1], 200, salt=1)[128:] != a.prompt([1], 200, salt=2)[128:]
    assert TokenMap(128, vocab=1000, seed=1).block(7).tolist() != a.block(7).tolist()


def test_token_map_is_the_same_in_another_process() -> None:
    code = "from pdx.trace import TokenMap; print(TokenMap(64, 32000).prompt([5, 9], 100, salt=3))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={"PYTHONHASHSEED": "123", **_env()}, check=True).stdout
    assert json.loads(out) == TokenMap(64, 32000).prompt([5, 9], 100, salt=3)


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}


def test_oracle_on_hand_made_cases() -> None:
    o = Oracle(block_tokens=10)
    assert o.see(TraceRequest(0, 35, 1, (1, 2, 3, 4))) == 0  # first sight: nothing
    assert o.see(TraceRequest(1, 35, 1, (1, 2, 3, 4))) == 30  # 3 whole blocks; the 4th is partial
    assert o.see(TraceRequest(2, 40, 1, (1, 2, 9, 4))) == 20  # stops at the first new block
    assert o.see(TraceRequest(3, 20, 1, (9, 4))) == 0  # same ids after another prefix: other KV
    assert o.see(TraceRequest(4, 40, 1, (1, 2, 9, 4))) == 40
    assert o.hit_tokens == 90 and o.total_tokens == 170
    assert o.hit_ratio == pytest.approx(90 / 170)


def test_generator_multi_turn_sessions_share_their_history() -> None:
    spec = TraceSpec(requests=400, rate=5, turns=4, think_s=5, seed=1)
    reqs = generate(spec)
    assert len(reqs) == 400 and reqs == generate(spec)
    assert all(a.timestamp <= b.timestamp for a, b in itertools.pairwise(reqs))
    assert all(len(r.hash_ids) == -(-r.input_length // spec.block_tokens) for r in reqs)
    single = generate(TraceSpec(requests=400, rate=5, turns=1, doc_share=0, seed=1))
    assert oracle_hit_ratio(reqs) > oracle_hit_ratio(single)  # history reuse comes on top of prompts
    # later turns extend an earlier request's whole blocks (their session's previous turn)
    earlier: set[tuple[int, ...]] = set()
    extended = 0
    for r in reqs:
        full = r.hash_ids[: r.input_length // spec.block_tokens]
        extended += any(full[:k] in earlier for k in range(4, len(full)))
        earlier.add(full)
    assert extended > 40


def test_generator_rejects_bad_knobs() -> None:
    from pdx.errors import PdxError

    with pytest.raises(PdxError, match="turns"):
        generate(TraceSpec(turns=0.5))
