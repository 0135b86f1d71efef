"""Fixtures of the connector's end-to-end tests: vLLM engines under real ``pdx-agent``s.

Imported by ``tests/e2e/conftest.py`` so the fixtures are shared by every e2e module
(``test_pd.py``, ``test_pd_failures.py``, ``test_reuse.py``) and each engine starts once.

Fixtures:
  ``references``  ``{prompt name: greedy token ids}`` from a plain vLLM server (no connector),
                  computed once for every prompt in ``PROMPTS`` before any pdx engine starts;
                  that server is stopped afterwards.
  ``prompts``     ``{prompt name: token ids}``.
  ``stack``       a ``PdxStack``: ``stack.use("prefill", "decode")`` returns those engines,
                  started on first use, and stops every other one first, so at most two vLLM
                  servers run at a time (~3.2 GiB each).
  ``redis_server`` a redis-server of our own on a free loopback port (the ``both`` agent's L3);
                  without the binary the ``both`` engine runs without a Redis tier.

Engines (``ENGINES``): ``prefill`` (kv_producer, core 0), ``decode`` (kv_consumer, core 1) and
``both`` (kv_both, core 1; small L1 so chunks spill to disk and Redis; its transport corrupts every
3rd received chunk, for the integrity test). vLLM's own prefix caching is off on all of them, so a
hit can only come from pdx; except ``blend`` (kv_both, core 1, CacheBlend's model handle on), which keeps
it on to prove that blended blocks never reach other requests through it. Every process is stopped by PID at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pdx.deploy.agent_engine import AgentEngine
from pdx.engine.vllm import free_port
from pdx.model import BuiltModel

ENGINE_START_TIMEOUT_S = 240.0
CHUNK_TOKENS = 128
#: 1,500-token prompts leave 11 full chunks = 1,408 tokens (94%) to load.
PROMPT_TOKENS = 1500
MAX_TOKENS = 32
#: the connector's load deadline in these tests (a dead prefill agent costs this long)
LOAD_TIMEOUT_S = 8.0

#: name -> (tokens, seed of the generated text). Every test uses its own prompts.
PROMPTS: dict[str, tuple[int, int]] = {
    "pd": (PROMPT_TOKENS, 101),
    "dead_agent": (PROMPT_TOKENS, 102),
    "wrong_fingerprint": (PROMPT_TOKENS, 103),
    "integrity": (PROMPT_TOKENS, 104),
    "reuse": (PROMPT_TOKENS, 105),
    "spill_a": (PROMPT_TOKENS, 106),
    "spill_b": (PROMPT_TOKENS, 107),
    "spill_c": (PROMPT_TOKENS, 108),
    "crash": (PROMPT_TOKENS, 109),
    "reuse_whole_chunks": (12 * CHUNK_TOKENS, 110),
    "tenants": (PROMPT_TOKENS, 111),
    "shared_mooncake": (PROMPT_TOKENS, 112),
    "p2p": (PROMPT_TOKENS, 113),
    "p2p_dead_peer": (PROMPT_TOKENS, 114),
    "shared_redis": (PROMPT_TOKENS, 115),
    "pd_layerwise": (PROMPT_TOKENS, 116),
    "tails": (700, 118),
}

#: prompts that extend another one: name -> (the prompt it extends, extra tokens, seed of the extra text)
EXTENDED_PROMPTS: dict[str, tuple[str, int, int]] = {
    "tails_extended": ("tails", 400, 117),
}

#: CacheBlend (``test_blend_connector.py``): parts ``(tokens, seed)``, and prompts composed of them
#: (an anchor, documents, a question); their references come from plain vLLM like the others.
BLEND_PARTS: dict[str, tuple[int, int]] = {
    "anchor": (32, 120), "doc_a": (200, 121), "doc_b": (160, 122), "doc_c": (150, 123),
    "q": (20, 124), "q2": (24, 125), "qs": (12, 126),
}
BLEND_PROMPTS: dict[str, tuple[str, ...]] = {
    "blend_store_a": ("anchor", "doc_a", "qs"),
    "blend_store_b": ("anchor", "doc_b", "qs"),
    "blend_x": ("anchor", "doc_b", "doc_a", "q"),
    "blend_y": ("anchor", "doc_a", "doc_b", "q2"),
    "blend_z": ("anchor", "doc_c", "doc_a", "q"),
}

@dataclass(frozen=True)
class EngineSpec:
    role: str  # prefill, decode, both
    cpu_bind: str
    store: dict[str, Any] = field(default_factory=dict)
    transport: dict[str, Any] = field(default_factory=dict)
    needs_redis: bool = False
    #: ``VllmOptions`` overrides and engine environment on top of the defaults below
    vllm: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


ENGINES: dict[str, EngineSpec] = {
    "prefill": EngineSpec("prefill", "0", store={"l1": {"capacity": "32MiB"}}),
    "decode": EngineSpec("decode", "1", store={"l1": {"capacity": "32MiB"}}),
    # 16 slabs of one 128 KiB chunk: a third 11-chunk prompt pushes the first one out of L1.
    # The disk tier keeps about 12 chunks, so the oldest evicted ones survive only in Redis.
    "both": EngineSpec("both", "1",
                       store={"l1": {"capacity": "2MiB"},
                              "disk": {"enabled": True, "capacity": "1600KiB", "write": "evicted"},
                              "redis": {"enabled": True, "write": "evicted"}},
                       transport={"debug_corrupt_every": 3}, needs_redis=True),
    # CacheBlend: the model handle on, and vLLM's own prefix cache ON (blended requests must
    # never hand their blocks to later requests through it).
    "blend": EngineSpec("both", "1", store={"l1": {"capacity": "32MiB"}}, vllm={"prefix_caching": True},
                        env={"PDX_BLEND_HANDLE": "1"}),
}


class RedisServer:
    """A private redis-server on a free port; stopped by PID."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        binary = shutil.which("redis-server")
        assert binary is not None
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        import redis

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_timeout=0.5).ping():
                    return self
            except redis.RedisError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def make_engine(name: str, spec: EngineSpec, model: BuiltModel, root: Path, redis_url: str = "") -> AgentEngine:
    """The engine ``name``: vLLM (one pinned core, prefix caching off) under its pdx-agent.
    Without ``redis_url`` an engine that wants the Redis tier runs without it."""
    store: dict[str, Any] = {"chunk_tokens": CHUNK_TOKENS, **spec.store}
    if spec.needs_redis and redis_url:
        store["redis"] = {**store.get("redis", {}), "url": redis_url}
    else:
        store.pop("redis", None)
    return AgentEngine(name, model.path, spec.role, root, cpu_bind=spec.cpu_bind, served_model_name="tiny",
                       store=store, transport=spec.transport,
                       # A fetch from a dead peer fails at this deadline: keeps the failure tests short.
                       engine_env={"PDX__CONNECTOR__LOAD_TIMEOUT_S": str(LOAD_TIMEOUT_S), **spec.env},
                       vllm={"kv_cache_gib": 1, "max_model_len": 4096, "prefix_caching": False, **spec.vllm})



