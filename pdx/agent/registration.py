"""Announce this agent to a pdx-proxy, with heartbeats.

The message is ``pdx.scheduler.messages.AgentAnnouncement`` (role, engine URL,
addresses, load, a Bloom-filter summary of the chunk keys held). It is POSTed as
JSON to ``<proxy>/admin/register`` of every proxy of the deployment (``proxy_url``
plus ``proxy_urls``) at start and then every ``heartbeat_s``; each one is a full
announcement, so a restarted proxy relearns the agent within one period. ``stop()``
sends a last one with ``leaving=True`` to each.

A proxy that is down or slow costs one failed POST per period (bounded by
``timeout_s``), counted in ``pdx_agent_announcements{result="error"}``; it never
affects the data path nor the other proxies: each proxy has its own thread.
``stop()`` is idempotent and thread-safe.
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
    from pdx.agent.context import AgentContext

log = logging.getLogger("pdx.agent.registration")

REGISTER_PATH = "/admin/register"
#: longest registration reply read (the peers list of a large fleet fits easily).
MAX_REPLY = 4 * 1024 * 1024


def proxy_urls(config: RegistrationConfig) -> list[str]:
    """Every proxy the agent announces itself to (``proxy_url`` first, no duplicates)."""
    urls = [u.strip().rstrip("/") for u in (config.proxy_url, *config.proxy_urls)]
    return list(dict.fromkeys(u for u in urls if u))


class Announcer:
    """Posts ``snapshot(leaving)`` to every proxy every ``heartbeat_s``, one thread per proxy."""

    def __init__(self, config: RegistrationConfig, snapshot: Callable[[bool], AgentAnnouncement | None],
                 metrics: AgentMetrics,
                 on_peers: Callable[[list[tuple[str, str, str, str]]], None] | None = None) -> None:
        self.config = config
        self._on_peers = on_peers
        self.urls = [u + REGISTER_PATH for u in proxy_urls(config)]
        self.url = self.urls[0] if self.urls else ""
        self._snapshot = snapshot
        self._metrics = metrics
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._failing: dict[str, bool] = {}
        self._lock = threading.Lock()
        self.sent = 0

    def start(self) -> None:
        for url in self.urls:
            t = threading.Thread(target=self._run, args=(url,), name="pdx-agent-announce", daemon=True)
            t.start()
            self._threads.append(t)

    def _run(self, url: str) -> None:
        while not self._stop.is_set():
            self._post(url, leaving=False)
            self._stop.wait(self.config.heartbeat_s)

    def announce(self, leaving: bool) -> bool:
        """One POST to each proxy; True when every one accepted it (2xx). Never raises."""
        results = [self._post(url, leaving) for url in self.urls]
        return bool(results) and all(results)

    def _post(self, url: str, leaving: bool) -> bool:
        """One POST to ``url``; True when the proxy accepted it (2xx). Never raises."""
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
        req = urllib.request.Request(url, data=body, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.config.timeout_s) as resp:
                ok = 200 <= int(resp.status) < 300
                reply = resp.read(MAX_REPLY) if ok else b""
        except urllib.error.HTTPError as exc:
            ok = False
            detail = exc.read(512).decode("utf-8", "replace")
            self._note(url, False, f"HTTP {exc.code}: {detail}")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            ok = False
            self._note(url, False, str(getattr(exc, "reason", exc)))
        else:
            self._note(url, ok, "" if ok else "non-2xx reply")
        if ok:
            with self._lock:
                self.sent += 1
            self._peers_from(reply)
        return ok

    def _peers_from(self, reply: bytes) -> None:
        """The proxy's list of registered agents (``peers``: agent_id, peer address, public key and
        role): the agents of this deployment, the only ones this agent fetches from (besides
        ``transport.peers``), the keys that prove who they are in ``peer_hello``, and the links
        worth keeping warm (a proxy that names no role: every agent may serve)."""
        if self._on_peers is None:
            return
        try:
            doc = json.loads(reply)
            raw = doc.get("peers") if isinstance(doc, dict) else None
        except ValueError:
            raw = None
        if not isinstance(raw, list):
            return  # an older proxy: keep what we knew
        peers = [(str(p.get("agent_id", "")), str(p.get("peer_address", "")), str(p.get("identity_key", "")),
                  str(p.get("role", "")))
                 for p in raw if isinstance(p, dict) and isinstance(p.get("peer_address"), str)]
        self._on_peers(peers)

    def _note(self, url: str, ok: bool, why: str) -> None:
        self._metrics.announcements.labels(result="ok" if ok else "error").inc()
        with self._lock:
            failing = self._failing.get(url, False)
            self._failing[url] = not ok
        if ok and failing:
            log.info("proxy at %s accepts announcements again", url)
        elif not ok and not failing:
            log.warning("cannot announce to the proxy at %s: %s (retrying every %.1fs)", url, why,
                        self.config.heartbeat_s)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop heartbeats and say goodbye (one bounded POST)."""
        if self._stop.is_set():
            return
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        deadline = time.monotonic() + timeout
        if time.monotonic() < deadline:
            self.announce(leaving=True)


def build_announcement(ctx: AgentContext, seq: int, leaving: bool, *, engine_url: str, agent_url: str = "",
                       control_address: str = "",
                       keys: Callable[[], Sequence[bytes]] | None = None) -> AgentAnnouncement:
    """The announcement of the agent of ``ctx`` now (any thread). ``engine_url``, ``agent_url`` and
    ``control_address`` are what the agent's process knows of its engine and endpoints; ``keys`` lists
    the chunk keys to summarise."""
    from pdx.config import shared_tier_ids
    from pdx.scheduler.messages import AgentLoad, WorkerRole
    from pdx.scheduler.summary import KeySummary

    cfg = ctx.config
    used = capacity = 0
    if ctx.store is not None:
        st = ctx.store.stats()
        used, capacity = st.used_bytes, st.slab_count * st.slab_size
    layout = ctx.layout
    summary = None
    if keys is not None:
        summary = KeySummary.build(keys(), cfg.registration.summary_fp_rate)
    return AgentAnnouncement(
        agent_id=ctx.agent_id,
        role=WorkerRole(cfg.role),
        engine_url=engine_url,
        agent_url=agent_url,
        control_address=control_address,
        transport_address=ctx.peer_address,
        models=tuple(cfg.registration.models),
        load=AgentLoad(requests=0, tokens=0, pool_used_bytes=int(used), pool_capacity_bytes=int(capacity)),
        chunk_fingerprint=layout.chunk_fingerprint if layout is not None else "",
        chunk_tokens=cfg.store.chunk_tokens,
        namespace=cfg.store.namespace,
        keys=summary,
        shared_tiers=tuple(shared_tier_ids(cfg.store)),
        identity_key=ctx.identity.public if ctx.identity is not None else "",
        heartbeat_s=cfg.registration.heartbeat_s,
        seq=seq,
        timestamp=time.time(),
        leaving=leaving,
    )
