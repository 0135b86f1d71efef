"""Worker registry and P/D routing policies, used by ``pdx-proxy``.

* ``messages``: the agent -> proxy announcement (registration and heartbeat) and its wire rules.
* ``summary``: the Bloom filter of held chunk keys carried in an announcement.
* ``registry``: the proxy's workers, their health, load and cache hints.
* ``policies`` / ``cache_aware``: routing policies, chosen by name via ``POLICIES``.
* ``tokenizer``: text -> token ids for cache-aware routing.

Nothing here does I/O or imports an HTTP library; the proxy (``proxy/``) does that.
"""
