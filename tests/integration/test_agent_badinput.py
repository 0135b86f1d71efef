"""Bad input against a live ``pdx-agent``: each case gets an error reply or a dropped
connection, and the agent keeps serving everyone else (checked with a ping after each)."""

from __future__ import annotations

import os
import re
import time
import urllib.request
from collections.abc import Iterator

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdx.agent.client import AgentClient
from pdx.agent.protocol import WIRE_VERSION, Op, decode_reply, encode_request
from pdx.deploy.process import AgentProcess
from pdx.errors import ErrorCode, WireError
from pdx.layout import KVDtype, KVLayout

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MAX_FRAME = 64 * 1024
LAYOUT = KVLayout("bad-input", KVDtype.FP32, num_layers=1, num_kv_heads=1, head_size=32, block_size=16)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    cfg = {"store": {"l1": {"capacity": "4MiB", "reservation_timeout_s": 0.3}},
           "control": {"max_frame": MAX_FRAME}, "leases": {"sweep_s": 0.05}}
    proc = AgentProcess(tmp_path_factory.mktemp("bad"), cfg, name="bad")
    proc.start()
    with proc.client() as c:
        c.register_engine(LAYOUT)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    c: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield c
    c.term()


def raw(ctx: zmq.Context[zmq.Socket[bytes]], address: str, kind: int = zmq.DEALER) -> zmq.Socket[bytes]:
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(address)
    return s


def exchange(sock: zmq.Socket[bytes], frames: list[bytes], wait_ms: int = 2000) -> bytes | None:
    sock.send_multipart(frames)
    return sock.recv() if sock.poll(wait_ms) else None


def serving(agent: AgentProcess) -> bool:
    with AgentClient(agent.control_address, 5.0) as c:
        return c.ping()["agent_id"] == "bad"


def error_of(frame: bytes | None) -> str:
    assert frame is not None, "expected an error reply"
    reply = decode_reply(frame)
    assert not reply.ok and reply.error is not None
    return f"{type(reply.error).__name__}: {reply.error}"


def test_garbage_gets_no_reply_and_changes_nothing(agent: AgentProcess, ctx: zmq.Context) -> None:
    s = raw(ctx, agent.control_address)
    for junk in [b"", b"\xc1", b"\x00" * 100, os.urandom(1000), msgpack.packb([1, 2, 3]),
                 msgpack.packb({"v": WIRE_VERSION})]:
        assert exchange(s, [junk], 200) is None
    s.close(0)
    assert serving(agent)


def test_bad_envelopes_get_error_replies(agent: AgentProcess, ctx: zmq.Context) -> None:
    s = raw(ctx, agent.control_address)
    cases = {
        "wire version": {"v": 99, "id": 1, "op": "ping", "a": {}},
        "unknown message type": {"v": WIRE_VERSION, "id": 2, "op": "format_disk", "a": {}},
        "unknown field `x`": {"v": WIRE_VERSION, "id": 3, "op": "lookup", "a": {"keys": [], "x": 1}},
        "missing required field `keys`": {"v": WIRE_VERSION, "id": 4, "op": "lookup", "a": {}},
        "length >= 16": {"v": WIRE_VERSION, "id": 5, "op": "lookup", "a": {"keys": [b"short"]}},
        # a peer op on the local socket is unknown there
        "unknown message type 'peer_pin'": {"v": WIRE_VERSION, "id": 6, "op": "peer_pin",
                                            "a": {"keys": [], "owner": "x"}},
    }
    for want, msg in cases.items():
        err = error_of(exchange(s, [msgpack.packb(msg, use_bin_type=True)]))
        assert err.startswith("WireError") and want in err, err
    s.close(0)
    assert serving(agent)


def test_wrong_framing_and_oversized_frames_are_dropped(agent: AgentProcess, ctx: zmq.Context) -> None:
    s = raw(ctx, agent.control_address)
    ping = encode_request(7, Op.PING)
    assert exchange(s, [b"a", b"b", ping], 300) is None  # three frames from a DEALER
    big = raw(ctx, agent.control_address)
    assert exchange(big, [b"\x00" * (MAX_FRAME * 2)], 500) is None  # ZMQ drops this connection
    big.close(0)
    req = raw(ctx, agent.control_address, zmq.REQ)  # REQ framing is served too
    assert decode_reply(exchange(req, [ping]) or b"").ok
    req.close(0)
    assert decode_reply(exchange(s, [ping]) or b"").ok  # same socket, still served
    s.close(0)


def test_client_gone_mid_request(agent: AgentProcess, ctx: zmq.Context) -> None:
    with AgentClient(agent.control_address, 5.0) as c:
        job = c.fetch("tcp://127.0.0.1:9", [os.urandom(16)], "req-gone", deadline_s=1.0)
    s = raw(ctx, agent.control_address)
    s.send(encode_request(8, Op.WAIT, {"job_id": job, "timeout_s": 10.0}))
    s.close(0)  # gone before the deferred reply
    time.sleep(1.5)  # the job ends, the agent replies to nobody
    assert serving(agent)


def test_commit_of_an_expired_reservation(agent: AgentProcess) -> None:
    with AgentClient(agent.control_address, 5.0) as c:
        (res,) = c.reserve([os.urandom(16)], 1024)
        time.sleep(0.6)
        (err,) = c.commit([res.id], 256)
        assert err.code is ErrorCode.RESERVATION, err
        assert c.abort([res.id]) == 0
        with pytest.raises(WireError, match="one entry per id"):
            c.commit([1, 2], 256, [1])


frames = st.one_of(
    st.binary(max_size=512),
    st.builds(lambda obj: msgpack.packb(obj, use_bin_type=True),
              st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20)
                           | st.binary(max_size=20),
                           lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12)),
    st.builds(lambda op, args, rid: msgpack.packb({"v": WIRE_VERSION, "id": rid, "op": op, "a": args},
                                                  use_bin_type=True),
              st.sampled_from([o.value for o in Op] + ["nope"]),
              st.dictionaries(st.sampled_from(["keys", "owner", "ids", "job_id", "nbytes", "layout", "peer",
                                               "timeout_s", "lease_s", "num_tokens", "checksums"]),
                              st.none() | st.integers(-5, 2**64 - 1) | st.text(max_size=8)
                              | st.lists(st.binary(min_size=15, max_size=17), max_size=3), max_size=4),
              st.integers(0, 2**64 - 1)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frame=frames)
def test_fuzzed_frames_never_stop_the_daemon(agent: AgentProcess, ctx: zmq.Context, frame: bytes) -> None:
    for address in (agent.control_address, agent.peer_address):
        s = raw(ctx, address)
        s.send(frame)
        if s.poll(100):
            reply = s.recv()
            try:
                decode_reply(reply)
            except WireError:
                pytest.fail(f"the agent sent an undecodable reply to {frame!r}")
        s.close(0)
    assert serving(agent)


def test_bad_frames_are_counted(agent: AgentProcess) -> None:
    with urllib.request.urlopen(agent.http_url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(r'^pdx_agent_bad_frames_total\{reason="decode"\} (\S+)$', text, re.M)
    assert m is not None and float(m.group(1)) > 0
