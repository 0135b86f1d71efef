"""A disk that stops taking writes mid-file degrades to misses with one warning.

Filling a real disk is not an option, so a child process runs the store under
``RLIMIT_FSIZE`` smaller than one chunk file: every write fails part-way with
``EFBIG`` (SIGXFSZ ignored), as a full disk fails with ``ENOSPC``. The child
reports what it saw as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

CHILD = textwrap.dedent("""
    import json, logging, resource, signal, sys
    from pathlib import Path

    from pdx.config import DiskConfig, L1Config, StoreConfig
    from pdx.keys import ChunkKey
    from pdx.store import ChunkStore

    records = []
    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())
    logging.getLogger("pdx.store").addHandler(Keep())
    logging.getLogger("pdx.store").setLevel(logging.WARNING)

    data_dir = Path(sys.argv[1])
    cfg = StoreConfig(l1=L1Config(capacity=4 * 65536),
                      disk=DiskConfig(enabled=True, write="evicted"))
    store = ChunkStore(cfg, 65536, "0123456789abcdef", data_dir)
    # after the pool exists (the limit applies to shared memory too)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, 32 * 1024))
    keys = [ChunkKey(i.to_bytes(16, "little")) for i in range(8)]
    for i, k in enumerate(keys):
        store.put(k, bytes([i]) * 65536)  # the first four are evicted to the failing disk
    flushed = store.flush(10)
    lookup = [t.value if t else None for t in store.lookup(keys).tiers]
    pins = store.get(keys[:4])
    m = store.metrics
    out = {
        "flushed": flushed,
        "lookup": lookup,
        "pins": [p is not None for p in pins],
        "drops": m.value("pdx_store_write_drops_total", {"tier": "disk"}),
        "errors": m.value("pdx_store_tier_errors_total", {"tier": "disk"}),
        "warnings": [r for r in records if "not written to disk" in r],
        "leftovers": sorted(p.name for p in data_dir.rglob("*") if p.is_file()),
    }
    store.close()
    print(json.dumps(out))
""")


def test_writes_failing_mid_file_are_dropped_with_one_warning(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["flushed"] is True
    assert out["lookup"] == [None] * 4 + ["l1"] * 4  # nothing reached the disk index
    assert out["pins"] == [False] * 4  # misses, not exceptions
    assert out["drops"] == 4 and out["errors"] == 4
    assert len(out["warnings"]) == 1 and "File too large" in out["warnings"][0]
    assert out["leftovers"] == []  # half-written temporary files were removed
