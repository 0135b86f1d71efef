"""The P/D flow against in-process stand-in workers: what each worker receives, retries,
fallbacks, timeouts, broken streams and client disconnects."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator

import httpx
import pytest

from pdx.config import CacheAwareConfig, ProxyWorkerConfig
from pdx.scheduler.tokenizer import ByteTokenizer
from proxy.standin import content_of_stream
from proxy.testing import Cluster, wait_until

MODEL = "standin-model"


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with Cluster(2, 2, models=[MODEL]) as c:
        yield c


def _post(c: Cluster, body: dict[str, object], path: str = "/v1/completions",
          headers: dict[str, str] | None = None, timeout: float = 20.0) -> httpx.Response:
    return httpx.post(c.url + path, json=body, headers=headers, timeout=timeout)


def _completion(**kw: object) -> dict[str, object]:
    return {"model": MODEL, "prompt": "hello there", "max_tokens": 4, **kw}


def _chat(**kw: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **kw}


def _dead_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def test_completion_goes_prefill_then_decode(cluster: Cluster) -> None:
    r = _post(cluster, _completion(min_tokens=2, stream_options={"include_usage": True}, stream=False),
              headers={"X-Request-Id": "req-42"})
    assert r.status_code == 200, r.text
    assert r.headers["X-Request-Id"] == "req-42"
    assert r.json()["choices"][0]["text"] == " w0 w1 w2 w3"
    (p,) = [rec for w in cluster.prefill for rec in w.received]
    (d,) = [rec for w in cluster.decode for rec in w.received]
    assert p.body["max_tokens"] == 1 and p.body["stream"] is False
    assert p.body["kv_transfer_params"] == {"do_remote_decode": True}
    assert "min_tokens" not in p.body and "stream_options" not in p.body
    assert p.body["prompt"] == "hello there"
    assert d.body["max_tokens"] == 4 and d.body["min_tokens"] == 2
    assert d.body["kv_transfer_params"]["remote_request_id"] == "req-42"
    assert d.body["kv_transfer_params"]["do_remote_prefill"] is True
    assert p.request_id == d.request_id == "req-42"
    assert p.path == d.path == "/v1/completions"


def test_request_id_is_generated_when_absent_or_invalid(cluster: Cluster) -> None:
    r1 = _post(cluster, _completion())
    r2 = _post(cluster, _completion(), headers={"X-Request-Id": "bad id with spaces"})
    rid1, rid2 = r1.headers["X-Request-Id"], r2.headers["X-Request-Id"]
    assert rid1 and rid2 and rid1 != rid2 and " " not in rid2
    got = {rec.request_id for w in (*cluster.prefill, *cluster.decode) for rec in w.received}
    assert got == {rid1, rid2}


def test_chat_sends_the_same_messages_to_both(cluster: Cluster) -> None:
    r = _post(cluster, _chat(max_completion_tokens=5), path="/v1/chat/completions")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == " w0 w1 w2 w3 w4"
    (p,) = [rec for w in cluster.prefill for rec in w.received]
    (d,) = [rec for w in cluster.decode for rec in w.received]
    assert p.body["messages"] == d.body["messages"] == [{"role": "user", "content": "hi"}]
    assert p.body["max_tokens"] == 1 and p.body["max_completion_tokens"] == 1
    assert d.body["max_completion_tokens"] == 5
    assert p.path == d.path == "/v1/chat/completions"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_streaming_matches_plain(cluster: Cluster, path: str) -> None:
    body = _completion(max_tokens=6) if "chat" not in path else _chat(max_tokens=6)
    plain = _post(cluster, body, path=path).json()["choices"][0]
    text = plain.get("text") or plain["message"]["content"]
    r = _post(cluster, {**body, "stream": True}, path=path)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.content.endswith(b"data: [DONE]\n\n")
    assert content_of_stream(r.content) == text
    decode_bodies = [rec.body for w in cluster.decode for rec in w.received]
    assert [b.get("stream") for b in decode_bodies] == [None, True]


def test_streamed_bytes_arrive_before_the_answer_ends() -> None:
    with Cluster(1, 1) as c:
        c.decode[0].behaviour.pace_s = 0.2
        c.decode[0].behaviour.tokens = 50
        with httpx.stream("POST", c.url + "/v1/completions", json=_completion(max_tokens=50, stream=True),
                          timeout=20) as r:
            first = next(r.iter_raw())
            assert b"w0" in first
            # the stand-in is still producing: most tokens are not sent yet
            assert len(c.decode[0].completed) == 0


def test_client_kv_transfer_params_are_dropped(cluster: Cluster) -> None:
    evil = {"do_remote_prefill": True, "remote_host": "10.0.0.1"}
    _post(cluster, _completion(kv_transfer_params=evil))
    (d,) = [rec for w in cluster.decode for rec in w.received]
    assert d.body["kv_transfer_params"]["remote_engine_id"] in ("p0", "p1")
    assert "remote_host" not in d.body["kv_transfer_params"]


def test_prefill_error_retries_on_another_prefill_worker(cluster: Cluster) -> None:
    cluster.prefill[0].behaviour.fail_status = 500  # the first choice of a fresh proxy
    r = _post(cluster, _completion())
    assert r.status_code == 200
    assert [len(w.received) for w in cluster.prefill] == [1, 1]
    (d,) = [rec for w in cluster.decode for rec in w.received]
    assert d.body["kv_transfer_params"]["remote_engine_id"] == "p1"
    assert cluster.metric("pdx_proxy_retries_total", side="prefill") == 1
    assert cluster.metric("pdx_proxy_upstream_errors_total", side="prefill", kind="status") == 1


def test_prefill_failing_everywhere_falls_back_to_decode(cluster: Cluster) -> None:
    for w in cluster.prefill:
        w.behaviour.fail_status = 503
    r = _post(cluster, _completion())
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == " w0 w1 w2 w3"
    (d,) = [rec for w in cluster.decode for rec in w.received]
    assert "kv_transfer_params" not in d.body  # decode computes the prompt itself
    assert cluster.metric("pdx_proxy_prefill_fallback_total") == 1


def test_prefill_fallback_can_be_turned_off() -> None:
    with Cluster(1, 1, prefill_fallback=False, prefill_retries=0) as c:
        c.prefill[0].behaviour.fail_status = 500
        r = _post(c, _completion())
        assert r.status_code == 502
        assert r.json()["error"]["type"] == "upstream_error"
        assert "Retry-After" in r.headers
        assert not c.decode[0].received


def test_unreachable_prefill_worker_is_skipped_and_leaves_the_pool() -> None:
    dead = ProxyWorkerConfig(url=_dead_url(), role="prefill", id="dead")
    with Cluster(1, 1, extra_workers=[dead], policy="round_robin", health_interval_s=30) as c:
        for _ in range(3):
            assert _post(c, _completion()).status_code == 200
        assert c.metric("pdx_proxy_upstream_errors_total", side="prefill", kind="connect") == 1
        workers = httpx.get(c.admin_url + "/admin/workers").json()["workers"]
        assert {w["id"]: w["state"] for w in workers}["dead"] == "unhealthy"
        assert len(c.prefill[0].received) == 3


def test_prefill_client_error_is_returned_as_is(cluster: Cluster) -> None:
    for w in cluster.prefill:
        w.behaviour.fail_status = 400
    r = _post(cluster, _completion())
    assert r.status_code == 400
    assert "told to fail" in r.json()["error"]["message"]
    assert sum(len(w.received) for w in cluster.prefill) == 1  # not retried: the request is at fault
    assert not any(w.received for w in cluster.decode)


def test_prefill_timeout_falls_back() -> None:
    with Cluster(1, 1, prefill_timeout_s=0.3) as c:
        c.prefill[0].behaviour.hang = True
        r = _post(c, _completion())
        assert r.status_code == 200
        assert c.metric("pdx_proxy_upstream_errors_total", side="prefill", kind="timeout") == 1
        wait_until(lambda: len(c.prefill[0].aborted) == 1, what="prefill aborted after its timeout")


def test_decode_error_before_first_byte_retries_another_decode(cluster: Cluster) -> None:
    cluster.decode[0].behaviour.fail_status = 500  # the first choice of a fresh proxy
    r = _post(cluster, _completion(stream=True))
    assert r.status_code == 200 and content_of_stream(r.content) == " w0 w1 w2 w3"
    assert sum(len(w.received) for w in cluster.decode) == 2
    bodies = [rec.body for w in cluster.decode for rec in w.received]
    assert bodies[0]["kv_transfer_params"] == bodies[1]["kv_transfer_params"]
    assert cluster.metric("pdx_proxy_retries_total", side="decode") == 1


def test_decode_dropping_the_connection_retries() -> None:
    with Cluster(1, 2) as c:
        c.decode[0].behaviour.drop = True
        r = _post(c, _completion())
        assert r.status_code == 200
        # d0 may see it twice: a dropped reused keep-alive connection is retried once
        assert len(c.decode[0].received) in (1, 2) and len(c.decode[1].received) == 1
        assert c.metric("pdx_proxy_upstream_errors_total", side="decode", kind="broken") == 1


def test_decode_failing_everywhere_is_502() -> None:
    with Cluster(1, 2, decode_fallback=False) as c:
        for w in c.decode:
            w.behaviour.fail_status = 500
        r = _post(c, _completion())
        assert r.status_code == 502
        err = r.json()["error"]
        assert err["type"] == "upstream_error" and err["code"] == "upstream_failed"


def test_decode_first_token_timeout_is_504() -> None:
    with Cluster(1, 1, first_token_timeout_s=0.3, decode_fallback=False) as c:
        c.decode[0].behaviour.hang = True
        r = _post(c, _completion(stream=True))
        assert r.status_code == 504
        assert r.json()["error"]["code"] == "upstream_timeout"
        wait_until(lambda: len(c.decode[0].aborted) == 1, what="decode aborted after its timeout")


def test_decode_stream_breaking_midway_ends_with_an_error_event() -> None:
    with Cluster(1, 1) as c:
        c.decode[0].behaviour.break_after = 3
        r = _post(c, _completion(max_tokens=8, stream=True))
        assert r.status_code == 200
        events = [line for line in r.text.splitlines() if line.startswith("data: ")]
        assert content_of_stream("\n".join(events[:-1]).encode()) == " w0 w1 w2"
        assert json.loads(events[-1][6:])["error"]["code"] == "stream_broken"
        assert "[DONE]" not in r.text


def test_decode_stalling_midway_hits_the_read_timeout() -> None:
    with Cluster(1, 1, read_timeout_s=0.3) as c:
        c.decode[0].behaviour.pace_s = 30
        r = _post(c, _completion(max_tokens=3, stream=True))
        assert r.status_code == 200
        assert '"code": "stream_broken"' in r.text and "w0" in r.text
        wait_until(lambda: len(c.decode[0].aborted) == 1, what="stalled decode aborted")


def test_client_disconnect_mid_stream_aborts_decode() -> None:
    with Cluster(1, 1) as c:
        c.decode[0].behaviour.pace_s = 0.05
        with httpx.stream("POST", c.url + "/v1/completions",
                          json=_completion(max_tokens=500, stream=True),
                          headers={"X-Request-Id": "gone-1"}, timeout=20) as r:
            next(r.iter_raw())
        wait_until(lambda: c.decode[0].aborted == ["gone-1"], what="decode abort")
        wait_until(lambda: c.metric("pdx_proxy_client_disconnects_total") == 1, what="disconnect metric")
        assert c.decode[0].completed == []
        assert c.prefill[0].completed == ["gone-1"]


def test_client_disconnect_during_prefill_aborts_prefill_and_skips_decode() -> None:
    with Cluster(1, 1) as c:
        c.prefill[0].behaviour.hang = True
        done = threading.Event()

        def client() -> None:
            try:
                _post(c, _completion(), headers={"X-Request-Id": "gone-2"}, timeout=0.5)
            except httpx.TimeoutException:
                pass
            done.set()

        t = threading.Thread(target=client)
        t.start()
        wait_until(done.is_set, what="client gave up")
        t.join()
        wait_until(lambda: c.prefill[0].aborted == ["gone-2"], what="prefill abort")
        assert not c.decode[0].received


def test_no_healthy_decode_worker_is_503() -> None:
    with Cluster(1, 1, unhealthy_after=1, decode_fallback=False) as c:
        c.decode[0].behaviour.health_status = 500
        wait_until(lambda: httpx.get(c.url + "/health").status_code == 503, what="decode out of the pool")
        r = _post(c, _completion())
        assert r.status_code == 503 and "Retry-After" in r.headers
        assert r.json()["error"]["code"] == "no_healthy_workers"
        c.decode[0].behaviour.health_status = 200
        wait_until(lambda: httpx.get(c.url + "/health").status_code == 200, what="decode back")
        assert _post(c, _completion()).status_code == 200


def test_worker_failing_health_checks_leaves_and_returns() -> None:
    with Cluster(2, 1, policy="round_robin") as c:
        c.prefill[0].behaviour.health_status = 503

        def state() -> str:
            ws = httpx.get(c.admin_url + "/admin/workers").json()["workers"]
            return str({w["id"]: w["state"] for w in ws}["p0"])

        wait_until(lambda: state() == "unhealthy", what="p0 out")
        for _ in range(4):
            assert _post(c, _completion()).status_code == 200
        assert not c.prefill[0].received and len(c.prefill[1].received) == 4
        c.prefill[0].behaviour.health_status = 200
        wait_until(lambda: state() == "healthy", what="p0 back")
        for _ in range(4):
            _post(c, _completion())
        assert c.prefill[0].received


def test_upstream_api_key_is_sent_to_workers() -> None:
    with Cluster(1, 1, upstream_api_key="w-secret") as c:
        _post(c, _completion())
        assert c.prefill[0].received[0].authorization == "Bearer w-secret"
        assert c.decode[0].received[0].authorization == "Bearer w-secret"


def test_cache_aware_repeat_goes_to_the_cache_and_skips_prefill() -> None:
    cfg = CacheAwareConfig(chunk_tokens=16)
    with Cluster(2, 1, policy="cache_aware", cache_aware=cfg, tokenizer=ByteTokenizer()) as c:
        long_prompt = "".join(chr(97 + i % 26) * 16 for i in range(8))
        assert _post(c, _completion(prompt=long_prompt + "tail")).status_code == 200
        first = [w.name for w in c.prefill if w.received]
        assert len(first) == 1
        # the same prompt again: the decode worker holds every full chunk -> no prefill
        assert _post(c, _completion(prompt=long_prompt + "tail")).status_code == 200
        assert sum(len(w.received) for w in c.prefill) == 1
        assert "kv_transfer_params" not in c.decode[0].received[-1].body
        assert c.metric("pdx_proxy_routes_total", reason="skip_prefill") == 1
        # same prefix, new ending: prefill on the worker that holds the prefix
        assert _post(c, _completion(prompt=long_prompt + "x" * 40)).status_code == 200
        holder = next(w for w in c.prefill if w.name == first[0])
        assert len(holder.received) == 2
        assert c.metric("pdx_proxy_routes_total", reason="cache_hit") == 1
        assert c.metric("pdx_proxy_routed_cached_chunks_total") >= 8 + 8


def test_decode_only_deployment_skips_prefill() -> None:
    with Cluster(0, 1) as c:
        r = _post(c, _completion(stream=True))
        assert r.status_code == 200 and content_of_stream(r.content) == " w0 w1 w2 w3"
        assert "kv_transfer_params" not in c.decode[0].received[0].body


def test_utf16_body_reaches_decode_as_valid_json(cluster: Cluster) -> None:
    body = json.dumps(_completion(prompt="héllo")).encode("utf-16")
    r = httpx.post(cluster.url + "/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    (d,) = [rec for w in cluster.decode for rec in w.received]
    assert d.body["prompt"] == "héllo" and d.body["kv_transfer_params"]["do_remote_prefill"] is True


# --- peer-to-peer reuse: hints ---------------------------------------------------------------------

_P2P_PROMPT = "".join(chr(97 + i % 26) * 16 for i in range(8)) + "tail"


def _announce_agents(c: Cluster, held: dict[str, tuple[int, int]]) -> dict[str, str]:
    """Announce an agent for each stand-in: ``held[name] = (chunks held, requests)``; returns each
    worker's peer address."""
    from pdx.keys import chunk_keys
    from pdx.scheduler.messages import AgentAnnouncement, AgentLoad
    from pdx.scheduler.summary import KeySummary

    assert c.server is not None
    keys = chunk_keys(list(_P2P_PROMPT.encode()), "fp-flow", 16)
    addresses = {}
    for i, w in enumerate((*c.prefill, *c.decode)):
        n, requests = held.get(w.name, (0, 0))
        addresses[w.name] = f"tcp://127.0.0.1:{9100 + i}"
        worker = c.server.registry.by_url(w.url)
        assert worker is not None
        msg = AgentAnnouncement(
            agent_id=f"agent-{w.name}", role=worker.role, engine_url=w.url, transport_address=addresses[w.name],
            load=AgentLoad(requests=requests, pool_used_bytes=1024 * 16 * max(n, 1)),
            chunk_fingerprint="fp-flow", chunk_tokens=16, keys=KeySummary.build(keys[:n]) if n else None,
            heartbeat_s=30.0, seq=1)
        c.bg.call(c.server.registry.announce, msg)
    return addresses


