"""The agent's small HTTP endpoint (loopback by default).

* ``GET /healthz``: 200 while the agent's control loop runs.
* ``GET /readyz``: 200 when the store is up (an engine registered its layout) and,
  if the agent supervises an engine, the engine runs; 503 with the reasons otherwise.
* ``GET /metrics``: Prometheus text of the agent's registry (store + agent series).
* ``GET /v1/status``: JSON: role, layout, pool usage, tiers, peers, engine pid and restarts.

Served by the standard library's threading HTTP server on at most ``MAX_THREADS`` threads, each
request with a ``REQUEST_TIMEOUT_S`` socket timeout (a slow client cannot pin them); the
callbacks it calls (``health``, ``ready``, ``status``) must be thread-safe and quick.
``HttpEndpoint.close()`` is idempotent.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from pdx.errors import ConfigError

log = logging.getLogger("pdx.agent.http")

#: requests served at once; more connections are closed at once (a scrape is quick).
MAX_THREADS = 16
#: a client that sends nothing (or too slowly) for this long is dropped.
REQUEST_TIMEOUT_S = 10.0


class _BoundedServer(ThreadingHTTPServer):
    """A threading server with at most ``MAX_THREADS`` handler threads."""

    daemon_threads = True

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._slots = threading.BoundedSemaphore(MAX_THREADS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.warning("http: %d requests in progress; closing a connection from %s", MAX_THREADS,
                        client_address[0])
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class HttpEndpoint:
    """Serve the four paths on ``host:port`` (0 = a free port; see ``url``)."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 health: Callable[[], bool], ready: Callable[[], list[str]],
                 status: Callable[[], dict[str, Any]]) -> None:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "pdx-agent"
            timeout = REQUEST_TIMEOUT_S  # socket timeout: a silent or slow client is dropped

            def do_GET(self) -> None:
                endpoint._get(self)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("%s " + format, self.address_string(), *args)

        self._registry = registry
        self._health = health
        self._ready = ready
        self._status = status
        try:
            self._server = _BoundedServer((host, port), Handler)
        except OSError as exc:
            raise ConfigError(f"http: cannot listen on {host}:{port}: {exc.strerror}") from exc
        h, p = self._server.server_address[:2]
        self.url = f"http://{h!s}:{p}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="pdx-agent-http", daemon=True)
        self._thread.start()
        self._closed = False

    def _get(self, req: BaseHTTPRequestHandler) -> None:
        path = req.path.split("?", 1)[0]
        try:
            if path == "/healthz":
                ok = self._health()
                self._send(req, 200 if ok else 503, b"ok\n" if ok else b"control loop stopped\n",
                           "text/plain")
            elif path == "/readyz":
                problems = self._ready()
                body = json.dumps({"ready": not problems, "problems": problems}).encode() + b"\n"
                self._send(req, 503 if problems else 200, body, "application/json")
            elif path == "/metrics":
                self._send(req, 200, generate_latest(self._registry), CONTENT_TYPE_LATEST)
            elif path == "/v1/status":
                body = json.dumps(self._status(), indent=1, sort_keys=True, default=str).encode() + b"\n"
                self._send(req, 200, body, "application/json")
            else:
                self._send(req, 404, b'{"error": "not found; try /healthz /readyz /metrics /v1/status"}\n',
                           "application/json")
        except Exception as exc:  # a failing callback must not kill the server thread
            log.exception("http %s failed", path)
            self._send(req, 500, json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode(),
                       "application/json")

    @staticmethod
    def _send(req: BaseHTTPRequestHandler, code: int, body: bytes, ctype: str) -> None:
        try:
            req.send_response(code)
            req.send_header("Content-Type", ctype)
            req.send_header("Content-Length", str(len(body)))
            req.end_headers()
            req.wfile.write(body)
        except OSError:
            pass  # the client went away

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)
