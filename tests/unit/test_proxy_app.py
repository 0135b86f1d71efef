"""The proxy's HTTP surface: bad input, API keys, overload, models, health, metrics, admin."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import msgpack
import pytest

from pdx.config import ProxyWorkerConfig
from pdx.scheduler.messages import WIRE_VERSION, AgentAnnouncement, AgentLoad, WorkerRole
from proxy.standin import StandinWorker
from proxy.testing import Cluster, wait_until

MODEL = "standin-model"


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with Cluster(1, 1, models=[MODEL], max_body_size=4096) as c:
        yield c


def _err(r: httpx.Response) -> dict[str, object]:
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("content", "code"), [
    (b"{not json", "invalid_json"),
    (b"", "invalid_json"),
    (b"[1, 2]", "invalid_json"),
    (b"\xff\xfe", "invalid_json"),
])
def test_malformed_body_is_400(cluster: Cluster, content: bytes, code: str) -> None:
    r = httpx.post(cluster.url + "/v1/completions", content=content,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert _err(r)["code"] == code and _err(r)["type"] == "invalid_request_error"
    assert r.headers["X-Request-Id"]


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"prompt": "x"}, "model"),
    ("/v1/completions", {"model": MODEL}, "prompt"),
    ("/v1/chat/completions", {"model": MODEL}, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"content": "no role"}]}, "messages"),
    ("/v1/completions", {"model": 3, "prompt": "x"}, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": 5}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": []}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ["a", 1]}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": "9"}, "max_completion_tokens"),
])
def test_missing_or_bad_fields_are_400_naming_the_field(cluster: Cluster, path: str,
                                                         body: dict[str, object], param: str) -> None:
    r = httpx.post(cluster.url + path, json=body)
    assert r.status_code == 400
    err = _err(r)
    assert err["param"] == param and param in str(err["message"])
    assert not cluster.prefill[0].received and not cluster.decode[0].received


def test_token_id_prompts_are_accepted(cluster: Cluster) -> None:
    for prompt in ([1, 2, 3], [[1, 2], [3]], ["a", "b"]):
        r = httpx.post(cluster.url + "/v1/completions", json={"model": MODEL, "prompt": prompt})
        assert r.status_code == 200, r.text
        assert cluster.decode[0].received[-1].body["prompt"] == prompt


def test_unknown_model_is_404(cluster: Cluster) -> None:
    r = httpx.post(cluster.url + "/v1/completions", json={"model": "gpt-9", "prompt": "x"})
    assert r.status_code == 404
    err = _err(r)
    assert err["code"] == "model_not_found" and err["param"] == "model" and MODEL in str(err["message"])


def test_body_over_the_limit_is_413(cluster: Cluster) -> None:
    big = {"model": MODEL, "prompt": "x" * 5000}
    r = httpx.post(cluster.url + "/v1/completions", json=big)
    assert r.status_code == 413 and _err(r)["code"] == "body_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked upload
        yield b'{"model": "standin-model", "prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    r = httpx.post(cluster.url + "/v1/completions", content=chunks(),
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert not cluster.decode[0].received
    # the proxy still serves
    assert httpx.post(cluster.url + "/v1/completions", json={"model": MODEL, "prompt": "ok"}).status_code == 200


def test_unknown_path_and_method(cluster: Cluster) -> None:
    r = httpx.get(cluster.url + "/v2/nothing")
    assert r.status_code == 404 and _err(r)["code"] == "not_found"
    r = httpx.get(cluster.url + "/v1/completions")
    assert r.status_code == 405 and _err(r)["code"] == "method_not_allowed"


# --- API key -------------------------------------------------------------------------------------


def test_api_key() -> None:
    with Cluster(1, 1, api_key="sekret") as c:
        body = {"model": "standin-model", "prompt": "x"}
        r = httpx.post(c.url + "/v1/completions", json=body)
        assert r.status_code == 401 and _err(r)["type"] == "authentication_error"
        r = httpx.post(c.url + "/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401
        assert httpx.get(c.url + "/v1/models").status_code == 401
        ok = {"Authorization": "Bearer sekret"}
        assert httpx.post(c.url + "/v1/completions", json=body, headers=ok).status_code == 200
        assert httpx.get(c.url + "/v1/models", headers=ok).status_code == 200
        # health and metrics need no key; admin falls back to the api key
        assert httpx.get(c.url + "/health").status_code == 200
        assert httpx.get(c.url + "/metrics").status_code == 200
        assert httpx.get(c.url + "/admin/workers").status_code == 401
        assert httpx.get(c.url + "/admin/workers", headers=ok).status_code == 200
        # the client's key is not forwarded to the workers
        assert c.decode[0].received[0].authorization is None


# --- overload ------------------------------------------------------------------------------------


def _slow_stream_in_flight(c: Cluster, rid: str) -> tuple[threading.Thread, threading.Event]:
    """Start a long streaming request in a thread; return once its first byte arrived."""
    started, stop = threading.Event(), threading.Event()

    def run() -> None:
        try:
            with httpx.stream("POST", c.url + "/v1/completions", timeout=30, headers={"X-Request-Id": rid},
                              json={"model": "standin-model", "prompt": "x", "max_tokens": 400,
                                    "stream": True}) as r:
                for _ in r.iter_raw():
                    started.set()
                    if stop.is_set():
                        break
        except httpx.HTTPError:
            pass  # the proxy was stopped under it

    t = threading.Thread(target=run)
    t.start()
    wait_until(started.is_set, what="first request streaming")
    return t, stop


def test_full_queue_is_429_with_retry_after() -> None:
    with Cluster(1, 1, max_inflight=1, max_queue=0, retry_after_s=3) as c:
        c.decode[0].behaviour.pace_s = 0.02
        t, stop = _slow_stream_in_flight(c, "long")
        r = httpx.post(c.url + "/v1/completions", json={"model": "standin-model", "prompt": "x"})
        assert r.status_code == 429 and r.headers["Retry-After"] == "3"
        assert _err(r)["code"] == "overloaded"
        stop.set()
        t.join()
        assert c.metric("pdx_proxy_rejected_total", reason="overloaded") == 1
        wait_until(lambda: httpx.post(c.url + "/v1/completions",
                                      json={"model": "standin-model", "prompt": "x"}).status_code == 200,
                   what="slot free again")


def test_waiting_too_long_in_the_queue_is_503() -> None:
    with Cluster(1, 1, max_inflight=1, max_queue=4, queue_timeout_s=0.2) as c:
        c.decode[0].behaviour.pace_s = 0.02
        t, stop = _slow_stream_in_flight(c, "long")
        r = httpx.post(c.url + "/v1/completions", json={"model": "standin-model", "prompt": "x"})
        assert r.status_code == 503 and "Retry-After" in r.headers
        stop.set()
        t.join()


def test_queued_request_is_served_when_a_slot_frees() -> None:
    with Cluster(1, 1, max_inflight=1, max_queue=4, queue_timeout_s=30) as c:
        c.decode[0].behaviour.pace_s = 0.02
        t, stop = _slow_stream_in_flight(c, "long")
        result: list[int] = []
        waiter = threading.Thread(target=lambda: result.append(httpx.post(
            c.url + "/v1/completions", json={"model": "standin-model", "prompt": "x"}, timeout=30).status_code))
        waiter.start()
        wait_until(lambda: c.metric("pdx_proxy_queued") == 1 or bool(result), what="request queued")
        stop.set()  # the first client leaves: its slot goes to the waiter
        t.join()
        waiter.join()
        assert result == [200]


# --- models, health, metrics ---------------------------------------------------------------------


def test_models_configured_and_learned() -> None:
    with Cluster(1, 1, models=["a", "b"]) as c:
        ids = [m["id"] for m in httpx.get(c.url + "/v1/models").json()["data"]]
        assert ids == ["a", "b"]
    with Cluster(1, 1) as c:  # none configured: learned from the workers
        wait_until(lambda: [m["id"] for m in httpx.get(c.url + "/v1/models").json()["data"]] == [MODEL],
                   what="models learned")
        r = httpx.post(c.url + "/v1/completions", json={"model": "other", "prompt": "x"})
        assert r.status_code == 404


def test_health_is_503_until_a_decode_worker_answered() -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()
    dead_decode = [ProxyWorkerConfig(url=dead, role="decode", id="dead")]
    with Cluster(1, 0, extra_workers=dead_decode, decode_fallback=False) as c:
        h = httpx.get(c.url + "/health")
        assert h.status_code == 503 and h.json()["workers"] == {"prefill": 1, "decode": 0}
    # a prefill worker can serve whole: the proxy is up, degraded
    with Cluster(1, 0, extra_workers=dead_decode) as c:
        h = httpx.get(c.url + "/health")
        assert h.status_code == 200 and h.json()["status"] == "degraded"


def test_health_and_metrics(cluster: Cluster) -> None:
    h = httpx.get(cluster.url + "/health")
    assert h.status_code == 200 and h.json()["workers"] == {"prefill": 1, "decode": 1}
    httpx.post(cluster.url + "/v1/completions", json={"model": MODEL, "prompt": "x"})
    httpx.post(cluster.url + "/v1/completions", json={"model": "nope", "prompt": "x"})
    text = httpx.get(cluster.url + "/metrics").text
    assert 'pdx_proxy_requests_total{endpoint="completions",status="200"} 1.0' in text
    assert 'pdx_proxy_requests_total{endpoint="completions",status="404"} 1.0' in text
    assert "pdx_proxy_first_byte_seconds_bucket" in text
    assert 'pdx_proxy_worker_up{role="decode",state="healthy",worker="d0"} 1.0' in text
    assert 'pdx_proxy_routes_total{reason="cache_miss"} 1.0' in text  # prefix_affinity, nothing cached


# --- admin: agent announcements ------------------------------------------------------------------


def _announce(url: str, role: str = "decode", **kw: object) -> dict[str, object]:
    return AgentAnnouncement(agent_id=str(kw.pop("agent_id", "agent-x")), role=WorkerRole(role),
                             engine_url=url, **kw).to_dict()  # type: ignore[arg-type]


def _extra_standin(c: Cluster, name: str) -> StandinWorker:
    w = StandinWorker(name)
    c.bg.run(w.start())
    return w


def test_agent_registration_adds_a_worker_that_gets_requests() -> None:
    with Cluster(1, 0, decode_fallback=False) as c:
        assert httpx.get(c.url + "/health").status_code == 503
        d = _extra_standin(c, "dyn")
        try:
            r = httpx.post(c.admin_url + "/admin/register",
                           json=_announce(d.url, agent_id="agent-d", load=AgentLoad(requests=2), models=("m",)))
            assert r.status_code == 200 and r.json()["worker_id"] == "agent-d"
            workers = httpx.get(c.admin_url + "/admin/workers").json()["workers"]
            dyn = next(w for w in workers if w["id"] == "agent-d")
            assert dyn["source"] == "agent" and dyn["reported_load"] == {"requests": 2, "tokens": 0}
            r = httpx.post(c.url + "/v1/completions", json={"model": "standin-model", "prompt": "x"})
            assert r.status_code == 200 and len(d.received) == 1
            # msgpack works too, and leaving removes it
            packed = msgpack.packb(_announce(d.url, agent_id="agent-d", leaving=True))
            r = httpx.post(c.admin_url + "/admin/register", content=packed,
                           headers={"Content-Type": "application/msgpack"})
            assert r.status_code == 200
            assert all(w["id"] != "agent-d" for w in httpx.get(c.admin_url + "/admin/workers").json()["workers"])
        finally:
            c.bg.run(d.stop())


def test_missed_heartbeats_take_the_worker_out_until_the_next() -> None:
    with Cluster(1, 0, heartbeat_timeout_s=0.3, decode_fallback=False) as c:
        d = _extra_standin(c, "dyn")
        try:
            ann = _announce(d.url, heartbeat_s=0.05)
            assert httpx.post(c.admin_url + "/admin/register", json=ann).status_code == 200
            assert httpx.get(c.url + "/health").status_code == 200
            wait_until(lambda: httpx.get(c.url + "/health").status_code == 503, what="heartbeat timeout")
            httpx.post(c.admin_url + "/admin/register", json=ann)
            assert httpx.get(c.url + "/health").status_code == 200
        finally:
            c.bg.run(d.stop())


@pytest.mark.parametrize(("body", "code"), [
    ({"wire_version": WIRE_VERSION + 1, "agent_id": "a", "role": "decode", "engine_url": "http://x"},
     "invalid_announcement"),
    ({"wire_version": WIRE_VERSION, "agent_id": "a", "role": "decode"}, "invalid_announcement"),
    ({"wire_version": WIRE_VERSION, "agent_id": "a", "role": "decode", "engine_url": "http://127.0.0.1:1",
      "leaving": True}, "unknown_worker"),
])
def test_bad_announcements_are_refused(cluster: Cluster, body: dict[str, object], code: str) -> None:
    r = httpx.post(cluster.admin_url + "/admin/register", json=body)
    assert r.status_code in (400, 404) and _err(r)["code"] == code
    r = httpx.post(cluster.admin_url + "/admin/register", content=b"\xc1\xc1",
                   headers={"Content-Type": "application/msgpack"})
    assert r.status_code == 400
    assert httpx.post(cluster.url + "/v1/completions", json={"model": MODEL, "prompt": "x"}).status_code == 200


def test_admin_key_and_separate_admin_port() -> None:
    with Cluster(1, 1, admin_key="adm", admin_port=0) as c:
        assert c.admin_url != c.url
        assert httpx.get(c.url + "/admin/workers").status_code == 404  # not on the client port
        assert httpx.get(c.admin_url + "/admin/workers").status_code == 401
        r = httpx.get(c.admin_url + "/admin/workers", headers={"Authorization": "Bearer adm"})
        assert r.status_code == 200 and len(r.json()["workers"]) == 2
        assert httpx.get(c.admin_url + "/v1/models").status_code == 404  # and no client API there


def test_stop_cancels_streams_still_running_after_the_grace_period() -> None:
    c = Cluster(1, 1, shutdown_grace_s=0.2)
    c.decode[0].behaviour.pace_s = 0.05  # 400 tokens: 20 s
    t, stop = _slow_stream_in_flight(c, "long")
    decode = c.decode[0]
    c.close()
    stop.set()
    t.join(30)
    assert not t.is_alive()
    assert decode.aborted == ["long"] and decode.completed == []


def test_agents_announce_with_the_admin_key() -> None:
    from pdx.agent.metrics import AgentMetrics
    from pdx.agent.registration import Announcer
    from pdx.config import RegistrationConfig

    with Cluster(1, 0, admin_key="adm") as c:
        d = _extra_standin(c, "dyn")
        try:
            msg = lambda leaving: AgentAnnouncement.from_dict(  # noqa: E731
                _announce(d.url, agent_id="agent-k", leaving=leaving))
            metrics = AgentMetrics()
            keyless = Announcer(RegistrationConfig(proxy_url=c.admin_url, timeout_s=2.0), msg, metrics)
            assert keyless.announce(False) is False  # 401: counted, never raised
            assert metrics.value("pdx_agent_announcements_total", {"result": "error"}) == 1
            keyed = Announcer(RegistrationConfig(proxy_url=c.admin_url, timeout_s=2.0, admin_key="adm"), msg, metrics)
            assert keyed.announce(False) is True
            workers = httpx.get(c.admin_url + "/admin/workers", headers={"Authorization": "Bearer adm"}).json()
            assert any(w["id"] == "agent-k" for w in workers["workers"])
        finally:
            c.bg.run(d.stop())
