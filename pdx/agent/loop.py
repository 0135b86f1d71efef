"""The agent's control loop: ZMQ ROUTER sockets, request dispatch, deferred replies.

One thread (``ControlLoop.run``) owns every ZMQ socket of the agent's control
plane: the local control socket (``ipc://`` in an owner-only folder, or
``tcp://127.0.0.1``) for the engine's connector, and the peer socket (on
``transport.host``) for other agents. It decodes each frame
(``pdx.agent.protocol``), calls the handler registered for the op and sends the
reply. Handlers run on this thread and must not block: anything that waits
(a transfer, a job ``wait``, tier I/O) returns a ``Deferred`` whose future is
completed elsewhere; the loop sends the reply when the future is done or its
timeout passes. So a slow peer or a long wait never delays anyone else's ``ping``.

Bad input never stops the loop: an undecodable frame gets an error reply when
it carried a usable id and is counted and dropped otherwise; a frame over
``max_frame`` makes ZMQ drop that connection (``MAXMSGSIZE``); a reply to a
client that went away is dropped by the ROUTER. A handler that raises sends an
error reply (``PdxError`` subclasses keep their class name).

Thread-safety: only ``wake`` and ``stop`` may be called from other threads.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import zmq

from pdx.agent.metrics import AgentMetrics
from pdx.agent.protocol import (
    Op,
    Request,
    decode_request,
    encode_error,
    encode_reply,
)
from pdx.errors import AgentUnavailable, ConfigError, PdxError, WireError

log = logging.getLogger("pdx.agent")

#: messages handled per socket before the loop looks at the others (fairness).
BATCH = 64
#: how long closing the loop's sockets may take to deliver replies already queued (ms).
CLOSE_LINGER_MS = 500
#: longest ipc:// path the kernel accepts (sun_path is 108 bytes with the NUL).
MAX_IPC_PATH = 107

Handler = Callable[..., Any]  # (args) or, on an endpoint with ``auth``, (args, what auth returned)
_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE) | int(zmq.NOBLOCK)
_POLLIN = int(zmq.POLLIN)
_EVENTS = int(zmq.EVENTS)


@dataclass
class Deferred:
    """A reply that comes later: when ``future`` is done, or ``on_timeout()`` after ``timeout_s``.

    ``on_timeout`` returns the result to send when time runs out (e.g. a job's
    current state); without it the caller gets ``AgentUnavailable``.
    """

    future: Future[Any]
    timeout_s: float
    on_timeout: Callable[[], Any] | None = None


@dataclass
class _Pending:
    sock: zmq.Socket[bytes]
    envelope: list[bytes]
    rid: int
    op: Op
    started: float
    deferred: Deferred
    done: bool = False


class Endpoint:
    """One ROUTER socket and the ops it accepts."""

    def __init__(self, name: str, sock: zmq.Socket[bytes], address: str, handlers: dict[Op, Handler],
                 auth: Callable[[Request], Any] | None = None) -> None:
        self.name = name
        self.sock = sock
        self.address = address
        self.handlers = handlers
        self.allowed = frozenset(handlers)
        self.auth = auth


def prepare_ipc(address: str) -> None:
    """Make the folder of an ``ipc://`` address owner-only (0700) and clear a stale socket file."""
    path = Path(address[len("ipc://"):])
    if len(str(path)) > MAX_IPC_PATH:
        raise ConfigError(f"control.address: ipc path {str(path)!r} is {len(str(path))} characters; "
                          f"the limit is {MAX_IPC_PATH} (use a shorter data_dir or a tcp:// address)")
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    try:
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()  # left by an agent that died; ZMQ cannot bind over it
    except FileNotFoundError:
        pass