def test_prefill_on_a_worker_without_the_prefix_gets_a_hint_naming_the_busy_holder() -> None:
    from pdx.config import PeerReuseConfig

    cfg = CacheAwareConfig(chunk_tokens=16, max_imbalance=0, skip_prefill=False)
    with Cluster(2, 1, policy="cache_aware", cache_aware=cfg, tokenizer=ByteTokenizer(),
                 p2p=PeerReuseConfig(fetch_fixed_ms=0.0)) as c:
        addr = _announce_agents(c, {"p0": (8, 3)})  # p0 holds the prefix but is busy
        assert _post(c, _completion(prompt=_P2P_PROMPT)).status_code == 200
        assert not c.prefill[0].received
        (p,) = c.prefill[1].received
        assert p.body["kv_transfer_params"] == {
            "do_remote_decode": True,
            "pdx": {"v": 2, "hint": {"agent": addr["p0"], "chunks": 8, "agent_id": "agent-p0"}}}
        (d,) = c.decode[0].received  # decode gets the prefill's params, never a hint
        assert "hint" not in json.dumps(d.body["kv_transfer_params"])
        assert c.metric("pdx_proxy_peer_hints_total", decision="fetch") == 1
        assert c.metric("pdx_proxy_peer_hint_chunks_total", decision="fetch") == 8


