"""``pdx-bench soak``: its schedule, workload and report logic (no process is started here), and
``pdx up``'s restart of an agent that died (fake workers)."""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path
from typing import Any

import pytest

from bench.soak import (
    ALL_FAULTS,
    Fault,
    Sent,
    Workload,
    corrupt_redis,
    in_flight_at,
    parse_proxy_log,
    pick_sample,
    plan_faults,
    summarize,
    wrong_tokens,
)
from pdx.config import load_config
from pdx.deploy.deployment import DeployConfig, Deployment
from pdx.errors import AgentError


def test_faults_are_spread_between_warmup_and_tail() -> None:
    plan = plan_faults(600, ALL_FAULTS)
    assert [f for _, f in plan] == list(ALL_FAULTS)
    times = [t for t, _ in plan]
    assert times[0] == 60.0 and times[-1] < 600 - 60
    gaps = {round(b - a, 3) for a, b in itertools.pairwise(times)}
    assert gaps == {96.0}  # evenly: (600 - 60 - 60) / 5
    assert plan_faults(60, ["engine_kill"]) == [(6.0, "engine_kill")]
    assert plan_faults(60, []) == []
    with pytest.raises(ValueError):
        plan_faults(0, ALL_FAULTS)


def _sent(i: int, start: float, end: float, ok: bool = True, kind: str = "unique", turn: int = 0,
          tokens: list[int] | None = None, prompt_len: int = 256) -> Sent:
    s = Sent(i, kind, turn, [1] * prompt_len, 0.5, start=start, end=end)
    if ok:
        s.ttft_s = 0.1
        s.tokens = tokens if tokens is not None else [7, 8]
    else:
        s.error = "HTTP 502: upstream gone"
    return s


def test_in_flight_and_wrong_tokens() -> None:
    a, b, c = _sent(1, 0, 5), _sent(2, 4, 9), _sent(3, 6, 0)  # c has not finished
    assert [s.index for s in in_flight_at([a, b, c], 4.5)] == [1, 2]
    assert [s.index for s in in_flight_at([a, b, c], 7)] == [2, 3]
    assert wrong_tokens([1, 2, 3], [1, 2, 3]) == 0
    assert wrong_tokens([1, 9, 3], [1, 2, 3]) == 1
    assert wrong_tokens([1, 2], [1, 2, 3, 4]) == 2  # missing tokens are wrong too


def test_proxy_log_lines_give_the_routing_of_each_request() -> None:
    text = ("2026 proxy.flow INFO request soak-12 completions: prefill=p decode=d route=prefix cached=3/5 "
            "status=200 ms=12.0\n"
            "2026 proxy.flow INFO request other-1 completions: prefill=p decode=d route=x cached=1/1 status=200\n"
            "2026 proxy.flow INFO request soak-13 completions: prefill=- decode=- whole=p route=degraded "
            "status=200 ms=3.0\n")
    assert parse_proxy_log(text) == {"soak-12": (3, 5)}


def test_the_sample_takes_requests_after_faults_first() -> None:
    sent = [_sent(i, float(i), float(i) + 0.5) for i in range(100)]
    sent[51].error = "failed"
    fault = Fault("engine_kill", 50.0, at=50.0)
    sample = pick_sample(sent, [fault], 10, after_fault_s=5, per_fault=3)
    idx = [s.index for s in sample]
    assert len(idx) == 10 and {50, 52, 53} <= set(idx) and 51 not in idx
    assert idx == sorted(idx)


