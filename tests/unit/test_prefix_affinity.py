"""``prefix_affinity``: reuse weighed against load, a load bound, two random choices."""

from __future__ import annotations

from collections import Counter

from pdx.config import CacheAwareConfig, ProxyWorkerConfig
from pdx.scheduler.affinity import PrefixAffinity
from pdx.scheduler.policies import POLICIES, RouteRequest, make_policy
from pdx.scheduler.registry import Side, Worker, WorkerRegistry

CHUNK = 16


def _registry(n_prefill: int, n_decode: int = 1) -> WorkerRegistry:
    static = [ProxyWorkerConfig(url=f"http://127.0.0.1:{8100 + i}", role="prefill", id=f"p{i}")
              for i in range(n_prefill)]
    static += [ProxyWorkerConfig(url=f"http://127.0.0.1:{8200 + i}", role="decode", id=f"d{i}")
               for i in range(n_decode)]
    return WorkerRegistry(static, default_chunk_tokens=CHUNK)


def _req(tokens: list[int], rid: str = "r") -> RouteRequest:
    return RouteRequest(rid, len(tokens), 8, tokens)


def _sides(reg: WorkerRegistry) -> tuple[list[Worker], list[Worker]]:
    return reg.candidates(Side.PREFILL), reg.candidates(Side.DECODE)


def _prompt(prefix: int, own: int, chunks: int = 8, shared: int = 2) -> list[int]:
    """``shared`` chunks of prefix ``prefix``, then chunks unique to ``own``."""
    return [prefix * 1000 + i for i in range(shared * CHUNK)] + \
        [10**6 + own * 1000 + i for i in range((chunks - shared) * CHUNK)]


def test_registered_by_name() -> None:
    assert "prefix_affinity" in POLICIES.names()
    assert isinstance(make_policy("prefix_affinity"), PrefixAffinity)


def test_goes_where_the_prefix_is_when_loads_are_equal() -> None:
    reg = _registry(4)
    pol = make_policy("prefix_affinity", CacheAwareConfig(skip_prefill=False))
    first = _req(_prompt(1, 1))
    route = pol.route(first, *_sides(reg))
    holder = route.prefill[0]
    pol.observe(first, holder)
    again = pol.route(_req(_prompt(1, 1)), *_sides(reg))
    assert again.prefill[0] is holder and again.reason == "cache_hit" and again.cached_chunks == 8
    assert len(again.prefill) == 4 and again.decode[0].id == "d0"  # the others follow, for retries


def test_a_loaded_holder_loses_to_an_idle_worker() -> None:
    reg = _registry(4)
    pol = make_policy("prefix_affinity", CacheAwareConfig(skip_prefill=False))
    first = _req(_prompt(1, 1))
    holder = pol.route(first, *_sides(reg)).prefill[0]
    pol.observe(first, holder)
    reg.begin(holder, 50_000)  # far over the bound: 1.25 x the mean outstanding tokens
    route = pol.route(_req(_prompt(1, 1)), *_sides(reg))
    assert route.prefill[0] is not holder
    assert route.reason == "imbalance"


def test_a_shared_prefix_does_not_pull_every_request_to_one_worker() -> None:
    """Distinct prompts behind one hot prefix: cache_aware sends all to its holder (nothing is
    outstanding, so its guard never trips); prefix_affinity bounds each worker's recent work."""
    shares = {}
    for name in ("cache_aware", "prefix_affinity"):
        reg = _registry(4)
        pol = make_policy(name, CacheAwareConfig(skip_prefill=False))
        got: Counter[str] = Counter()
        for i in range(80):
            req = _req(_prompt(1, i), f"r{i}")
            w = pol.route(req, *_sides(reg)).prefill[0]
            pol.observe(req, w)
            got[w.id] += 1
        shares[name] = max(got.values()) / 80
    assert shares["cache_aware"] > 0.9
    assert shares["prefix_affinity"] <= 0.4


def test_sessions_stay_on_their_worker_while_loads_allow() -> None:
    reg = _registry(4)
    pol = make_policy("prefix_affinity", CacheAwareConfig(skip_prefill=False))
    homes: dict[int, str] = {}
    moved = 0
    for turn in range(4):
        for s in range(8):
            # each session's prompt grows by two chunks per turn and keeps its history
            tokens = [s * 10**5 + i for i in range((2 + 2 * turn) * CHUNK)]
            req = _req(tokens, f"s{s}t{turn}")
            w = pol.route(req, *_sides(reg)).prefill[0]
            pol.observe(req, w)
            if s in homes and homes[s] != w.id:
                moved += 1
            homes[s] = w.id
    assert moved <= 3  # 24 follow-up turns
    assert len(set(homes.values())) == 4  # and the sessions spread over the workers


def test_without_token_ids_it_is_least_loaded() -> None:
    reg = _registry(2)
    p0 = reg.get("p0")
    assert p0 is not None
    reg.begin(p0, 100)
    route = make_policy("prefix_affinity").route(RouteRequest("r", 10, 8, None), *_sides(reg))
    assert route.prefill[0].id == "p1" and route.reason == "least_loaded"


def test_skip_prefill_when_a_decode_worker_holds_everything() -> None:
    reg = _registry(2, 2)
    pol = make_policy("prefix_affinity")
    req = _req(_prompt(3, 3))
    d1 = reg.get("d1")
    assert d1 is not None
    pol.observe(req, d1)
    route = pol.route(_req(_prompt(3, 3)), *_sides(reg))
    assert route.prefill == () and route.decode[0] is d1 and route.reason == "skip_prefill"


def test_same_seed_same_routes() -> None:
    def routes() -> list[str]:
        reg = _registry(6)
        pol = PrefixAffinity(CacheAwareConfig(skip_prefill=False), seed=7)
        out = []
        for i in range(30):
            req = _req(_prompt(i % 3, i), f"r{i}")
            w = pol.route(req, *_sides(reg)).prefill[0]
            pol.observe(req, w)
            out.append(w.id)
        return out

    assert routes() == routes()
