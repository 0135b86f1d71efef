"""The agent announcement and its key summary: round trips, validation, decoder fuzzing."""

from __future__ import annotations

import json
import os

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdx.errors import WireError
from pdx.keys import chunk_keys
from pdx.scheduler.messages import WIRE_VERSION, AgentAnnouncement, AgentLoad, WorkerRole
from pdx.scheduler.summary import MAX_HASHES, KeySummary


def _keys(n: int, seed: int = 0) -> list[bytes]:
    return chunk_keys(list(range(seed, seed + n * 4)), "fp", chunk_tokens=4)


def _announcement(**kw: object) -> AgentAnnouncement:
    base: dict[str, object] = dict(
        agent_id="agent-p0", role=WorkerRole.PREFILL, engine_url="http://127.0.0.1:8100",
        agent_url="http://127.0.0.1:8101", control_address="ipc:///tmp/x", transport_address="127.0.0.1:9000",
        models=("m1",), load=AgentLoad(requests=3, tokens=900, pool_used_bytes=10, pool_capacity_bytes=100),
        chunk_fingerprint="abc", chunk_tokens=256, namespace="t1", keys=KeySummary.build(_keys(5)),
        heartbeat_s=0.5, seq=7, timestamp=1700000000.5)
    base.update(kw)
    return AgentAnnouncement(**base)  # type: ignore[arg-type]


def test_round_trip_json_and_msgpack() -> None:
    msg = _announcement()
    d = msg.to_dict()
    assert d["wire_version"] == WIRE_VERSION
    assert AgentAnnouncement.from_dict(json.loads(json.dumps(d))) == msg
    assert AgentAnnouncement.from_dict(msgpack.unpackb(msgpack.packb(d), raw=False)) == msg


def test_minimal_announcement_defaults() -> None:
    msg = AgentAnnouncement.from_dict({"wire_version": WIRE_VERSION, "agent_id": "a", "role": "decode",
                                       "engine_url": "http://127.0.0.1:1"})
    assert msg.role is WorkerRole.DECODE and msg.keys is None and msg.load == AgentLoad()
    assert msg.role.decodes and not msg.role.prefills


@pytest.mark.parametrize(("change", "field"), [
    ({"wire_version": 99}, "wire_version"),
    ({"wire_version": None}, "wire_version"),
    ({"agent_id": ""}, "agent_id"),
    ({"agent_id": 5}, "agent_id"),
    ({"role": "router"}, "role"),
    ({"engine_url": "ftp://x"}, "engine_url"),
    ({"engine_url": None}, "engine_url"),
    ({"bogus": 1}, "bogus"),
    ({"load": {"requests": -1}}, "load.requests"),
    ({"load": {"cpu": 1}}, "cpu"),
    ({"load": []}, "load"),
    ({"chunk_tokens": 1.5}, "chunk_tokens"),
    ({"heartbeat_s": 0}, "heartbeat_s"),
    ({"timestamp": float("nan")}, "timestamp"),
    ({"leaving": "yes"}, "leaving"),
    ({"models": "m1"}, "models"),
    ({"keys": {"bits": "!!!", "num_hashes": 3, "count": 1}}, "keys.bits"),
    ({"keys": {"bits": "AAAAAAAAAAA=", "num_hashes": 0, "count": 1}}, "keys.num_hashes"),
    ({"keys": {"bits": "AAAAAAAAAAA=", "num_hashes": 3, "extra": 1}}, "extra"),
    ({"keys": "zz"}, "keys"),
])
def test_bad_fields_name_the_field(change: dict[str, object], field: str) -> None:
    d = _announcement().to_dict()
    d.update(change)
    with pytest.raises(WireError, match=field):
        AgentAnnouncement.from_dict(d)


def test_not_a_mapping() -> None:
    with pytest.raises(WireError):
        AgentAnnouncement.from_dict([1, 2])


def test_oversized_summary_is_refused() -> None:
    import base64

    from pdx.scheduler.summary import MAX_SUMMARY_BYTES

    d = _announcement().to_dict()
    d["keys"] = {"bits": base64.b64encode(bytes(MAX_SUMMARY_BYTES + 8)).decode(), "num_hashes": 3, "count": 1}
    with pytest.raises(WireError, match="over"):
        AgentAnnouncement.from_dict(d)


_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20) \
    | st.binary(max_size=20)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)
_field_names = st.sampled_from(sorted(_announcement().to_dict())) | st.text(max_size=10)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_field_names, _values, max_size=12), st.booleans())
def test_decoder_only_raises_wire_error(raw: dict[str, object], with_version: bool) -> None:
    if with_version:
        raw["wire_version"] = WIRE_VERSION
    try:
        msg = AgentAnnouncement.from_dict(raw)
    except WireError:
        return
    assert AgentAnnouncement.from_dict(msg.to_dict()) == msg


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["agent_url", "models", "load", "keys", "seq", "heartbeat_s"]),
                       _values, max_size=6))
def test_decoder_fuzz_near_valid(extra: dict[str, object]) -> None:
    d = _announcement().to_dict()
    d.update(extra)
    try:
        AgentAnnouncement.from_dict(d)
    except WireError:
        pass


# --- the Bloom filter ---------------------------------------------------------------------------


def test_summary_holds_every_key_and_few_others() -> None:
    held = _keys(2000)
    s = KeySummary.build(held, fp_rate=0.01)
    assert all(k in s for k in held)
    others = [os.urandom(16) for _ in range(20000)]
    false_pos = sum(k in s for k in others)
    assert false_pos < 20000 * 0.03  # 1 % design rate, generous bound against randomness
    assert s.count == 2000 and 1 <= s.num_hashes <= MAX_HASHES


def test_summary_prefix_len_stops_at_first_miss() -> None:
    prompt = _keys(10)
    s = KeySummary.build(prompt[:6])
    assert s.prefix_len(prompt) == 6
    assert s.prefix_len([]) == 0
    assert KeySummary.build([]).prefix_len(prompt) == 0


def test_summary_round_trip_and_rule_is_deterministic() -> None:
    held = _keys(50, seed=3)
    a = KeySummary.build(held)
    b = KeySummary.from_dict(json.loads(json.dumps(a.to_dict())))
    assert a == b
    assert KeySummary.build(list(reversed(held))) == a  # order does not matter
    raw = msgpack.unpackb(msgpack.packb({**a.to_dict(), "bits": a.bits}), raw=False)
    assert KeySummary.from_dict(raw) == a


def test_summary_sizing() -> None:
    num_bytes, k = KeySummary.sizing(1000, 0.01)
    assert 1100 <= num_bytes <= 1300 and k == 7  # ~9.6 bits per key
    with pytest.raises(ValueError):
        KeySummary.sizing(10, 1.5)
    assert "x" not in KeySummary.build(_keys(3))


def test_summary_vectorized_build_sets_the_documented_bits() -> None:
    """Large key sets are built with numpy; the bits must follow the scalar rule exactly."""
    from pdx.scheduler.summary import _positions

    keys = [os.urandom(16) for _ in range(3000)] + [os.urandom(20), b"short"]
    for subset in (keys, keys[:64], keys[:63]):
        s = KeySummary.build(subset)
        want = bytearray(len(s.bits))
        for k in subset:
            for p in _positions(k, s.num_hashes, len(want) * 8):
                want[p >> 3] |= 1 << (p & 7)
        assert s.bits == bytes(want)
        assert all(k in s for k in subset)