def test_summary_rows() -> None:
    sent = [_sent(1, 0, 1, kind="chat", turn=1), _sent(2, 1, 3, ok=False),  # 2 is in flight at the fault
            _sent(3, 4, 5, ok=False), _sent(4, 5, 6, kind="chat", turn=2, tokens=[7, 9])]
    sent[0].cached_chunks, sent[3].cached_chunks = 0, 2
    faults = [Fault("engine_kill", 2.0, at=2.0, in_flight=1, recovered_s=30.0), Fault("link_cut", 9.0,
                                                                                     error="not injected")]
    checks = [(sent[0], [7, 8], 0.05), (sent[3], [7, 8], 0.05)]
    report = summarize(sent, faults, checks, {"proxy": (100.0, 103.5)}, {"psm_1": 4096}, 128, 3.0)
    rows = {r.name: r for r in report.results}
    assert rows["soak_requests"].value == 4
    assert rows["soak_ok_ratio"].value == 0.5
    assert rows["soak_ok_ratio"].baseline == pytest.approx(2 / 3)  # request 2 was in flight at the fault
    assert rows["soak_failed"].value == 2 and rows["soak_failed"].extra["in_flight_at_a_fault"] == 1
    assert rows["soak_failed_not_in_flight"].value == 1
    assert rows["soak_wrong_tokens"].value == 1
    assert rows["soak_wrong_tokens"].extra["mismatched_requests"] == ["soak-4"]
    assert rows["soak_checked_tokens"].value == 4
    assert rows["soak_ttft_p50_ms"].baseline == pytest.approx(50.0)
    assert rows["soak_hit_ratio_turn_1"].value == 0.0 and rows["soak_hit_ratio_turn_2"].value == 1.0
    assert rows["soak_hit_ratio_turn_2"].baseline == 0.5
    assert rows["soak_rss_growth_proxy_mib"].value == pytest.approx(3.5)
    assert rows["soak_shm_leaked_bytes"].value == 4096 and rows["soak_shm_leaked_segments"].value == 1
    assert rows["soak_faults"].value == 1
    assert rows["soak_integrity_failures"].value == 3


