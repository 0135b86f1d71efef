"""Another process maps the L1 pool by name and reads/writes chunks in place.

The agent process (this test) owns every piece of metadata; the child process
plays the engine's connector: it only touches bytes at the offsets it is given.
"""

from __future__ import annotations

import select
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import numpy as np
import pytest

from pdx.checksum import checksum
from pdx.config import L1Config, StoreConfig
from pdx.errors import ReservationError, StoreError
from pdx.keys import ChunkKey
from pdx.store import ChunkStore, attach

pytestmark = pytest.mark.integration

SLAB = 64 * 1024
FP = "0123456789abcdef"

# argv: pool name, offset, nbytes, seed, mode ("write", "write-and-hang", "read")
CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    from pdx.checksum import checksum
    from pdx.store.pool import attach

    name, offset, nbytes, seed, mode = sys.argv[1], *map(int, sys.argv[2:5]), sys.argv[5]
    pool = attach(name)
    view = pool.array(offset, nbytes)
    if mode == "read":
        print(checksum(view.tobytes()), flush=True)
    else:
        view[:] = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
        print(checksum(view), flush=True)
        if mode == "write-and-hang":
            time.sleep(60)  # killed before it can ask for a commit
    del view
    pool.close()
""")


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def key(i: int) -> ChunkKey:
    return ChunkKey(i.to_bytes(16, "little"))


def run_child(*args: object, timeout: float = 60) -> str:
    out = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> Iterator[ChunkStore]:
    cfg = StoreConfig(l1=L1Config(capacity=2 * SLAB, reservation_timeout_s=5.0))
    s = ChunkStore(cfg, SLAB, FP, clock=clock)
    yield s
    s.close()


def test_child_writes_in_place_and_parent_commits(store: ChunkStore) -> None:
    res = store.reserve(key(1), SLAB - 100)
    reported = int(run_child(store.pool_name, res.offset, res.nbytes, 7, "write"))
    info = store.commit(res.id, checksum=reported)  # verified against the slab bytes
    expected = np.random.default_rng(7).integers(0, 256, SLAB - 100, dtype=np.uint8).tobytes()
    assert info.checksum == checksum(expected)
    (pin,) = store.pin([key(1)])
    assert pin is not None and bytes(store.view(pin)) == expected
    # ... and a child reads the pinned chunk in place
    assert int(run_child(store.pool_name, pin.offset, pin.nbytes, 0, "read")) == pin.checksum
    store.unpin(pin.lease_id)


def test_child_exit_does_not_unlink_the_pool(store: ChunkStore) -> None:
    res = store.reserve(key(2), 1000)
    run_child(store.pool_name, res.offset, res.nbytes, 1, "write")
    run_child(store.pool_name, res.offset, res.nbytes, 0, "read")
    again = attach(store.pool_name)  # still there after two children came and went
    again.close()


def test_reservation_of_a_killed_writer_is_reclaimed(store: ChunkStore, clock: FakeClock) -> None:
    res = store.reserve(key(3), SLAB)
    child = subprocess.Popen([sys.executable, "-c", CHILD, store.pool_name, str(res.offset),
                              str(res.nbytes), "3", "write-and-hang"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([child.stdout], [], [], 60)
        assert ready, "child did not write in time"
        assert child.stdout is not None and child.stdout.readline().strip()
    finally:
        child.kill()  # SIGKILL by PID: no chance to commit or abort
        child.wait(timeout=10)
    # Only two slabs: the abandoned one is still held until its reservation expires.
    store.put(key(4), b"x" * 10)
    store.pin([key(4)], lease_s=1000)
    with pytest.raises(StoreError, match="pool full"):
        store.reserve(key(5), 10)
    clock.t += 5.0
    res5 = store.reserve(key(5), 10)  # reaped: the slab is usable again
    assert res5.slab == res.slab
    with pytest.raises(ReservationError):
        store.commit(res.id)
    assert store.lookup([key(3)]).prefix_chunks == 0
    assert store.metrics.value("pdx_store_expired_reservations_total") == 1


def test_attach_refuses_what_is_not_a_pool() -> None:
    with pytest.raises(StoreError, match="no pdx pool named"):
        attach("pdx-no-such-pool-for-sure")


OWNER = textwrap.dedent("""
    import time
    from pdx.store.pool import SlabPool
    pool = SlabPool(4096, 4)
    print(pool.name, flush=True)
    time.sleep(60)
""")


def test_pool_of_a_crashed_owner_is_swept_by_the_next_store(clock: FakeClock) -> None:
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([owner.stdout], [], [], 60)
        assert ready and owner.stdout is not None
        name = owner.stdout.readline().strip()
        live = ChunkStore(StoreConfig(l1=L1Config(capacity=SLAB)), SLAB, FP, clock=clock)
        live.close()
        attach(name).close()  # a live owner's pool is left alone
    finally:
        owner.kill()
        owner.wait(timeout=10)
    attach(name).close()  # the owner died: its segment is still there...
    s = ChunkStore(StoreConfig(l1=L1Config(capacity=SLAB)), SLAB, FP, clock=clock)
    s.close()
    with pytest.raises(StoreError, match="no pdx pool"):  # ...until the next store sweeps it
        attach(name)
