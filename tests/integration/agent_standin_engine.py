"""A stand-in engine for the agent's supervision tests (not a test module).

Run by ``pdx-agent ... -- python agent_standin_engine.py``: it finds its agent
through ``PDX_AGENT_ADDRESS``, registers a small KV layout, writes and commits
``STANDIN_CHUNKS`` chunks (keys and bytes depend on its generation: how many
times it ran before in ``STANDIN_DIR``) into the agent's pool, records what it
did in ``STANDIN_DIR/engine-<generation>.json``, then idles until killed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import xxhash

from pdx.agent.client import AgentClient
from pdx.checksum import checksum
from pdx.errors import AgentUnavailable
from pdx.layout import KVDtype, KVLayout
from pdx.store.pool import attach

LAYOUT = KVLayout("standin", KVDtype.FP32, num_layers=2, num_kv_heads=2, head_size=32, block_size=16)


def key(generation: int, i: int) -> bytes:
    return xxhash.xxh3_128_digest(f"standin/{generation}/{i}".encode())


def main() -> int:
    out = Path(os.environ["STANDIN_DIR"])
    n = int(os.environ.get("STANDIN_CHUNKS", "4"))
    generation = len(list(out.glob("engine-*.json")))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    client = AgentClient(os.environ["PDX_AGENT_ADDRESS"], timeout_s=2.0)
    deadline = time.monotonic() + 30
    while True:
        try:
            reg = client.register_engine(LAYOUT, pid=os.getpid())
            break
        except AgentUnavailable:
            if time.monotonic() > deadline:
                raise
    pool = attach(reg.shm_name)
    keys = [key(generation, i) for i in range(n)]
    rng = np.random.default_rng(generation)
    res = client.reserve(keys, reg.chunk_bytes)
    sums = []
    for r in res:
        arr = pool.array(r.offset, r.nbytes)
        arr[:] = rng.integers(0, 256, r.nbytes, dtype=np.uint8)
        sums.append(checksum(memoryview(arr)))
        del arr
    errors = client.commit([r.id for r in res], reg.chunk_tokens, sums)
    record = {"pid": os.getpid(), "generation": generation, "created": reg.created, "shm_name": reg.shm_name,
              "keys": [k.hex() for k in keys], "checksums": sums, "errors": [e.msg for e in errors if not e.ok]}
    tmp = out / f".engine-{generation}.tmp"
    tmp.write_text(json.dumps(record))
    tmp.replace(out / f"engine-{generation}.json")
    while True:
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
