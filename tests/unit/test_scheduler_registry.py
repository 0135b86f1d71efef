"""The worker registry: static workers, announcements, heartbeats, health, load."""

from __future__ import annotations

import pytest

from pdx.config import ProxyWorkerConfig
from pdx.keys import chunk_keys
from pdx.scheduler.messages import AgentAnnouncement, AgentLoad, WorkerRole
from pdx.scheduler.registry import (
    HINT_FINGERPRINT,
    KeySpace,
    Side,
    WorkerRegistry,
    WorkerSource,
    WorkerState,
    normalize_url,
)
from pdx.scheduler.summary import KeySummary


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _registry(clock: Clock, **kw: object) -> WorkerRegistry:
    static = [ProxyWorkerConfig(url="http://127.0.0.1:8100/", role="prefill"),
              ProxyWorkerConfig(url="http://127.0.0.1:8200", role="decode", id="dec"),
              ProxyWorkerConfig(url="http://127.0.0.1:8300", role="both")]
    return WorkerRegistry(static, clock=clock, heartbeat_timeout_s=5.0, unhealthy_after=2,
                          **kw)  # type: ignore[arg-type]


def _ann(url: str, role: str = "decode", **kw: object) -> AgentAnnouncement:
    return AgentAnnouncement(agent_id=kw.pop("agent_id", "agent"), role=WorkerRole(role),  # type: ignore[arg-type]
                             engine_url=url, **kw)  # type: ignore[arg-type]


def test_static_workers_and_sides() -> None:
    reg = _registry(Clock())
    ids = [w.id for w in reg.all()]
    assert ids == ["127.0.0.1:8100", "dec", "127.0.0.1:8300"]
    assert [w.id for w in reg.candidates(Side.PREFILL)] == ["127.0.0.1:8100", "127.0.0.1:8300"]
    assert [w.id for w in reg.candidates(Side.DECODE)] == ["dec", "127.0.0.1:8300"]
    assert reg.by_url("HTTP://127.0.0.1:8100").id == "127.0.0.1:8100"  # type: ignore[union-attr]
    assert all(w.state(0) is WorkerState.UNKNOWN for w in reg.all())


def test_normalize_url() -> None:
    assert normalize_url(" HTTP://LocalHost:80/ ") == "http://localhost:80"
    assert normalize_url("http://h:1/base/") == "http://h:1/base"


def test_announcement_merges_with_static_worker_by_url() -> None:
    clock = Clock()
    reg = _registry(clock)
    w = reg.announce(_ann("http://127.0.0.1:8200/", load=AgentLoad(requests=7, tokens=70), models=("m",)))
    assert w.id == "dec" and w.source is WorkerSource.STATIC and len(reg) == 3
    assert w.load_requests == 7 and w.load_tokens == 70
    w.inflight, w.inflight_tokens = 9, 5
    assert w.load_requests == 9 and w.load_tokens == 70  # the larger of ours and the agent's
    assert reg.models() == ["m"]


def test_static_role_wins_over_announced_role() -> None:
    reg = _registry(Clock())
    w = reg.announce(_ann("http://127.0.0.1:8100", role="decode"))
    assert w.role is WorkerRole.PREFILL


def test_agent_worker_added_and_removed_when_leaving() -> None:
    reg = _registry(Clock())
    w = reg.announce(_ann("http://127.0.0.1:9000", role="prefill", agent_id="p9"))
    assert w.source is WorkerSource.AGENT and w.id == "p9"
    assert w in reg.candidates(Side.PREFILL)
    reg.announce(_ann("http://127.0.0.1:9000", role="prefill", agent_id="p9", leaving=True))
    assert reg.get("p9") is None and len(reg) == 3
    with pytest.raises(KeyError):
        reg.announce(_ann("http://127.0.0.1:9999", leaving=True))


def test_agent_id_collision_gets_a_unique_id() -> None:
    reg = _registry(Clock())
    reg.announce(_ann("http://127.0.0.1:9000", agent_id="dec"))
    assert {w.id for w in reg.all()} >= {"dec", "dec-2"}


def test_static_worker_leaving_returns_on_next_announcement() -> None:
    reg = _registry(Clock())
    w = reg.announce(_ann("http://127.0.0.1:8200"))
    reg.announce(_ann("http://127.0.0.1:8200", leaving=True))
    assert w.state(reg.clock()) is WorkerState.LEFT and w not in reg.candidates(Side.DECODE)
    reg.announce(_ann("http://127.0.0.1:8200"))
    assert w in reg.candidates(Side.DECODE)


def test_missed_heartbeats_take_a_worker_out_and_a_heartbeat_brings_it_back() -> None:
    clock = Clock()
    reg = _registry(clock)
    w = reg.announce(_ann("http://127.0.0.1:8200", heartbeat_s=1.0))
    clock.t += 4.9
    assert w in reg.candidates(Side.DECODE)
    clock.t += 0.2
    assert w.state(clock.t) is WorkerState.STALE and w not in reg.candidates(Side.DECODE)
    reg.announce(_ann("http://127.0.0.1:8200", heartbeat_s=1.0, seq=2))
    assert w in reg.candidates(Side.DECODE)


def test_slow_heartbeat_period_stretches_the_timeout() -> None:
    clock = Clock()
    reg = _registry(clock)
    w = reg.announce(_ann("http://127.0.0.1:8200", heartbeat_s=4.0))
    assert w.heartbeat_timeout_s == 10.0
    clock.t += 9
    assert w in reg.candidates(Side.DECODE)


