"""Peer-to-peer reuse in the proxy: which agent a hint names, and the fetch-or-recompute estimate."""

from __future__ import annotations

from typing import Any

import pytest

from pdx.config import PeerReuseConfig, ProxyWorkerConfig
from pdx.connector.params import PARAMS_VERSION, PeerHint, parse_request_params
from pdx.keys import chunk_keys
from pdx.scheduler.messages import AgentAnnouncement, AgentLoad
from pdx.scheduler.p2p import DEFAULT_BYTES_PER_TOKEN, PeerCost, PeerReuse, bytes_per_token
from pdx.scheduler.p2p import PARAMS_VERSION as HINT_VERSION
from pdx.scheduler.policies import RouteRequest
from pdx.scheduler.registry import WorkerRegistry
from pdx.scheduler.summary import KeySummary

CHUNK = 16
FP = "fp-p2p"
TOKENS = list(range(10 * CHUNK + 3))  # 10 full chunks
KEYS = chunk_keys(TOKENS, FP, CHUNK)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _registry(clock: Clock | None = None) -> WorkerRegistry:
    static = [ProxyWorkerConfig(url=f"http://127.0.0.1:{8100 + i}", role="prefill", id=f"p{i}") for i in range(3)]
    static.append(ProxyWorkerConfig(url="http://127.0.0.1:8200", role="decode", id="d0"))
    reg = WorkerRegistry(static, default_chunk_tokens=CHUNK, clock=clock or Clock())
    for w in static:  # every worker has an agent holding nothing yet
        _announce(reg, w.id, 0)
    return reg


def _announce(reg: WorkerRegistry, wid: str, held: int, *, fp: str = FP, requests: int = 0,
              address: str | None = None, bytes_per_chunk: int = 1024 * CHUNK, shared: tuple[str, ...] = ()) -> None:
    w = reg.get(wid)
    assert w is not None
    keys = KEYS[:held]
    reg.announce(AgentAnnouncement(
        agent_id=f"agent-{wid}", role=w.role, engine_url=w.url,
        transport_address=f"tcp://10.0.0.{len(wid)}:{9000 + int(wid[1:])}" if address is None else address,
        load=AgentLoad(requests=requests, pool_used_bytes=bytes_per_chunk * max(1, held)),
        chunk_fingerprint=fp, chunk_tokens=CHUNK, keys=KeySummary.build(keys) if keys else None,
        heartbeat_s=1.0, seq=1, shared_tiers=shared))


def _req() -> RouteRequest:
    return RouteRequest("r", len(TOKENS), 8, TOKENS)


def _p2p(reg: WorkerRegistry, counted: list[tuple[str, int]] | None = None, **cfg: Any) -> PeerReuse:
    sink = counted if counted is not None else []
    return PeerReuse(PeerReuseConfig(**cfg), reg, lambda d, n: sink.append((d, n)))


def test_the_hint_names_the_agent_holding_the_longest_prefix() -> None:
    reg = _registry()
    _announce(reg, "p0", 8)
    _announce(reg, "p1", 0)
    _announce(reg, "p2", 5)
    counted: list[tuple[str, int]] = []
    hint = _p2p(reg, counted).hint(_req(), reg.get("p1"))  # type: ignore[arg-type]
    assert hint is not None
    assert (hint.agent, hint.chunks, hint.agent_id, hint.worker_id, hint.extra_chunks) == \
        ("tcp://10.0.0.2:9000", 8, "agent-p0", "p0", 8)
    assert counted == [("fetch", 8)]
    # the decode half of a new pair: a decode worker is hinted toward the prefill worker that holds it
    _announce(reg, "d0", 0)
    hint = _p2p(reg).hint(_req(), reg.get("d0"))  # type: ignore[arg-type]
    assert hint is not None and hint.worker_id == "p0"


def test_the_hint_is_what_the_connector_parses() -> None:
    reg = _registry()
    _announce(reg, "p0", 8)
    hint = _p2p(reg).hint(_req(), reg.get("p1"))  # type: ignore[arg-type]
    assert hint is not None
    assert HINT_VERSION == PARAMS_VERSION
    for remote_decode in (False, True):
        parsed = parse_request_params(hint.params(remote_decode=remote_decode))
        assert parsed.hint == PeerHint("tcp://10.0.0.2:9000", 8, "agent-p0")
        assert parsed.remote_decode is remote_decode


def test_no_hint_when_the_target_holds_as_much_or_more() -> None:
    reg = _registry()
    _announce(reg, "p0", 6)
    _announce(reg, "p1", 6)
    counted: list[tuple[str, int]] = []
    p2p = _p2p(reg, counted)
    assert p2p.hint(_req(), reg.get("p1")) is None  # type: ignore[arg-type]
    assert p2p.hint(_req(), reg.get("p0")) is None  # type: ignore[arg-type]  # it is the holder
    assert counted == []


def test_no_hint_toward_a_holder_out_of_the_pool_or_in_another_key_space_or_without_an_address() -> None:
    clock = Clock()
    reg = _registry(clock)
    _announce(reg, "p0", 8, fp="another-model")
    _announce(reg, "p2", 8, address="")
    p1 = reg.get("p1")
    assert p1 is not None
    _announce(reg, "p1", 0)
    assert _p2p(reg).hint(_req(), p1) is None
    _announce(reg, "p0", 8)  # now in the same key space
    assert _p2p(reg).hint(_req(), p1) is not None
    clock.t += 60  # p0's heartbeats stopped: it left the pool
    _announce(reg, "p1", 0)
    assert _p2p(reg).hint(_req(), p1) is None


