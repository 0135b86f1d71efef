"""Graceful degradation against stand-in workers: a missing half of the P/D pair is served
by the other role, dead workers leave the pool at once, and failed decode halves are retried."""

from __future__ import annotations

import logging

import httpx
import pytest

from proxy.standin import content_of_stream
from proxy.testing import Cluster, wait_until

MODEL = "standin-model"


def _post(c: Cluster, **kw: object) -> httpx.Response:
    body = {"model": MODEL, "prompt": "hello there", "max_tokens": 4, **kw}
    return httpx.post(c.url + "/v1/completions", json=body, timeout=20)


def _stop(c: Cluster, worker_list: str, i: int) -> None:
    """The worker's process is gone: its port refuses connections."""
    c.bg.run(getattr(c, worker_list)[i].stop())


@pytest.mark.parametrize("stream", [False, True])
def test_no_healthy_decode_worker_serves_whole_on_prefill(stream: bool,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pdx.proxy")
    with Cluster(1, 1, unhealthy_after=1) as c:
        c.decode[0].behaviour.health_status = 500
        wait_until(lambda: httpx.get(c.url + "/health").json()["status"] == "degraded", what="decode out")
        r = _post(c, stream=stream, min_tokens=2)
        assert r.status_code == 200, r.text
        text = content_of_stream(r.content) if stream else r.json()["choices"][0]["text"]
        assert text == " w0 w1 w2 w3"
        assert not c.decode[0].received
        (p,) = c.prefill[0].received
        # the client's own request, not a prefill half
        assert "kv_transfer_params" not in p.body
        assert p.body["max_tokens"] == 4 and p.body["min_tokens"] == 2
        assert p.body.get("stream", False) is stream
        assert c.metric("pdx_proxy_degraded_total", missing="decode") == 1
        assert any("degraded (decode missing)" in rec.getMessage() for rec in caplog.records)
        # the decode worker comes back: P/D again
        c.decode[0].behaviour.health_status = 200
        wait_until(lambda: httpx.get(c.url + "/health").json()["status"] == "ok", what="decode back")
        assert _post(c).status_code == 200
        assert c.decode[0].received[-1].body["kv_transfer_params"]["do_remote_prefill"] is True
        assert c.metric("pdx_proxy_degraded_total", missing="decode") == 1


def test_decode_failing_before_first_byte_is_served_whole_by_the_prefill_worker() -> None:
    with Cluster(2, 1, policy="round_robin") as c:
        c.decode[0].behaviour.fail_status = 500
        r = _post(c, stream=True)
        assert r.status_code == 200 and content_of_stream(r.content) == " w0 w1 w2 w3"
        (prefilled,) = [w for w in c.prefill if w.received]
        # the worker that prefilled holds the prompt's KV: it serves the whole request
        assert [rec.body.get("kv_transfer_params") for rec in prefilled.received] == [
            {"do_remote_decode": True}, None]
        assert c.metric("pdx_proxy_degraded_total", missing="decode") == 1
        assert c.metric("pdx_proxy_upstream_errors_total", side="decode", kind="status") == 1


def test_a_dead_decode_worker_leaves_the_pool_on_the_first_failed_call() -> None:
    # Health checks far apart: only the request path can notice the death.
    with Cluster(1, 2, policy="round_robin", health_interval_s=60) as c:
        _stop(c, "decode", 0)
        statuses = [_post(c, stream=i % 2 == 0).status_code for i in range(6)]
        assert statuses == [200] * 6
        assert not c.decode[0].received
        assert len(c.decode[1].received) == 6
        # one request found d0 dead and was retried on d1; no later request tried d0
        assert c.metric("pdx_proxy_upstream_errors_total", side="decode", kind="connect") <= 1
        assert c.metric("pdx_proxy_retries_total", side="decode") <= 1
        assert c.metric("pdx_proxy_degraded_total", missing="decode") == 0
        states = {w["id"]: w["state"] for w in httpx.get(c.admin_url + "/admin/workers").json()["workers"]}
        assert states["d0"] == "unhealthy" and states["d1"] in ("healthy", "unknown")


def test_only_decode_worker_dead_mid_flight_falls_back_to_prefill() -> None:
    with Cluster(1, 1, health_interval_s=60) as c:
        _stop(c, "decode", 0)
        for _ in range(3):
            assert _post(c).status_code == 200
        # first request: P/D, decode unreachable, then whole on p0; later ones whole at once
        bodies = [rec.body.get("kv_transfer_params") for rec in c.prefill[0].received]
        assert bodies == [{"do_remote_decode": True}, None, None, None]
        assert c.metric("pdx_proxy_degraded_total", missing="decode") == 3


def test_no_healthy_prefill_worker_decode_computes_the_prompt() -> None:
    with Cluster(1, 1, health_interval_s=60) as c:
        _stop(c, "prefill", 0)
        assert _post(c).status_code == 200  # prefill unreachable: out of the pool, decode computes
        assert _post(c).status_code == 200  # no prefill candidate at all
        assert all("kv_transfer_params" not in rec.body for rec in c.decode[0].received)
        assert len(c.decode[0].received) == 2
        assert c.metric("pdx_proxy_degraded_total", missing="prefill") == 2
        assert httpx.get(c.url + "/health").json()["status"] == "degraded"


def test_every_worker_dead_is_503_or_502() -> None:
    with Cluster(1, 1, health_interval_s=60) as c:
        _stop(c, "prefill", 0)
        _stop(c, "decode", 0)
        r = _post(c)
        assert r.status_code == 502  # both failed on the request path
        r = _post(c)
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_workers"


def test_client_closing_after_done_is_not_a_disconnect(caplog: pytest.LogCaptureFixture) -> None:
    import socket

    caplog.set_level(logging.INFO, logger="pdx.proxy")
    with Cluster(1, 1) as c:
        # the worker keeps its response open after [DONE]: the client closes first
        c.decode[0].behaviour.done_linger_s = 30
        host, port = c.url.removeprefix("http://").split(":")
        body = b'{"model": "standin-model", "prompt": "x", "max_tokens": 3, "stream": true}'
        with socket.create_connection((host, int(port)), timeout=20) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            got = b""
            while b"data: [DONE]" not in got:
                piece = s.recv(65536)
                assert piece, got
                got += piece
        wait_until(lambda: c.metric("pdx_proxy_requests_total", endpoint="completions", status="200") == 1,
                   what="request counted as answered")
        wait_until(lambda: c.decode[0].aborted != [], what="the lingering worker response closed")
        assert c.metric("pdx_proxy_client_disconnects_total") == 0
        assert not any("went away" in rec.getMessage() for rec in caplog.records)
        # a client leaving before [DONE] still is one
        c.decode[0].behaviour.done_linger_s = 0
        c.decode[0].behaviour.pace_s = 0.05
        with httpx.stream("POST", c.url + "/v1/completions", timeout=20,
                          json={"model": MODEL, "prompt": "x", "max_tokens": 500, "stream": True}) as r:
            next(r.iter_raw())
        wait_until(lambda: c.metric("pdx_proxy_client_disconnects_total") == 1, what="disconnect counted")
        assert any("went away" in rec.getMessage() for rec in caplog.records)
