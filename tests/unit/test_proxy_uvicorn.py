"""The proxy in front of workers served like vLLM serves: a Starlette app on uvicorn
(keep-alive timeout, chunked SSE, disconnect detection), not the aiohttp stand-ins."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

uvicorn = pytest.importorskip("uvicorn")
starlette_apps = pytest.importorskip("starlette.applications")
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, Response, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from pdx.config import ProxyWorkerConfig  # noqa: E402
from proxy.standin import content_of_stream  # noqa: E402
from proxy.testing import BackgroundLoop, Cluster, wait_until  # noqa: E402


class UvicornWorker:
    """A tiny vLLM look-alike on uvicorn, recording what it got and which streams were cut."""

    def __init__(self, name: str, keep_alive_s: int = 5) -> None:
        self.name = name
        self.received: list[dict[str, Any]] = []
        self.aborted: list[str] = []
        self.pace_s = 0.0
        app = starlette_apps.Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/health", lambda r: Response(status_code=200), methods=["GET"]),
        ])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off",
                                                    log_level="warning", timeout_keep_alive=keep_alive_s))
        self.task: asyncio.Task[None] | None = None
        self.url = ""

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            await asyncio.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await asyncio.wait_for(self.task, 10)

    async def completions(self, request: Request) -> Response:
        body = await request.json()
        rid = request.headers.get("x-request-id", "")
        self.received.append(body)
        n = int(body.get("max_tokens") or 4)
        kv = body.get("kv_transfer_params") or {}
        kv_out = {"remote_engine_id": self.name, "remote_request_id": rid} if kv.get("do_remote_decode") else None
        if not body.get("stream"):
            return JSONResponse({"id": rid, "object": "text_completion", "model": "m", "kv_transfer_params": kv_out,
                                 "choices": [{"index": 0, "text": "".join(f" u{i}" for i in range(n)),
                                              "finish_reason": "length"}]})

        async def gen() -> AsyncIterator[str]:
            try:
                for i in range(n):
                    yield "data: " + json.dumps({"choices": [{"index": 0, "text": f" u{i}"}]}) + "\n\n"
                    if self.pace_s:
                        await asyncio.sleep(self.pace_s)
                yield "data: [DONE]\n\n"
            except asyncio.CancelledError:
                self.aborted.append(rid)
                raise

        return StreamingResponse(gen(), media_type="text/event-stream")


@pytest.fixture
def uvicorn_cluster() -> Iterator[tuple[Cluster, UvicornWorker, UvicornWorker]]:
    bg = BackgroundLoop()
    p, d = UvicornWorker("up", keep_alive_s=1), UvicornWorker("ud", keep_alive_s=1)
    try:
        bg.run(p.start())
        bg.run(d.start())
        extra = [ProxyWorkerConfig(url=p.url, role="prefill", id="up"),
                 ProxyWorkerConfig(url=d.url, role="decode", id="ud")]
        with Cluster(0, 0, extra_workers=extra, models=["m"]) as c:
            yield c, p, d
    finally:
        bg.run(p.stop())
        bg.run(d.stop())
        bg.close()


def test_plain_and_streamed_through_uvicorn_workers(uvicorn_cluster: tuple[Cluster, UvicornWorker,
                                                                         UvicornWorker]) -> None:
    c, p, d = uvicorn_cluster
    body = {"model": "m", "prompt": "hi", "max_tokens": 5}
    plain = httpx.post(c.url + "/v1/completions", json=body, timeout=20)
    assert plain.status_code == 200 and plain.json()["choices"][0]["text"] == " u0 u1 u2 u3 u4"
    streamed = httpx.post(c.url + "/v1/completions", json={**body, "stream": True}, timeout=20)
    assert streamed.status_code == 200 and content_of_stream(streamed.content) == " u0 u1 u2 u3 u4"
    assert d.received[-1]["kv_transfer_params"]["remote_engine_id"] == "up"
    assert p.received[-1]["max_tokens"] == 1 and p.received[-1]["stream"] is False


def test_idle_connections_closed_by_uvicorn_are_not_a_failure(
        uvicorn_cluster: tuple[Cluster, UvicornWorker, UvicornWorker]) -> None:
    c, _, d = uvicorn_cluster
    body = {"model": "m", "prompt": "hi", "max_tokens": 2}
    for pause in (0.0, 1.3, 0.9, 1.1):  # around uvicorn's 1 s keep-alive timeout
        time.sleep(pause)
        assert httpx.post(c.url + "/v1/completions", json=body, timeout=20).status_code == 200
    assert c.metric("pdx_proxy_upstream_errors_total", side="decode", kind="broken") == 0
    assert len(d.received) == 4


def test_client_disconnect_reaches_the_uvicorn_worker(
        uvicorn_cluster: tuple[Cluster, UvicornWorker, UvicornWorker]) -> None:
    c, _, d = uvicorn_cluster
    d.pace_s = 0.05
    with httpx.stream("POST", c.url + "/v1/completions", timeout=20, headers={"X-Request-Id": "uv-gone"},
                      json={"model": "m", "prompt": "hi", "max_tokens": 400, "stream": True}) as r:
        next(r.iter_raw())
    wait_until(lambda: d.aborted == ["uv-gone"], what="uvicorn worker saw the disconnect")
