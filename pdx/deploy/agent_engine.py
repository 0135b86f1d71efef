"""A vLLM server under its own ``pdx-agent``: for ``pdx up``, ``pdx-bench e2e`` and the e2e tests.

``AgentEngine`` writes the agent config (role, store, transport), builds the vLLM
command with ``pdx.engine.vllm.vllm_command`` (the CPU fixes, one pinned core) and
starts ``pdx-agent --config ... -- <vLLM command>``: the agent adds the
``--kv-transfer-config`` that loads ``PdxConnector``. ``start`` blocks until vLLM
answers ``/health``; ``stop`` stops the agent by PID (it stops its engine first).
``Metrics`` reads a Prometheus page (the agent's or vLLM's).

Blocking calls, one owner per object. ``Metrics`` needs prometheus-client and
``AgentEngine`` httpx; both are imported where they are used.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pdx.deploy.process import AgentProcess
from pdx.engine.vllm import VllmOptions, free_port, vllm_command

#: the environment keys of vllm_command that the agent must hand to its engine
_ENGINE_ENV_PREFIXES = ("VLLM_", "TORCHINDUCTOR_", "HF_", "TRANSFORMERS_", "TMPDIR", "DO_NOT_TRACK",
                        "PYTHONUNBUFFERED")


class AgentEngine:
    """One vLLM server launched and supervised by its ``pdx-agent``.

    ``store`` / ``transport`` are merged into the agent's config sections; ``engine_env``
    adds to the engine's environment (e.g. ``PDX__CONNECTOR__LOAD_TIMEOUT_S``);
    ``vllm`` overrides ``VllmOptions`` fields (``model`` and ``cpu_bind`` are arguments; vLLM's own
    prefix cache stays on unless ``vllm={"prefix_caching": False}``, which tests use to prove
    that a hit came from pdx);
    ``agent`` adds other sections of the agent config (e.g. ``registration``); ``env`` is the
    agent's environment (default: this process's). ``host`` is the address vLLM binds (another
    host's address in a multi-host deployment; the agent's own addresses go in ``agent`` and
    ``transport``).
    """

    def __init__(self, name: str, model: str | Path, role: str, workdir: Path, *, cpu_bind: str = "auto",
                 served_model_name: str = "", store: Mapping[str, Any] | None = None,
                 transport: Mapping[str, Any] | None = None, engine_env: Mapping[str, str] | None = None,
                 vllm: Mapping[str, Any] | None = None, agent: Mapping[str, Any] | None = None,
                 env: Mapping[str, str] | None = None, host: str = "127.0.0.1") -> None:
        self.name = name
        self.port = free_port(host)
        self.url = f"http://{host}:{self.port}"
        run_dir = Path(workdir) / f"{name}-run"
        run_dir.mkdir(parents=True, exist_ok=True)
        fields: dict[str, Any] = {"model": str(model), "served_model_name": served_model_name,
                                  "cpu_bind": cpu_bind, "host": host}
        fields.update(vllm or {})
        self.options = VllmOptions(**fields)
        argv, vllm_env = vllm_command(self.options, run_dir, self.port)
        env_out = {k: v for k, v in vllm_env.items() if k.startswith(_ENGINE_ENV_PREFIXES)}
        env_out.update(engine_env or {})
        config = {"role": role, "store": dict(store or {}), "transport": {"backend": "tcp", **(transport or {})},
                  "engine": {"env": env_out, "url": self.url, "restart_backoff_s": 0.5}, **(agent or {})}
        self.agent = AgentProcess(Path(workdir), config, engine=argv, env=env, name=name)

    @property
    def model_name(self) -> str:
        return self.options.served_model_name or self.options.model

    # --- life cycle ----------------------------------------------------------------------------

    def start(self, timeout_s: float = 240.0) -> AgentEngine:
        self.agent.start()
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float = 240.0) -> None:
        """Until vLLM answers /health; fails early, with the engine log's tail, if the agent exits
        or gives up restarting the engine."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.agent.alive():
                raise RuntimeError(f"pdx-agent {self.name} exited:\n{self.agent.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.engine_status().get("state") == "failed":
                break
            time.sleep(0.5)
        raise RuntimeError(f"engine {self.name} not ready; engine log tail:\n{self.engine_log_tail()}")

    def stop(self) -> None:
        """Stop the agent (which stops the engine) by PID. Idempotent."""
        self.agent.stop()

    # --- what tests and benches look at ------------------------------------------------------------

    @property
    def engine_log(self) -> Path:
        return Path(self.agent.info["engine_log"])

    def engine_log_text(self) -> str:
        try:
            return self.engine_log.read_text(errors="replace")
        except OSError:
            return ""

    def engine_log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.engine_log_text().splitlines()[-lines:]) or "<no engine log>"

    def status(self) -> dict[str, Any]:
        """The agent's status document (``/v1/status``)."""
        with self.agent.client(timeout_s=5.0) as c:
            doc: dict[str, Any] = c.stats()
            return doc

    def engine_status(self) -> dict[str, Any]:
        try:
            engine: dict[str, Any] = self.status()["engine"]
            return engine
        except Exception:
            return {}

    def pool(self) -> dict[str, Any]:
        pool: dict[str, Any] = self.status()["pool"] or {}
        return pool

    def agent_metrics(self) -> Metrics:
        return Metrics.fetch(f"{self.agent.http_url}/metrics")

    def vllm_metrics(self) -> Metrics:
        return Metrics.fetch(f"{self.url}/metrics")


class Metrics:
    """A Prometheus text page; ``value(name, **labels)`` sums the matching samples."""

    def __init__(self, samples: list[tuple[str, dict[str, str], float]]) -> None:
        self.samples = samples

    @classmethod
    def fetch(cls, url: str, timeout_s: float = 10.0) -> Metrics:
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(url, timeout=timeout_s).text
        return cls([(s.name, dict(s.labels), float(s.value))
                    for fam in text_string_to_metric_families(text) for s in fam.samples])

    def value(self, name: str, **labels: str) -> float:
        return sum(v for n, lab, v in self.samples
                   if n == name and all(lab.get(k) == want for k, want in labels.items()))
