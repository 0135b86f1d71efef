"""Hostile client input at the proxy: every case is a 400 naming the field (never a 500), nothing
reaches a worker, and the proxy keeps serving. Ends with a bounded hypothesis fuzz of the app."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.checks import MAX_GENERATED_TOKENS, MAX_JSON_DEPTH, MAX_N, MAX_TOKEN_ID
from proxy.testing import Cluster

MODEL = "standin-model"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster(1, 1, models=[MODEL], max_body_size=1 << 20) as c:
        yield c


def _nested(depth: int) -> Any:
    node: Any = 1
    for _ in range(depth):
        node = [node]
    return node


def _user(content: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": content}]}


def _prompt(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "hello", **kw}


CASES: list[tuple[str, dict[str, Any], str]] = [
    ("/v1/completions", _prompt(extra=_nested(MAX_JSON_DEPTH + 5)), "extra"),
    ("/v1/chat/completions", _user(_nested(MAX_JSON_DEPTH + 1)), "messages"),
    ("/v1/chat/completions", _user(5), "messages[1].content"),
    ("/v1/chat/completions", _user({"type": "text", "text": "x"}), "messages[1].content"),
    ("/v1/chat/completions", _user([7]), "messages[1].content[0]"),
    ("/v1/chat/completions", _user([{"text": "no type"}]), "messages[1].content[0]"),
    ("/v1/chat/completions", _user([{"type": "text", "text": ["not", "a", "string"]}]), "messages[1].content[0].text"),
    ("/v1/chat/completions", _user([{"type": "text"}]), "messages[1].content[0].text"),
    ("/v1/completions", _prompt(prompt=[1, -1]), "prompt"),
    ("/v1/completions", _prompt(prompt=[1, MAX_TOKEN_ID + 1]), "prompt"),
    ("/v1/completions", _prompt(prompt=[[1], [2, 10**30]]), "prompt"),
    ("/v1/completions", _prompt(prompt=[True, 1]), "prompt"),
    ("/v1/completions", _prompt(prompt=[[1], []]), "prompt"),
    ("/v1/completions", _prompt(n=MAX_N + 1), "n"),
    ("/v1/completions", _prompt(n=0), "n"),
    ("/v1/completions", _prompt(n="4"), "n"),
    ("/v1/completions", _prompt(best_of=10**9), "best_of"),
    ("/v1/completions", _prompt(max_tokens=MAX_GENERATED_TOKENS + 1), "max_tokens"),
    ("/v1/completions", _prompt(max_tokens=10**100), "max_tokens"),
    ("/v1/completions", _prompt(max_tokens=1.5), "max_tokens"),
    ("/v1/completions", _prompt(min_tokens=-1), "min_tokens"),
    ("/v1/chat/completions", {**_user("x"), "max_completion_tokens": 2**63}, "max_completion_tokens"),
    ("/v1/chat/completions", {**_user("x"), "n": -3}, "n"),
]


@pytest.mark.parametrize(("path", "body", "param"), CASES)
def test_hostile_bodies_are_400_naming_the_field(cluster: Cluster, path: str, body: dict[str, Any],
                                                  param: str) -> None:
    def sent() -> tuple[int, int]:
        return len(cluster.prefill[0].received), len(cluster.decode[0].received)

    before = sent()
    r = httpx.post(cluster.url + path, json=body, timeout=20)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert sent() == before  # nothing reached a worker
    assert httpx.post(cluster.url + "/v1/completions", json=_prompt(max_tokens=2), timeout=20).status_code == 200


@pytest.mark.parametrize("raw", [b"[" * 200_000, b'{"a":' * 200_000, b'{"model": "m", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"])
def test_nesting_beyond_the_parser_is_400(cluster: Cluster, raw: bytes) -> None:
    r = httpx.post(cluster.url + "/v1/completions", content=raw, headers={"Content-Type": "application/json"},
                   timeout=20)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text


def test_ordinary_bodies_still_pass(cluster: Cluster) -> None:
    ok = [("/v1/completions", _prompt(prompt=[0, 5, MAX_TOKEN_ID], n=2, max_tokens=3)),
          ("/v1/completions", _prompt(prompt=[[1, 2], [3]], min_tokens=0, max_tokens=2)),
          ("/v1/chat/completions", {**_user([{"type": "text", "text": "a"}, {"type": "image_url",
                                             "image_url": {"url": "data:,"}}]), "max_tokens": 2}),
          ("/v1/chat/completions", {**_user(None), "max_completion_tokens": 2,
                                    "response_format": {"type": "json_schema", "json_schema": _nested(20)}})]
    for path, body in ok:
        assert httpx.post(cluster.url + path, json=body, timeout=20).status_code == 200


def test_client_kv_transfer_params_never_reach_a_worker(cluster: Cluster) -> None:
    # A duplicate key whose last value is null must not smuggle the first one through the raw bytes.
    evil = {"do_remote_prefill": True, "remote_host": "10.6.6.6", "pdx": {"agent": "tcp://10.6.6.6:1"}}
    raw = (b'{"model": "standin-model", "prompt": "hello", "max_tokens": 2, "kv_transfer_params": '
           + json.dumps(evil).encode() + b', "kv_transfer_params": null}')
    for body in (raw, json.dumps(_prompt(max_tokens=2, kv_transfer_params=evil)).encode()):
        r = httpx.post(cluster.url + "/v1/completions", content=body, headers={"Content-Type": "application/json"},
                       timeout=20)
        assert r.status_code == 200
        got = cluster.decode[0].received[-1]
        assert b"10.6.6.6" not in got.raw and b"10.6.6.6" not in cluster.prefill[0].received[-1].raw
        assert got.body["kv_transfer_params"]["remote_engine_id"] == "p0"  # what prefill answered


def test_an_oversized_worker_answer_fails_that_call_and_the_proxy_keeps_serving() -> None:
    with Cluster(1, 1, models=[MODEL], max_upstream_body_size=2048, prefill_fallback=False) as c:
        # the stand-in answers ~3 bytes per token: 1,000 tokens is over the 2 KiB limit
        r = httpx.post(c.url + "/v1/completions", json=_prompt(max_tokens=1000), timeout=20)
        assert r.status_code == 502 and "over the limit of 2048 bytes" in r.json()["error"]["message"]
        streamed = httpx.post(c.url + "/v1/completions", json=_prompt(max_tokens=1000, stream=True), timeout=20)
        assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")  # streams are not buffered
        assert httpx.post(c.url + "/v1/completions", json=_prompt(max_tokens=3), timeout=20).status_code == 200


# --- a bounded fuzz of the whole app -------------------------------------------------------------

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                     st.text(max_size=20))
_json = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                     max_leaves=20)
_small = st.one_of(st.integers(-3, 8), st.sampled_from([2**31, 2**63, 10**30]), _scalars)
_part = st.one_of(_json, st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", ""]),
                                                "text": st.one_of(st.text(max_size=20), _json)}))
_message = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "system"]), _json),
                                  "content": st.one_of(st.text(max_size=40), st.lists(_part, max_size=3), _json)})
_optional = {"n": _small, "max_tokens": _small, "max_completion_tokens": _small, "min_tokens": _small,
             "best_of": _small, "stream": st.one_of(st.booleans(), _scalars), "cache_salt": _json,
             "kv_transfer_params": _json, "extra": _json}
_completion = st.fixed_dictionaries(
    {"model": st.one_of(st.just(MODEL), _json),
     "prompt": st.one_of(st.text(max_size=40), st.lists(st.integers(-5, 2**32), max_size=8),
                         st.lists(st.lists(st.integers(-5, 300), max_size=4), max_size=3), _json)},
    optional=_optional)
_chat = st.fixed_dictionaries({"model": st.one_of(st.just(MODEL), _json),
                               "messages": st.one_of(st.lists(_message, max_size=3), _json)}, optional=_optional)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.one_of(st.tuples(st.just("/v1/completions"), _completion),
                      st.tuples(st.just("/v1/chat/completions"), _chat),
                      st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), _json),
                      st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), st.binary(max_size=64))))
def test_fuzz_never_5xx_and_errors_are_json(cluster: Cluster, data: tuple[str, Any]) -> None:
    path, body = data
    if isinstance(body, bytes):
        content = body
    else:
        if isinstance(body, dict) and isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool):
            body["max_tokens"] = min(body["max_tokens"], 8)  # the stand-in writes that many tokens
        content = json.dumps(body).encode()
    r = httpx.post(cluster.url + path, content=content, headers={"Content-Type": "application/json"}, timeout=20)
    assert r.status_code < 500, (r.status_code, r.text[:500], content[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
