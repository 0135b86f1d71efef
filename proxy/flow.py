"""The P/D request flow: route, prefill, decode, stream back; retries and aborts.

For one validated generate request (``app.py`` parses and admits it):

1. **Route.** Tokenize if the policy needs token ids (long prompts on a worker
   thread), then ``policy.route`` orders the prefill and decode candidates.
2. **Prefill** (unless the route skips it): the request with ``max_tokens=1``
   (and ``max_completion_tokens=1`` for chat), ``stream=false``, no
   ``stream_options``/``min_tokens``, and ``kv_transfer_params={"do_remote_decode":
   true}``. A worker that is unreachable, times out or answers 5xx/429 is
   recorded and the next prefill candidate is tried (``prefill_retries``); when
   none answers, the decode worker computes the prompt itself
   (``prefill_fallback``). A 4xx answer is the client's fault and goes back as is.
3. **Decode**: the client's request, plus the ``kv_transfer_params`` prefill
   returned. Nothing reaches the client until decode's first byte: a decode
   worker that fails before it is retried on the next one (``decode_retries``).
   After it, bytes are forwarded as they arrive, unparsed. A stream that breaks
   later ends with an SSE ``error`` event.
4. **Degradation.** With no healthy decode worker, or when every decode worker
   tried failed before its first byte, a prefill worker serves the whole request
   (the client's body, no ``kv_transfer_params``; the worker that just prefilled it
   goes first, since it holds the prompt's KV). With no healthy prefill worker the
   decode worker computes the prompt. Both are counted in
   ``pdx_proxy_degraded_total{missing}`` and logged.
5. **Peer hints.** A call that computes a prompt (a prefill, or a decode or whole request without
   a prefill's params) goes with ``kv_transfer_params.pdx.hint`` when another agent holds more of
   the prompt's prefix than the chosen worker and fetching it is estimated cheaper than computing
   it (``pdx.scheduler.p2p``); prefill calls also feed the measured prefill rate of that estimate.
6. **Aborts.** A client that goes away cancels the handler (the server runs with
   handler cancellation); every upstream response still open is then closed, so
   vLLM aborts the request on both workers and frees (or lets its connector
   release) the KV it holds.

Chat requests go to both workers as the same ``messages``: both run the same
model and chat template, so both see the same tokens, and the answer keeps the
chat format. ``X-Request-Id`` (the client's, or a new one) goes to both workers,
to the client and to the logs. Any ``kv_transfer_params`` sent by the client is
dropped: only the proxy sets it.

Runs on the proxy's event loop; one ``PDFlow`` serves all requests of one proxy.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, cast

from aiohttp import web

from pdx.config import ProxyConfig
from pdx.errors import ConnectError, NoWorkers, TransportError, UpstreamError, UpstreamTimeout
from pdx.scheduler.p2p import PeerReuse
from pdx.scheduler.policies import RouteRequest, RoutingPolicy
from pdx.scheduler.registry import Side, Worker, WorkerRegistry
from pdx.scheduler.tokenizer import Tokenizer, render_plain_chat
from proxy.metrics import ProxyMetrics
from proxy.upstream import UpstreamPool, UpstreamResponse

log = logging.getLogger("pdx.proxy")

#: set on the aiohttp request once the client has been sent the whole answer (``[DONE]`` or
#: decode's end): a client closing after that is a normal end, not a disconnect.
ANSWER_SENT = web.RequestKey("pdx_answer_sent", bool)
_DONE_EVENT = b"data: [DONE]\n\n"
#: prompts longer than this (characters) are tokenized on a worker thread.
TOKENIZE_INLINE_CHARS = 2048
_PREFILL_DROP = ("stream_options", "min_tokens", "kv_transfer_params")
#: bytes unsent to a streaming client above which relaying pauses until the client drains.
RELAY_HIGH_WATER = 1 << 16


class Endpoint(str, Enum):
    COMPLETIONS = "completions"
    CHAT = "chat"

    @property
    def path(self) -> str:
        return "/v1/completions" if self is Endpoint.COMPLETIONS else "/v1/chat/completions"


@dataclass(frozen=True)
class Passthrough:
    """A worker's 4xx answer, returned to the client unchanged."""

    status: int
    body: bytes
    content_type: str