def test_a_chunk_the_target_reads_from_a_shared_tier_needs_no_hint() -> None:
    reg = _registry()
    _announce(reg, "p0", 8, shared=("redis://r",))
    _announce(reg, "p1", 0, shared=("redis://r",))
    reg.get("p0").shared[0].add(KEYS[:8])  # type: ignore[union-attr]  # written through to the shared tier
    assert _p2p(reg).hint(_req(), reg.get("p1")) is None  # type: ignore[arg-type]


def test_equal_holders_the_least_loaded_is_named() -> None:
    reg = _registry()
    _announce(reg, "p0", 8, requests=5)
    _announce(reg, "p2", 8, requests=1)
    hint = _p2p(reg).hint(_req(), reg.get("p1"))  # type: ignore[arg-type]
    assert hint is not None and hint.worker_id == "p2"


def test_min_chunks_and_disabled() -> None:
    reg = _registry()
    _announce(reg, "p0", 2)
    assert _p2p(reg, min_chunks=3, fetch_fixed_ms=0).hint(_req(), reg.get("p1")) is None  # type: ignore[arg-type]
    assert _p2p(reg, min_chunks=2, fetch_fixed_ms=0).hint(_req(), reg.get("p1")) is not None  # type: ignore[arg-type]
    # 32 tokens recompute in 3.2 ms at 10k tokens/s: under the default 5 ms fixed cost of a fetch
    assert _p2p(reg).hint(_req(), reg.get("p1")) is None  # type: ignore[arg-type]
    assert _p2p(reg, enabled=False).hint(_req(), reg.get("p1")) is None  # type: ignore[arg-type]
    no_tokens = RouteRequest("r", 200, 8, None)
    assert _p2p(reg).hint(no_tokens, reg.get("p1")) is None  # type: ignore[arg-type]


def test_recompute_wins_on_a_slow_link_or_a_fast_prefill() -> None:
    reg = _registry()
    _announce(reg, "p0", 8)  # 8 chunks x 16 tokens x 1 KiB = 128 KiB
    counted: list[tuple[str, int]] = []
    # 0.001 Gbit/s: 128 KiB take ~1 s; recomputing 128 tokens at 10k tokens/s takes 12.8 ms
    assert _p2p(reg, counted, link_gbps=0.001).hint(_req(), reg.get("p1")) is None  # type: ignore[arg-type]
    assert counted == [("recompute", 8)]
    # a fixed cost above recompute's: recompute
    assert _p2p(reg, fetch_fixed_ms=50.0).hint(_req(), reg.get("p1")) is None  # type: ignore[arg-type]
    # a measured prefill rate replaces the configured one
    p2p = _p2p(reg)
    assert p2p.hint(_req(), reg.get("p1")) is not None  # type: ignore[arg-type]
    p2p.observe_prefill(100_000, 1.0)  # 100k tokens/s: 128 tokens in 1.3 ms < 5 ms fixed
    assert p2p.prefill_rate == 100_000
    assert p2p.hint(_req(), reg.get("p1")) is None  # type: ignore[arg-type]


def test_cost_model_arithmetic() -> None:
    c = PeerCost(link_gbps=8.0, fetch_fixed_s=0.002, prefill_tokens_per_s=5000.0)
    assert c.fetch_s(10**9) == pytest.approx(1.002)  # 8 Gbit at 8 Gbit/s, plus the fixed cost
    assert c.recompute_s(5000) == pytest.approx(1.0)
    assert not c.fetch_wins(5000, 10**9) and c.fetch_wins(5000, 10**8)


def test_measured_prefill_rate_is_an_average_of_big_enough_calls() -> None:
    p2p = _p2p(_registry())
    p2p.observe_prefill(100, 0.001)  # too few tokens: mostly fixed overhead, ignored
    p2p.observe_prefill(1000, 0.0)
    assert p2p.prefill_rate == 0 and p2p.cost().prefill_tokens_per_s == 10000.0
    p2p.observe_prefill(1000, 0.5)  # 2000/s
    p2p.observe_prefill(1000, 0.1)  # 10000/s
    assert p2p.prefill_rate == pytest.approx(0.8 * 2000 + 0.2 * 10000)
    assert p2p.cost().prefill_tokens_per_s == p2p.prefill_rate


def test_bytes_per_token_from_config_announcement_or_default() -> None:
    reg = _registry()
    _announce(reg, "p0", 8, bytes_per_chunk=4096 * CHUNK)
    p0, p1 = reg.get("p0"), reg.get("p1")
    assert p0 is not None and p1 is not None
    assert bytes_per_token(p0, 0) == 4096
    assert bytes_per_token(p0, 777) == 777
    assert bytes_per_token(p1, 0) == DEFAULT_BYTES_PER_TOKEN  # no announcement


def test_config_is_validated() -> None:
    from pdx.config import ProxyConfig, load_config
    from pdx.errors import ConfigError

    with pytest.raises(ConfigError, match="link_gbps"):
        load_config(ProxyConfig, data={"p2p": {"link_gbps": 0}}, env={})
    assert load_config(ProxyConfig, data={"p2p": {"bytes_per_token": "2KiB"}}, env={}).p2p.bytes_per_token == 2048
