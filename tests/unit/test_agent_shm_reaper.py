"""The agent's engine supervision: an engine killed with SIGKILL leaves no ``psm_*`` segment of
its own in /dev/shm (and no one else's is touched); the user's core binding is respected."""

from __future__ import annotations

import mmap
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdx.agent.launcher import EngineState, EngineSupervisor, engine_command
from pdx.config import EngineConfig

SHM = Path("/dev/shm")
VLLM = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "m"]

pytestmark = pytest.mark.skipif(not SHM.is_dir() or not Path("/proc/self/maps").exists(),
                                reason="needs Linux /dev/shm and /proc")

# The stand-in engine: it maps segments the way vLLM's broadcast queue does (create, map, keep
# open; never unlinked because it dies by SIGKILL), and so does a child in its process group.
ENGINE = r"""
import mmap, os, subprocess, sys, time
import _posixshmem
def make(name, attach=False):
    flags = os.O_RDWR if attach else os.O_CREAT | os.O_EXCL | os.O_RDWR
    fd = _posixshmem.shm_open("/" + name, flags, 0o600)
    if not attach:
        os.ftruncate(fd, 4096)
    return mmap.mmap(fd, 4096)
own, child_own, theirs, ready = sys.argv[1:5]
maps = [make(own), make(theirs, attach=True)]
child = subprocess.Popen([sys.executable, "-c", "import sys, time\n" + sys.argv[5] + "\nm = make(sys.argv[1])\n"
                          "open(sys.argv[2], 'w').write('ok')\ntime.sleep(60)", child_own, ready + ".child"])
while not os.path.exists(ready + ".child"):
    time.sleep(0.01)
open(ready, "w").write("ok")
time.sleep(60)
"""
MAKE_SRC = ENGINE.split("def make", 1)[1].split("own, child_own", 1)[0]


def _create(name: str) -> mmap.mmap:
    import _posixshmem

    fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.ftruncate(fd, 4096)
    m = mmap.mmap(fd, 4096)
    os.close(fd)
    return m


@pytest.fixture
def names() -> Iterator[dict[str, str]]:
    tag = f"psm_fleettest{os.getpid()}"
    got = {k: f"{tag}_{k}" for k in ("own", "child", "theirs", "later", "agent")}
    yield got
    for n in got.values():
        (SHM / n).unlink(missing_ok=True)


def test_engine_killed_with_sigkill_leaves_none_of_its_segments(tmp_path: Path, names: dict[str, str]) -> None:
    theirs = _create(names["theirs"])  # exists before the launch; the engine attaches to it
    agent_own = _create(names["agent"])  # mapped by the agent itself (like its pool)
    ready = tmp_path / "ready"
    argv = [sys.executable, "-c", ENGINE, names["own"], names["child"], names["theirs"], str(ready),
            "import os, mmap, _posixshmem\ndef make" + MAKE_SRC]
    sup = EngineSupervisor(argv, dict(os.environ), EngineConfig(restart=False), tmp_path / "engine.log")
    sup.start()
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and sup.running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ready.exists(), (tmp_path / "engine.log").read_text()
        later = _create(names["later"])  # created after the launch by someone else
        # the supervisor notices what the engine maps (it scans about once a second)
        while set(sup._shm.owned) != {names["own"], names["child"]} and time.monotonic() < deadline:
            time.sleep(0.05)
        assert set(sup._shm.owned) == {names["own"], names["child"]}
        os.kill(sup.status().pid, signal.SIGKILL)
        while sup.status().state is not EngineState.FAILED and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sup.status().state is EngineState.FAILED
        assert not (SHM / names["own"]).exists() and not (SHM / names["child"]).exists()
        for kept in ("theirs", "later", "agent"):
            assert (SHM / names[kept]).exists(), kept
    finally:
        sup.stop()
        for m in (theirs, agent_own):
            m.close()
        if "later" in locals():
            later.close()


def test_clean_stop_leaves_segments_alone_that_are_still_in_use(tmp_path: Path, names: dict[str, str]) -> None:
    """A segment the engine mapped but another live process still maps is not removed."""
    ready = tmp_path / "ready"
    argv = [sys.executable, "-c", ENGINE, names["own"], names["child"], names["theirs"], str(ready),
            "import os, mmap, _posixshmem\ndef make" + MAKE_SRC]
    theirs = _create(names["theirs"])
    sup = EngineSupervisor(argv, dict(os.environ), EngineConfig(restart=False, stop_timeout_s=5),
                           tmp_path / "engine.log")
    sup.start()
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        while len(sup._shm.owned) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        # someone else attaches to the engine's own segment
        import _posixshmem

        fd = _posixshmem.shm_open("/" + names["own"], os.O_RDWR, 0)
        keep = mmap.mmap(fd, 4096)
        os.close(fd)
        sup.stop()  # the stand-in ignores nothing: SIGTERM kills it without cleanup
        assert (SHM / names["own"]).exists()  # still mapped here: not removed
        assert not (SHM / names["child"]).exists()
        keep.close()
    finally:
        sup.stop()
        theirs.close()


def test_user_core_binding_is_respected_unless_the_config_says_otherwise(tmp_path: Path) -> None:
    def bind(base: dict[str, str], cfg_env: dict[str, str]) -> str:
        _, env = engine_command(VLLM, role="decode", control_address="a", request_timeout_s=1,
                                config=EngineConfig(env=cfg_env), run_dir=tmp_path / "run", base_env=base)
        return env["VLLM_CPU_OMP_THREADS_BIND"]

    assert bind({"VLLM_CPU_OMP_THREADS_BIND": "0-1"}, {}) == "0-1"
    assert bind({"VLLM_CPU_OMP_THREADS_BIND": "0-1"}, {"VLLM_CPU_OMP_THREADS_BIND": "1"}) == "1"
    assert bind({}, {}) == "auto"
