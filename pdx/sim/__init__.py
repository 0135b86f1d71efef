"""``pdx sim``: a discrete-event simulation of a P/D fleet over a request trace.

* ``cost``: the cost model (prefill, loads, transfers, decode steps) and its presets;
* ``fleet``: each simulated worker's store and the shared tier;
* ``engine``: the event loop that drives pdx's real registry, routing and eviction code;
* ``cli``: the ``pdx sim`` command.
"""
