"""Hosts without more machines: Linux network namespaces joined by a bridge, for tests and benches.

``NetnsHosts(n, name)`` builds ``n`` "hosts", each a network namespace with its own loopback
and one interface ``eth0`` holding ``10.<net>.0.<i+1>/24``. Their veth peers are attached to
a bridge that lives in a namespace of its own (the "switch"), so nothing is added to the
machine's own namespace: no address, no route, no interface stays there. Optional
``rate`` (e.g. ``"1gbit"``) shapes every host's egress with ``tc qdisc ... tbf``
(``netem`` is not available on every kernel, ``tbf`` is).

Work inside a host:

* ``hosts.call(i, fn, *args)`` runs ``fn`` on a fresh thread that has joined host ``i``'s
  namespace (``setns`` is per thread): sockets it opens live there, and processes it
  starts (``subprocess.Popen``) inherit that namespace, with every helper that starts
  processes (``AgentEngine``, ``VllmServer``) unchanged.
* ``hosts.popen(i, argv)`` is ``ip netns exec <host> argv``.

``close()`` (also ``__exit__``) deletes the namespaces, which removes their interfaces;
processes started inside must be stopped first, by their owner. Names carry a unique
prefix (``pdx-<name>-<pid>``) so parallel runs never collide, and ``cleanup_stale`` removes
those of a dead process with the same name. Needs root (``CAP_SYS_ADMIN``) and ``ip``
(iproute2); ``netns_unavailable()`` says why not, for a skip. Every command has a timeout.
Blocking calls; one owner per object.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
CMD_TIMEOUT_S = 20.0


class NetnsError(RuntimeError):
    """A namespace command failed (its stderr is in the message)."""


def _ip(*args: str, ns: str = "", check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
    if check and done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done


def netns_unavailable() -> str:
    """'' when network namespaces can be made here, else why not (for ``pytest.skip``)."""
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"pdx-probe-{os.getpid()}"
    try:
        done = _ip("netns", "add", probe, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"ip netns add failed: {exc}"
    if done.returncode != 0:
        return f"ip netns add is not permitted here: {done.stderr.strip()}"
    _ip("netns", "delete", probe, check=False)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.setns  # noqa: B018 - present in every glibc since 2.14
    except (OSError, AttributeError):
        return "setns(2) is not available"
    return ""


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Host:
    index: int
    netns: str  # the namespace's name (ip netns exec <netns> ...)
    address: str  # eth0's IPv4 address

    def url(self, port: int) -> str:
        return f"http://{self.address}:{port}"


def cleanup_stale(name: str) -> list[str]:
    """Delete namespaces ``pdx-<name>-<pid>-*`` whose process is gone. Returns their names."""
    done = _ip("netns", "list", check=False)
    removed = []
    for line in done.stdout.splitlines()[:10000]:
        ns = line.split()[0] if line.strip() else ""
        head = f"pdx-{name}-"
        if not ns.startswith(head):
            continue
        pid = ns[len(head):].split("-", 1)[0]
        if not pid.isdigit() or os.path.exists(f"/proc/{pid}"):
            continue
        _ip("netns", "delete", ns, check=False)
        removed.append(ns)
    return removed


class NetnsHosts:
    """See the module docstring. ``net`` picks the second octet of the hosts' subnet."""

    def __init__(self, n: int, name: str = "pdx", *, rate: str = "", net: int = 213) -> None:
        if not 1 <= n <= 200:
            raise ValueError("between 1 and 200 hosts")
        self.prefix = f"pdx-{name}-{os.getpid()}"
        self.switch = f"{self.prefix}-sw"
        self.rate = rate
        self.hosts = [Host(i, f"{self.prefix}-h{i}", f"10.{net}.0.{i + 1}") for i in range(n)]
        self._made: list[str] = []
        # veth names in the machine's namespace exist for an instant; 15 characters at most
        self._tag = f"{os.getpid() % 10**7:07d}"

    def __enter__(self) -> NetnsHosts:
        self.create()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def __len__(self) -> int:
        return len(self.hosts)

    def create(self) -> NetnsHosts:
        """Make the switch and the hosts; on failure, remove what was made and raise ``NetnsError``."""
        try:
            self._add_ns(self.switch)
            _ip("link", "add", "br0", "type", "bridge", ns=self.switch)
            _ip("link", "set", "br0", "up", ns=self.switch)
            for h in self.hosts:
                self._add_ns(h.netns)
                a, b = f"v{self._tag}h{h.index}", f"v{self._tag}s{h.index}"
                _ip("link", "add", a, "type", "veth", "peer", "name", b)
                _ip("link", "set", a, "netns", h.netns)
                _ip("link", "set", b, "netns", self.switch)
                _ip("link", "set", a, "name", "eth0", ns=h.netns)
                _ip("addr", "add", f"{h.address}/24", "dev", "eth0", ns=h.netns)
                _ip("link", "set", "eth0", "up", ns=h.netns)
                _ip("link", "set", b, "master", "br0", ns=self.switch)
                _ip("link", "set", b, "up", ns=self.switch)
                if self.rate:
                    self.shape(h.index, self.rate)
        except BaseException:
            self.close()
            raise
        return self

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._made.append(ns)
        _ip("link", "set", "lo", "up", ns=ns)

    def shape(self, i: int, rate: str, burst: str = "1mb", latency: str = "10ms") -> None:
        """Limit host ``i``'s egress to ``rate`` (``tc qdisc replace ... tbf``)."""
        argv = ["ip", "netns", "exec", self.hosts[i].netns, "tc", "qdisc", "replace", "dev", "eth0", "root",
                "tbf", "rate", rate, "burst", burst, "latency", latency]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
        if done.returncode != 0:
            raise NetnsError(f"{' '.join(argv)}: {done.stderr.strip()}")

    def popen(self, i: int, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside host ``i`` (``ip netns exec``); the caller owns the process."""
        return subprocess.Popen(["ip", "netns", "exec", self.hosts[i].netns, *argv], **kwargs)

    def call(self, i: int, fn: Callable[..., T], *args: Any, timeout_s: float = 600.0, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` on a thread inside host ``i``'s namespace; return its result
        (its exception is raised here). ``TimeoutError`` after ``timeout_s`` (the thread is left)."""
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                _setns(f"/run/netns/{self.hosts[i].netns}")
                box["value"] = fn(*args, **kwargs)
            except BaseException as exc:  # handed to the caller
                box["error"] = exc

        t = threading.Thread(target=run, name=f"netns-{self.hosts[i].netns}", daemon=True)
        t.start()
        t.join(timeout_s)
        if t.is_alive():
            raise TimeoutError(f"{getattr(fn, '__name__', fn)} in {self.hosts[i].netns} ran past {timeout_s:g}s")
        if "error" in box:
            raise box["error"]
        value: T = box["value"]
        return value

    def close(self) -> None:
        """Delete every namespace made (their interfaces go with them). Idempotent."""
        while self._made:
            _ip("netns", "delete", self._made.pop(), check=False)