def test_reordered_heartbeat_is_ignored() -> None:
    reg = _registry(Clock())
    reg.announce(_ann("http://127.0.0.1:8200", seq=5, load=AgentLoad(requests=5)))
    w = reg.announce(_ann("http://127.0.0.1:8200", seq=4, load=AgentLoad(requests=1)))
    assert w.load_requests == 5


def test_a_restarted_agent_is_heard_although_its_count_starts_again() -> None:
    clock = Clock()
    reg = _registry(clock)
    url = "http://127.0.0.1:8200"
    old = {"agent_url": "http://127.0.0.1:9001", "transport_address": "127.0.0.1:9002"}
    reg.announce(_ann(url, seq=400, load=AgentLoad(requests=5), **old))
    # the agent died and started again: new ports, its count from 1
    w = reg.announce(_ann(url, seq=1, load=AgentLoad(requests=1), agent_url="http://127.0.0.1:9101",
                          transport_address="127.0.0.1:9102"))
    assert w.load_requests == 1
    # the same ports (configured), but the count far behind: a new process too
    reg.announce(_ann(url, seq=300, **old))
    w = reg.announce(_ann(url, seq=2, load=AgentLoad(requests=3), **old))
    assert w.load_requests == 3


def test_health_checks_move_workers_out_and_back() -> None:
    reg = _registry(Clock())
    w = reg.get("dec")
    assert w is not None
    reg.record_check(w, False, "boom")
    assert w in reg.candidates(Side.DECODE)  # one failure is not enough
    reg.record_check(w, False, "boom")
    assert w.health is WorkerState.UNHEALTHY and w not in reg.candidates(Side.DECODE)
    reg.record_check(w, True)
    assert w.health is WorkerState.HEALTHY and w.failures == 0 and w in reg.candidates(Side.DECODE)


def test_unreachable_worker_leaves_at_once() -> None:
    reg = _registry(Clock())
    w = reg.get("dec")
    assert w is not None
    reg.record_failure(w, "connection refused", fatal=True)
    assert w not in reg.candidates(Side.DECODE)


def test_begin_end_count_load() -> None:
    reg = _registry(Clock())
    w = reg.get("dec")
    assert w is not None
    reg.begin(w, 100)
    reg.begin(w, 50)
    assert (w.inflight, w.inflight_tokens, w.routed) == (2, 150, 2)
    reg.end(w, 100)
    reg.end(w, 50)
    assert (w.inflight, w.inflight_tokens) == (0, 0)


def test_key_space_and_held_prefix_from_summary_and_hints() -> None:
    reg = _registry(Clock(), hint_keys=4, default_chunk_tokens=8)
    w = reg.get("dec")
    assert w is not None
    assert w.key_space == KeySpace(HINT_FINGERPRINT, 8)
    tokens = list(range(64))
    hint_keys = chunk_keys(tokens, HINT_FINGERPRINT, 8)
    w.hints.add(hint_keys[:3])
    assert w.held_prefix(hint_keys) == 3
    w.hints.add(hint_keys[3:])
    assert len(w.hints) == 4  # bounded: the oldest went out
    assert w.held_prefix(hint_keys) == 0
    agent_keys = chunk_keys(tokens, "fpX", 16, "ns")
    reg.announce(_ann("http://127.0.0.1:8200", chunk_fingerprint="fpX", chunk_tokens=16, namespace="ns",
                      keys=KeySummary.build(agent_keys[:2])))
    assert w.key_space == KeySpace("fpX", 16, "ns")
    assert len(w.hints) == 0  # hints of another key space are dropped
    assert w.held_prefix(agent_keys) == 2


def test_describe_is_json_safe() -> None:
    import json

    reg = _registry(Clock())
    reg.announce(_ann("http://127.0.0.1:8200", keys=KeySummary.build([b"k" * 16])))
    out = json.loads(json.dumps(reg.describe()))
    assert {d["id"] for d in out} == {"127.0.0.1:8100", "dec", "127.0.0.1:8300"}
    dec = next(d for d in out if d["id"] == "dec")
    assert dec["held_chunks"] == 1 and dec["agent_id"] == "agent" and dec["state"] == "unknown"


def test_verified_needs_a_passed_check_or_a_heartbeat() -> None:
    clock = Clock()
    reg = _registry(clock)
    dec = reg.get("dec")
    assert dec is not None
    assert dec.available(clock.t) and not dec.verified(clock.t)  # unknown: routable, not proven
    reg.record_check(dec, True)
    assert dec.verified(clock.t)
    w = reg.announce(_ann("http://127.0.0.1:9100", agent_id="fresh"))
    assert w.verified(clock.t)


def test_peers_lists_registered_agents_and_their_peer_sockets() -> None:
    reg = _registry(Clock())
    assert reg.peers() == []  # static workers have no agent
    reg.announce(_ann("http://127.0.0.1:9000", role="prefill", agent_id="p9",
                      transport_address="tcp://127.0.0.1:7000"))
    reg.announce(_ann("http://127.0.0.1:9001", agent_id="d1"))  # no peer socket: not listed
    assert reg.peers() == [{"agent_id": "p9", "peer_address": "tcp://127.0.0.1:7000", "identity_key": "",
                            "role": "prefill"}]
    reg.announce(_ann("http://127.0.0.1:9000", role="prefill", agent_id="p9", leaving=True))
    assert reg.peers() == []
