"""``pdx-proxy``: the OpenAI-compatible endpoint in front of prefill and decode workers.

* ``app``: the HTTP service (``ProxyServer``) and request validation.
* ``flow``: the P/D flow of one request: route, prefill, decode, stream, retry, abort.
* ``admission``: the bounded in-flight slots and queue (429/503 with Retry-After).
* ``health``: the health loop that moves workers in and out of the pool.
* ``upstream``: the lean keep-alive HTTP/1.1 client for the calls to the workers.
* ``metrics``: Prometheus metrics in a per-proxy registry.
* ``standin``: a stand-in OpenAI worker, the fake backend of the tests and the bench.
* ``testing``: stand-ins plus a proxy on a background loop, for synchronous tests.
* ``cli``: the ``pdx-proxy`` command.

Routing decisions live in ``pdx.scheduler``; this package does the HTTP.
"""
