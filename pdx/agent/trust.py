"""Peer trust: the deployment secret, peer sessions, and what each session may do (its grants).

Who calls what:

* ``AgentServer`` calls ``load_secret`` and ``check_bind`` before it binds anything: an agent
  that would serve peers on a non-loopback address without a secret refuses to start.
* ``PeerService`` (``pdx.agent.peers``) opens a ``Session`` for every successful ``peer_hello``
  and consults it before each peer op: a peer reads only slabs pinned for it in that session,
  writes only slabs reserved for it, unpins/aborts/releases only its own ids, holds at most its
  quota of the pool, and commits only keys this agent asked for (``Expectations``).
* The tcp transport's serving threads call ``Sessions.data_guard`` before serving a range.
* ``KnownPeers`` says which peer sockets the local engine's fetches may dial.

Refusals raise ``PeerDenied`` (counted in ``pdx_agent_peer_denied_total{op}``, logged once per
session and op). Thread-safe: one lock per table, every method a few dict operations.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from pdx.config import AgentConfig, TransportConfig
from pdx.errors import AuthError, ConfigError, PeerDenied
from pdx.transport.handshake import session_handle

log = logging.getLogger("pdx.agent.trust")

#: a session unused this long is forgotten (its token stops working).
SESSION_IDLE_S = 600.0
#: a session token stops working this long after the hello that issued it, used or not.
SESSION_MAX_S = 3600.0
#: sessions kept at most (least recently used dropped first).
MAX_SESSIONS = 4096
#: keys one session remembers having been granted (for releasing a request's handed-off pins).
MAX_SESSION_KEYS = 65536
#: keys this agent expects pushes for, at most.
MAX_EXPECTED = 1 << 20


# --- the deployment secret --------------------------------------------------------------------


def load_secret(cfg: TransportConfig) -> str:
    """The deployment secret: ``transport.secret``, else the content of ``transport.secret_file``.

    Raises ``ConfigError`` when the file is missing, not a regular file, empty, or readable by
    group or others (a secret every local user can read authenticates nothing).
    """
    if cfg.secret:
        return cfg.secret
    if not cfg.secret_file:
        return ""
    path = Path(cfg.secret_file).expanduser()
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"transport.secret_file: cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"transport.secret_file: {path} is not a regular file")
    if st.st_mode & 0o077:
        raise ConfigError(f"transport.secret_file: {path} is readable by group or others "
                          f"(mode {stat.S_IMODE(st.st_mode):04o}); make it owner-only: chmod 600 {path}")
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"transport.secret_file: cannot read {path}: {exc}") from None
    if not secret:
        raise ConfigError(f"transport.secret_file: {path} is empty")
    return secret


def is_loopback(host: str) -> bool:
    """True for loopback addresses and ``localhost``; a host name or a wildcard is not loopback."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(cfg: AgentConfig, secret: str) -> None:
    """Refuse (``ConfigError``) to serve peers on a non-loopback address without a secret, and the
    local control socket (unauthenticated: it serves the engine beside the agent) off loopback."""
    control = cfg.control.address
    if control.startswith("tcp://") and not is_loopback(host_of(control)):
        raise ConfigError(f"control.address {control!r} is not on loopback: the control socket serves the engine "
                          "beside this agent and has no authentication; use ipc:// or tcp://127.0.0.1:PORT")
    if secret or is_loopback(cfg.transport.host):
        return
    raise ConfigError(
        f"transport.host is {cfg.transport.host!r}, which is not a loopback address, and no deployment "
        "secret is set: anyone who can reach this host could read and write this agent's pool. Set "
        "transport.secret_file (pdx up writes one, mode 0600) or bind transport.host to 127.0.0.1")


def host_of(address: str) -> str:
    """The host of ``tcp://host:port`` (empty if unparsable)."""
    try:
        return urlparse(address).hostname or ""
    except ValueError:
        return ""


# --- sessions and grants ----------------------------------------------------------------------


@dataclass
class Grant:
    """A byte range of this agent's pool that one session may read (a pin) or write (a reservation)."""

    offset: int
    nbytes: int
    expires_at: float
    key: bytes = b""
    owner: str = ""  # the peer's owner name (pins)


