"""``pdx-agent``: the daemon beside each engine worker, and the client that talks to it.

* ``pdx.agent.client.AgentClient``: what the connector (and tests, benches, peer agents) use.
* ``pdx.agent.server.AgentServer``: the daemon (store, transport, jobs, control plane).
* ``pdx.agent.cli``: the ``pdx-agent`` command (daemon + HTTP + engine supervisor + announcements).

See docs/agent.md.
"""

from pdx.agent.client import AgentClient

__all__ = ["AgentClient"]
