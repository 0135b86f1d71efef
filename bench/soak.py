"""``pdx-bench soak --minutes N``: a mixed load through a real deployment while faults hit it.

What runs (everything on this machine, everything stopped by PID at the end, also on Ctrl-C):

* a ``redis-server`` of its own on a free loopback port (and, with ``--mooncake``, a
  ``mooncake_master``), listed as the agents' shared tiers below a deliberately small L1, so
  chunks leave L1 and come back from the shared tier during the run;
* ``pdx up --config <soak config>``, exactly as a user starts a deployment: the config is
  ``--config`` (default ``configs/local-1p1d.yaml``) with the soak's tiers, a free proxy port,
  its own workdir and keys; ``pdx down`` stops it at the end;
* ``--users`` closed-loop clients (the bound on concurrency), each sending streamed, greedy
  ``/v1/completions`` with token-id prompts: multi-turn chats whose history grows by every
  question and the real answer, RAG prompts that share a few documents, and unique prompts
  (token ids from ``pdx.trace.TokenMap``: deterministic, no tokenizer needed);
* faults on a schedule, spaced over the run, each after the deployment has recovered from the
  one before (all workers healthy again in the proxy, bounded): ``engine_kill`` (SIGKILL the
  decode worker's vLLM; its agent restarts it), ``agent_kill`` (SIGKILL the prefill worker's
  pdx-agent; its engine dies with it and ``pdx up`` restarts the agent), ``redis_restart``
  (redis-server stopped, down ``--outage-s``, started again, empty), ``mooncake_restart`` (the
  same for the master, with ``--mooncake``), ``corrupt_chunk`` (one byte of the payload of every
  chunk stored in Redis flipped: the checksum must catch each one that is read), ``link_cut``
  (every TCP connection of the agents' listening ports torn down with ``ss -K``, again and again
  for ``--outage-s``: the P/D transfer link is cut, not merely slowed).

Then, after ``pdx down``: a plain vLLM server on the same model answers a sample of the requests
(``--check``: those that finished right after a fault first, then spread over the run) one at a
time, greedy; every token that differs is a wrong token. ``/dev/shm`` is checked for what the
deployment's processes mapped (pdx pools, vLLM's ``psm_*``, ``sem.mp-*`` semaphores) and left.

Rows (value, baseline, ratio):

* ``soak_ok_ratio`` against ``ok_ratio_not_in_flight`` (requests not in flight at a fault);
  ``soak_failed`` and ``soak_failed_not_in_flight`` (must be 0);
* ``soak_wrong_tokens`` (must be 0) over ``soak_checked_tokens``;
* ``soak_ttft_p50_ms`` / ``_p99_ms`` against plain vLLM, one request at a time, on the sample;
* ``soak_hit_ratio_turn_K``: per chat turn K, the prompt share the proxy routed to a worker
  that held it (its ``cached=`` per request in the proxy log), against ``oracle_hit_ratio_turn_K``
  (the share of whole chunks of the prompt that an earlier prompt of the run had);
  ``soak_hit_ratio_rag`` likewise;
* ``soak_rss_growth_<part>_mib``: resident memory of the proxy, each agent and each engine (its
  process tree), last sample minus the first once the process ran the warm-up (restarted
  processes start over);
* ``soak_shm_leaked_bytes`` / ``_segments`` after ``pdx down`` (must be 0);
* ``soak_faults`` injected and, per fault, in-flight requests, recovery time and what it did
  (``soak_integrity_failures`` counts the corrupt chunks the agents caught).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.report import Report, Result, percentile
from pdx.sse import adata_lines, data_lines

ALL_FAULTS = ("engine_kill", "agent_kill", "redis_restart", "corrupt_chunk", "link_cut")
OPTIONAL_FAULTS = ("mooncake_restart",)
SHM_DIR = Path("/dev/shm")
#: /dev/shm names the deployment's processes make: pdx pools, vLLM's queues, multiprocessing locks
SHM_PREFIXES = ("pdx-", "psm_", "sem.mp-")
REDIS_PREFIX = "pdx-soak:"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = __doc__
    p.add_argument("--minutes", type=float, default=10.0, help="length of the loaded run (default 10)")
    p.add_argument("--config", default="", help="deployment config to start with 'pdx up' (default "
                   "configs/local-1p1d.yaml); the soak adds its tiers, port, workdir and keys")
    p.add_argument("--users", type=int, default=4, help="concurrent clients: the bound on requests in flight")
    p.add_argument("--faults", default=",".join(ALL_FAULTS),
                   help=f"comma-separated faults, in order (default all: {','.join(ALL_FAULTS)}; "
                   "mooncake_restart with --mooncake)")
    p.add_argument("--mooncake", action="store_true", help="also run a mooncake_master as a tier, and "
                   "restart it as a fault")
    p.add_argument("--outage-s", type=float, default=8.0, help="how long Redis/Mooncake stay down and the "
                   "link stays cut (default 8)")
    p.add_argument("--recover-timeout-s", type=float, default=240.0,
                   help="longest wait for the deployment to be whole again after a fault")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request (ignore_eos)")
    p.add_argument("--check", type=int, default=60, help="requests checked against plain vLLM (default 60)")
    p.add_argument("--l1", default="16MiB", help="each agent's L1 pool: small, so chunks cycle through the tiers")
    p.add_argument("--timeout-s", type=float, default=120.0, help="limit on one request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="", help="folder for logs and configs (default: a new temp folder, "
                   "kept and printed)")


# --- the schedule ------------------------------------------------------------------------------------


def plan_faults(duration_s: float, faults: Sequence[str], warmup_s: float | None = None,
                tail_s: float | None = None) -> list[tuple[float, str]]:
    """(time from the start of the load, fault) for each fault, evenly spaced between a warm-up and
    a quiet tail (each a tenth of the run, at most 60 s), so the deployment recovers in between.
    A fault is never injected before the deployment recovered from the previous one (the runner
    waits); these are the earliest times."""
    if duration_s <= 0:
        raise ValueError("duration must be positive")
    warm = min(60.0, duration_s / 10) if warmup_s is None else warmup_s
    tail = min(60.0, duration_s / 10) if tail_s is None else tail_s
    span = max(0.0, duration_s - warm - tail)
    n = len(faults)
    if n == 0:
        return []
    step = span / n
    return [(round(warm + step * i, 3), f) for i, f in enumerate(faults)]


# --- the workload ------------------------------------------------------------------------------------


@dataclass
class Sent:
    """One request of the run and what came back."""

    index: int
    kind: str  # chat, rag, unique
    turn: int  # chat turn (1-based); 0 for the others
    prompt: list[int]
    oracle_hit: float  # share of the prompt in whole chunks an earlier prompt had
    start: float = 0.0  # monotonic
    end: float = 0.0
    ttft_s: float | None = None
    tokens: list[int] = field(default_factory=list)
    error: str = ""
    cached_chunks: int | None = None  # the proxy's routing: chunks held by the chosen worker
    total_chunks: int | None = None

    @property
    def ok(self) -> bool:
        return not self.error and self.ttft_s is not None

    @property
    def rid(self) -> str:
        return f"soak-{self.index}"


class Workload:
    """Prompts for ``users`` closed-loop clients: each continues its chat (history = every earlier
    question and answer) until the chat ends, and in between sends RAG and unique prompts.
    Deterministic for a seed, given the answers."""

    def __init__(self, vocab: int, chunk_tokens: int, seed: int = 0, max_prompt: int = 3500,
                 documents: int = 6, document_tokens: int = 1400, system_prompts: int = 3,
                 system_tokens: int = 300, mean_turns: float = 4.0, max_turns: int = 8) -> None:
        from pdx.trace import TokenMap

        self.tmap = TokenMap(chunk_tokens, vocab, seed=seed)
        self.chunk = chunk_tokens
        self.rng = random.Random(seed)
        self.max_prompt = max_prompt
        self.mean_turns = mean_turns
        self.max_turns = max_turns
        self.docs = [self._tokens(10_000 + d, document_tokens + 97 * d) for d in range(documents)]
        self.systems = [self._tokens(20_000 + s, system_tokens + 41 * s) for s in range(system_prompts)]
        self._uid = 1_000_000
        self._seen: set[bytes] = set()
        self._count = 0
        self.chats: dict[int, tuple[list[int], int]] = {}  # user -> (history, turns sent)

    def _tokens(self, salt: int, n: int) -> list[int]:
        return self.tmap.prompt([], n, salt=salt)

    def _fresh(self, lo: int, hi: int) -> list[int]:
        self._uid += 1
        return self._tokens(self._uid, self.rng.randint(lo, hi))

    def _oracle(self, prompt: list[int]) -> float:
        """Whole chunks of ``prompt`` whose whole prefix an earlier prompt had, as a share of it."""
        h = hashlib.blake2b(digest_size=16)
        hits, missed, keys = 0, False, []
        for end in range(self.chunk, len(prompt) + 1, self.chunk):
            h.update(b"".join(t.to_bytes(4, "little") for t in prompt[end - self.chunk:end]))
            key = h.copy().digest()
            keys.append(key)
            if not missed and key in self._seen:
                hits += 1
            else:
                missed = True
        self._seen.update(keys)
        return hits * self.chunk / len(prompt) if prompt else 0.0

    def next(self, user: int) -> Sent:
        chat = self.chats.get(user)
        roll = self.rng.random()
        if chat is not None or roll < 0.5:
            if chat is None:
                history = list(self.systems[self.rng.randrange(len(self.systems))])
                chat = (history, 0)
            history, turns = chat
            prompt = history + self._fresh(40, 160)
            if len(prompt) > self.max_prompt:  # too long: this chat is over, start another
                self.chats.pop(user, None)
                return self.next(user)
            turn = turns + 1
            self.chats[user] = (prompt, turn)
            kind = "chat"
        elif roll < 0.8:
            doc = self.docs[self.rng.randrange(len(self.docs))]
            prompt, turn, kind = doc + self._fresh(20, 80), 0, "rag"
        else:
            prompt, turn, kind = self._fresh(200, 1200), 0, "unique"
        self._count += 1
        return Sent(self._count, kind, turn, prompt, self._oracle(prompt))

    def answered(self, user: int, sent: Sent) -> None:
        """The answer joins the chat's history; a chat ends after a geometric number of turns."""
        chat = self.chats.get(user)
        if sent.kind != "chat" or chat is None:
            return
        history, turns = chat
        if not sent.ok or turns >= self.max_turns or self.rng.random() < 1.0 / self.mean_turns:
            self.chats.pop(user, None)
            return
        self.chats[user] = (history + sent.tokens, turns)


