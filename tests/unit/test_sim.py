"""``pdx sim`` on hand-made traces: its hit accounting against the oracle, tiers, eviction, policies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdx.config import CacheAwareConfig
from pdx.sim.cli import main
from pdx.sim.cost import cost_model
from pdx.sim.engine import SimConfig, Simulation
from pdx.sim.fleet import DISK, L1, SHARED, LRUTier, SimStore
from pdx.trace import TraceRequest, TraceSpec, generate, write_trace

BLOCK = 10
# one byte of KV per token: a block is 10 bytes, so capacities below count blocks x 10
COST = cost_model("gpu-8b", kv_bytes_per_token=1)
NO_SKIP = CacheAwareConfig(skip_prefill=False)


def _req(t_s: float, ids: tuple[int, ...], length: int | None = None) -> TraceRequest:
    return TraceRequest(t_s * 1000.0, length if length is not None else BLOCK * len(ids), 4, ids)


def _sim(trace: list[TraceRequest], **kw: object) -> object:
    cfg = SimConfig(block_tokens=BLOCK, **{"prefill": 1, "decode": 1, "settings": NO_SKIP, **kw})  # type: ignore[arg-type]
    return Simulation(cfg, COST).run(trace)


def test_one_worker_with_room_reaches_the_oracle() -> None:
    trace = [_req(0, (1, 2, 3)), _req(10, (1, 2, 3)), _req(20, (1, 2, 9, 4)), _req(30, (7,), 5)]
    r = _sim(trace, l1_bytes=1000)
    assert r.oracle_tokens == 30 + 20  # the repeat, then the shared two blocks; a partial block never counts
    assert r.hit_tokens == r.oracle_tokens
    assert r.tier_tokens[L1] == 50 and r.tier_tokens["computed"] == 30 + 20 + 5
    assert r.hit_ratio == pytest.approx(50 / 105) and r.oracle_hit_ratio == r.hit_ratio
    assert len(r.ttft_s) == 4 and all(t > 0 for t in r.ttft_s)


def test_a_repeat_on_another_worker_misses_where_the_oracle_hits() -> None:
    trace = [_req(0, (1, 2, 3)), _req(10, (1, 2, 3))]
    rr = _sim(trace, prefill=2, policy="round_robin", l1_bytes=1000)
    assert rr.oracle_tokens == 30 and rr.hit_tokens == 0
    ca = _sim(trace, prefill=2, policy="cache_aware", l1_bytes=1000)
    assert ca.hit_tokens == 30  # the proxy's hints sent it back to the worker that holds it


def test_eviction_and_the_tiers_below() -> None:
    trace = [_req(0, (1, 2)), _req(10, (3, 4)), _req(20, (1, 2))]
    # two blocks: the second request evicts the first, the third the second
    small = _sim(trace, l1_bytes=20, decode_l1=False)
    assert small.oracle_tokens == 20 and small.hit_tokens == 0 and small.evictions == 4
    assert small.reasons["cache_hit"] == 1  # the proxy's hints still said so: routing is a guess
    disk = _sim(trace, l1_bytes=20, disk_bytes=40)
    assert disk.hit_tokens == 20 and disk.tier_tokens[DISK] == 20
    shared = _sim(trace, l1_bytes=20, shared_bytes=40)
    assert shared.hit_tokens == 20 and shared.tier_tokens[SHARED] == 20


def test_skip_prefill_counts_decode_hits() -> None:
    trace = [_req(0, (1, 2, 3)), _req(10, (1, 2, 3))]
    r = _sim(trace, l1_bytes=1000, settings=CacheAwareConfig())
    assert r.reasons.get("skip_prefill") == 1
    assert r.tier_tokens["decode_local"] == 30 and r.hit_tokens == 30


def test_store_uses_the_real_eviction_policy() -> None:
    store = SimStore(2, "lru")
    store.commit([b"a", b"b"])
    store.commit([b"a"], [L1])  # read: a is now the most recent
    store.commit([b"c"])
    assert store.lookup([b"a"]) == [L1] and store.lookup([b"b"]) == []
    assert b"a" in store.summary() and b"c" in store.summary()
    tier = LRUTier(1)
    tier.write(b"x")
    tier.write(b"y")
    assert b"x" not in tier and b"y" in tier


def test_busy_workers_queue() -> None:
    # two long prompts at the same moment on one prefill worker: the second waits for the first
    trace = [_req(0, tuple(range(1, 400))), _req(0, tuple(range(1000, 1400)))]
    r = _sim(trace, l1_bytes=10**6)
    assert r.queue_s[0] == 0 and r.queue_s[1] > 0
    assert r.prefill_imbalance == pytest.approx(1.0)


def test_cli_runs_every_policy_and_writes_bench_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.jsonl"
    write_trace(trace, generate(TraceSpec(requests=300, rate=20, seed=2)))
    out = tmp_path / "sim.json"
    assert main([str(trace), "--prefill", "4", "--decode", "4", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for name in ("round_robin", "least_loaded", "cache_aware", "prefix_affinity"):
        assert name in text
    rows = {r["name"]: r for r in json.loads(out.read_text())["results"]}
    hit = rows["sim_hit_ratio@prefix_affinity"]
    assert hit["baseline_name"] == "oracle_hit_ratio" and 0 < hit["value"] <= hit["baseline"] + 1e-9
    assert rows["sim_load_imbalance@round_robin"]["value"] >= 1.0


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 1, "input_length": 5}\n')
    assert main([str(bad)]) == 2
    assert "bad.jsonl:1: field 'output_length' is missing" in capsys.readouterr().err
    good = tmp_path / "g.jsonl"
    write_trace(good, generate(TraceSpec(requests=5)))
    assert main([str(good), "--policy", "nope"]) == 2
    assert "round_robin" in capsys.readouterr().err  # the known names are listed


def test_generate_subcommand(tmp_path: Path) -> None:
    out = tmp_path / "g.jsonl"
    assert main(["generate", str(out), "--requests", "20", "--turns", "2"]) == 0
    assert len(out.read_text().splitlines()) == 20