class ControlLoop:
    """Owns the agent's ROUTER sockets; see the module docstring.

    Build with ``ControlLoop(instance, metrics, max_frame)``, add endpoints with
    ``bind``, add periodic work with ``every``, then ``start()`` (a thread) or ``run()``.
    """

    def __init__(self, instance: str, metrics: AgentMetrics, max_frame: int) -> None:
        self.instance = instance
        self.metrics = metrics
        self.max_frame = max_frame
        self.ctx = zmq.Context()
        self.endpoints: list[Endpoint] = []
        self._timers: list[tuple[float, Callable[[], None], list[float]]] = []
        self._pending: dict[int, _Pending] = {}
        self._deadlines: list[tuple[float, int]] = []
        self._completed: deque[int] = deque()
        self._tokens = itertools.count(1)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stats = metrics.control
        self._op_index = {op: metrics.control.ops.index(op.value) for op in Op}
        self._next_due = 0.0

    # --- set-up --------------------------------------------------------------------------------

    def bind(self, name: str, address: str, handlers: dict[Op, Handler],
             auth: Callable[[Request], Any] | None = None) -> Endpoint:
        """Bind a ROUTER at ``address`` (``tcp://host:0`` picks a free port). Returns the endpoint,
        whose ``address`` is the resolved one."""
        if address.startswith("ipc://"):
            prepare_ipc(address)
        sock: zmq.Socket[bytes] = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_frame + 1024)  # + envelope frames
        sock.setsockopt(zmq.SNDHWM, 10000)
        sock.setsockopt(zmq.RCVHWM, 10000)
        try:
            if address.startswith("tcp://") and address.endswith(":0"):
                port = sock.bind_to_random_port(address[: -len(":0")])
                address = f"{address[: -len(':0')]}:{port}"
            else:
                sock.bind(address)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise ConfigError(f"cannot bind the {name} socket at {address}: {exc}") from exc
        if address.startswith("ipc://"):
            os.chmod(address[len("ipc://"):], 0o600)
        ep = Endpoint(name, sock, address, handlers, auth)
        self.endpoints.append(ep)
        return ep

    def every(self, interval_s: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread every ``interval_s`` (it must not block)."""
        self._timers.append((interval_s, fn, [time.monotonic() + interval_s]))

    def wake(self, token: int) -> None:
        """Thread-safe: the deferred reply ``token`` is ready."""
        self._completed.append(token)
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: the loop is awake anyway
        except OSError:
            pass  # closed during shutdown

    # --- running ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="pdx-agent-control", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop and close its sockets (idempotent; thread-safe)."""
        self._stop.set()
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def run(self) -> None:
        poller = zmq.Poller()
        for ep in self.endpoints:
            poller.register(ep.sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(self._next_wait_ms()))
                for ep in self.endpoints:
                    if ep.sock in events:
                        self._drain(ep)
                if self._wake_r in events:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                self._flush_completed()
                self._run_due()
        except Exception:
            log.exception("control loop crashed")
            raise
        finally:
            try:
                self._flush_completed()  # replies whose work finished as the loop was asked to stop
            except Exception:
                log.exception("control loop: flushing the last replies failed")
            for ep in self.endpoints:
                # a short linger: replies queued just now (a drained job's ``wait``) still go out
                ep.sock.close(linger=CLOSE_LINGER_MS)
            self.ctx.term()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _next_wait_ms(self) -> int:
        now = time.monotonic()
        nxt = now + 1.0
        if self._deadlines:
            nxt = min(nxt, self._deadlines[0][0])
        for _interval, _fn, due in self._timers:
            nxt = min(nxt, due[0])
        return max(0, int((nxt - now) * 1000) + 1)

    def _run_due(self) -> None:
        now = time.monotonic()
        if now < self._next_due and not (self._deadlines and self._deadlines[0][0] <= now):
            return
        self._next_due = now + 1.0
        for interval, fn, due in self._timers:
            if now >= due[0]:
                due[0] = now + interval
                try:
                    fn()
                except Exception:
                    log.exception("periodic task %s failed", getattr(fn, "__name__", fn))
            self._next_due = min(self._next_due, due[0])
        while self._deadlines and self._deadlines[0][0] <= now:
            _, token = heapq.heappop(self._deadlines)
            p = self._pending.get(token)
            if p is not None and not p.done:
                self._finish(token, p, timed_out=True)

    # --- requests ------------------------------------------------------------------------------

    def _drain(self, ep: Endpoint) -> None:
        sock = ep.sock
        for _ in range(BATCH):
            # Asking EVENTS is cheaper than a recv that ends in zmq.Again (an exception per wake-up).
            if not cast(int, sock.getsockopt(_EVENTS)) & _POLLIN:
                return
            try:
                frames = sock.recv_multipart(_NOBLOCK)
            except zmq.Again:
                return
            self._handle(ep, frames)

    def _handle(self, ep: Endpoint, frames: list[bytes]) -> None:
        t0 = time.perf_counter()
        # DEALER: [identity, payload]; REQ: [identity, b"", payload].
        if len(frames) == 2:
            envelope, payload = frames[:1], frames[1]
        elif len(frames) == 3 and frames[1] == b"":
            envelope, payload = frames[:2], frames[2]
        else:
            self.metrics.bad_frames.labels(reason="framing").inc()
            return
        try:
            req = decode_request(payload, self.max_frame, ep.allowed)
        except WireError as exc:
            self.metrics.bad_frames.labels(reason="decode").inc()
            rid = getattr(exc, "request_id", None)
            log.debug("%s: bad request: %s", ep.name, exc)
            if rid is not None:
                self._send(ep.sock, envelope, encode_error(rid, exc, self.instance))
            return
        try:
            if ep.auth is not None:  # the peer socket: handlers also get the caller's session
                result = ep.handlers[req.op](req.args, ep.auth(req))
            else:
                result = ep.handlers[req.op](req.args)
        except PdxError as exc:
            self._stats.observe(self._op_index[req.op], time.perf_counter() - t0, False)
            self._send(ep.sock, envelope, encode_error(req.id, exc, self.instance))
            return
        except Exception as exc:
            log.exception("%s: handler of %s failed", ep.name, req.op.value)
            self._stats.observe(self._op_index[req.op], time.perf_counter() - t0, False)
            self._send(ep.sock, envelope, encode_error(req.id, exc, self.instance))
            return
        if isinstance(result, Deferred):
            self._defer(ep.sock, envelope, req, result, t0)
            return
        try:
            frame = encode_reply(req.id, result, self.instance)
        except WireError as exc:
            log.error("%s: cannot encode the reply to %s: %s", ep.name, req.op.value, exc)
            frame = encode_error(req.id, exc, self.instance)
        self._send(ep.sock, envelope, frame)
        self._stats.observe(self._op_index[req.op], time.perf_counter() - t0, True)

    def _defer(self, sock: zmq.Socket[bytes], envelope: list[bytes], req: Request, d: Deferred,
               t0: float) -> None:
        token = next(self._tokens)
        self._pending[token] = _Pending(sock, envelope, req.id, req.op, t0, d)
        heapq.heappush(self._deadlines, (time.monotonic() + d.timeout_s, token))
        d.future.add_done_callback(functools.partial(self._wake_token, token))

    def _wake_token(self, token: int, _future: Future[Any]) -> None:
        self.wake(token)

    def _flush_completed(self) -> None:
        while self._completed:
            token = self._completed.popleft()
            p = self._pending.get(token)
            if p is not None and not p.done:
                self._finish(token, p, timed_out=False)

    def _finish(self, token: int, p: _Pending, timed_out: bool) -> None:
        p.done = True
        del self._pending[token]
        d = p.deferred
        try:
            if timed_out and not d.future.done():
                if d.on_timeout is None:
                    raise AgentUnavailable(f"{p.op.value} did not finish within {d.timeout_s:g}s")
                result = d.on_timeout()
            else:
                result = d.future.result(timeout=0)
            frame = encode_reply(p.rid, result, self.instance)
            outcome = "ok"
        except Exception as exc:
            if not isinstance(exc, PdxError):
                log.error("deferred %s failed: %s: %s", p.op.value, type(exc).__name__, exc)
            frame = encode_error(p.rid, exc, self.instance)
            outcome = "error"
        self._send(p.sock, p.envelope, frame)
        self._stats.observe(self._op_index[p.op], time.perf_counter() - p.started, outcome == "ok")

    def _send(self, sock: zmq.Socket[bytes], envelope: list[bytes], frame: bytes) -> None:
        # Plain int flags and per-frame sends: pyzmq's enum flag arithmetic and send_multipart
        # wrapper cost more than the send itself on this path.
        try:
            for part in envelope:
                sock.send(part, _MORE_NOBLOCK)
            sock.send(frame, _NOBLOCK)
        except zmq.ZMQError as exc:  # the client is gone or its queue is full: drop
            log.debug("reply dropped: %s", exc)

    @property
    def pending(self) -> int:
        """Deferred replies not yet sent."""
        return len(self._pending)