# --- what the report is made of ------------------------------------------------------------------------


@dataclass
class Fault:
    name: str
    planned_s: float
    at: float = 0.0  # monotonic time of the injection
    in_flight: int = 0
    recovered_s: float | None = None  # from injection until the deployment was whole again
    detail: str = ""
    error: str = ""


def in_flight_at(sent: Iterable[Sent], when: float) -> list[Sent]:
    """Requests started before ``when`` and not finished by then."""
    return [s for s in sent if s.start <= when and (s.end == 0.0 or s.end > when)]


def wrong_tokens(got: Sequence[int], want: Sequence[int]) -> int:
    """Positions where ``got`` differs from ``want``; a missing or extra token counts as wrong."""
    return sum(1 for a, b in zip(got, want, strict=False) if a != b) + abs(len(got) - len(want))


_ROUTE = re.compile(r"request (soak-\d+) \S+: .*?cached=(\d+)/(\d+)")


def parse_proxy_log(text: str) -> dict[str, tuple[int, int]]:
    """``{request id: (cached chunks, total chunks)}`` from the proxy's per-request log lines."""
    return {m.group(1): (int(m.group(2)), int(m.group(3))) for m in _ROUTE.finditer(text)}


def pick_sample(sent: Sequence[Sent], faults: Sequence[Fault], n: int, after_fault_s: float = 30.0,
                per_fault: int = 6) -> list[Sent]:
    """Up to ``n`` finished requests: first those that started within ``after_fault_s`` after a
    fault (at most ``per_fault`` each), then evenly spread over the rest."""
    ok = [s for s in sent if s.ok and s.tokens]
    chosen: dict[int, Sent] = {}
    for f in faults:
        if not f.at:
            continue
        near = [s for s in ok if f.at <= s.start <= f.at + after_fault_s]
        for s in near[:per_fault]:
            if len(chosen) < n:
                chosen[s.index] = s
    rest = [s for s in ok if s.index not in chosen]
    room = n - len(chosen)
    if room > 0 and rest:
        step = max(1, len(rest) // room)
        for s in rest[::step][:room]:
            chosen[s.index] = s
    return sorted(chosen.values(), key=lambda s: s.index)


def summarize(sent: Sequence[Sent], faults: Sequence[Fault], checks: Sequence[tuple[Sent, list[int], float]],
              rss: dict[str, tuple[float, float]], leaked: dict[str, int], chunk_tokens: int,
              integrity_failures: float | None = None) -> Report:
    """The report's rows; ``checks``: (request, plain vLLM's tokens, plain vLLM's TTFT s);
    ``rss``: part -> (first, last) MiB; ``leaked``: /dev/shm name -> bytes left after ``pdx down``."""
    report = Report("soak")
    done = [s for s in sent if s.end]
    hit_at_fault: set[int] = set()
    for f in faults:
        if f.at:
            hit_at_fault.update(s.index for s in in_flight_at(done, f.at))
    ok = sum(1 for s in done if s.ok)
    calm = [s for s in done if s.index not in hit_at_fault]
    calm_ok = sum(1 for s in calm if s.ok)
    failed = [s for s in done if not s.ok]
    failed_calm = [s for s in failed if s.index not in hit_at_fault]
    report.add(Result("soak_requests", float(len(done)), "requests",
                      extra={"by_kind": {k: sum(1 for s in done if s.kind == k) for k in ("chat", "rag", "unique")}}))
    report.add(Result("soak_ok_ratio", ok / len(done) if done else 0.0, "ratio", "ok_ratio_not_in_flight",
                      calm_ok / len(calm) if calm else None))
    report.add(Result("soak_failed", float(len(failed)), "requests",
                      extra={"in_flight_at_a_fault": len(failed) - len(failed_calm),
                             "errors": sorted({s.error[:160] for s in failed})[:8]}))
    report.add(Result("soak_failed_not_in_flight", float(len(failed_calm)), "requests",
                      extra={"requests": [s.rid for s in failed_calm][:20]}))
    wrong = sum(wrong_tokens(s.tokens, want) for s, want, _ in checks)
    report.add(Result("soak_wrong_tokens", float(wrong), "tokens",
                      extra={"mismatched_requests": [s.rid for s, want, _ in checks if s.tokens != want]}))
    report.add(Result("soak_checked_tokens", float(sum(len(w) for _, w, _ in checks)), "tokens",
                      extra={"requests": len(checks)}))
    ttft = [s.ttft_s * 1e3 for s in done if s.ok and s.ttft_s is not None]
    plain = [t * 1e3 for _, _, t in checks if t > 0]
    for p in (50, 99):
        b = percentile(plain, p) if plain else None
        report.add(Result(f"soak_ttft_p{p}_ms", percentile(ttft, p), "ms",
                          f"plain_vllm_sequential_ttft_p{p}_ms" if b is not None else None, b,
                          lower_is_better=True))
    routed = [s for s in done if s.ok and s.cached_chunks is not None]
    turns = sorted({s.turn for s in routed if s.kind == "chat"})
    for turn in turns:
        group = [s for s in routed if s.kind == "chat" and s.turn == turn]
        _hit_row(report, f"turn_{turn}", group, chunk_tokens)
    _hit_row(report, "rag", [s for s in routed if s.kind == "rag"], chunk_tokens)
    for part, (first, last) in sorted(rss.items()):
        report.add(Result(f"soak_rss_growth_{part}_mib", last - first, "MiB",
                          extra={"first_mib": round(first, 1), "last_mib": round(last, 1)}))
    report.add(Result("soak_shm_leaked_bytes", float(sum(leaked.values())), "bytes",
                      extra={"segments": sorted(leaked)}))
    report.add(Result("soak_shm_leaked_segments", float(len(leaked)), "segments"))
    report.add(Result("soak_faults", float(sum(1 for f in faults if f.at and not f.error)), "faults", extra={
        "faults": [{"name": f.name, "planned_s": f.planned_s, "in_flight": f.in_flight,
                    "recovered_s": None if f.recovered_s is None else round(f.recovered_s, 1),
                    "detail": f.detail, "error": f.error} for f in faults]}))
    if integrity_failures is not None:
        report.add(Result("soak_integrity_failures", integrity_failures, "chunks"))
    return report


def _hit_row(report: Report, label: str, group: Sequence[Sent], chunk_tokens: int) -> None:
    if not group:
        return
    prompt = sum(len(s.prompt) for s in group)
    cached = sum(min(len(s.prompt), (s.cached_chunks or 0) * chunk_tokens) for s in group)
    oracle = sum(s.oracle_hit * len(s.prompt) for s in group)
    report.add(Result(f"soak_hit_ratio_{label}", cached / prompt, "ratio", f"oracle_hit_ratio_{label}",
                      oracle / prompt if oracle else None, extra={"requests": len(group)}))


# --- processes ---------------------------------------------------------------------------------------


def _say(msg: str) -> None:
    print(f"soak: {msg}", file=sys.stderr, flush=True)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
    except OSError:
        pass
    return out


def _tree(pid: int) -> list[int]:
    from pdx.agent.shm_reaper import _tree_pids

    return _tree_pids(pid)


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _started(pid: int) -> int | None:
    """The process's start time (clock ticks since boot): with the pid, its identity."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _state(pid: int) -> str:
    """The process's state letter (``Z``: a zombie, waiting to be reaped); empty when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _rss_mib(pids: Iterable[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return total / 1024


class IntegrityCount:
    """A counter summed over processes that restart: a value below the last one seen means a new
    process, whose count starts from zero."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}
        self.total = 0.0

    def see(self, who: str, value: float) -> None:
        last = self.last.get(who, 0.0)
        self.total += value - last if value >= last else value
        self.last[who] = value


class Redis:
    """A redis-server of our own on a free loopback port; the port survives stop/start."""

    def __init__(self, workdir: Path) -> None:
        from bench.servers import free_port

        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian package redis-server)")
        self.binary, self.workdir, self.port = binary, workdir, free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 15.0) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited at start; see {self.workdir / 'redis.log'}")
            with contextlib.suppress(Exception):
                if self.client().ping():
                    return
            time.sleep(0.1)
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout_s:.0f} s")

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, socket_connect_timeout=2)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class ShmWatch:
    """Which ``/dev/shm`` segments the deployment's processes map, and which are left at the end."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}  # name -> inode
        self.who: dict[str, str] = {}  # name -> the first process seen mapping it
        self.before = self._listing()

    @staticmethod
    def _listing() -> dict[str, int]:
        out = {}
        with contextlib.suppress(OSError):
            for e in os.scandir(SHM_DIR):
                if e.name.startswith(SHM_PREFIXES):
                    with contextlib.suppress(OSError):
                        out[e.name] = e.stat().st_ino
        return out

    def scan(self, pids: Iterable[int]) -> None:
        from pdx.agent.shm_reaper import _mapped_shm

        for pid in pids:
            for name in _mapped_shm(pid, SHM_DIR):
                if name.startswith(SHM_PREFIXES) and name not in self.seen:
                    with contextlib.suppress(OSError):
                        self.seen[name] = (SHM_DIR / name).stat().st_ino
                        self.who[name] = f"pid {pid} {' '.join(_cmdline(pid))[:80]}"

    def leaked(self) -> dict[str, int]:
        """Segments mapped by the deployment that still exist (same inode): name -> bytes."""
        out = {}
        for name, ino in self.seen.items():
            with contextlib.suppress(OSError):
                st = (SHM_DIR / name).stat()
                if st.st_ino == ino:
                    out[name] = st.st_size
        return out

    def new_unmapped(self) -> list[str]:
        """Segments that appeared during the run but were never seen mapped by the deployment (other
        users of this machine, or segments made and dropped between two scans)."""
        return sorted(set(self._listing()) - set(self.before) - set(self.seen))


class Soak:
    """One soak run; ``run()`` returns the report. Owns every process it starts."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pdx-soak-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.redis: Redis | None = None
        self.master: Any = None
        self.up: subprocess.Popen[bytes] | None = None
        self.config_path = self.workdir / "soak.yaml"
        self.api_key = secrets.token_hex(16)
        self.admin_key = secrets.token_hex(16)
        self.url = ""
        self.state: dict[str, Any] = {}
        self.shm = ShmWatch()
        self.sent: list[Sent] = []
        self.faults: list[Fault] = []
        self.rss_first: dict[str, float] = {}
        self.rss_last: dict[str, float] = {}
        self.rss_pids: dict[str, int] = {}
        self.rss_since: dict[str, float] = {}
        self.stop_load = threading.Event()
        self.chunk_tokens = 128
        self.model_path = ""
        self.vocab = 0
        self.workers: dict[str, dict[str, Any]] = {}  # name -> {"role", "url", "agent"}
        self.left_behind: list[str] = []  # processes still alive after pdx down (killed)
        self.integrity = IntegrityCount()
        self._known_pids: dict[int, int] = {}  # pid -> start time, of every process of the deployment

    # --- start ---------------------------------------------------------------------------------

    def _write_config(self) -> None:
        import yaml

        from pdx.config import load_config
        from pdx.deploy import DeployConfig

        src = Path(self.args.config) if self.args.config else (
            Path(__file__).resolve().parents[1] / "configs" / "local-1p1d.yaml")
        doc = yaml.safe_load(src.read_text())
        doc["workdir"] = str(self.workdir / "deploy")
        proxy = dict(doc.get("proxy") or {})
        proxy.update({"host": "127.0.0.1", "port": 0, "api_key": self.api_key, "admin_key": self.admin_key,
                      "log_requests": True})
        doc["proxy"] = proxy
        tiers: list[dict[str, Any]] = []
        if self.master is not None:
            tiers.append({"type": "mooncake", "master": self.master.master,
                          "metadata_server": self.master.metadata_server, "global_segment_size": "64MiB",
                          "local_buffer_size": "32MiB", "write": "all", "retry_after_s": 5.0})
        assert self.redis is not None
        tiers.append({"type": "redis", "url": self.redis.url, "write": "all", "key_prefix": REDIS_PREFIX,
                      "retry_after_s": 5.0})
        for w in doc.get("workers") or []:
            store = dict(w.get("store") or {})
            store["l1"] = {**dict(store.get("l1") or {}), "capacity": self.args.l1}
            store["tiers"] = tiers
            w["store"] = store
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(yaml.safe_dump(doc, sort_keys=False))
        cfg = load_config(DeployConfig, self.config_path)  # fails here, naming the key, if it is wrong
        self.chunk_tokens = cfg.chunk_tokens
        from pdx.model import ensure_model

        if Path(cfg.model).is_dir():
            self.model_path = str(Path(cfg.model).resolve())
            self.served = cfg.served_model_name or "model"
        else:
            built = ensure_model(cfg.model)
            self.model_path = str(built.path)
            self.served = cfg.served_model_name or f"pdx-{cfg.model}"
        from transformers import AutoConfig

        self.vocab = int(AutoConfig.from_pretrained(self.model_path).vocab_size)
        self.max_model_len = int((cfg.vllm or {}).get("max_model_len", 4096))

    def _pdx(self, *argv: str) -> list[str]:
        return [sys.executable, "-m", "pdx.deploy.cli", *argv, "--config", str(self.config_path)]

    def start(self) -> None:
        self.redis = Redis(self.workdir)
        self.redis.start()
        _say(f"redis-server on {self.redis.url} (pid {self.redis.proc.pid if self.redis.proc else '?'})")
        if self.args.mooncake:
            from bench.servers import MooncakeMaster

            self.master = MooncakeMaster(self.workdir)
            self.master.start()
            _say(f"mooncake_master on {self.master.master}")
        self._write_config()
        log = (self.workdir / "pdx-up.log").open("ab")
        _say(f"pdx up --config {self.config_path} (log {self.workdir / 'pdx-up.log'})")
        self.up = subprocess.Popen(self._pdx("up"), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        log.close()
        deadline = time.monotonic() + 420
        state_file = self.workdir / "deploy" / "deployment.json"
        while time.monotonic() < deadline:
            if self.up.poll() is not None:
                raise RuntimeError(f"pdx up exited with {self.up.returncode}:\n{self._tail('pdx-up.log')}")
            if "[pdx] serving" in self._tail("pdx-up.log", 200) and state_file.exists():
                break
            self._remember_pids()
            time.sleep(0.5)
        else:
            raise RuntimeError(f"pdx up not serving within 420 s:\n{self._tail('pdx-up.log')}")
        self.state = json.loads(state_file.read_text())
        self.url = self.state["url"].rstrip("/")
        for name, w in self.state["workers"].items():
            self.workers[name] = {"url": w["url"], "agent": w["agent"], "role": self._role(name)}
        _say(f"deployment serving at {self.url}: " + ", ".join(
            f"{n} ({w['role']})" for n, w in self.workers.items()))
        self._remember_pids()

    def _role(self, name: str) -> str:
        import yaml

        doc = yaml.safe_load(self.config_path.read_text())
        for w in doc.get("workers") or []:
            if w.get("name") == name:
                return str(w.get("role", "both"))
        return "both"

    def _tail(self, name: str, n: int = 40) -> str:
        try:
            return "\n".join((self.workdir / name).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # --- the deployment's processes ---------------------------------------------------------------

    def parts(self) -> dict[str, int]:
        """``{proxy: pid, agent:<name>: pid, engine:<name>: pid}`` of the processes running now."""
        out: dict[str, int] = {}
        if self.up is None or self.up.poll() is not None:
            return out
        for child in _children(self.up.pid):
            argv = _cmdline(child)
            if "proxy.cli" in argv:
                out["proxy"] = child
            elif "pdx.agent.cli" in argv:
                name = self._agent_name(argv)
                out[f"agent:{name}"] = child
                for grandchild in _children(child):
                    if any("vllm" in a for a in _cmdline(grandchild)):
                        out[f"engine:{name}"] = grandchild
        return out

    @staticmethod
    def _agent_name(argv: list[str]) -> str:
        import yaml

        try:
            path = argv[argv.index("--config") + 1]
            return str(yaml.safe_load(Path(path).read_text()).get("name", "?"))
        except (ValueError, IndexError, OSError, AttributeError):
            return "?"

    def _remember_pids(self) -> list[int]:
        pids = _tree(self.up.pid) if self.up is not None and self.up.poll() is None else []
        for pid in pids:
            started = _started(pid)
            if started is not None:
                self._known_pids.setdefault(pid, started)
        self.shm.scan(pids)
        return pids

    def sample_rss(self, settle_s: float = 60.0) -> None:
        """RSS of each part; a part's first figure is taken once its process ran ``settle_s`` and the
        deployment is whole (a vLLM server grows while it starts, and for a while after it is
        ready), and a restarted one starts over."""
        now = time.monotonic()
        whole: bool | None = None
        for part, pid in self.parts().items():
            if self.rss_pids.get(part) != pid:  # new, or restarted: its growth starts over
                self.rss_pids[part] = pid
                self.rss_since[part] = now
                self.rss_first.pop(part, None)
                self.rss_last.pop(part, None)
            if now - self.rss_since[part] < settle_s:
                continue
            if part not in self.rss_first:
                whole = self.healthy() if whole is None else whole
                if not whole:
                    self.rss_since[part] = now  # not serving yet: it settles from when it is
                    continue
            mib = _rss_mib(_tree(pid) if part.startswith("engine:") else [pid])
            self.rss_first.setdefault(part, mib)
            self.rss_last[part] = mib

    def healthy(self) -> bool:
        import httpx

        try:
            doc = httpx.get(f"{self.url}/admin/workers", timeout=5.0,
                            headers={"Authorization": f"Bearer {self.admin_key}"}).json()
        except (httpx.HTTPError, ValueError):
            return False
        states = {str(w.get("id")): w.get("state") for w in doc.get("workers", [])}
        return all(states.get(n) == "healthy" for n in self.workers)

    def wait_healthy(self, timeout_s: float) -> float | None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.healthy():
                return time.monotonic() - t0
            self._remember_pids()
            time.sleep(1.0)
        return None

    def _agent_status(self, name: str) -> dict[str, Any]:
        import httpx

        doc: dict[str, Any] = httpx.get(f"{self.workers[name]['agent']}/v1/status", timeout=5.0).json()
        return doc

    def sample_integrity(self) -> None:
        """Add each agent's corrupt chunks caught (any tier) since the last sample."""
        from pdx.deploy.agent_engine import Metrics

        for name in self.workers:
            with contextlib.suppress(Exception):
                self.integrity.see(name, Metrics.fetch(f"{self._agent_url(name)}/metrics", 5.0).value(
                    "pdx_store_integrity_failures_total"))

    def _agent_url(self, name: str) -> str:
        """The agent's HTTP URL now (a restarted agent listens on a new port): from the proxy."""
        import httpx

        with contextlib.suppress(Exception):
            doc = httpx.get(f"{self.url}/admin/workers", timeout=5.0,
                            headers={"Authorization": f"Bearer {self.admin_key}"}).json()
            for w in doc.get("workers", []):
                if w.get("id") == name and w.get("agent_url"):
                    self.workers[name]["agent"] = w["agent_url"]
        return str(self.workers[name]["agent"])

    def _worker(self, role: str) -> str:
        for name, w in self.workers.items():
            if w["role"] == role:
                return name
        return next(iter(self.workers))

    # --- faults --------------------------------------------------------------------------------

    def inject(self, fault: Fault) -> None:
        name = fault.name
        if name == "engine_kill":
            worker = self._worker("decode")
            pid = self.parts().get(f"engine:{worker}")
            if pid is None:
                pid = int(self._agent_status(worker)["engine"]["pid"])
            os.kill(pid, signal.SIGKILL)
            fault.detail = f"SIGKILL to {worker}'s vLLM (pid {pid})"
        elif name == "agent_kill":
            worker = self._worker("prefill")
            pid = self.parts()[f"agent:{worker}"]
            os.kill(pid, signal.SIGKILL)
            fault.detail = f"SIGKILL to {worker}'s pdx-agent (pid {pid})"
        elif name == "redis_restart":
            assert self.redis is not None
            self.redis.stop()
            self.stop_load.wait(self.args.outage_s)
            self.redis.start()
            fault.detail = f"redis-server stopped for {self.args.outage_s:.0f} s, started again (empty)"
        elif name == "mooncake_restart":
            if self.master is None:
                raise RuntimeError("no mooncake_master (run with --mooncake)")
            self.master.stop()
            self.stop_load.wait(self.args.outage_s)
            self.master.start()
            fault.detail = f"mooncake_master stopped for {self.args.outage_s:.0f} s, started again (empty)"
        elif name == "corrupt_chunk":
            n = corrupt_redis(self.redis.client() if self.redis else None, REDIS_PREFIX)
            fault.detail = f"one payload byte flipped in each of {n} chunks stored in Redis"
        elif name == "link_cut":
            killed, ports = self.cut_links(self.args.outage_s)
            fault.detail = (f"{killed} TCP connections of the agents' listening ports {sorted(ports)} torn down "
                            f"(ss -K) during {self.args.outage_s:.0f} s")
        else:
            raise ValueError(f"unknown fault {name!r}")

    def cut_links(self, duration_s: float) -> tuple[int, set[int]]:
        agents = {pid for part, pid in self.parts().items() if part.startswith("agent:")}
        out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=10).stdout
        ports: set[int] = set()
        for line in out.splitlines():
            pids = {int(p) for p in re.findall(r"pid=(\d+)", line)}
            if pids & agents:
                ports.add(int(line.split()[3].rsplit(":", 1)[1]))
        http_ports = {int(w["agent"].rsplit(":", 1)[1].split("/")[0]) for w in self.workers.values()}
        ports -= http_ports  # the metrics endpoint is no link between agents
        if not ports:
            return 0, ports
        expr = " or ".join(f"sport = :{p} or dport = :{p}" for p in sorted(ports))
        killed = 0
        deadline = time.monotonic() + duration_s
        while time.monotonic() < deadline and not self.stop_load.is_set():
            res = subprocess.run(["ss", "-K", "-tnH", "state", "established", f"( {expr} )"],
                                 capture_output=True, text=True, timeout=10)
            killed += sum(1 for line in res.stdout.splitlines() if line.strip())
            time.sleep(0.2)
        return killed, ports

    def run_faults(self, plan: list[tuple[float, str]], t0: float, end: float) -> None:
        for planned, name in plan:
            fault = Fault(name, planned)
            self.faults.append(fault)
            while time.monotonic() < t0 + planned and not self.stop_load.is_set():
                self.stop_load.wait(0.5)
            if self.stop_load.is_set() or time.monotonic() >= end:
                fault.error = "not injected: the run ended first"
                continue
            if not self.healthy():
                fault.error = "not injected: the deployment had not recovered from the previous fault"
                continue
            fault.at = time.monotonic()
            fault.in_flight = len(in_flight_at(self.sent, fault.at))
            _say(f"fault {name} at {fault.at - t0:.0f} s ({fault.in_flight} requests in flight)")
            try:
                self.inject(fault)
            except Exception as exc:
                fault.error = f"{type(exc).__name__}: {exc}"
                _say(f"fault {name} failed: {fault.error}")
                continue
            _say(f"  {fault.detail}")
            time.sleep(2.0)  # let the proxy see the fault before asking whether it is whole
            rec = self.wait_healthy(min(self.args.recover_timeout_s, max(5.0, end - time.monotonic())))
            fault.recovered_s = None if rec is None else time.monotonic() - fault.at
            _say(f"  recovered in {fault.recovered_s:.0f} s" if rec is not None else "  not recovered in time")

    # --- load ----------------------------------------------------------------------------------

    async def _one(self, client: Any, s: Sent) -> None:
        import httpx

        body = {"model": self.served, "prompt": s.prompt, "max_tokens": self.args.max_tokens, "temperature": 0.0,
                "ignore_eos": True, "stream": True, "return_token_ids": True,
                "stream_options": {"include_usage": True}}
        headers = {"Authorization": f"Bearer {self.api_key}", "X-Request-Id": s.rid}
        s.start = time.monotonic()
        try:
            async with client.stream("POST", f"{self.url}/v1/completions", json=body, headers=headers) as resp:
                if resp.status_code != 200:
                    s.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
                    return
                async for data in adata_lines(resp.aiter_bytes()):
                    if data == "[DONE]":
                        continue
                    event = json.loads(data)
                    if "error" in event:
                        s.error = str(event["error"])[:200]
                    for choice in event.get("choices") or []:
                        if s.ttft_s is None:
                            s.ttft_s = time.monotonic() - s.start
                        s.tokens.extend(choice.get("token_ids") or [])
            if not s.error and len(s.tokens) != self.args.max_tokens:
                s.error = f"stream ended after {len(s.tokens)} of {self.args.max_tokens} tokens"
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            s.error = f"{type(exc).__name__}: {exc}"[:200]
        finally:
            s.end = time.monotonic()

    async def _load(self, end: float) -> None:
        import httpx

        work = Workload(self.vocab, self.chunk_tokens, seed=self.args.seed,
                        max_prompt=self.max_model_len - self.args.max_tokens - 8)
        timeout = httpx.Timeout(self.args.timeout_s, connect=10.0)
        limits = httpx.Limits(max_connections=self.args.users + 4)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

            async def user(u: int) -> None:
                while time.monotonic() < end and not self.stop_load.is_set():
                    s = work.next(u)
                    self.sent.append(s)
                    await self._one(client, s)
                    work.answered(u, s)
                    if not s.ok:
                        await asyncio.sleep(0.5)  # a failing deployment is not hammered

            await asyncio.gather(*(user(u) for u in range(self.args.users)))

    def load_and_faults(self) -> None:
        duration = self.args.minutes * 60.0
        faults = [f.strip() for f in self.args.faults.split(",") if f.strip()]
        unknown = set(faults) - set(ALL_FAULTS) - set(OPTIONAL_FAULTS)
        if unknown:
            raise ValueError(f"--faults: unknown {sorted(unknown)}; known: {ALL_FAULTS + OPTIONAL_FAULTS}")
        if self.args.mooncake and "mooncake_restart" not in faults:
            faults.append("mooncake_restart")
        plan = plan_faults(duration, faults)
        t0 = time.monotonic()
        end = t0 + duration
        _say(f"load: {self.args.users} users for {duration:.0f} s; faults at " +
             ", ".join(f"{name} {t:.0f} s" for t, name in plan))
        injector = threading.Thread(target=self.run_faults, args=(plan, t0, end), name="soak-faults", daemon=True)
        ticker = threading.Thread(target=self._progress, args=(t0, end), name="soak-progress", daemon=True)
        injector.start()
        ticker.start()
        watcher = threading.Thread(target=self._watch_shm, name="soak-shm", daemon=True)
        watcher.start()
        try:
            asyncio.run(self._load(end))
        finally:
            self.stop_load.set()
            injector.join(self.args.recover_timeout_s + self.args.outage_s + 60)
            ticker.join(15)
            watcher.join(15)

    def _watch_shm(self) -> None:
        """Every 0.2 s: which /dev/shm segments the deployment's processes map (vLLM maps some for a
        few seconds only)."""
        while not self.stop_load.wait(0.2):
            self._remember_pids()

    def _progress(self, t0: float, end: float) -> None:
        warm = t0 + min(60.0, (end - t0) / 10)
        settle = warm - t0
        last_print = 0.0
        while not self.stop_load.wait(2.0):
            now = time.monotonic()
            if now >= warm:
                self.sample_rss(settle)
            self.sample_integrity()
            if now - last_print >= 10.0:
                last_print = now
                done = [s for s in self.sent if s.end]
                ok = [s for s in done if s.ok]
                p50 = percentile([s.ttft_s * 1e3 for s in ok if s.ttft_s], 50) if ok else float("nan")
                _say(f"{now - t0:.0f}/{end - t0:.0f} s: {len(done)} done, {len(ok)} ok, "
                     f"{len(done) - len(ok)} failed, {len(self.sent) - len(done)} in flight, "
                     f"TTFT p50 {p50:.0f} ms, faults {sum(1 for f in self.faults if f.at)}/{len(self.faults)}")

    # --- stop ----------------------------------------------------------------------------------

    def down(self) -> int | None:
        """``pdx down``, then wait for ``pdx up`` to exit; whatever is left is killed by PID."""
        if self.up is None:
            return None
        code = None
        if self.up.poll() is None:
            self._remember_pids()
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run(self._pdx("down"), timeout=90, capture_output=True)
            try:
                code = self.up.wait(90)
            except subprocess.TimeoutExpired:
                _say("pdx up did not stop after pdx down; killing it")
                self.up.kill()
                self.up.wait(10)
        else:
            code = self.up.returncode
        for pid, started in sorted(self._known_pids.items()):  # nothing the deployment started outlives it
            if _started(pid) == started and _state(pid) not in ("Z", "X"):  # the same, live process
                with contextlib.suppress(OSError):
                    argv = _cmdline(pid)
                    os.kill(pid, signal.SIGKILL)
                    self.left_behind.append(" ".join(argv)[:120])
                    _say(f"killed pid {pid}, left after pdx down: {' '.join(argv)[:120]}")
        return code

    def stop_servers(self) -> None:
        if self.redis is not None:
            self.redis.stop()
        if self.master is not None:
            self.master.stop()

    # --- after --------------------------------------------------------------------------------

    def reference(self, sample: list[Sent]) -> list[tuple[Sent, list[int], float]]:
        """Plain vLLM on the same model, one request at a time: (request, tokens, TTFT s)."""
        import httpx

        from pdx.engine.vllm import VllmOptions, start_server

        opts = VllmOptions(model=self.model_path, served_model_name=self.served, max_model_len=self.max_model_len,
                           cpu_bind="0")
        server = start_server(opts, self.workdir / "plain-vllm")
        out = []
        try:
            _say(f"plain vLLM at {server.url}: checking {len(sample)} requests")
            for s in sample:
                body = {"model": self.served, "prompt": s.prompt, "max_tokens": self.args.max_tokens,
                        "temperature": 0.0, "ignore_eos": True, "stream": True, "return_token_ids": True}
                tokens: list[int] = []
                t0 = time.monotonic()
                ttft = 0.0
                with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120.0) as resp:
                    resp.raise_for_status()
                    for data in data_lines(resp.iter_bytes()):
                        if data == "[DONE]":
                            continue
                        for choice in json.loads(data).get("choices") or []:
                            ttft = ttft or time.monotonic() - t0
                            tokens.extend(choice.get("token_ids") or [])
                out.append((s, tokens, ttft))
        finally:
            server.stop()
        return out


