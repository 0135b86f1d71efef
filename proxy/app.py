"""The proxy's HTTP service: OpenAI endpoints, health, metrics and admin, on aiohttp.

``ProxyServer`` owns everything one proxy runs: the listening sockets, the client
session to the workers (keep-alive pools), the worker registry, the routing
policy, the health loop and the metrics. ``await server.start()`` binds and
returns; ``await server.stop()`` closes it all. It runs on the caller's event
loop (``pdx-proxy serve`` uses uvloop); nothing in it is thread-safe.

Client endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /v1/models`` (API key checked when configured; a tenant's key also
identifies the tenant, whose ``cache_salt`` every request then carries: ``proxy/tenants.py``), ``GET /health`` (200 when a
decode worker is in the pool, else 503), ``GET /metrics`` (Prometheus).
Admin endpoints (admin key; on their own port when ``admin_port`` is set):
``POST /admin/register`` (an agent announcement, JSON or msgpack) and
``GET /admin/workers``. Every error is an OpenAI error body
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from typing import Any

import msgpack
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from pdx.config import ProxyConfig
from pdx.errors import (
    BadRequest,
    NotFound,
    NoWorkers,
    Overloaded,
    PayloadTooLarge,
    ProxyError,
    Unauthorized,
    WireError,
)
from pdx.scheduler.messages import AgentAnnouncement
from pdx.scheduler.policies import RoutingPolicy, make_policy
from pdx.scheduler.registry import Side, WorkerRegistry
from pdx.scheduler.summary import MAX_SUMMARY_BYTES
from pdx.scheduler.tokenizer import Tokenizer, load_tokenizer
from proxy.admission import Admission
from proxy.checks import MAX_JSON_DEPTH, check_depth, check_generate
from proxy.flow import ANSWER_SENT, Endpoint, PDFlow
from proxy.health import HealthChecker
from proxy.metrics import ProxyMetrics
from proxy.tenants import ClientAuth
from proxy.upstream import UpstreamPool

log = logging.getLogger("pdx.proxy")

_RID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
#: largest admin body: an announcement with the biggest key summary, base64 encoded.
ADMIN_MAX_BODY = MAX_SUMMARY_BYTES * 4 // 3 + 256 * 1024
_STATUS_DISCONNECTED = 499  # nginx's "client closed request", in metrics only


def error_response(exc: ProxyError, rid: str | None = None) -> web.Response:
    headers = {}
    if rid:
        headers["X-Request-Id"] = rid
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    body = {"error": {"message": exc.message, "type": exc.error_type, "param": exc.param,
                      "code": exc.code}}
    return web.json_response(body, status=exc.status, headers=headers)


def json_or_400(raw: bytes) -> Any:
    if not raw:
        raise BadRequest("empty request body; expected a JSON object", code="invalid_json")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise BadRequest(f"JSON nested more than {MAX_JSON_DEPTH} levels deep", code="invalid_json") from None
    check_depth(raw, body)
    return body


def validate_body(endpoint: Endpoint, body: Any) -> None:
    """Checks the proxy needs before routing (``proxy.checks``: shapes, ranges, limits); the
    worker validates everything else."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if model is None:
        raise BadRequest("missing required field 'model'", param="model", code="missing_field")
    if not isinstance(model, str):
        raise BadRequest("'model' must be a string", param="model", code="invalid_type")
    if endpoint is Endpoint.COMPLETIONS:
        if "prompt" not in body:
            raise BadRequest("missing required field 'prompt'", param="prompt", code="missing_field")
    else:
        messages = body.get("messages")
        if messages is None:
            raise BadRequest("missing required field 'messages'", param="messages", code="missing_field")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise BadRequest("'messages' must be a non-empty list of objects with a 'role'",
                             param="messages", code="invalid_type")
    check_generate(endpoint is Endpoint.CHAT, body)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", param="stream", code="invalid_type")