@dataclass
class Session:
    """One authenticated peer: who it said it is, and what it was granted. Guarded by ``Sessions``."""

    token: bytes
    agent_id: str
    address: str
    created: float
    used: float
    pins: dict[int, Grant] = field(default_factory=dict)  # lease id -> range
    reservations: dict[int, Grant] = field(default_factory=dict)  # reservation id -> range
    by_offset: dict[int, set[int]] = field(default_factory=dict)  # offset -> lease/reservation ids
    owners: set[str] = field(default_factory=set)  # owner names this peer pinned under
    keys: OrderedDict[bytes, None] = field(default_factory=OrderedDict)  # keys it was granted
    denied: set[str] = field(default_factory=set)  # ops already logged
    key: bytes = field(default=b"", repr=False)  # the session key (``pdx.transport.handshake.session_key``)
    handle: bytes = b""  # its public name on the transport's wire (``session_handle``)

    @property
    def sid(self) -> str:
        return self.token[:6].hex()

    def owner(self, name: str) -> str:
        """The store owner under which this session's pins of ``name`` live: sessions never share one."""
        return f"peer:{self.sid}:{name}"

    def held(self, now: float) -> int:
        """Slabs this session holds pinned or reserved now (expired grants are dropped)."""
        for table in (self.pins, self.reservations):
            for gid in [g for g, gr in table.items() if gr.expires_at <= now]:
                self._drop(table, gid)
        return len(self.pins) + len(self.reservations)

    def add(self, table: dict[int, Grant], gid: int, grant: Grant) -> None:
        table[gid] = grant
        self.by_offset.setdefault(grant.offset, set()).add(gid)
        if grant.key:
            self.keys[grant.key] = None
            self.keys.move_to_end(grant.key)
            while len(self.keys) > MAX_SESSION_KEYS:
                self.keys.popitem(last=False)

    def _drop(self, table: dict[int, Grant], gid: int) -> Grant | None:
        grant = table.pop(gid, None)
        if grant is not None:
            ids = self.by_offset.get(grant.offset)
            if ids is not None:
                ids.discard(gid)
                if not ids:
                    del self.by_offset[grant.offset]
        return grant

    def drop_pin(self, lid: int) -> None:
        self._drop(self.pins, lid)

    def drop_reservation(self, rid: int) -> None:
        self._drop(self.reservations, rid)

    def drop_owner_pins(self, lids: Iterable[int]) -> None:
        for lid in list(lids):
            self._drop(self.pins, lid)

    def may_access(self, write: bool, offset: int, nbytes: int, now: float) -> bool:
        """Whether ``[offset, offset + nbytes)`` lies inside one live grant of the right kind."""
        table = self.reservations if write else self.pins
        for gid in self.by_offset.get(offset, ()):
            g = table.get(gid)
            if g is not None and g.expires_at > now and nbytes <= g.nbytes:
                return True
        if write:  # a layer-wise push writes one layer of a slab: a range inside a reservation
            for g in table.values():
                if g.offset < offset and offset + nbytes <= g.offset + g.nbytes and g.expires_at > now:
                    return True
        return False


class Sessions:
    """The peer sessions of one agent: tokens, expiry, grants, refusals (see the module docstring)."""

    def __init__(self, on_denied: Callable[[str], None], clock: Callable[[], float] = time.monotonic,
                 idle_s: float = SESSION_IDLE_S, max_s: float = SESSION_MAX_S) -> None:
        self._on_denied = on_denied
        self._clock = clock
        self._idle_s = idle_s
        self._max_s = max_s
        self._by_token: OrderedDict[bytes, Session] = OrderedDict()
        self._by_handle: dict[bytes, bytes] = {}  # transport handle -> token
        self._anonymous_denied: set[str] = set()  # ops refused without a session, already logged
        self.lock = threading.RLock()

    def open(self, agent_id: str, address: str, key_of: Callable[[bytes], bytes] | None = None) -> Session:
        """A new session; ``key_of(token)`` derives its key for the transport (none: no transport
        connection can present it)."""
        now = self._clock()
        token = os.urandom(16)
        s = Session(token, agent_id, address, now, now)
        if key_of is not None:
            s.key, s.handle = key_of(token), session_handle(token)
        with self.lock:
            self._by_token[s.token] = s
            if s.handle:
                self._by_handle[s.handle] = token
            while len(self._by_token) > MAX_SESSIONS:
                _t, old = self._by_token.popitem(last=False)
                self._by_handle.pop(old.handle, None)
        return s

    def lookup(self, handle: bytes) -> tuple[bytes, bytes] | None:
        """For the transport's handshake: ``(key, token)`` of the live session named ``handle``."""
        with self.lock:
            token = self._by_handle.get(handle)
            if token is None:
                return None
            s = self.find(token)
            if s is None:
                self._by_handle.pop(handle, None)
                return None
            return s.key, s.token

    def get(self, token: bytes) -> Session:
        """The live session of ``token``; raises ``AuthError`` when there is none (or it expired)."""
        now = self._clock()
        with self.lock:
            s = self._by_token.get(token) if token else None
            if s is not None and (now - s.used > self._idle_s or now - s.created > self._max_s):
                del self._by_token[token]
                self._by_handle.pop(s.handle, None)
                s = None
            if s is None:
                raise AuthError("no valid peer session (none, unknown or expired): do peer_hello first")
            s.used = now
            self._by_token.move_to_end(token)
            return s

    def find(self, token: bytes) -> Session | None:
        try:
            return self.get(token)
        except AuthError:
            return None

    def __len__(self) -> int:
        return len(self._by_token)

    def deny(self, session: Session | None, op: str, why: str) -> PeerDenied:
        """Count and log (once per session and op) a refusal; returns the error to raise or send."""
        self._on_denied(op)
        who = f"{session.agent_id or '?'} (session {session.sid})" if session is not None else "unknown peer"
        with self.lock:
            seen = session.denied if session is not None else self._anonymous_denied
            first = op not in seen
            seen.add(op)
        if first:
            log.warning("refused %s from %s: %s", op, who, why)
        return PeerDenied(f"{op}: {why}")

    def data_guard(self, token: bytes, write: bool, ranges: Sequence[Sequence[int]]) -> str:
        """For the data plane: empty when the session of ``token`` may read (write) every range,
        else the reason to refuse. Counts refusals as op ``data_write``/``data_read``."""
        op = "data_write" if write else "data_read"
        s = self.find(token) if isinstance(token, bytes) else None
        if s is None:
            self.deny(None, op, "no valid peer session")
            return "no valid peer session"
        now = self._clock()
        with self.lock:
            for r in ranges:
                if not s.may_access(write, int(r[0]), int(r[1]), now):
                    kind = "reserved" if write else "pinned"
                    why = f"bytes [{r[0]}, {int(r[0]) + int(r[1])}) are not {kind} for this peer"
                    break
            else:
                return ""
        self.deny(s, op, why)
        return why


