"""Unit tests of the agent's trust pieces: the deployment secret, the bind check, peer sessions
and their grants, expected pushes, known peers, shm segment names, bounded deadlines."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from pdx.agent.protocol import Op, decode_request, encode_request
from pdx.agent.trust import (
    Expectations,
    Grant,
    KnownPeers,
    Sessions,
    check_bind,
    is_loopback,
    load_secret,
)
from pdx.config import AgentConfig, TransportConfig
from pdx.errors import AuthError, ConfigError, PeerDenied, PeerIncompatible, WireError
from pdx.transport.handshake import bind_proof, session_handle, session_key
from pdx.transport.shm import SHM_DIR, segment_path


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_secret_file_must_be_owner_only(tmp_path: Path) -> None:
    f = tmp_path / "secret"
    f.write_text("s3cret\n")
    f.chmod(0o644)
    with pytest.raises(ConfigError, match=r"readable by group or others.*chmod 600"):
        load_secret(TransportConfig(secret_file=str(f)))
    f.chmod(0o600)
    assert load_secret(TransportConfig(secret_file=str(f))) == "s3cret"
    assert load_secret(TransportConfig(secret="inline", secret_file=str(f))) == "inline"
    assert load_secret(TransportConfig()) == ""
    with pytest.raises(ConfigError, match="cannot read"):
        load_secret(TransportConfig(secret_file=str(tmp_path / "absent")))
    (tmp_path / "empty").write_text("  \n")
    (tmp_path / "empty").chmod(0o600)
    with pytest.raises(ConfigError, match="empty"):
        load_secret(TransportConfig(secret_file=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="not a regular file"):
        load_secret(TransportConfig(secret_file=str(tmp_path)))


def test_no_secret_off_loopback_refuses_to_start() -> None:
    cfg = AgentConfig()
    check_bind(cfg, "")  # loopback: fine without a secret
    public = dataclasses.replace(cfg, transport=TransportConfig(host="0.0.0.0"))
    with pytest.raises(ConfigError, match="not a loopback address, and no deployment secret"):
        check_bind(public, "")
    check_bind(public, "s3cret")
    remote_ctl = dataclasses.replace(cfg, control=dataclasses.replace(cfg.control, address="tcp://0.0.0.0:5555"))
    with pytest.raises(ConfigError, match=r"control socket .* no authentication"):
        check_bind(remote_ctl, "s3cret")
    check_bind(dataclasses.replace(cfg, control=dataclasses.replace(cfg.control, address="tcp://127.0.0.1:5")), "")
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("myhost")


def test_sessions_expire_and_are_distinct() -> None:
    clock = Clock()
    denied: list[str] = []
    ss = Sessions(denied.append, clock=clock, idle_s=10, max_s=25)
    a, b = ss.open("a", ""), ss.open("b", "")
    assert a.token != b.token and ss.get(a.token) is a
    with pytest.raises(AuthError):
        ss.get(os.urandom(16))
    with pytest.raises(AuthError):
        ss.get(b"")
    clock.t += 11  # b idle too long; a was used 11 s ago as well
    with pytest.raises(AuthError, match="expired"):
        ss.get(b.token)
    a2 = ss.open("a", "")
    for _ in range(2):
        clock.t += 9
        assert ss.get(a2.token) is a2  # used: the idle limit slides
    clock.t += 9
    with pytest.raises(AuthError):
        ss.get(a2.token)  # 27 s after its hello: past the absolute limit
    assert a.owner("x") != b.owner("x")


def test_transport_lookup_needs_a_live_session() -> None:
    """The transport finds a session by its handle (never by its token) only while it is live."""
    clock = Clock()
    ss = Sessions(lambda _op: None, clock=clock, idle_s=10, max_s=25)
    s = ss.open("a", "", lambda token: b"K" + token)
    bare = ss.open("b", "")
    assert s.handle == session_handle(s.token) and s.handle != s.token[:16]
    assert ss.lookup(s.handle) == (b"K" + s.token, s.token)
    assert ss.lookup(s.token) is None and ss.lookup(os.urandom(16)) is None
    assert not bare.handle and ss.lookup(b"") is None  # a session without a key has no handle
    clock.t += 11  # idle too long: expired, and its handle is forgotten
    assert ss.lookup(s.handle) is None
    s2 = ss.open("a", "", lambda token: b"K" + token)
    for _ in range(2):
        clock.t += 9
        assert ss.lookup(s2.handle) is not None  # looking it up uses it
    clock.t += 9
    assert ss.lookup(s2.handle) is None  # 27 s after its hello: past the absolute limit


def test_session_keys_and_proofs_are_bound() -> None:
    """Both agents derive the same key from one hello; any other hello, token or secret gives another,
    and a bind proof made for one connection's nonces fails on another's."""
    n_c, n_s, tok = os.urandom(16), os.urandom(16), os.urandom(16)
    k = session_key("s3cret", n_c, n_s, tok)
    assert k == session_key("s3cret", n_c, n_s, tok)
    assert len({k, session_key("other", n_c, n_s, tok), session_key("s3cret", n_s, n_c, tok),
                session_key("s3cret", n_c, n_s, os.urandom(16))}) == 4
    h = session_handle(tok)
    a1, b1, a2 = os.urandom(16), os.urandom(16), os.urandom(16)
    assert bind_proof(k, a1, b1, h) != bind_proof(k, a2, b1, h)
    assert bind_proof(k, a1, b1, h) != bind_proof(k, b1, a1, h)


def test_grants_bound_reads_and_writes() -> None:
    clock = Clock()
    denied: list[str] = []
    ss = Sessions(denied.append, clock=clock)
    s, other = ss.open("p", ""), ss.open("q", "")
    s.add(s.pins, 7, Grant(4096, 1000, clock.t + 5, b"k" * 16, "o"))
    s.add(s.reservations, 9, Grant(8192, 1000, clock.t + 5, b"j" * 16))
    assert ss.data_guard(s.token, False, [[4096, 1000]]) == ""
    assert ss.data_guard(s.token, False, [[4096, 999]]) == ""
    assert "not pinned" in ss.data_guard(s.token, False, [[4096, 1001]])
    assert "not pinned" in ss.data_guard(s.token, False, [[8192, 10]])  # a reservation is not readable
    assert ss.data_guard(s.token, True, [[8192, 1000]]) == ""
    assert "not reserved" in ss.data_guard(s.token, True, [[4096, 10]])  # a pin is not writable
    assert ss.data_guard(other.token, False, [[4096, 10]])  # another session: nothing
    assert ss.data_guard(b"forged", False, [[4096, 10]])
    clock.t += 6
    assert ss.data_guard(s.token, False, [[4096, 10]])  # the lease expired
    assert s.held(clock.t) == 0
    assert denied.count("data_read") == 5 and denied.count("data_write") == 1
    s.add(s.pins, 11, Grant(0, 10, clock.t + 5))
    s.drop_pin(11)
    assert ss.data_guard(s.token, False, [[0, 10]])


def test_deny_counts_every_refusal_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    denied: list[str] = []
    ss = Sessions(denied.append)
    s = ss.open("rogue", "")
    for _ in range(3):
        assert isinstance(ss.deny(s, "peer_unpin", "not yours"), PeerDenied)
    assert denied == ["peer_unpin"] * 3
    assert sum("refused peer_unpin" in r.getMessage() for r in caplog.records) == 1
    for _ in range(3):  # without a session: counted each time, logged once
        ss.deny(None, "peer_pin", "no valid session")
    assert denied.count("peer_pin") == 3
    assert sum("refused peer_pin" in r.getMessage() for r in caplog.records) == 1


def test_expectations() -> None:
    clock = Clock()
    ex = Expectations(clock)
    k1, k2 = b"a" * 16, b"b" * 16
    assert not ex.expected(k1)
    ex.add([k1, k2], "req", 5)
    assert ex.expected(k1) and ex.expected(k2)
    ex.fulfilled([k1])
    assert not ex.expected(k1) and ex.expected(k2)
    clock.t += 6
    assert not ex.expected(k2)
    ex.add([k1], "req2", 5)
    assert ex.forget("req2") == 1 and not ex.expected(k1)


def test_known_peers() -> None:
    open_ = KnownPeers([], proxy=False)
    assert open_.knows("tcp://127.0.0.1:5000") and not open_.knows("tcp://10.1.2.3:5000")
    listed = KnownPeers(["tcp://10.1.2.3:5000"], proxy=False)
    assert listed.knows("tcp://10.1.2.3:5000") and not listed.knows("tcp://127.0.0.1:5000")
    proxied = KnownPeers([], proxy=True)
    assert not proxied.knows("tcp://127.0.0.1:5000")
    proxied.update([("d-1", "tcp://127.0.0.1:5000")])
    assert proxied.knows("tcp://127.0.0.1:5000")
    assert proxied.name_matches("tcp://127.0.0.1:5000", "d-1")
    assert not proxied.name_matches("tcp://127.0.0.1:5000", "impostor")
    assert proxied.name_matches("tcp://127.0.0.1:6000", "anyone")  # not registered: nothing to contradict


@pytest.mark.parametrize("name", ["../etc/passwd", "/../x", "a/b", "..", ".", "", "x\0y", "/" + "x" * 300])
def test_shm_segment_names_stay_in_the_shm_folder(name: str) -> None:
    with pytest.raises(PeerIncompatible, match="not a plain segment name"):
        segment_path(name)


def test_shm_segment_plain_names() -> None:
    assert segment_path("/pdx-pool-1") == SHM_DIR / "pdx-pool-1"
    assert segment_path("pdx-pool-1") == SHM_DIR / "pdx-pool-1"


@pytest.mark.parametrize("value", [1e308, float("inf"), 86400.5, -1, float("nan"), "5"])
def test_deadlines_are_bounded_in_the_schema(value: float) -> None:
    frame = encode_request(1, Op.FETCH, {"peer": "tcp://127.0.0.1:1", "keys": [b"k" * 16], "request_id": "r",
                                         "deadline_s": value})
    with pytest.raises(WireError, match=r"at `\$\.deadline_s`"):
        decode_request(frame)


def test_agent_config_validates_peer_settings() -> None:
    with pytest.raises(ConfigError, match="peer_max_share"):
        dataclasses.replace(AgentConfig(), control=dataclasses.replace(AgentConfig().control,
                                                                       peer_max_share=0)).validate()
    with pytest.raises(ConfigError, match=r"transport\.peers"):
        dataclasses.replace(AgentConfig(), transport=TransportConfig(peers=["10.0.0.1:5"])).validate()
