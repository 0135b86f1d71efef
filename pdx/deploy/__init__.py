"""Deployment harnesses: ``pdx up/demo/down`` and the helpers that run real agents and engines.

``cli`` is the ``pdx`` command; ``deployment`` a whole local deployment (proxy + agents +
vLLM); ``agent_engine`` one vLLM under its own ``pdx-agent``; ``process`` one ``pdx-agent``
child process. Tests, benches and ``pdx up`` use them; nothing else in ``pdx/`` or ``proxy/``
imports this package (tests/unit/test_import_rules.py checks it): arrows point inward.
"""

from pdx.deploy.deployment import DeployConfig, Deployment, WorkerSpec, read_state, stop_running

__all__ = ["DeployConfig", "Deployment", "WorkerSpec", "read_state", "stop_running"]
