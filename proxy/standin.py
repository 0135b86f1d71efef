"""A stand-in OpenAI-compatible worker: the proxy's fake backend, for tests and the bench.

Speaks just enough of vLLM's HTTP API for ``pdx-proxy``: ``/v1/completions`` and
``/v1/chat/completions`` (streaming and not), ``/v1/models``, ``/health``. Its
answer is deterministic: token ``i`` is ``" w<i>"``, so a streamed and a plain
answer can be compared. A request carrying ``kv_transfer_params.do_remote_decode``
is treated like vLLM's prefill side and answers with ``kv_transfer_params`` naming
this worker and the request id.

It records every request (path, body, ``X-Request-Id``, auth header) and every
request whose client went away before the answer was complete (``aborted``), and
can be told to fail (status), hang, drop the connection, stream slowly or break
mid-stream. Behaviour knobs are plain attributes (``StandinBehaviour``) that a
test thread may set while the server runs; records are appended from the server's
event loop and read by tests after the fact.

Runs on the event loop that calls ``start()``; ``stop()`` on the same loop.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class StandinBehaviour:
    fail_status: int = 0  # answer this status with an error body (0 = answer normally)
    fail_times: int = -1  # how many requests fail before it answers normally again (-1 = all)
    hang: bool = False  # never answer (until the client goes away)
    drop: bool = False  # close the connection without an answer
    break_after: int = -1  # streaming: drop the connection after this many tokens (-1 = never)
    first_token_delay_s: float = 0.0
    pace_s: float = 0.0  # pause between streamed tokens
    tokens: int = 8  # answer length when the request does not say (max_tokens)
    done_linger_s: float = 0.0  # streaming: pause after [DONE] before ending the response
    health_status: int = 200
    models_fail: bool = False


@dataclass
class Received:
    path: str
    body: dict[str, Any]
    request_id: str | None
    authorization: str | None
    at: float = field(default_factory=time.monotonic)
    raw: bytes = b""  # the body as sent (duplicate keys and all)


class StandinWorker:
    """One fake engine. ``await start()`` binds 127.0.0.1 on a free port (``url``)."""

    def __init__(self, name: str = "standin", model: str = "standin-model",
                 behaviour: StandinBehaviour | None = None) -> None:
        self.name = name
        self.model = model
        self.behaviour = behaviour or StandinBehaviour()
        self.received: list[Received] = []
        self.aborted: list[str | None] = []  # request ids whose client left early
        self.completed: list[str | None] = []
        self.url = ""
        self._runner: web.AppRunner | None = None
        app = web.Application()
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        self.app = app

    async def start(self, port: int = 0) -> str:
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None,
                                     shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port, backlog=2048)
        await site.start()
        bound = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{bound}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- handlers --------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=self.behaviour.health_status, text="")

    async def _models(self, request: web.Request) -> web.Response:
        if self.behaviour.models_fail:
            return web.Response(status=500)
        return web.json_response({"object": "list", "data": [
            {"id": self.model, "object": "model", "created": 0, "owned_by": self.name}]})

    def _should_fail(self) -> bool:
        b = self.behaviour
        if b.fail_times == 0:
            return False
        if b.fail_times > 0:
            b.fail_times -= 1
        return True

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw)
        rid = request.headers.get("X-Request-Id")
        self.received.append(Received(request.path, body, rid, request.headers.get("Authorization"), raw=raw))
        b = self.behaviour
        try:
            if b.drop and self._should_fail():
                assert request.transport is not None
                request.transport.close()
                await asyncio.sleep(3600)
            if b.hang:
                await asyncio.sleep(3600)
            if b.fail_status and self._should_fail():
                return web.json_response({"error": {"message": f"{self.name} told to fail",
                                                    "type": "standin", "param": None,
                                                    "code": b.fail_status}}, status=b.fail_status)
            if b.first_token_delay_s:
                await asyncio.sleep(b.first_token_delay_s)
            chat = request.path.endswith("/chat/completions")
            n = body.get("max_completion_tokens") if chat else None
            n = int(n or body.get("max_tokens") or b.tokens)
            kv = body.get("kv_transfer_params") or None
            kv_out = None
            if isinstance(kv, dict) and kv.get("do_remote_decode"):
                kv_out = {"do_remote_prefill": True, "remote_engine_id": self.name,
                          "remote_request_id": rid, "remote_block_ids": [0, 1]}
            if body.get("stream"):
                resp = await self._stream(request, rid, chat, n)
            else:
                resp = self._plain(rid, chat, n, kv_out)
            self.completed.append(rid)
            return resp
        except (asyncio.CancelledError, ConnectionResetError):
            self.aborted.append(rid)
            raise

    def _plain(self, rid: str | None, chat: bool, n: int, kv_out: Any) -> web.Response:
        text = "".join(f" w{i}" for i in range(n))
        usage = {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}
        if chat:
            out: dict[str, Any] = {
                "id": f"chatcmpl-{rid}", "object": "chat.completion", "created": 0, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": "length"}],
                "usage": usage, "kv_transfer_params": kv_out}
        else:
            out = {"id": f"cmpl-{rid}", "object": "text_completion", "created": 0, "model": self.model,
                   "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}],
                   "usage": usage, "kv_transfer_params": kv_out}
        return web.json_response(out)

    async def _stream(self, request: web.Request, rid: str | None, chat: bool, n: int) -> web.StreamResponse:
        b = self.behaviour
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        if chat:
            head = (f'data: {{"id":"chatcmpl-{rid}","object":"chat.completion.chunk","created":0,'
                    f'"model":"{self.model}","choices":[{{"index":0,"delta":').encode()
            await resp.write(head + b'{"role":"assistant","content":""},"logprobs":null,'
                             b'"finish_reason":null}]}\n\n')
        else:
            head = (f'data: {{"id":"cmpl-{rid}","object":"text_completion","created":0,'
                    f'"model":"{self.model}","choices":[{{"index":0,').encode()
        for i in range(n):
            if i and b.pace_s:
                await asyncio.sleep(b.pace_s)
            if i == b.break_after:
                assert request.transport is not None
                request.transport.close()
                return resp
            finish = b'"length"' if i == n - 1 else b"null"
            if chat:
                piece = head + f'{{"content":" w{i}"}},"logprobs":null,"finish_reason":'.encode()
            else:
                piece = head + f'"text":" w{i}","logprobs":null,"finish_reason":'.encode()
            await resp.write(piece + finish + b"}]}\n\n")
        await resp.write(b"data: [DONE]\n\n")
        if b.done_linger_s:
            await asyncio.sleep(b.done_linger_s)
        await resp.write_eof()
        return resp


def content_of_stream(raw: bytes) -> str:
    """Concatenated text of an SSE answer (completions or chat), for tests."""
    out = []
    for line in raw.decode().splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        for choice in json.loads(line[6:]).get("choices", []):
            out.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    return "".join(out)

