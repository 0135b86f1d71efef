"""The agent's small HTTP endpoint (loopback by default).

* ``GET /healthz``: 200 while the agent's control loop runs.
* ``GET /readyz``: 200 when the store is up (an engine registered its layout) and,
  if the agent supervises an engine, the engine runs; 503 with the reasons otherwise.
* ``GET /metrics``: Prometheus text of the agent's registry (store + agent series).
* ``GET /v1/status``: JSON: role, layout, pool usage, tiers, peers, engine pid and restarts.

Served by the standard library's threading HTTP server on its own threads; the
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


class HttpEndpoint:
    """Serve the four paths on ``host:port`` (0 = a free port; see ``url``)."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 health: Callable[[], bool], ready: Callable[[], list[str]],
                 status: Callable[[], dict[str, Any]]) -> None:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "pdx-agent"

            def do_GET(self) -> None:
                endpoint._get(self)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("%s " + format, self.address_string(), *args)

        self._registry = registry
        self._health = health
        self._ready = ready
        self._status = status
        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise ConfigError(f"http: cannot listen on {host}:{port}: {exc.strerror}") from exc
        self._server.daemon_threads = True
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