def corrupt_redis(client: Any, prefix: str, limit: int = 5000) -> int:
    """Flip one byte of the payload (the last byte; the header stays valid) of up to ``limit``
    chunks stored under ``prefix``. Returns how many were changed."""
    if client is None:
        return 0
    n = 0
    for key in client.scan_iter(match=f"{prefix}*", count=500):
        value = client.get(key)
        if not value or len(value) <= 32:
            continue
        flipped = value[:-1] + bytes([value[-1] ^ 0xFF])
        if client.set(key, flipped, xx=True, keepttl=True):
            n += 1
        if n >= limit:
            break
    return n


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> Report:
    if args.minutes <= 0 or args.users <= 0:
        raise SystemExit("pdx-bench soak: --minutes and --users must be positive")
    soak = Soak(args)
    _say(f"workdir {soak.workdir}")
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a SIGTERM stops everything as Ctrl-C does
    checks: list[tuple[Sent, list[int], float]] = []
    try:
        try:
            soak.start()
            soak.load_and_faults()
            soak.sample_rss(min(60.0, args.minutes * 6))
            soak.sample_integrity()
        finally:
            soak.stop_load.set()
            _say("pdx down")
            code = soak.down()
            soak.stop_servers()
        _say(f"pdx up exited with {code}")
        soak.shm.scan([])
        leaked = soak.shm.leaked()
        routes = parse_proxy_log((soak.workdir / "deploy" / "proxy.log").read_text(errors="replace")
                                 if (soak.workdir / "deploy" / "proxy.log").exists() else "")
        for s in soak.sent:
            if s.rid in routes:
                s.cached_chunks, s.total_chunks = routes[s.rid]
        sample = pick_sample(soak.sent, soak.faults, args.check)
        checks = soak.reference(sample) if sample else []
    except KeyboardInterrupt:
        _say("interrupted: everything started was stopped")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        soak.stop_load.set()
        soak.down()
        soak.stop_servers()
    rss = {part.replace(":", "_"): (soak.rss_first[part], soak.rss_last[part]) for part in soak.rss_first}
    report = summarize(soak.sent, soak.faults, checks, rss, leaked, soak.chunk_tokens, soak.integrity.total)
    report.notes.append(f"{args.minutes:g} min, {args.users} users, max_tokens {args.max_tokens}, L1 {args.l1} per "
                        f"agent, tiers: {'mooncake, ' if args.mooncake else ''}redis; config {soak.config_path}")
    report.notes.append(f"logs: {soak.workdir} (pdx-up.log, deploy/*.log)")
    if leaked:
        report.notes.append("left in /dev/shm: " + "; ".join(f"{n} ({b} bytes, mapped by {soak.shm.who.get(n, '?')})"
                                                            for n, b in sorted(leaked.items())))
    if soak.left_behind:
        report.notes.append(f"processes alive after pdx down (killed by the soak): {soak.left_behind}")
    other = soak.shm.new_unmapped()
    if other:
        report.notes.append(f"/dev/shm segments that appeared but no deployment process was seen mapping "
                            f"(other users, or short-lived): {other[:10]}")
    return report


__all__ = ["ALL_FAULTS", "Fault", "Sent", "Workload", "add_arguments", "corrupt_redis", "in_flight_at",
           "parse_proxy_log", "pick_sample", "plan_faults", "run", "summarize", "wrong_tokens"]