# --- keys this agent asked for; peers it may dial ------------------------------------------------


class Expectations:
    """Keys this agent asked a peer to push (``expect``): the only keys a peer may reserve here."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._keys: OrderedDict[bytes, tuple[float, str]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, keys: Sequence[bytes], request_id: str, deadline_s: float) -> None:
        until = self._clock() + deadline_s
        with self._lock:
            for k in keys:
                self._keys[k] = (until, request_id)
                self._keys.move_to_end(k)
            while len(self._keys) > MAX_EXPECTED:
                self._keys.popitem(last=False)

    def expected(self, key: bytes) -> bool:
        now = self._clock()
        with self._lock:
            v = self._keys.get(key)
            if v is not None and v[0] <= now:
                del self._keys[key]
                v = None
            return v is not None

    def fulfilled(self, keys: Iterable[bytes]) -> None:
        with self._lock:
            for k in keys:
                self._keys.pop(k, None)

    def forget(self, request_id: str) -> int:
        with self._lock:
            gone = [k for k, (_t, rid) in self._keys.items() if rid == request_id]
            for k in gone:
                del self._keys[k]
        return len(gone)


class KnownPeers:
    """The peer sockets this agent's fetches may dial: ``transport.peers`` plus the agents registered
    with the same proxy (updated from each registration reply). With neither configured (one box,
    no proxy) only loopback addresses are known."""

    def __init__(self, configured: Sequence[str], proxy: bool) -> None:
        self._configured = frozenset(configured)
        self._proxy = proxy
        self._registered: dict[str, str] = {}  # peer address -> agent id
        self._identities: dict[str, tuple[str, str]] = {}  # agent id -> (peer address, public key)
        self._lock = threading.Lock()

    @property
    def open_loopback(self) -> bool:
        return not self._configured and not self._proxy

    def update(self, peers: Iterable[tuple[str, ...]]) -> None:
        """Replace the proxy's list: ``(agent_id, peer_address[, identity_key])`` per agent."""
        fresh: dict[str, str] = {}
        keys: dict[str, tuple[str, str]] = {}
        for p in peers:
            aid, addr = p[0], p[1]
            if addr:
                fresh[addr] = aid
                if len(p) > 2 and p[2] and aid:
                    keys[aid] = (addr, p[2])
        with self._lock:
            self._registered = fresh
            self._identities = keys

    def registered_ids(self) -> list[str]:
        """Agents whose identity key the deployment published to this agent (for ``stats``)."""
        with self._lock:
            return sorted(self._identities)

    def identity_of(self, agent_id: str) -> tuple[str, str] | None:
        """``(peer address, public key)`` the deployment registered for ``agent_id``, if any."""
        with self._lock:
            return self._identities.get(agent_id)

    def key_at(self, address: str) -> tuple[str, str] | None:
        """``(agent id, public key)`` of the agent registered at ``address``, if any."""
        with self._lock:
            aid = self._registered.get(address)
            ident = self._identities.get(aid) if aid is not None else None
        return (aid, ident[1]) if aid is not None and ident is not None and ident[0] == address else None

    def knows(self, address: str) -> bool:
        if address in self._configured:
            return True
        with self._lock:
            if address in self._registered:
                return True
        return self.open_loopback and is_loopback(host_of(address))

    def name_matches(self, address: str, agent_id: str) -> bool:
        """False when the proxy registered ``address`` under another agent id."""
        with self._lock:
            known = self._registered.get(address)
        return known is None or known == agent_id