def test_chats_grow_by_question_and_answer_and_documents_are_shared() -> None:
    w = Workload(vocab=2048, chunk_tokens=128, seed=3, mean_turns=1e9, max_turns=4)
    first = w.next(0)
    while first.kind != "chat":  # the roll decides; keep the user until it opens a chat
        first = w.next(0)
    first.ttft_s, first.tokens = 0.1, [100 + i for i in range(16)]
    w.answered(0, first)
    second = w.next(0)
    assert second.kind == "chat" and second.turn == first.turn + 1
    assert second.prompt[:len(first.prompt) + 16] == first.prompt + first.tokens
    assert second.oracle_hit == pytest.approx((len(first.prompt) + 16) // 128 * 128 / len(second.prompt))
    rags = [s for s in (w.next(u) for u in range(1, 60)) if s.kind == "rag"]
    assert len(rags) >= 2 and any(s.oracle_hit > 0.5 for s in rags)  # a document seen before
    assert all(16 <= t < 2048 for s in rags for t in s.prompt)


class FakeRedis:
    def __init__(self, values: dict[bytes, bytes]) -> None:
        self.values = values

    def scan_iter(self, match: str, count: int) -> list[bytes]:
        return [k for k in self.values if k.startswith(match.rstrip("*").encode())]

    def get(self, key: bytes) -> bytes | None:
        return self.values.get(key)

    def set(self, key: bytes, value: bytes, xx: bool, keepttl: bool) -> bool:
        assert xx and keepttl
        self.values[key] = value
        return True


def test_corrupting_flips_one_payload_byte_and_keeps_the_header() -> None:
    values = {b"pdx-soak:a": bytes(32) + b"\x01\x02\x03", b"pdx-soak:b": bytes(40), b"other:c": bytes(40),
              b"pdx-soak:short": bytes(10)}
    r = FakeRedis(dict(values))
    assert corrupt_redis(r, "pdx-soak:") == 2
    assert r.values[b"pdx-soak:a"] == bytes(32) + b"\x01\x02\xfc"
    assert r.values[b"pdx-soak:b"][:39] == bytes(39) and r.values[b"pdx-soak:b"][39] == 0xFF
    assert r.values[b"other:c"] == values[b"other:c"] and r.values[b"pdx-soak:short"] == bytes(10)
    assert corrupt_redis(None, "pdx-soak:") == 0


# --- pdx up restarts an agent that died ---------------------------------------------------------


class FakeAgent:
    def __init__(self, fail_starts: int = 0) -> None:
        self.running = True
        self.fail_starts = fail_starts
        self.starts = 0
        self.stops = 0
        self.proc: Any = None  # no real process: supervise() records no children of it
        self.pid = -1

    def alive(self) -> bool:
        return self.running

    def stop(self) -> None:
        self.stops += 1

    def start(self) -> None:
        self.starts += 1
        if self.starts <= self.fail_starts:
            raise AgentError("not ready")
        self.running = True


def test_supervise_restarts_a_dead_agent_with_backoff(tmp_path: Path) -> None:
    cfg = load_config(DeployConfig, data={"workdir": str(tmp_path), "workers": [
        {"name": "p", "role": "prefill"}, {"name": "d", "role": "decode"}]}, env={})
    said: list[str] = []
    dep = Deployment(cfg, "t", progress=said.append)
    p, d = FakeAgent(), FakeAgent(fail_starts=1)
    dep.workers = {"p": type("W", (), {"agent": p})(), "d": type("W", (), {"agent": d})()}
    assert dep.supervise() == []  # all alive: nothing to do
    p.running = d.running = False
    assert dep.supervise() == ["p"]  # d failed to start: retried later, not now
    assert p.starts == 1 and p.stops == 1 and d.starts == 1
    assert any("d: pdx-agent did not start again" in m for m in said)
    assert dep.supervise() == [] and d.starts == 1  # inside d's back-off
    dep._retry_at["d"] = 0.0
    assert dep.supervise() == ["d"] and d.running
    assert dep.supervise() == []


def test_integrity_count_survives_agent_restarts() -> None:
    from bench.soak import IntegrityCount

    c = IntegrityCount()
    c.see("p", 0)
    c.see("p", 3)
    c.see("d", 2)
    c.see("p", 1)  # p restarted: its counter began again at zero
    c.see("p", 4)
    assert c.total == 3 + 2 + 1 + 3


def test_the_engine_a_dead_agent_left_is_killed_with_its_group(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    from pdx.deploy.deployment import _start_time, stop_left_engine

    # an "engine" leading its own group, with a child of its own (as vLLM's engine core)
    marker = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(120)']); open({str(marker)!r}, 'w').write(str(c.pid)); time.sleep(120)")
    engine = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        for _ in range(100):
            if marker.exists() and marker.read_text():
                break
            time.sleep(0.1)
        child = int(marker.read_text())
        started = _start_time(engine.pid)
        assert started is not None
        assert stop_left_engine({engine.pid: started + 1}) == []  # another process with that pid: untouched
        assert engine.poll() is None
        assert stop_left_engine({engine.pid: started}) == [engine.pid]
        assert engine.wait(5) == -9
        for _ in range(50):  # the child was in the engine's group: killed too (reaped by init)
            stat = Path(f"/proc/{child}/stat")
            if not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the engine's child survived")
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.wait(5)


def test_pdx_up_removes_the_shared_memory_of_an_engine_whose_agent_died(tmp_path: Path) -> None:
    """The 'agent' (a process whose child is the 'engine') dies; the engine made a psm_ segment.
    Deployment._watch_engine saw it while the agent lived; stop_left_engine kills the engine's group
    and removes the segment."""
    import os
    import subprocess
    import sys
    import time

    from pdx.deploy.deployment import stop_left_engine

    name = f"psm_pdxtest{os.getpid()}"
    ready = tmp_path / "ready"
    engine_code = ("from multiprocessing import shared_memory; import time, sys; "
                   f"s = shared_memory.SharedMemory(create=True, size=4096, name={name!r}); "
                   f"open({str(ready)!r}, 'w').write('1'); time.sleep(120)")
    agent_code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', sys.argv[1]], "
                  "start_new_session=True); time.sleep(120)")
    agent = subprocess.Popen([sys.executable, "-c", agent_code, engine_code])
    cfg = load_config(DeployConfig, data={"workdir": str(tmp_path), "workers": [
        {"name": "p", "role": "prefill"}, {"name": "d", "role": "decode"}]}, env={})
    dep = Deployment(cfg, "t")
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert time.monotonic() < deadline, "the engine did not start"
            time.sleep(0.1)
        dep._watch_engine("p", agent.pid)
        engines, shm = dep._engines["p"]
        assert len(engines) == 1 and name in shm.owned
        agent.kill()
        agent.wait(5)
        assert Path("/dev/shm", name).exists()  # the engine still runs (and maps it)
        assert stop_left_engine(engines, shm) == list(engines)
        assert not Path("/dev/shm", name).exists()
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(5)
        for pid in dep._engines.get("p", ({}, None))[0]:
            with contextlib.suppress(OSError):
                os.killpg(pid, 9)
        Path("/dev/shm", name).unlink(missing_ok=True)