class PdxStack:
    """The session's pdx engines; at most two vLLM servers run at a time (see ``use``)."""

    def __init__(self, model: BuiltModel, root: Path, redis: Callable[[], RedisServer | None]) -> None:
        self.model = model
        self.root = root
        self._redis = redis
        self.running: dict[str, AgentEngine] = {}

    def use(self, *names: str) -> tuple[AgentEngine, ...]:
        for name in [n for n in self.running if n not in names]:
            self.running.pop(name).stop()
        for name in names:
            if name not in self.running:
                spec = ENGINES[name]
                server = self._redis() if spec.needs_redis else None
                url = server.url if server is not None else ""
                self.running[name] = make_engine(name, spec, self.model, self.root, url).start(
                    ENGINE_START_TIMEOUT_S)
        return tuple(self.running[n] for n in names)

    def stop_all(self) -> None:
        for name in list(self.running):
            self.running.pop(name).stop()


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def prompts(make_prompt: Callable[..., Any]) -> dict[str, list[int]]:
    out = {name: list(make_prompt(n, seed=seed).token_ids[:n]) for name, (n, seed) in PROMPTS.items()}
    parts = {name: list(make_prompt(n, seed=seed).token_ids[:n]) for name, (n, seed) in BLEND_PARTS.items()}
    for name, names in BLEND_PROMPTS.items():
        out[name] = [t for part in names for t in parts[part]]
    for name, (base, n, seed) in EXTENDED_PROMPTS.items():
        out[name] = out[base] + list(make_prompt(n, seed=seed).token_ids[:n])
    return out


@pytest.fixture(scope="session")
def references(vllm: Any, prompts: dict[str, list[int]],
               complete: Callable[..., dict[str, Any]]) -> dict[str, list[int]]:
    """Greedy outputs of plain vLLM (same model, dtype, seed and one OpenMP thread as the pdx
    engines) for every prompt, taken before any pdx engine starts; then that server stops."""
    server = vllm.get("pdx-reference", cpu_bind="0")
    try:
        out = {}
        for name, ids in prompts.items():
            resp = complete(server, ids, MAX_TOKENS)
            out[name] = list(resp["choices"][0]["token_ids"])
            assert len(out[name]) == MAX_TOKENS
    finally:
        vllm.stop("pdx-reference")
    return out


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], RedisServer | None]]:
    """``get()`` starts (once) and returns our redis-server; None when the binary is missing."""
    holder: list[RedisServer] = []

    def get() -> RedisServer | None:
        if shutil.which("redis-server") is None:
            return None
        if not holder:
            holder.append(RedisServer(tmp_path_factory.mktemp("redis")).start())
        return holder[0]

    try:
        yield get
    finally:
        for r in holder:
            r.stop()


@pytest.fixture(scope="session")
def stack(references: dict[str, list[int]], tiny_model: BuiltModel,
          redis_server: Callable[[], RedisServer | None]) -> Iterator[PdxStack]:
    # Unix socket paths must stay short: agents live under a short temporary folder.
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="pdx-e2e-"))
    s = PdxStack(tiny_model, root, redis_server)
    try:
        yield s
    finally:
        s.stop_all()
        if os.environ.get("PDX_KEEP_E2E_LOGS") != "1":
            shutil.rmtree(root, ignore_errors=True)