class ProxyServer:
    """One running proxy. ``tokenizer`` overrides the configured one (tests)."""

    def __init__(self, cfg: ProxyConfig, *, tokenizer: Tokenizer | None = None) -> None:
        self.cfg = cfg
        self.registry = WorkerRegistry(
            cfg.workers, heartbeat_timeout_s=cfg.heartbeat_timeout_s,
            unhealthy_after=cfg.unhealthy_after, hint_keys=cfg.cache_aware.hint_keys,
            default_chunk_tokens=cfg.cache_aware.chunk_tokens)
        self.policy: RoutingPolicy = make_policy(cfg.policy, cfg.cache_aware)
        # peer hints need the prompt's chunk keys too: with any policy once a tokenizer is configured
        if tokenizer is None and (self.policy.needs_tokens or (cfg.p2p.enabled and cfg.cache_aware.tokenizer)):
            tokenizer = load_tokenizer(cfg.cache_aware.tokenizer)
        self.tokenizer = tokenizer
        self.admission = Admission(cfg.max_inflight, cfg.max_queue, cfg.queue_timeout_s,
                                   cfg.retry_after_s)
        self.metrics = ProxyMetrics(self.registry.describe)
        self.metrics.inflight.set_function(lambda: self.admission.inflight)
        self.metrics.queued.set_function(lambda: self.admission.queued)
        self.auth = ClientAuth(cfg)
        self._admin_key = (cfg.admin_key or cfg.api_key).encode()
        self.url = ""
        self.admin_url = ""
        self.pool: UpstreamPool | None = None
        self.flow: PDFlow | None = None
        self.health: HealthChecker | None = None
        self._runners: list[web.AppRunner] = []
        self._tasks: list[asyncio.Task[None]] = []

    # --- lifecycle -------------------------------------------------------------------------

    def _build_apps(self) -> tuple[web.Application, web.Application | None]:
        separate_admin = self.cfg.admin_port is not None
        main_size = self.cfg.max_body_size if separate_admin else max(self.cfg.max_body_size,
                                                                      ADMIN_MAX_BODY)
        app = web.Application(client_max_size=main_size)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        admin = web.Application(client_max_size=ADMIN_MAX_BODY) if separate_admin else app
        admin.router.add_post("/admin/register", self._register)
        admin.router.add_get("/admin/workers", self._workers)
        for a in {id(app): app, id(admin): admin}.values():
            a.router.add_route("*", "/{tail:.*}", self._not_found)
        return app, admin if separate_admin else None

    async def start(self) -> None:
        """Bind the listeners and start the health loop; returns once serving."""
        self.pool = UpstreamPool(self.cfg.connect_timeout_s)
        self.flow = PDFlow(self.cfg, self.registry, self.policy, self.pool, self.metrics, self.tokenizer)
        auth = {"Authorization": f"Bearer {self.cfg.upstream_api_key}"} if self.cfg.upstream_api_key else {}
        self.health = HealthChecker(self.registry, self.pool, interval_s=self.cfg.health_interval_s,
                                    timeout_s=self.cfg.health_timeout_s, headers=auth)
        app, admin = self._build_apps()
        try:
            self.url = await self._listen(app, self.cfg.host, self.cfg.port)
            self.admin_url = (await self._listen(admin, self.cfg.admin_host, self.cfg.admin_port or 0)
                              if admin is not None else self.url)
        except OSError:
            await self.stop()
            raise
        # One round before serving, so /health tells the truth from the start; a worker that
        # is down fails fast (connection refused), a hanging one costs at most the timeout.
        await self.health.check_all()
        self._tasks.append(asyncio.create_task(self.health.run(first_delay=True), name="pdx-proxy-health"))
        log.info("pdx-proxy serving on %s (admin %s), policy %s, %d static workers",
                 self.url, self.admin_url, self.policy.name, len(self.cfg.workers))

    async def _listen(self, app: web.Application, host: str, port: int) -> str:
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                               shutdown_timeout=self.cfg.shutdown_grace_s)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        bound_host, bound_port = runner.addresses[-1][:2]
        return f"http://{bound_host}:{bound_port}"

    async def stop(self) -> None:
        """Stop listening, cancel the health loop, close worker connections. Idempotent."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass
        self._tasks.clear()
        for r in self._runners:
            await r.cleanup()
        self._runners.clear()
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    async def __aenter__(self) -> ProxyServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _key_ok(request: web.Request, key: bytes) -> bool:
        if not key:
            return True
        got = request.headers.get("Authorization", "")
        if not got.startswith("Bearer "):
            return False
        return hmac.compare_digest(got[7:].strip().encode(), key)

    def _served_models(self) -> list[str]:
        return list(self.cfg.models) or self.registry.models()

    async def _read_json(self, request: web.Request, limit: int) -> Any:
        return json_or_400(await self._read_body(request, limit))

    async def _read_body(self, request: web.Request, limit: int) -> bytes:
        length = request.content_length
        if length is not None and length > limit:
            raise PayloadTooLarge(f"request body of {length} bytes is over the limit of {limit}")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes") from None
        if len(raw) > limit:
            raise PayloadTooLarge(f"request body of {len(raw)} bytes is over the limit of {limit}")
        return raw

    # --- client endpoints ------------------------------------------------------------------

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, Endpoint.COMPLETIONS)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, Endpoint.CHAT)

    async def _generate(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        t0 = time.perf_counter()
        rid = request.headers.get("X-Request-Id", "")
        if not _RID_RE.match(rid):
            rid = uuid.uuid4().hex
        m = self.metrics
        admitted = False
        try:
            tenant = self.auth.identify(request.headers)
            received = await self._read_body(request, self.cfg.max_body_size)
            body = json_or_400(received)
            validate_body(endpoint, body)
            # a body with a salt (the tenant's, or checked) is serialized again by the flow
            raw = None if self.auth.apply_salt(body, tenant) else received
            served = self._served_models()
            if served and body["model"] not in served:
                raise NotFound(f"the model '{body['model']}' does not exist; served: {', '.join(served)}",
                               param="model", code="model_not_found")
            await self.admission.acquire()
            admitted = True
            assert self.flow is not None
            resp = await self.flow.serve(request, endpoint, body, rid, t0, raw)
        except ProxyError as exc:
            if isinstance(exc, Overloaded | NoWorkers):
                m.rejected.labels(exc.code).inc()
            if exc.status >= 500 or isinstance(exc, Overloaded):
                log.warning("request %s: %d %s", rid, exc.status, exc.message)
            resp = error_response(exc, rid)
        except (ConnectionResetError, asyncio.CancelledError) as exc:
            if request.get(ANSWER_SENT):
                # A client closing once it has read [DONE] is the normal end of a stream.
                m.count_request(endpoint.value, 200, time.perf_counter() - t0)
                log.debug("request %s: the client closed after the end of the answer", rid)
            else:
                m.disconnects.inc()
                m.count_request(endpoint.value, _STATUS_DISCONNECTED)
                log.info("request %s: the client went away; upstream requests closed", rid)
            if isinstance(exc, asyncio.CancelledError):
                raise
            # The transport is gone: aiohttp drops whatever we return, quietly.
            return web.Response(status=_STATUS_DISCONNECTED)
        finally:
            if admitted:
                self.admission.release()
        m.count_request(endpoint.value, resp.status, time.perf_counter() - t0)
        return resp

    async def _models(self, request: web.Request) -> web.Response:
        try:
            self.auth.identify(request.headers)
        except Unauthorized as exc:
            return error_response(exc)
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "pdx"}
                for name in self._served_models()]
        return web.json_response({"object": "list", "data": data})

    async def _health(self, request: web.Request) -> web.Response:
        """200 once a decode worker has passed a health check (or its agent announced it), or,
        with ``decode_fallback``, a prefill worker (then ``status: degraded``: it serves whole)."""
        now = self.registry.clock()
        decode = sum(w.verified(now) for w in self.registry.candidates(Side.DECODE))
        prefill = sum(w.verified(now) for w in self.registry.candidates(Side.PREFILL))
        if decode and (prefill or not self.registry.has_role(Side.PREFILL)):
            status = "ok"
        elif decode or (prefill and self.cfg.decode_fallback):
            status = "degraded"
        else:
            status = "no healthy decode worker"
        ok = status != "no healthy decode worker"
        return web.json_response({"status": status, "workers": {"prefill": prefill, "decode": decode}},
                                 status=200 if ok else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _not_found(self, request: web.Request) -> web.Response:
        resource = request.app.router.resources()
        known = any(r.get_info().get("path") == request.path for r in resource)
        if known:
            return error_response(BadRequest(f"method {request.method} is not allowed on {request.path}",
                                             status=405, code="method_not_allowed"))
        return error_response(NotFound(f"no such endpoint: {request.method} {request.path}"))

    # --- admin endpoints -------------------------------------------------------------------

    async def _register(self, request: web.Request) -> web.Response:
        if not self._key_ok(request, self._admin_key):
            return error_response(Unauthorized("missing or wrong admin key"))
        try:
            if request.content_type == "application/msgpack":
                raw = await request.read()
                try:
                    data = msgpack.unpackb(raw, raw=False, max_bin_len=ADMIN_MAX_BODY,
                                           max_str_len=ADMIN_MAX_BODY)
                except (ValueError, msgpack.UnpackException) as exc:
                    raise BadRequest(f"malformed msgpack: {exc}", code="invalid_msgpack") from None
            else:
                data = await self._read_json(request, ADMIN_MAX_BODY)
            msg = AgentAnnouncement.from_dict(data)
        except ProxyError as exc:
            self.metrics.registrations.labels("rejected").inc()
            return error_response(exc)
        except WireError as exc:
            self.metrics.registrations.labels("rejected").inc()
            return error_response(BadRequest(str(exc), code="invalid_announcement"))
        try:
            w = self.registry.announce(msg)
        except KeyError as exc:
            self.metrics.registrations.labels("unknown").inc()
            return error_response(NotFound(str(exc.args[0]), code="unknown_worker"))
        self.metrics.registrations.labels("leaving" if msg.leaving else "ok").inc()
        now = self.registry.clock()
        return web.json_response({"worker_id": w.id, "state": w.state(now).value,
                                  "heartbeat_timeout_s": w.heartbeat_timeout_s,
                                  "peers": self.registry.peers()})

    async def _workers(self, request: web.Request) -> web.Response:
        if not self._key_ok(request, self._admin_key):
            return error_response(Unauthorized("missing or wrong admin key"))
        return web.json_response({"policy": self.policy.name, "workers": self.registry.describe(),
                                  "inflight": self.admission.inflight, "queued": self.admission.queued,
                                  "health_rounds": self.health.rounds if self.health else 0})