def test_decode_computing_the_prompt_gets_a_hint_and_a_slow_link_means_recompute() -> None:
    from pdx.config import PeerReuseConfig

    cfg = CacheAwareConfig(chunk_tokens=16, max_imbalance=0)
    with Cluster(0, 2, policy="cache_aware", cache_aware=cfg, tokenizer=ByteTokenizer(),
                 p2p=PeerReuseConfig(fetch_fixed_ms=0.0)) as c:
        addr = _announce_agents(c, {"d0": (8, 3)})  # d0 holds every full chunk but is busy
        assert _post(c, _completion(prompt=_P2P_PROMPT)).status_code == 200
        (d,) = c.decode[1].received
        assert d.body["kv_transfer_params"] == {
            "pdx": {"v": 2, "hint": {"agent": addr["d0"], "chunks": 8, "agent_id": "agent-d0"}}}
    with Cluster(0, 2, policy="cache_aware", cache_aware=cfg, tokenizer=ByteTokenizer(),
                 p2p=PeerReuseConfig(link_gbps=1e-6)) as c:
        _announce_agents(c, {"d0": (8, 3)})
        assert _post(c, _completion(prompt=_P2P_PROMPT)).status_code == 200
        (d,) = c.decode[1].received
        assert "kv_transfer_params" not in d.body
        assert c.metric("pdx_proxy_peer_hints_total", decision="recompute") == 1


