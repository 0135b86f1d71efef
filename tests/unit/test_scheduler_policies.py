"""Routing policies (round_robin, least_loaded, cache_aware) and the tokenizer interface."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

from pdx.config import CacheAwareConfig, ProxyWorkerConfig
from pdx.errors import ConfigError, UnknownName
from pdx.keys import chunk_keys
from pdx.scheduler.messages import AgentAnnouncement, AgentLoad, WorkerRole
from pdx.scheduler.policies import POLICIES, RouteRequest, make_policy, pair
from pdx.scheduler.registry import Side, Worker, WorkerRegistry
from pdx.scheduler.summary import KeySummary
from pdx.scheduler.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

CHUNK = 16


def _registry(n_prefill: int = 2, n_decode: int = 2, **kw: object) -> WorkerRegistry:
    static = [ProxyWorkerConfig(url=f"http://127.0.0.1:{8100 + i}", role="prefill", id=f"p{i}")
              for i in range(n_prefill)]
    static += [ProxyWorkerConfig(url=f"http://127.0.0.1:{8200 + i}", role="decode", id=f"d{i}")
               for i in range(n_decode)]
    return WorkerRegistry(static, default_chunk_tokens=CHUNK, **kw)  # type: ignore[arg-type]


def _sides(reg: WorkerRegistry) -> tuple[list[Worker], list[Worker]]:
    return reg.candidates(Side.PREFILL), reg.candidates(Side.DECODE)


def _req(text: str = "", tokens: list[int] | None = None) -> RouteRequest:
    ids = tokens if tokens is not None else (ByteTokenizer().encode(text) if text else None)
    return RouteRequest("r", len(ids) if ids else 1, 16, ids)


def test_registry_names() -> None:
    assert POLICIES.names() == ["cache_aware", "least_loaded", "prefix_affinity", "round_robin"]
    with pytest.raises(UnknownName, match="cache_aware"):
        make_policy("random")


def test_round_robin_alternates_each_side() -> None:
    reg = _registry(2, 3)
    pol = make_policy("round_robin")
    routes = [pol.route(_req(), *_sides(reg)) for _ in range(6)]
    assert [r.prefill[0].id for r in routes] == ["p0", "p1"] * 3
    assert [r.decode[0].id for r in routes] == ["d0", "d1", "d2"] * 2
    assert all(len(r.prefill) == 2 and len(r.decode) == 3 for r in routes)  # alternates for retries


def test_least_loaded_picks_the_idlest() -> None:
    reg = _registry(2, 2)
    pol = make_policy("least_loaded")
    p0, p1 = reg.get("p0"), reg.get("p1")
    d0, d1 = reg.get("d0"), reg.get("d1")
    assert p0 and p1 and d0 and d1
    reg.begin(p0, 5000)  # one big prompt
    reg.begin(p1, 10)
    reg.begin(p1, 10)  # two small ones
    reg.begin(d0, 10)
    r = pol.route(_req(), *_sides(reg))
    assert r.prefill[0] is p1  # prefill compares tokens first
    assert r.decode[0] is d1  # decode compares requests first
    assert r.reason == "least_loaded"


def test_least_loaded_ties_rotate() -> None:
    reg = _registry(2, 2)
    pol = make_policy("least_loaded")
    firsts = Counter(pol.route(_req(), *_sides(reg)).decode[0].id for _ in range(10))
    assert firsts == {"d0": 5, "d1": 5}


def test_least_loaded_counts_agent_reported_load() -> None:
    reg = _registry(1, 2)
    reg.announce(AgentAnnouncement(agent_id="a", role=WorkerRole.DECODE, engine_url="http://127.0.0.1:8200",
                                   load=AgentLoad(requests=50)))
    r = make_policy("least_loaded").route(_req(), *_sides(reg))
    assert r.decode[0].id == "d1"


def test_a_both_worker_is_not_its_own_prefill() -> None:
    reg = WorkerRegistry([ProxyWorkerConfig(url="http://127.0.0.1:1", role="both", id="b0")])
    r = make_policy("round_robin").route(_req(), *_sides(reg))
    assert r.prefill == () and r.decode[0].id == "b0" and "same_worker" in r.reason
    reg2 = WorkerRegistry([ProxyWorkerConfig(url="http://127.0.0.1:1", role="both", id="b0"),
                           ProxyWorkerConfig(url="http://127.0.0.1:2", role="both", id="b1")])
    for _ in range(4):
        r = make_policy("round_robin").route(_req(), *_sides(reg2))
        assert r.prefill[0] is not r.decode[0]
    b0 = reg2.get("b0")
    assert b0 is not None
    assert pair([b0], [b0], "x").prefill == ()


# --- cache_aware ---------------------------------------------------------------------------------


def _prompt(n_chunks: int, tail: str = "") -> str:
    return "".join(chr(ord("a") + i % 26) * CHUNK for i in range(n_chunks)) + tail


def test_cache_aware_routes_to_the_longest_prefix() -> None:
    reg = _registry(3, 1)
    pol = make_policy("cache_aware", CacheAwareConfig(chunk_tokens=CHUNK))
    req = _req(_prompt(6, "tail"))
    p1, p2 = reg.get("p1"), reg.get("p2")
    assert p1 and p2
    keys = req.keys(p1.key_space)
    assert len(keys) == 6
    p1.hints.add(keys[:2])
    p2.hints.add(keys[:4])
    r = pol.route(req, *_sides(reg))
    assert r.prefill[0] is p2 and r.reason == "cache_hit" and r.cached_chunks == 4 and r.total_chunks == 6
    assert len(r.prefill) == 3  # the others follow as fallbacks


def test_cache_aware_uses_agent_key_summaries_in_their_key_space() -> None:
    reg = _registry(2, 1)
    pol = make_policy("cache_aware", CacheAwareConfig(chunk_tokens=CHUNK))
    tokens = list(range(1000))
    agent_keys = chunk_keys(tokens, "model-fp", 128, "")
    reg.announce(AgentAnnouncement(agent_id="a1", role=WorkerRole.PREFILL, engine_url="http://127.0.0.1:8101",
                                   chunk_fingerprint="model-fp", chunk_tokens=128,
                                   keys=KeySummary.build(agent_keys[:5])))
    r = pol.route(_req(tokens=tokens), *_sides(reg))
    assert r.prefill[0].id == "p1" and r.cached_chunks == 5 and r.total_chunks == 7


def test_cache_aware_skips_prefill_when_decode_holds_the_whole_prompt() -> None:
    reg = _registry(2, 2)
    pol = make_policy("cache_aware", CacheAwareConfig(chunk_tokens=CHUNK))
    req = _req(_prompt(3, "xy"))
    d1 = reg.get("d1")
    assert d1
    d1.hints.add(req.keys(d1.key_space))
    r = pol.route(req, *_sides(reg))
    assert r.prefill == () and r.decode[0] is d1 and r.reason == "skip_prefill" and r.cached_chunks == 3
    # a partial hold is not enough to skip prefill
    req2 = _req(_prompt(4))
    d1.hints.clear()
    d1.hints.add(req2.keys(d1.key_space)[:3])
    assert make_policy("cache_aware").route(req2, *_sides(reg)).prefill != ()
    # nor when skipping is turned off
    d1.hints.add(req.keys(d1.key_space))
    off = make_policy("cache_aware", CacheAwareConfig(chunk_tokens=CHUNK, skip_prefill=False))
    assert off.route(req, *_sides(reg)).prefill != ()


def test_cache_aware_short_prompt_never_skips_prefill() -> None:
    reg = _registry(1, 1)
    r = make_policy("cache_aware").route(_req("short"), *_sides(reg))
    assert r.prefill and r.reason == "cache_miss" and r.total_chunks == 0


def test_cache_aware_load_guard() -> None:
    reg = _registry(2, 1)
    pol = make_policy("cache_aware", CacheAwareConfig(chunk_tokens=CHUNK, max_imbalance=2))
    req = _req(_prompt(4))
    p0, p1 = reg.get("p0"), reg.get("p1")
    assert p0 and p1
    p0.hints.add(req.keys(p0.key_space))
    for _ in range(2):
        reg.begin(p0, 1)
    assert pol.route(req, *_sides(reg)).prefill[0] is p0  # 2 more than p1: still allowed
    reg.begin(p0, 1)
    r = pol.route(req, *_sides(reg))
    assert r.prefill[0] is p1 and r.reason == "imbalance"


def test_cache_aware_hot_prefix_spreads_under_load() -> None:
    """Many requests with one prefix, none finishing: the guard spreads them over both workers."""
    reg = _registry(2, 1)
    pol = make_policy("cache_aware", CacheAwareConfig(chunk_tokens=CHUNK, max_imbalance=4))
    req = _req(_prompt(4))
    counts: Counter[str] = Counter()
    for _ in range(40):
        r = pol.route(req, *_sides(reg))
        w = r.prefill[0]
        reg.begin(w, 1)
        pol.observe(req, w)
        counts[w.id] += 1
    assert abs(counts["p0"] - counts["p1"]) <= 5


def test_cache_aware_without_token_ids_is_least_loaded() -> None:
    reg = _registry(2, 2)
    r = make_policy("cache_aware").route(RouteRequest("r", 10, 10, None), *_sides(reg))
    assert r.reason == "least_loaded" and r.prefill and r.decode


def test_cache_aware_observe_records_hints() -> None:
    reg = _registry(1, 1)
    pol = make_policy("cache_aware", CacheAwareConfig(chunk_tokens=CHUNK))
    req = _req(_prompt(2))
    d0 = reg.get("d0")
    assert d0
    pol.observe(req, d0)
    assert d0.held_prefix(req.keys(d0.key_space)) == 2
    assert pol.route(_req(_prompt(2)), *_sides(reg)).reason == "skip_prefill"


def test_route_request_keys_are_memoized_per_space() -> None:
    reg = _registry(1, 1)
    req = _req(_prompt(2))
    w = reg.get("p0")
    assert w
    assert req.keys(w.key_space) is req.keys(w.key_space)
    assert RouteRequest("r", 1, 1, None).keys(w.key_space) == []
    assert req.cost(Side.PREFILL) == req.prompt_tokens and req.cost(Side.DECODE) == req.prompt_tokens + 16


# --- tokenizers ----------------------------------------------------------------------------------


def test_byte_tokenizer() -> None:
    t = load_tokenizer("")
    assert t.encode("hé") == [104, 195, 169]
    chat = t.encode_chat([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert bytes(chat).decode() == "<|user|>\nhi\n<|assistant|>\n"


def _make_hf_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the quick brown fox"] * 20, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "chat_template": '
        '"{% for m in messages %}<s>{{ m.role }}: {{ m.content }}\\n{% endfor %}'
        '{% if add_generation_prompt %}assistant:{% endif %}"}')


def test_hf_tokenizer_from_a_local_folder(tmp_path: Path) -> None:
    _make_hf_tokenizer(tmp_path / "tok")
    t = load_tokenizer(str(tmp_path / "tok"))
    assert isinstance(t, HFTokenizer)
    ids = t.encode("hello world")
    assert ids and all(isinstance(i, int) for i in ids)
    assert t.encode("hello world") == ids
    chat = t.encode_chat([{"role": "user", "content": "hello"}])
    assert chat[0] == 0  # the template's <s>, added once
    assert t.encode_chat([{"role": "user", "content": "hello"}]) == chat


def test_hf_tokenizer_without_transformers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _make_hf_tokenizer(tmp_path / "tok")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails
    t = HFTokenizer(tmp_path / "tok" / "tokenizer.json")
    assert t.encode("hello world") and t.encode_chat([{"role": "user", "content": "hi"}])


def test_hf_tokenizer_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tokenizer"):
        load_tokenizer(str(tmp_path / "nothing"))


def test_cache_aware_counts_what_a_shared_tier_holds() -> None:
    # Two "both" workers write every chunk to one Mooncake store; a third does not share it.
    reg = WorkerRegistry(default_chunk_tokens=CHUNK)
    ids = ["a", "b", "c"]
    for i, wid in enumerate(ids):
        reg.announce(AgentAnnouncement(
            agent_id=wid, role=WorkerRole.BOTH, engine_url=f"http://127.0.0.1:{8300 + i}",
            shared_tiers=("mooncake:http://10.0.0.5:8080/metadata#pdx:",) if wid != "c" else ()))
    a, b, c = (reg.by_url(f"http://127.0.0.1:{8300 + i}") for i in range(3))
    assert a and b and c
    pol = make_policy("cache_aware", CacheAwareConfig(chunk_tokens=CHUNK))
    req = _req(_prompt(4, "tail"))
    pol.observe(req, a)  # a computed the prompt and wrote its chunks through to the shared tier
    assert b.held_prefix(req.keys(b.key_space)) == 4  # not a miss on b: it loads them from the tier
    assert c.held_prefix(req.keys(c.key_space)) == 0
    # and the announcement carries the ids over the wire
    msg = AgentAnnouncement(agent_id="a", role=WorkerRole.BOTH, engine_url="http://127.0.0.1:8300",
                            shared_tiers=("redis:redis://10.0.0.6:6379/0#pdx:",))
    assert AgentAnnouncement.from_dict(msg.to_dict()).shared_tiers == msg.shared_tiers


def test_shared_tier_ids_name_write_through_remote_tiers() -> None:
    from pdx.config import StoreConfig, load_config, shared_tier_ids

    cfg = load_config(StoreConfig, data={"tiers": [
        {"type": "disk"}, {"type": "redis", "url": "redis://r:6379/0", "write": "all"},
        {"type": "mooncake", "metadata_server": "http://m:8080/metadata"},
        {"type": "s3", "bucket": "kv", "write": "evicted"}]}, env={})
    assert shared_tier_ids(cfg) == ["redis:redis://r:6379/0#pdx:", "mooncake:http://m:8080/metadata#pdx:"]
