"""Announce this agent to a pdx-proxy, with heartbeats.

The message is ``pdx.scheduler.messages.AgentAnnouncement`` (role, engine URL,
addresses, load, a Bloom-filter summary of the chunk keys held). It is POSTed as
JSON to ``<proxy_url>/admin/register`` at start and then every ``heartbeat_s``;
each one is a full announcement, so a restarted proxy relearns the agent within
one period. ``stop()`` sends a last one with ``leaving=True``.

A proxy that is down or slow costs one failed POST per period (bounded by
``timeout_s``), counted in ``pdx_agent_announcements{result="error"}``; it never
affects the data path. One thread; ``stop()`` is idempotent and thread-safe.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from pdx.agent.metrics import AgentMetrics
from pdx.config import RegistrationConfig
from pdx.scheduler.messages import AgentAnnouncement

if TYPE_CHECKING:
    from pdx.agent.server import AgentServer

log = logging.getLogger("pdx.agent.registration")

REGISTER_PATH = "/admin/register"


class Announcer:
    """Posts ``snapshot(leaving)`` to the proxy every ``heartbeat_s`` on its own thread."""

    def __init__(self, config: RegistrationConfig, snapshot: Callable[[bool], AgentAnnouncement | None],
                 metrics: AgentMetrics) -> None:
        self.config = config
        self.url = config.proxy_url.rstrip("/") + REGISTER_PATH
        self._snapshot = snapshot
        self._metrics = metrics
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        self.sent = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pdx-agent-announce", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.announce(leaving=False)
            self._stop.wait(self.config.heartbeat_s)

    def announce(self, leaving: bool) -> bool:
        """One POST; True when the proxy accepted it (2xx). Never raises."""
        try:
            msg = self._snapshot(leaving)
            if msg is None:  # nothing to announce yet (no engine URL known)
                return False
            body = json.dumps(msg.to_dict()).encode()
        except Exception:
            log.exception("cannot build the announcement")
            return False
        headers = {"Content-Type": "application/json"}
        if self.config.admin_key:
            headers["Authorization"] = f"Bearer {self.config.admin_key}"
        req = urllib.request.Request(self.url, data=body, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.config.timeout_s) as resp:
                ok = 200 <= int(resp.status) < 300
        except urllib.error.HTTPError as exc:
            ok = False
            detail = exc.read(512).decode("utf-8", "replace")
            self._note(False, f"HTTP {exc.code}: {detail}")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            ok = False
            self._note(False, str(getattr(exc, "reason", exc)))
        else:
            self._note(ok, "" if ok else "non-2xx reply")
        if ok:
            self.sent += 1
        return ok

    def _note(self, ok: bool, why: str) -> None:
        self._metrics.announcements.labels(result="ok" if ok else "error").inc()
        if ok and self._failing:
            log.info("proxy at %s accepts announcements again", self.url)
        elif not ok and not self._failing:
            log.warning("cannot announce to the proxy at %s: %s (retrying every %.1fs)", self.url, why,
                        self.config.heartbeat_s)
        self._failing = not ok

    def stop(self, timeout: float = 5.0) -> None:
        """Stop heartbeats and say goodbye (one bounded POST)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        deadline = time.monotonic() + timeout
        if time.monotonic() < deadline:
            self.announce(leaving=True)


def build_announcement(server: AgentServer, seq: int, leaving: bool,
                       keys: Callable[[], Sequence[bytes]] | None = None) -> AgentAnnouncement:
    """The announcement of ``server`` now (any thread). ``keys`` lists the chunk keys to summarise."""
    from pdx.config import shared_tier_ids
    from pdx.scheduler.messages import AgentLoad, WorkerRole
    from pdx.scheduler.summary import KeySummary

    cfg = server.config
    status = server.status()
    pool = status.get("pool") or {}
    layout = server.layout
    summary = None
    if keys is not None:
        summary = KeySummary.build(keys(), cfg.registration.summary_fp_rate)
    return AgentAnnouncement(
        agent_id=server.agent_id,
        role=WorkerRole(cfg.role),
        engine_url=server.engine_url,
        agent_url=server.http_url,
        control_address=server.control_address,
        transport_address=server.peer_address,
        models=tuple(cfg.registration.models),
        load=AgentLoad(requests=0, tokens=0, pool_used_bytes=int(pool.get("used_bytes", 0)),
                       pool_capacity_bytes=int(pool.get("capacity_bytes", 0))),
        chunk_fingerprint=layout.chunk_fingerprint if layout is not None else "",
        chunk_tokens=cfg.store.chunk_tokens,
        namespace=cfg.store.namespace,
        keys=summary,
        shared_tiers=tuple(shared_tier_ids(cfg.store)),
        heartbeat_s=cfg.registration.heartbeat_s,
        seq=seq,
        timestamp=time.time(),
        leaving=leaving,
    )