def test_peer_hints_work_with_a_policy_that_ignores_the_cache() -> None:
    """round_robin never looks at caches, but with a tokenizer configured the proxy still computes the
    prompt's keys for peer hints: whichever worker it picks fetches what another agent holds."""
    from pdx.config import PeerReuseConfig

    cfg = CacheAwareConfig(chunk_tokens=16, tokenizer="configured")  # ByteTokenizer() stands in for it
    with Cluster(2, 1, policy="round_robin", cache_aware=cfg, tokenizer=ByteTokenizer(),
                 p2p=PeerReuseConfig(fetch_fixed_ms=0.0)) as c:
        addr = _announce_agents(c, {"p1": (8, 0)})
        assert _post(c, _completion(prompt=_P2P_PROMPT)).status_code == 200
        (p,) = c.prefill[0].received  # round_robin's first pick, without the prefix
        assert p.body["kv_transfer_params"]["pdx"]["hint"]["agent"] == addr["p1"]
    with Cluster(2, 1, policy="round_robin", cache_aware=CacheAwareConfig(chunk_tokens=16),
                 tokenizer=ByteTokenizer(), p2p=PeerReuseConfig(fetch_fixed_ms=0.0)) as c:
        _announce_agents(c, {"p1": (8, 0)})  # no tokenizer configured: no keys, no hint
        assert _post(c, _completion(prompt=_P2P_PROMPT)).status_code == 200
        (p,) = c.prefill[0].received
        assert p.body["kv_transfer_params"] == {"do_remote_decode": True}


def test_layerwise_prefill_names_the_decode_agent_it_streams_to() -> None:
    with Cluster(1, 1, pd_layerwise=True) as c:
        assert _post(c, _completion()).status_code == 200  # no agent announced: nothing to name
        (p,) = c.prefill[0].received
        assert p.body["kv_transfer_params"] == {"do_remote_decode": True}
        addr = _announce_agents(c, {})
        assert _post(c, _completion()).status_code == 200
        p = c.prefill[0].received[-1]
        assert p.body["kv_transfer_params"] == {"do_remote_decode": True,
                                                "pdx": {"v": 2, "push": {"agent": addr["d0"]}}}
        d = c.decode[0].received[-1]
        assert d.body["kv_transfer_params"]["do_remote_prefill"] is True
    with Cluster(1, 1) as c:  # off by default: whole-prompt transfer
        _announce_agents(c, {})
        assert _post(c, _completion()).status_code == 200
        (p,) = c.prefill[0].received
        assert p.body["kv_transfer_params"] == {"do_remote_decode": True}
