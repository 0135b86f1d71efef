"""The scheduler half: matches, load plans, store plans, P/D params; against a fake agent."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest
from connector_fakes import PEERS, FakeAgent

from pdx.connector.agent import SchedulerPort
from pdx.connector.params import RemotePrefill, parse_request_params, response_params
from pdx.connector.scheduler import PdxSchedulerSide, SchedulerSettings
from pdx.keys import chunk_keys, tail_key

CT, BS, FP = 128, 128, "fp-test"


@pytest.fixture(autouse=True)
def _clear_peers() -> Any:
    yield
    PEERS.clear()


def _side(agent: FakeAgent | None = None, **over: Any) -> PdxSchedulerSide:
    fields: dict[str, Any] = dict(chunk_tokens=CT, block_size=BS, chunk_fingerprint=FP,
                                  peer_address="tcp://127.0.0.1:7001")
    fields.update(over)
    port = SchedulerPort(agent, 1.0, False, 1.0) if agent is not None else None
    return PdxSchedulerSide(SchedulerSettings(**fields), port)


def _req(req_id: str, n: int, params: dict[str, Any] | None = None, seed: int = 0) -> SimpleNamespace:
    return SimpleNamespace(request_id=req_id, prompt_token_ids=[(seed * 7919 + i) % 5000 for i in range(n)],
                           kv_transfer_params=params)


def _keys(req: SimpleNamespace) -> list[bytes]:
    return list(chunk_keys(req.prompt_token_ids, FP, CT))


def _fill(agent: FakeAgent, keys: Sequence[bytes]) -> None:
    import numpy as np

    for k in keys:
        agent.put(k, np.zeros(16, dtype=np.uint8), CT)


def _new(req_id: str, blocks: list[int], computed: int) -> SimpleNamespace:
    return SimpleNamespace(req_id=req_id, block_ids=(blocks,), num_computed_tokens=computed)


def _out(new: list[SimpleNamespace] = (), cached: list[tuple[str, list[int] | None, int]] = (),  # type: ignore[assignment]
         scheduled: dict[str, int] | None = None, resumed: set[str] | None = None) -> SimpleNamespace:
    c = SimpleNamespace(req_ids=[x[0] for x in cached],
                        new_block_ids=[(x[1],) if x[1] is not None else None for x in cached],
                        num_computed_tokens=[x[2] for x in cached], resumed_req_ids=resumed or set())
    return SimpleNamespace(scheduled_new_reqs=list(new), scheduled_cached_reqs=c,
                           num_scheduled_tokens=scheduled or {})


def test_miss_then_store_plan_follows_chunked_prefill() -> None:
    agent = FakeAgent(slab_size=4096)
    side = _side(agent)
    req = _req("a", 600)
    assert side.matched_tokens(req, 0) == (0, False)
    side.after_alloc(req, [10, 11, 12], 0)
    # Step 1 computes 300 tokens: chunk 0 (0..127) and chunk 1 (128..255) are complete.
    plan = side.build_step(_out(new=[_new("a", [10, 11, 12], 0)], scheduled={"a": 300}))
    assert plan.loads == []
    assert [(s.req_id, [c.index for c in s.chunks], s.block_ids) for s in plan.stores] == \
        [("a", [0, 1], (10, 11, 12))]
    assert [c.key for c in plan.stores[0].chunks] == _keys(req)[:2]
    # Step 2 computes the rest (two more blocks appended): chunks 2 and 3; 600 // 128 = 4 full chunks,
    # then the tail: tokens 512..598 (the last prompt token is never stored).
    plan = side.build_step(_out(cached=[("a", [13, 14], 300)], scheduled={"a": 300}))
    assert [[(c.index, c.num_tokens) for c in s.chunks] for s in plan.stores] == [[(2, 0), (3, 0), (4, 87)]]
    assert plan.stores[0].chunks[-1].key == tail_key(req.prompt_token_ids, 599, FP, CT)
    assert plan.stores[0].block_ids == (10, 11, 12, 13, 14)
    # Decode steps: nothing new to store.
    plan = side.build_step(_out(cached=[("a", None, 600)], scheduled={"a": 1}))
    assert plan.stores == []
    assert side.finished(req, completed=True) == (False, None)
    assert side.num_live_requests() == 0


def test_local_l1_hit_leaves_last_token_and_loads_in_the_step() -> None:
    agent = FakeAgent(slab_size=4096)
    side = _side(agent)
    req = _req("b", 4 * CT)  # exactly 4 chunks: all but the last token is loaded
    _fill(agent, _keys(req))
    assert side.matched_tokens(req, 0) == (4 * CT - 1, False)  # all in L1: synchronous
    assert side.pending_peer("b") == ""
    side.after_alloc(req, [1, 2, 3, 4], 4 * CT - 1)
    plan = side.build_step(_out())
    (load,) = plan.loads
    assert load.peer == "" and load.block_ids == (1, 2, 3, 4) and load.sync
    assert [(c.index, c.start, c.end, c.num_tokens) for c in load.chunks] == \
        [(0, 0, 128, 0), (1, 128, 256, 0), (2, 256, 384, 0), (3, 384, 511, 0)]  # chunk 3 in part
    assert [c.key for c in load.chunks] == _keys(req)
    assert side.build_step(_out()).loads == []  # handed over once
    # After the load vLLM computes the last token; every chunk is in the store: nothing to store.
    plan = side.build_step(_out(new=[_new("b", [1, 2, 3, 4], 4 * CT - 1)], scheduled={"b": 1}))
    assert plan.stores == []


@pytest.mark.parametrize("why", ["on_disk", "sync_off"])
def test_hits_needing_io_load_asynchronously(why: str) -> None:
    agent = FakeAgent(slab_size=4096)
    side = _side(agent, sync_l1_loads=why != "sync_off")
    req = _req("b2", 4 * CT)
    _fill(agent, _keys(req))
    if why == "on_disk":
        agent.on_disk = {_keys(req)[2]}
    assert side.matched_tokens(req, 0) == (4 * CT - 1, True)
    side.after_alloc(req, [1, 2, 3, 4], 4 * CT - 1)
    (load,) = side.build_step(_out()).loads
    assert not load.sync


def test_hit_beyond_vllm_prefix_cache_and_partial_chunk() -> None:
    agent = FakeAgent(slab_size=4096)
    side = _side(agent, chunk_tokens=256)
    req = _req("c", 1000)
    keys = list(chunk_keys(req.prompt_token_ids, FP, 256))
    _fill(agent, keys[:3])
    # vLLM's own cache holds one 128-token block: pdx supplies 128..768.
    assert side.matched_tokens(req, 128) == (768 - 128, False)
    side.after_alloc(req, list(range(8)), 640)
    (load,) = side.build_step(_out()).loads
    assert [(c.index, c.start, c.end) for c in load.chunks] == [(0, 128, 256), (1, 256, 512), (2, 512, 768)]
    # vLLM's cache already covers everything pdx has: no load
    assert side.matched_tokens(_req("d", 1000), 768) == (0, False)


def test_lookup_failure_is_a_miss() -> None:
    agent = FakeAgent(slab_size=4096, down=True)
    side = _side(agent)
    assert side.matched_tokens(_req("e", 1000), 0) == (0, False)
    assert side.stats.lookup_errors == 1


# --- reuse at token granularity: stored tails ----------------------------------------------------


def _run_prefill(side: PdxSchedulerSide, agent: FakeAgent, req: SimpleNamespace) -> list[Any]:
    """A cold prefill of ``req`` that stores everything it computes (committed into ``agent``)."""
    import numpy as np

    n = len(req.prompt_token_ids)
    blocks = list(range(-(-n // BS)))
    assert side.matched_tokens(req, 0) == (0, False)
    side.after_alloc(req, blocks, 0)
    plan = side.build_step(_out(new=[_new(req.request_id, blocks, 0)], scheduled={req.request_id: n}))
    chunks = [c for s in plan.stores for c in s.chunks]
    for c in chunks:
        agent.put(c.key, np.zeros(16, dtype=np.uint8), c.num_tokens or CT)
    side.finished(req, completed=True)
    return chunks


def test_repeated_prompt_loads_all_but_its_last_token() -> None:
    agent = FakeAgent(slab_size=4096)
    side = _side(agent)
    first = _run_prefill(side, agent, _req("t1", 4 * CT + 10))
    assert [c.num_tokens for c in first] == [0, 0, 0, 0, 9]
    again = _req("t2", 4 * CT + 10)
    assert side.matched_tokens(again, 0) == (4 * CT + 9, False)  # all in L1: synchronous
    side.after_alloc(again, [1, 2, 3, 4, 5], 4 * CT + 9)
    (load,) = side.build_step(_out()).loads
    assert load.sync and [(c.index, c.start, c.end, c.num_tokens) for c in load.chunks] == \
        [(0, 0, 128, 0), (1, 128, 256, 0), (2, 256, 384, 0), (3, 384, 512, 0), (4, 512, 521, 9)]
    assert [c.key for c in load.chunks] == [c.key for c in first]
    assert side.stats.hit_tokens == 4 * CT + 9 and side.stats.tail_hits == 1
    # vLLM computes the last token; nothing is stored again (the tail is the one it loaded)
    plan = side.build_step(_out(new=[_new("t2", [1, 2, 3, 4, 5], 4 * CT + 9)], scheduled={"t2": 1}))
    assert plan.stores == []
    # vLLM's own prefix cache holds the full chunks: pdx loads just the tail
    third = _req("t3", 4 * CT + 10)
    assert side.matched_tokens(third, 4 * CT) == (9, False)
    side.after_alloc(third, [1, 2, 3, 4, 5], 9)
    (load,) = side.build_step(_out()).loads
    assert [(c.index, c.start, c.end, c.num_tokens) for c in load.chunks] == [(4, 512, 521, 9)]


def test_extended_prompt_loads_the_earlier_prompts_tail() -> None:
    agent = FakeAgent(slab_size=4096)
    side = _side(agent)
    first = _run_prefill(side, agent, _req("x1", 2 * CT + 50))
    longer = _req("x2", 4 * CT + 94)  # the same first 2 * CT + 50 tokens, then more
    assert longer.prompt_token_ids[:2 * CT + 50] == _req("x1", 2 * CT + 50).prompt_token_ids
    assert side.matched_tokens(longer, 0) == (2 * CT + 49, False)
    blocks = list(range(5))
    side.after_alloc(longer, blocks, 2 * CT + 49)
    (load,) = side.build_step(_out()).loads
    assert [(c.index, c.start, c.end, c.num_tokens) for c in load.chunks] == \
        [(0, 0, 128, 0), (1, 128, 256, 0), (2, 256, 305, 49)]
    assert load.chunks[-1].key == first[-1].key
    # it computes the rest and stores chunk 2 whole (its first 49 tokens came from the tail), 3, and its tail
    plan = side.build_step(_out(new=[_new("x2", blocks, 2 * CT + 49)], scheduled={"x2": 2 * CT + 45}))
    (store,) = plan.stores
    assert [(c.index, c.num_tokens) for c in store.chunks] == [(2, 0), (3, 0), (4, 93)]
    assert [c.key for c in store.chunks[:2]] == _keys(longer)[2:4]


def test_a_shorter_prompt_or_another_tail_does_not_match() -> None:
    agent = FakeAgent(slab_size=4096)
    side = _side(agent)
    _run_prefill(side, agent, _req("s1", 2 * CT + 50))
    # a prompt that ends inside the stored tail: the full chunks only (its own tokens there are fewer)
    assert side.matched_tokens(_req("s2", 2 * CT + 20), 0) == (2 * CT, False)
    # the same length, different tokens at the tail's position: full chunks only
    other = _req("s3", 2 * CT + 50)
    other.prompt_token_ids[2 * CT + 3] += 1
    assert side.matched_tokens(other, 0) == (2 * CT, False)
    # another tenant: nothing
    salted = _salted("s4", 2 * CT + 50, "tenant-b")
    assert side.matched_tokens(salted, 0) == (0, False)


def test_tail_on_disk_loads_asynchronously_and_misses_are_probed_once() -> None:
    agent = FakeAgent(slab_size=4096)
    side = _side(agent)
    first = _run_prefill(side, agent, _req("d1", 3 * CT + 7))
    agent.on_disk = {first[-1].key}
    assert side.matched_tokens(_req("d2", 3 * CT + 7), 0) == (3 * CT + 6, True)
    cold = _req("d3", 3 * CT + 7, seed=5)
    agent.calls.clear()
    for _ in range(3):  # vLLM asks again while the request waits: one probe only
        assert side.matched_tokens(cold, 0) == (0, False)
    assert agent.calls.count("probe") == 1 and agent.calls.count("lookup") == 3


def test_tail_probe_failure_is_a_miss() -> None:
    agent = FakeAgent(slab_size=4096)
    side = _side(agent)
    _run_prefill(side, agent, _req("f1", 3 * CT + 7))

    def fail(keys: Sequence[bytes]) -> tuple[int, bool]:
        from pdx.errors import AgentUnavailable

        raise AgentUnavailable("probe timed out")

    assert side._agent is not None
    side._agent.lookup_tails = fail  # type: ignore[method-assign]
    assert side.matched_tokens(_req("f2", 3 * CT + 7), 0) == (3 * CT, False)
    assert side.stats.lookup_errors == 1


def test_no_reuse_when_disabled() -> None:
    agent = FakeAgent(slab_size=4096)
    side = _side(agent, reuse=False)
    req = _req("f", 1000)
    _fill(agent, _keys(req))
    assert side.matched_tokens(req, 0) == (0, False)
    assert "lookup" not in agent.calls


def test_prefill_pins_and_answers_params_for_decode() -> None:
    agent = FakeAgent(slab_size=4096)
    side = _side(agent, lease_s=45.0)
    req = _req("p1", 1500, params={"do_remote_decode": True})
    assert side.matched_tokens(req, 0) == (0, False)
    side.after_alloc(req, list(range(12)), 0)
    plan = side.build_step(_out(new=[_new("p1", list(range(12)), 0)], scheduled={"p1": 1500}))
    (store,) = plan.stores
    # 11 full chunks, then the tail: tokens 1408..1498 (the last prompt token is decode's to compute)
    assert [(c.index, c.num_tokens) for c in store.chunks] == [(i, 0) for i in range(11)] + [(11, 91)]
    tail = tail_key(req.prompt_token_ids, 1499, FP, CT)
    assert store.chunks[-1].key == tail
    _fill(agent, [c.key for c in store.chunks])  # the worker would have committed them
    delay, params = side.finished(req, completed=True)
    assert delay is False and params is not None
    remote = parse_request_params(params).remote
    assert remote is not None
    assert remote.num_tokens == 1499 and remote.keys == (*_keys(req)[:11], tail)
    assert remote.agent == "tcp://127.0.0.1:7001" and remote.fingerprint == FP and remote.lease_s == 45.0
    assert remote.request_id == "p1"
    assert agent.pins == {"pd:p1": 12}


def test_prefill_stores_its_tail_after_the_last_full_chunk() -> None:
    side = _side(FakeAgent(slab_size=4096))
    req = _req("p5", 1500, params={"do_remote_decode": True})
    side.matched_tokens(req, 0)
    side.after_alloc(req, list(range(12)), 0)
    # chunked prefill: 1000 tokens, then the rest
    (first,) = side.build_step(_out(new=[_new("p5", list(range(12)), 0)], scheduled={"p5": 1000})).stores
    assert [(c.index, c.num_tokens) for c in first.chunks] == [(i, 0) for i in range(7)]
    (second,) = side.build_step(_out(cached=[("p5", None, 1000)], scheduled={"p5": 500})).stores
    assert [(c.index, c.num_tokens) for c in second.chunks] == [(7, 0), (8, 0), (9, 0), (10, 0), (11, 91)]
    assert side.build_step(_out(cached=[("p5", None, 1500)], scheduled={"p5": 1})).stores == []


@pytest.mark.parametrize(("n", "tail"), [(4 * CT, False), (4 * CT + 1, False), (4 * CT + 5, True)])
def test_tail_only_when_the_prompt_needs_one(n: int, tail: bool) -> None:
    side = _side(FakeAgent(slab_size=4096))
    req = _req("p6", n, params={"do_remote_decode": True})
    side.matched_tokens(req, 0)
    (store,) = side.build_step(_out(new=[_new("p6", list(range(5)), 0)], scheduled={"p6": n})).stores
    assert [c.num_tokens for c in store.chunks] == [0, 0, 0, 0] + ([4] if tail else [])


def test_every_storing_prefill_stores_its_tail() -> None:
    side = _side(FakeAgent(slab_size=4096))
    req = _req("p7", 1500)
    side.matched_tokens(req, 0)
    (store,) = side.build_step(_out(new=[_new("p7", list(range(12)), 0)], scheduled={"p7": 1500})).stores
    assert [c.num_tokens for c in store.chunks] == [0] * 11 + [91]
    assert store.chunks[-1].key == tail_key(req.prompt_token_ids, 1499, FP, CT)


def test_prefill_offers_only_what_the_agent_holds() -> None:
    agent = FakeAgent(slab_size=4096)
    side = _side(agent)
    req = _req("p2", 1000, params={"do_remote_decode": True})
    side.matched_tokens(req, 0)
    side.after_alloc(req, list(range(8)), 0)
    (store,) = side.build_step(_out(new=[_new("p2", list(range(8)), 0)], scheduled={"p2": 1000})).stores
    _fill(agent, [c.key for c in store.chunks[:2]])
    _, params = side.finished(req, completed=True)
    remote = parse_request_params(params).remote
    assert remote is not None and remote.num_tokens == 2 * CT
    # aborted: no params
    req2 = _req("p3", 1000, params={"do_remote_decode": True})
    side.matched_tokens(req2, 0)
    assert side.finished(req2, completed=False) == (False, None)


def test_prefill_pin_failure_offers_nothing(caplog: pytest.LogCaptureFixture) -> None:
    agent = FakeAgent(slab_size=4096)
    side = _side(agent)
    req = _req("p4", 1000, params={"do_remote_decode": True})
    side.matched_tokens(req, 0)
    side.build_step(_out(new=[_new("p4", list(range(8)), 0)], scheduled={"p4": 1000}))
    agent.down = True
    with caplog.at_level(logging.WARNING):
        _, params = side.finished(req, completed=True)
    assert parse_request_params(params).remote.num_tokens == 0  # type: ignore[union-attr]
    assert "could not pin" in caplog.text


def _decode_params(req: SimpleNamespace, n_chunks: int, **over: Any) -> dict[str, Any]:
    fields: dict[str, Any] = dict(agent="tcp://127.0.0.1:7002", fingerprint=FP, chunk_tokens=CT,
                                  num_tokens=n_chunks * CT, keys=tuple(_keys(req)[:n_chunks]), request_id="p9")
    fields.update(over)
    return response_params(RemotePrefill(**fields))


def test_decode_loads_from_the_prefill_side() -> None:
    agent = FakeAgent(slab_size=4096)
    side = _side(agent)
    req = _req("d1", 1500)
    req.kv_transfer_params = _decode_params(req, 11)
    assert side.matched_tokens(req, 0) == (11 * CT, True)
    assert side.pending_peer("d1") == "tcp://127.0.0.1:7002"
    side.after_alloc(req, list(range(12)), 11 * CT)
    (load,) = side.build_step(_out()).loads
    assert load.peer == "tcp://127.0.0.1:7002" and load.remote_request_id == "p9"
    assert len(load.chunks) == 11
    # The transfer is used once: a preempted request that comes back looks in the local store.
    assert side.matched_tokens(req, 0) == (0, False)
    assert side.stats.remote_tokens == 11 * CT


def test_decode_loads_the_tail_and_computes_one_token() -> None:
    side = _side(FakeAgent(slab_size=4096))
    req = _req("d6", 1500)
    tail = tail_key(req.prompt_token_ids, 1499, FP, CT)
    req.kv_transfer_params = _decode_params(req, 11, num_tokens=1499, keys=(*_keys(req)[:11], tail))
    assert side.matched_tokens(req, 0) == (1499, True)
    side.after_alloc(req, list(range(12)), 1499)
    (load,) = side.build_step(_out()).loads
    assert [(c.index, c.start, c.end, c.num_tokens) for c in load.chunks[-2:]] == \
        [(10, 1280, 1408, 0), (11, 1408, 1499, 91)]
    assert load.chunks[-1].key == tail
    assert side.stats.remote_tokens == 1499
    # vLLM's prefix cache already holds 1024 tokens: the rest, tail included
    req2 = _req("d7", 1500)
    req2.kv_transfer_params = req.kv_transfer_params
    assert side.matched_tokens(req2, 1024) == (1499 - 1024, True)


@pytest.mark.parametrize("why", ["other key", "other size", "missing chunk"])
def test_decode_ignores_a_tail_it_cannot_use(why: str) -> None:
    side = _side(FakeAgent(slab_size=4096))
    req = _req("d8", 1500)
    keys = list(_keys(req)[:11])
    tail = tail_key(req.prompt_token_ids, 1499, FP, CT)
    if why == "other key":
        req.kv_transfer_params = _decode_params(req, 11, num_tokens=1499, keys=(*keys, b"\x07" * 16))
        assert side.matched_tokens(req, 0) == (11 * CT, True)
    elif why == "other size":  # a prefill that saw a longer prompt
        req.kv_transfer_params = _decode_params(req, 11, num_tokens=1409, keys=(*keys, tail))
        assert side.matched_tokens(req, 0) == (11 * CT, True)
    else:  # the tail follows a chunk that does not match
        other = _keys(_req("x", 1500, seed=5))
        req.kv_transfer_params = _decode_params(req, 11, num_tokens=1499, keys=(*keys[:10], other[10], tail))
        assert side.matched_tokens(req, 0) == (10 * CT, True)


def test_decode_prefers_a_longer_local_hit() -> None:
    agent = FakeAgent(slab_size=4096)
    side = _side(agent)
    req = _req("d2", 1500)
    _fill(agent, _keys(req))
    req.kv_transfer_params = _decode_params(req, 5)
    assert side.matched_tokens(req, 0) == (11 * CT, False)
    assert side.pending_peer("d2") == ""


@pytest.mark.parametrize(("over", "words"), [
    ({"fingerprint": "other"}, "chunk fingerprint"),
    ({"chunk_tokens": 256, "num_tokens": 5 * 256, "keys": ()}, "chunk_tokens 256 differs"),
    ({"namespace": "tenant-b"}, "namespace"),
])
def test_decode_refuses_incompatible_params(over: dict[str, Any], words: str,
                                            caplog: pytest.LogCaptureFixture) -> None:
    side = _side(FakeAgent(slab_size=4096))
    req = _req("d3", 1500)
    req.kv_transfer_params = _decode_params(req, 11, **over)
    with caplog.at_level(logging.WARNING):
        assert side.matched_tokens(req, 0) == (0, False)
    assert words in caplog.text and "recomputing" in caplog.text
    assert side.stats.bad_params == 1


def test_decode_uses_only_matching_keys(caplog: pytest.LogCaptureFixture) -> None:
    side = _side(FakeAgent(slab_size=4096))
    req = _req("d4", 1500)
    other = _req("x", 1500, seed=3)
    keys = tuple(_keys(req)[:4]) + tuple(_keys(other)[4:11])
    req.kv_transfer_params = _decode_params(req, 11, keys=keys)
    with caplog.at_level(logging.WARNING):
        assert side.matched_tokens(req, 0) == (4 * CT, True)
    assert "only 4 of 11 chunk keys" in caplog.text


def test_malformed_params_are_logged_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    side = _side(FakeAgent(slab_size=4096))
    req = _req("d5", 1500, params={"do_remote_prefill": True, "pdx": {"v": 99}})
    with caplog.at_level(logging.WARNING):
        assert side.matched_tokens(req, 0) == (0, False)
    assert "ignoring its kv_transfer_params" in caplog.text and "pdx.v" in caplog.text


def test_resumed_request_replaces_its_block_table() -> None:
    side = _side(FakeAgent(slab_size=4096))
    req = _req("g", 700)
    side.matched_tokens(req, 0)
    side.after_alloc(req, [1, 2], 0)
    plan = side.build_step(_out(new=[_new("g", [1, 2], 0)], scheduled={"g": 200}))
    assert [[c.index for c in s.chunks] for s in plan.stores] == [[0]]
    # preempted and resumed with new blocks, recomputing from token 0
    plan = side.build_step(_out(cached=[("g", [7, 8, 9, 10, 11, 12], 0)], scheduled={"g": 700},
                                resumed={"g"}))
    (store,) = plan.stores
    assert store.block_ids == (7, 8, 9, 10, 11, 12)
    assert [c.index for c in store.chunks] == [1, 2, 3, 4, 5]  # 700 // 128 = 5 full chunks, then the tail


def test_consumer_stores_nothing() -> None:
    side = _side(FakeAgent(slab_size=4096), store=False)
    req = _req("h", 700)
    side.matched_tokens(req, 0)
    side.after_alloc(req, [1, 2, 3, 4, 5, 6], 0)
    assert side.build_step(_out(new=[_new("h", [1, 2, 3, 4, 5, 6], 0)], scheduled={"h": 700})).stores == []


def test_chunk_tokens_must_be_a_multiple_of_the_block_size() -> None:
    from pdx.errors import PdxError

    with pytest.raises(PdxError, match="multiple of the engine's block size"):
        _side(None, chunk_tokens=100)


# --- tenants: vLLM's cache_salt is part of every key -----------------------------------------------


def _salted(req_id: str, n: int, salt: str | None, params: dict[str, Any] | None = None) -> SimpleNamespace:
    req = _req(req_id, n, params)
    req.cache_salt = salt
    return req


def test_tenants_with_the_same_prompt_never_share_chunks() -> None:
    agent = FakeAgent(slab_size=4096)
    side = _side(agent)
    a1 = _salted("a1", 4 * CT + 10, "tenant-a")
    assert side.matched_tokens(a1, 0) == (0, False)
    side.after_alloc(a1, [1, 2, 3, 4, 5], 0)
    plan = side.build_step(_out(new=[_new("a1", [1, 2, 3, 4, 5], 0)], scheduled={"a1": 4 * CT + 10}))
    stored = [c.key for s in plan.stores for c in s.chunks]
    salted = list(chunk_keys(a1.prompt_token_ids, FP, CT, salt="tenant-a"))
    salted.append(tail_key(a1.prompt_token_ids, 4 * CT + 9, FP, CT, salt="tenant-a"))
    assert stored == salted and not set(stored) & set(_keys(a1))  # stored under tenant A's keys only
    assert stored[-1] != tail_key(a1.prompt_token_ids, 4 * CT + 9, FP, CT)
    _fill(agent, stored)
    side.finished(a1, completed=True)

    # A's repeat hits, its tail included
    assert side.matched_tokens(_salted("a2", 4 * CT + 10, "tenant-a"), 0) == (4 * CT + 9, False)
    assert side.matched_tokens(_salted("b1", 4 * CT + 10, "tenant-b"), 0) == (0, False)  # B: same prompt, miss
    assert side.matched_tokens(_salted("n1", 4 * CT + 10, None), 0) == (0, False)  # no salt: miss too


def test_decode_of_another_tenant_loads_nothing_from_the_prefill_side(caplog: pytest.LogCaptureFixture) -> None:
    side = _side(FakeAgent(slab_size=4096))
    prefill_req = _salted("p", 1500, "tenant-a")
    keys = tuple(chunk_keys(prefill_req.prompt_token_ids, FP, CT, salt="tenant-a"))[:11]
    params = _decode_params(prefill_req, 11, keys=keys)
    assert side.matched_tokens(_salted("same", 1500, "tenant-a", params), 0) == (11 * CT, True)
    with caplog.at_level(logging.WARNING):
        assert side.matched_tokens(_salted("other", 1500, "tenant-b", params), 0) == (0, False)
    assert "only 0 of 11 chunk keys" in caplog.text


def test_a_prefill_offers_its_tenants_keys(caplog: pytest.LogCaptureFixture) -> None:
    agent = FakeAgent(slab_size=4096)
    side = _side(agent)
    req = _salted("pt", 3 * CT + 5, "tenant-a", {"do_remote_decode": True})
    side.matched_tokens(req, 0)
    side.after_alloc(req, [1, 2, 3, 4], 0)
    plan = side.build_step(_out(new=[_new("pt", [1, 2, 3, 4], 0)], scheduled={"pt": 3 * CT + 5}))
    keys = [c.key for s in plan.stores for c in s.chunks]
    want_full = list(chunk_keys(req.prompt_token_ids, FP, CT, salt="tenant-a"))
    want_tail = tail_key(req.prompt_token_ids, 3 * CT + 4, FP, CT, salt="tenant-a")
    assert keys == [*want_full, want_tail]


# --- peer-to-peer reuse: the proxy's hint --------------------------------------------------------


def _hint(chunks: int, agent: str = "tcp://127.0.0.1:7003") -> dict[str, Any]:
    return {"pdx": {"v": 2, "hint": {"agent": agent, "chunks": chunks, "agent_id": "holder"}}}


def test_a_hint_loads_the_holders_chunks_from_that_peer() -> None:
    agent = FakeAgent(slab_size=4096)
    side = _side(agent)
    req = _req("h1", 1500, params=_hint(8))
    _fill(agent, _keys(req)[:3])  # the local store holds 3 of the 8 hinted chunks
    assert side.matched_tokens(req, 0) == (8 * CT, True)
    assert side.pending_peer("h1") == "tcp://127.0.0.1:7003"
    side.after_alloc(req, list(range(12)), 8 * CT)
    (load,) = side.build_step(_out()).loads
    assert load.peer == "tcp://127.0.0.1:7003" and load.hint and load.remote_request_id == ""
    assert [c.index for c in load.chunks] == list(range(8))
    assert side.stats.hint_tokens == 8 * CT and side.stats.remote_tokens == 0
    # used once: a preempted request that comes back looks in the local store (which now has them)
    assert side.pending_peer("h1") == ""
    side.matched_tokens(req, 0)
    assert side.pending_peer("h1") == ""


def test_a_hint_is_ignored_when_the_local_store_holds_as_much() -> None:
    agent = FakeAgent(slab_size=4096)
    side = _side(agent)
    req = _req("h2", 1500, params=_hint(4))
    _fill(agent, _keys(req)[:6])
    assert side.matched_tokens(req, 0) == (6 * CT, False)
    assert side.pending_peer("h2") == ""


def test_a_hint_works_with_reuse_off_and_is_capped_by_the_prompt() -> None:
    side = _side(FakeAgent(slab_size=4096), reuse=False)
    req = _req("h3", 1500, params=_hint(50))  # more than the prompt's 11 full chunks
    assert side.matched_tokens(req, 0) == (11 * CT, True)
    # a prefill for remote decode with a hint: loads from the holder, then keeps its chunks for decode
    req2 = _req("h4", 1500, params={"do_remote_decode": True, **_hint(5)})
    assert side.matched_tokens(req2, 0) == (5 * CT, True)


@pytest.mark.parametrize("block", [
    {"v": 2, "hint": {"agent": "", "chunks": 3}},
    {"v": 2, "hint": {"agent": "tcp://x:1", "chunks": 0}},
    {"v": 2, "hint": {"agent": "tcp://x:1", "chunks": 3, "bogus": 1}},
    {"v": 3, "hint": {"agent": "tcp://x:1", "chunks": 3}},
    {"v": 2, "hint": {"agent": "tcp://x:1", "chunks": 3}, "agent": "x"},
    {"v": 2, "hint": ["tcp://x:1", 3]},
])
def test_a_malformed_hint_is_logged_and_recomputed(block: dict[str, Any],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    side = _side(FakeAgent(slab_size=4096))
    req = _req("h5", 1500, params={"pdx": block})
    with caplog.at_level(logging.WARNING):
        assert side.matched_tokens(req, 0) == (0, False)
    assert side.stats.bad_params == 1 and "kv_transfer_params" in caplog.text


def test_hint_params_round_trip() -> None:
    from pdx.connector.params import PeerHint, hint_params

    h = PeerHint("tcp://10.0.0.1:9100", 7, "prefill-0")
    got = parse_request_params(hint_params(h, remote_decode=True))
    assert got.hint == h and got.remote_decode and got.remote is None
    # beside a RemotePrefill the prefill side's params win: no hint
    assert parse_request_params(response_params(RemotePrefill("tcp://a:1", FP, CT, CT))).hint is None
