"""The network-namespace host harness (``bench/netns.py``): hosts reach each other over their
own interfaces, not the machine's, shaping applies, and nothing is left after close."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from bench.netns import NetnsHosts, netns_unavailable

WHY = netns_unavailable()
pytestmark = pytest.mark.skipif(bool(WHY), reason=f"network namespaces: {WHY}")


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=20).stdout


def test_two_hosts_talk_over_the_bridge_and_are_removed() -> None:
    hosts = NetnsHosts(2, "fleet", rate="1gbit")
    with hosts:
        a, b = hosts[0], hosts[1]
        assert a.netns in _namespaces() and b.netns in _namespaces()

        def serve() -> socket.socket:
            s = socket.socket()
            s.bind((b.address, 0))
            s.listen(1)
            return s

        server = hosts.call(1, serve)
        port = server.getsockname()[1]
        # a plain process in host 0 connects to host 1's address
        code = (f"import socket; s = socket.create_connection(('{b.address}', {port}), timeout=10); "
                "s.sendall(b'ping'); print(s.getsockname()[0])")
        client = hosts.popen(0, [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        conn, peer = server.accept()
        conn.settimeout(10)
        assert conn.recv(4) == b"ping"
        out, _ = client.communicate(timeout=20)
        assert out.strip() == a.address and peer[0] == a.address
        conn.close()
        server.close()
        # the addresses exist only inside the hosts, never in the machine's own namespace
        own = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, timeout=20).stdout
        assert a.address not in own and b.address not in own
        shaped = subprocess.run(["ip", "netns", "exec", a.netns, "tc", "qdisc", "show", "dev", "eth0"],
                                capture_output=True, text=True, timeout=20).stdout
        assert "tbf" in shaped
    listed = _namespaces()
    assert hosts.switch not in listed and a.netns not in listed and b.netns not in listed