@dataclass(frozen=True)
class CallFailure:
    kind: str  # connect, timeout, status, broken, empty, bad_answer
    detail: str

    @property
    def fatal(self) -> bool:
        """The worker is unreachable: take it out of the pool at once."""
        return self.kind == "connect"


def _client_error(status: int) -> bool:
    return 400 <= status < 500 and status not in (408, 429)


def _failure(exc: BaseException, timeout_s: float = 0.0) -> CallFailure:
    if isinstance(exc, ConnectError):
        return CallFailure("connect", str(exc))
    if isinstance(exc, TimeoutError):
        return CallFailure("timeout", f"no answer within {timeout_s:g}s")
    return CallFailure("broken", str(exc))


def _decode_body(body: dict[str, Any], raw: bytes | None, kv_params: Any) -> bytes:
    """The decode request: the client's body plus ``kv_transfer_params``. Long prompts make
    serializing costly, so the client's own bytes are reused (and extended) when possible."""
    if raw is not None and b"\x00" not in raw[:4]:  # UTF-16/32 bodies (JSON allows them): re-encode
        raw = raw.rstrip()
        if kv_params is None:
            return raw
        if raw.endswith(b"}"):
            return raw[:-1] + b',"kv_transfer_params":' + json.dumps(kv_params).encode() + b"}"
    if kv_params is not None:
        body = {**body, "kv_transfer_params": kv_params}
    return json.dumps(body, separators=(",", ":")).encode()


def _decode_error(failures: Sequence[CallFailure], retry_after: float) -> UpstreamError:
    detail = "; ".join(f"{f.kind} ({f.detail})" for f in failures)
    if failures and all(f.kind == "timeout" for f in failures):
        return UpstreamTimeout(f"decode timed out: {detail}", retry_after=retry_after)
    return UpstreamError(f"decode failed on every worker tried: {detail}", retry_after=retry_after)


class PDFlow:
    def __init__(self, cfg: ProxyConfig, registry: WorkerRegistry, policy: RoutingPolicy,
                 pool: UpstreamPool, metrics: ProxyMetrics, tokenizer: Tokenizer | None = None) -> None:
        self.cfg = cfg
        self.registry = registry
        self.policy = policy
        self.pool = pool
        self.metrics = metrics
        self.tokenizer = tokenizer
        self._auth = {"Authorization": f"Bearer {cfg.upstream_api_key}"} if cfg.upstream_api_key else {}
        self.p2p = PeerReuse(cfg.p2p, registry, metrics.count_peer_hint)
        #: tokenize for peer hints even when the policy does not need tokens: a real tokenizer is
        #: configured (the byte-level stand-in's keys never match an agent's)
        self._hint_tokens = cfg.p2p.enabled and bool(cfg.cache_aware.tokenizer)

    def _hinted_body(self, body: dict[str, Any], raw: bytes | None,
                     rreq: RouteRequest) -> Callable[[Worker], bytes]:
        """The request for a worker that computes the prompt itself (no prefill's params): with a
        peer hint when another agent holds more of the prefix and fetching it is worth it."""
        plain: list[bytes] = []

        def build(w: Worker) -> bytes:
            hint = self.p2p.hint(rreq, w)
            if hint is not None:
                log.debug("request %s: %s may fetch %d chunks from %s", rreq.request_id, w.id,
                          hint.extra_chunks, hint.worker_id)
                return _decode_body(body, raw, hint.params())
            if not plain:
                plain.append(_decode_body(body, raw, None))
            return plain[0]

        return build

    # --- routing ---------------------------------------------------------------------------

    async def _route_request(self, endpoint: Endpoint, body: dict[str, Any], rid: str) -> RouteRequest:
        chat = endpoint is Endpoint.CHAT
        max_tokens = body.get("max_completion_tokens") if chat else None
        max_tokens = max_tokens or body.get("max_tokens") or (256 if chat else 16)
        if not isinstance(max_tokens, int):
            max_tokens = 16
        token_ids: list[int] | None = None
        if chat:
            text = render_plain_chat(body["messages"])
        else:
            prompt = body["prompt"]
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
                prompt = prompt[0]  # a batch of token-id prompts: route on the first
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
                token_ids = prompt
                text = ""
            else:
                text = prompt[0] if isinstance(prompt, list) else prompt
        if token_ids is None and self.tokenizer is not None and (self.policy.needs_tokens or self._hint_tokens):
            token_ids = await self._tokenize(endpoint, body, text, rid)
        estimate = len(token_ids) if token_ids is not None else len(text) // 4 + 1
        salt = body.get("cache_salt")
        return RouteRequest(rid, estimate, max_tokens, token_ids, salt if isinstance(salt, str) else "")

    async def _tokenize(self, endpoint: Endpoint, body: dict[str, Any], text: str,
                        rid: str) -> list[int] | None:
        tok = self.tokenizer
        assert tok is not None

        def run() -> list[int]:
            if endpoint is Endpoint.CHAT:
                return tok.encode_chat(body["messages"])
            return tok.encode(text)

        try:
            if len(text) <= TOKENIZE_INLINE_CHARS:
                return run()
            return await asyncio.get_running_loop().run_in_executor(None, run)
        except Exception as exc:  # a tokenizer bug must not fail the request: route without cache
            log.warning("request %s: cannot tokenize for routing (%s: %s)", rid,
                        exc.__class__.__name__, exc)
            return None

    # --- the flow --------------------------------------------------------------------------

    async def serve(self, request: web.Request, endpoint: Endpoint, body: dict[str, Any],
                    rid: str, t0: float, raw: bytes | None = None) -> web.StreamResponse:
        """Serve one admitted request; raises ``ProxyError`` subclasses for the client.

        ``raw`` is the body as received: when given (and it carries no ``kv_transfer_params``)
        the decode request reuses its bytes instead of serializing ``body`` again.
        """
        if "kv_transfer_params" in body:  # only the proxy says where KV comes from (even a null
            del body["kv_transfer_params"]  # goes: the raw bytes may hold an earlier duplicate key)
            raw = None
        rreq = await self._route_request(endpoint, body, rid)
        decode = self.registry.candidates(Side.DECODE)
        prefill = self.registry.candidates(Side.PREFILL)
        headers = {"Content-Type": "application/json", "X-Request-Id": rid, **self._auth}
        stream = body.get("stream") is True
        if not decode:
            if not (prefill and self.cfg.decode_fallback):
                raise NoWorkers("no healthy decode worker", retry_after=self.cfg.retry_after_s)
            return await self._serve_whole(request, endpoint, body, raw, rreq, prefill, (), headers, t0,
                                           "no healthy decode worker")
        route = self.policy.route(rreq, prefill, decode)
        self.metrics.count_route(route.reason)
        if route.total_chunks:
            self.metrics.cached_chunks.inc(route.cached_chunks)
            self.metrics.prompt_chunks.inc(route.total_chunks)
        if not prefill and self.registry.has_role(Side.PREFILL):
            # Prefill workers exist but none is in the pool: decode computes the prompt.
            self._degraded(rid, "prefill", "no healthy prefill worker: the decode worker computes the prompt")
        kv_params: Any = None
        prefill_used: Worker | None = None
        if route.prefill:
            got = await self._prefill(endpoint, body, rreq, route.prefill, headers,
                                      self._push_target(route.decode))
            if isinstance(got, Passthrough):
                return self._passthrough(got, rid)
            if got is not None:
                kv_params, prefill_used = got
        data: bytes | Callable[[Worker], bytes] = _decode_body(body, raw, kv_params) \
            if kv_params is not None else self._hinted_body(body, raw, rreq)
        tried = route.decode[: 1 + self.cfg.decode_retries]
        served = await self._decode(request, endpoint, stream, data, rreq, tried, headers, t0)
        if isinstance(served, list):
            whole = [w for w in self.registry.candidates(Side.PREFILL) if w not in tried]
            if not (whole and self.cfg.decode_fallback):
                raise _decode_error(served, self.cfg.retry_after_s)
            first = (prefill_used,) if prefill_used is not None and prefill_used in whole else ()
            return await self._serve_whole(request, endpoint, body, raw, rreq, whole, first, headers, t0,
                                           "every decode worker tried failed before its first byte",
                                           served)
        resp, decode_used = served
        if self.cfg.log_requests:
            log.info("request %s %s: prefill=%s decode=%s route=%s cached=%d/%d status=%d ms=%.1f",
                     rid, endpoint.value, prefill_used.id if prefill_used else "-", decode_used.id,
                     route.reason, route.cached_chunks, route.total_chunks, resp.status,
                     (time.perf_counter() - t0) * 1e3)
        return resp

    def _degraded(self, rid: str, missing: str, why: str) -> None:
        self.metrics.count_degraded(missing)
        log.warning("request %s: degraded (%s missing): %s", rid, missing, why)

    async def _serve_whole(self, request: web.Request, endpoint: Endpoint, body: dict[str, Any],
                           raw: bytes | None, rreq: RouteRequest, workers: Sequence[Worker],
                           first: Sequence[Worker], headers: dict[str, str], t0: float, why: str,
                           earlier: Sequence[CallFailure] = ()) -> web.StreamResponse:
        """Serve the whole request (prompt and generation) on prefill-capable ``workers``, the
        ``first`` ones first, then in the policy's order. A vLLM worker can do both halves; its
        connector stores what it computes, so nothing is lost but the split."""
        rest = [w for w in workers if w not in first]
        ordered = self.policy.route(rreq, (), rest).decode if rest else ()
        order = (*first, *ordered)[: 1 + self.cfg.decode_retries]
        self._degraded(rreq.request_id, "decode",
                       f"{why}: prefill worker {order[0].id} serves the whole request")
        data = self._hinted_body(body, raw, rreq)
        served = await self._decode(request, endpoint, body.get("stream") is True, data, rreq, order,
                                    headers, t0)
        if isinstance(served, list):
            raise _decode_error([*earlier, *served], self.cfg.retry_after_s)
        resp, used = served
        if self.cfg.log_requests:
            log.info("request %s %s: prefill=- decode=- whole=%s route=degraded status=%d ms=%.1f",
                     rreq.request_id, endpoint.value, used.id, resp.status,
                     (time.perf_counter() - t0) * 1e3)
        return resp

    def _passthrough(self, p: Passthrough, rid: str) -> web.Response:
        return web.Response(status=p.status, body=p.body, headers={"X-Request-Id": rid},
                            content_type=p.content_type or "application/json")

    def _push_target(self, decode: Sequence[Worker]) -> str:
        """Layer-wise P/D (``pd_layerwise``): the peer address of the decode worker tried first, to
        which the prefill streams each layer as it is computed; '' when off or its agent is unknown."""
        if not self.cfg.pd_layerwise or not decode:
            return ""
        ann = decode[0].announcement
        return ann.transport_address if ann is not None else ""

    async def _prefill(self, endpoint: Endpoint, body: dict[str, Any], rreq: RouteRequest,
                       workers: Sequence[Worker], headers: dict[str, str], push_to: str = "",
                       ) -> tuple[Any, Worker] | Passthrough | None:
        """``(kv_transfer_params, worker)``, a client-error ``Passthrough``, or None (fall back)."""
        pbody = {k: v for k, v in body.items() if k not in _PREFILL_DROP}
        pbody["stream"] = False
        pbody["max_tokens"] = 1
        if endpoint is Endpoint.CHAT:
            pbody["max_completion_tokens"] = 1
        push = {"push": {"agent": push_to}} if push_to else {}
        pbody["kv_transfer_params"] = {"do_remote_decode": True, **({"pdx": {"v": 2, **push}} if push else {})}
        plain = json.dumps(pbody, separators=(",", ":")).encode()
        cost = rreq.cost(Side.PREFILL)
        failures: list[str] = []
        for i, w in enumerate(workers[: 1 + self.cfg.prefill_retries]):
            if i:
                self.metrics.retries.labels("prefill").inc()
            hint = self.p2p.hint(rreq, w)
            data = plain
            if hint is not None:
                log.debug("request %s: prefill worker %s may fetch %d chunks from %s", rreq.request_id,
                          w.id, hint.extra_chunks, hint.worker_id)
                params = hint.params(remote_decode=True)
                if push:
                    params["pdx"] = {**cast(dict[str, Any], params["pdx"]), **push}
                data = json.dumps({**pbody, "kv_transfer_params": params}, separators=(",", ":")).encode()
            computes = self._tokens_to_compute(rreq, w, hint.chunks if hint is not None else 0)
            self.registry.begin(w, cost)
            t_call = time.perf_counter()
            try:
                got = await self._prefill_once(w, endpoint, data, headers)
            finally:
                self.registry.end(w, cost)
            if not isinstance(got, (CallFailure, Passthrough)):
                self.p2p.observe_prefill(computes, time.perf_counter() - t_call)
            if isinstance(got, CallFailure):
                self._record_failure(w, Side.PREFILL, got, rreq.request_id)
                failures.append(f"{w.id}: {got.kind} ({got.detail})")
                continue
            if isinstance(got, Passthrough):
                return got
            self.registry.record_success(w)
            self.policy.observe(rreq, w)
            return got.get("kv_transfer_params") if isinstance(got, dict) else None, w
        detail = "; ".join(failures) or "no prefill worker tried"
        if not self.cfg.prefill_fallback:
            raise UpstreamError(f"prefill failed on every worker tried: {detail}",
                                retry_after=self.cfg.retry_after_s)
        log.warning("request %s: prefill failed (%s); decode computes the prompt", rreq.request_id, detail)
        self.metrics.prefill_fallback.inc()
        self.metrics.count_degraded("prefill")
        return None

    @staticmethod
    def _tokens_to_compute(rreq: RouteRequest, w: Worker, fetched_chunks: int) -> int:
        """Prompt tokens ``w`` will compute for ``rreq`` (what it and a hinted peer do not hold);
        0 when unknown (no token ids): such calls do not measure the prefill rate."""
        if rreq.token_ids is None:
            return 0
        keys = rreq.keys(w.key_space)
        held = max(w.held_prefix(keys), min(fetched_chunks, len(keys))) if keys else 0
        return max(0, rreq.prompt_tokens - held * w.key_space.chunk_tokens)

    async def _prefill_once(self, w: Worker, endpoint: Endpoint, data: bytes,
                            headers: dict[str, str]) -> Any:
        resp: UpstreamResponse | None = None
        try:
            async with asyncio.timeout(self.cfg.prefill_timeout_s):
                resp = await self.pool.request(w.url, "POST", endpoint.path, data, headers)
                raw = await resp.read(self.cfg.max_upstream_body_size)
        except (TimeoutError, TransportError) as exc:
            return _failure(exc, self.cfg.prefill_timeout_s)
        finally:
            if resp is not None:
                resp.close()  # no-op when read to the end; aborts the worker's request otherwise
        if resp.status == 200:
            try:
                return json.loads(raw)
            except ValueError:
                return CallFailure("bad_answer", "prefill answer is not JSON")
        if _client_error(resp.status):
            return Passthrough(resp.status, raw, resp.content_type)
        return CallFailure("status", f"HTTP {resp.status}: {raw[:200]!r}")

    def _record_failure(self, w: Worker, side: Side, f: CallFailure, rid: str) -> None:
        self.metrics.upstream_errors.labels(side.value, f.kind).inc()
        log.warning("request %s: %s worker %s failed: %s (%s)", rid, side.value, w.id, f.kind, f.detail)
        self.registry.record_failure(w, f"{f.kind}: {f.detail}", fatal=f.fatal)

    async def _decode(self, request: web.Request, endpoint: Endpoint, stream: bool,
                      body_for: bytes | Callable[[Worker], bytes], rreq: RouteRequest,
                      workers: Sequence[Worker], headers: dict[str, str],
                      t0: float) -> tuple[web.StreamResponse, Worker] | list[CallFailure]:
        """The answer and the worker that gave it, or why each of ``workers`` failed before its
        first byte (nothing was sent to the client then, so the caller may try elsewhere).
        ``body_for`` is the request body, or gives it per worker (peer hints differ)."""
        cost = rreq.cost(Side.DECODE)
        failures: list[CallFailure] = []
        for i, w in enumerate(workers):
            if i:
                self.metrics.retries.labels("decode").inc()
            data = body_for if isinstance(body_for, bytes) else body_for(w)
            self.registry.begin(w, cost)
            upstream: UpstreamResponse | None = None
            try:
                try:
                    async with asyncio.timeout(self.cfg.first_token_timeout_s):
                        upstream = await self.pool.request(w.url, "POST", endpoint.path, data, headers)
                        if upstream.status != 200 or not stream:
                            raw = await upstream.read(self.cfg.max_upstream_body_size)
                        else:
                            raw = await upstream.readany()
                except (TimeoutError, TransportError) as exc:
                    f = _failure(exc, self.cfg.first_token_timeout_s)
                else:
                    assert upstream is not None
                    if upstream.status != 200 and _client_error(upstream.status):
                        return self._passthrough(Passthrough(upstream.status, raw, upstream.content_type),
                                                 rreq.request_id), w
                    if upstream.status != 200:
                        f = CallFailure("status", f"HTTP {upstream.status}: {raw[:200]!r}")
                    elif not raw:
                        f = CallFailure("empty", "decode closed its answer before the first byte")
                    else:
                        self.registry.record_success(w)
                        self.policy.observe(rreq, w)
                        if not stream:
                            return self._plain(raw, upstream.content_type, rreq.request_id, endpoint,
                                               t0), w
                        return await self._pump(request, endpoint, upstream, raw, rreq.request_id, t0), w
                failures.append(f)
                self._record_failure(w, Side.DECODE, f, rreq.request_id)
            finally:
                self.registry.end(w, cost)
                if upstream is not None:
                    upstream.close()  # no-op when fully read; aborts the worker's request otherwise
        return failures

    def _plain(self, raw: bytes, content_type: str, rid: str, endpoint: Endpoint,
               t0: float) -> web.Response:
        self.metrics.observe_ttfb(endpoint.value, time.perf_counter() - t0)
        return web.Response(body=raw, headers={"X-Request-Id": rid},
                            content_type=content_type or "application/json")

    async def _pump(self, request: web.Request, endpoint: Endpoint, upstream: UpstreamResponse,
                    first: bytes, rid: str, t0: float) -> web.StreamResponse:
        """Forward decode's stream; closes ``upstream`` when the client leaves.

        After the first bytes (which go out with the response head), an HTTP/1.1 client's
        stream is relayed from the upstream connection's callback straight to the client's
        socket, one chunk per read (``UpstreamResponse.relay``): no task wake-up and no
        response-writer layers per token. The relay steps aside (the loop below carries on
        with ``readany`` and aiohttp's writer, which waits for the client to drain) when the
        client's socket has ``RELAY_HIGH_WATER`` bytes unsent or is closing."""
        out = web.StreamResponse(headers={
            "Content-Type": upstream.headers.get("content-type", "text/event-stream"),
            "Cache-Control": "no-cache", "X-Request-Id": rid})
        client = request.transport
        relay = client is not None and request.version >= (1, 1)
        if relay:
            out.enable_chunked_encoding()  # framed here too: each relayed piece is one chunk
        # One timer per stream, not one per chunk: each chunk only stamps the time, and the
        # watchdog re-arms itself until the stream has been idle for read_timeout_s.
        loop = asyncio.get_running_loop()
        read_timeout = self.cfg.read_timeout_s
        last = [loop.time()]
        stalled = [False]
        timer: list[asyncio.TimerHandle] = []

        def watchdog() -> None:
            due = last[0] + read_timeout
            if loop.time() >= due:
                stalled[0] = True
                upstream.close()  # the pending read fails at once
            else:
                timer[0] = loop.call_at(due, watchdog)

        def forward(piece: bytes) -> bool:
            assert client is not None
            if client.is_closing() or client.get_write_buffer_size() > RELAY_HIGH_WATER:
                return False
            client.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            last[0] = loop.time()
            if piece.endswith(_DONE_EVENT):
                request[ANSWER_SENT] = True
            return True

        timer.append(loop.call_at(last[0] + read_timeout, watchdog))
        try:
            await out.prepare(request)
            await out.write(first)
            if first.endswith(_DONE_EVENT):
                request[ANSWER_SENT] = True
            self.metrics.observe_ttfb(endpoint.value, time.perf_counter() - t0)
            while True:
                try:
                    if relay:
                        await upstream.relay(forward)
                    chunk = await upstream.readany()
                except TransportError as exc:
                    f = CallFailure("timeout", f"no data for {read_timeout:g}s") if stalled[0] \
                        else _failure(exc)
                    log.warning("request %s: decode stream broke: %s (%s)", rid, f.kind, f.detail)
                    self.metrics.upstream_errors.labels("decode", "stream_" + f.kind).inc()
                    err = {"error": {"message": f"the decode worker's stream broke: {f.kind}",
                                     "type": "upstream_error", "param": None, "code": "stream_broken"}}
                    await out.write(b"data: " + json.dumps(err).encode() + b"\n\n")
                    break
                if not chunk:
                    request[ANSWER_SENT] = True
                    break
                last[0] = loop.time()
                await out.write(chunk)
                if chunk.endswith(_DONE_EVENT):
                    request[ANSWER_SENT] = True
            await out.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            upstream.close()
            raise
        finally:
            timer[0].cancel()
        return out
