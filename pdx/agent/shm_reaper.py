"""Reap the POSIX shared-memory segments a crashed engine leaves in ``/dev/shm``.

vLLM's shared-memory broadcast queue (``multiprocessing.shared_memory``, named
``psm_<hex>``, 160-240 MiB) is unlinked by vLLM on a clean exit only; an engine
killed with SIGKILL leaves it behind, and a few restarts fill ``/dev/shm``. The
agent that supervised the engine is the one process that can tell which segments
were the engine's, so it reaps them.

Ownership must be exact (other engines, other agents and other users share
``/dev/shm``). A segment is the engine's when all of these hold:

* its name starts with ``psm_`` (what ``multiprocessing`` names them; pdx's own pools
  are named otherwise and are never touched);
* it did not exist when the engine was launched (``EngineShm.__init__`` lists
  ``/dev/shm`` then);
* the engine or one of its descendants mapped it (``scan`` reads ``/proc/<pid>/maps``
  of each; the supervisor calls it every second during the engine's first minute, when
  vLLM makes its queues, then every 10 s);
* the agent itself does not map it.

``reap`` runs after the engine has exited: it unlinks such a segment only if it still
exists, still has the same inode, and no live process maps it any more.

Called from the agent's engine supervisor thread only (not thread-safe); Linux ``/proc``.
Every step is bounded by the number of processes; nothing waits.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("pdx.agent.engine")

SHM_DIR = Path("/dev/shm")
#: the prefix of segments ``multiprocessing.shared_memory`` creates (vLLM's broadcast queues)
ENGINE_SHM_PREFIX = "psm_"


def _mapped_shm(pid: int, shm_dir: Path) -> set[str]:
    """Names of the ``shm_dir`` files that process ``pid`` maps (empty if it is gone)."""
    prefix = str(shm_dir).rstrip("/") + "/"
    out: set[str] = set()
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                at = line.find(prefix)
                if at >= 0:
                    name = line[at + len(prefix):].rstrip("\n").removesuffix(" (deleted)")
                    if "/" not in name:
                        out.add(name)
    except OSError:
        pass
    return out


def _tree_pids(pid: int) -> list[int]:
    """``pid`` and its live descendants (``/proc/<pid>/task/<tid>/children``), at most 4096."""
    out: list[int] = []
    todo = [pid]
    while todo and len(out) < 4096:
        p = todo.pop()
        out.append(p)
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children", encoding="ascii") as f:
                    todo.extend(int(c) for c in f.read().split())
            except (OSError, ValueError):
                continue
    return out


def _all_pids() -> list[int]:
    return [int(e.name) for e in os.scandir("/proc") if e.name.isdigit()]


class EngineShm:
    """The shared-memory segments of one engine launch; see the module docstring."""

    def __init__(self, shm_dir: Path = SHM_DIR, prefix: str | tuple[str, ...] = ENGINE_SHM_PREFIX,
                 before: set[str] | None = None) -> None:
        """``before``: names known not to be the engine's (default: what ``shm_dir`` holds now, the
        right thing before a launch; an empty set for an engine that is already running)."""
        self.shm_dir = shm_dir
        self.prefix = prefix
        if before is not None:
            self._before = set(before)
        else:
            try:
                self._before = {n for n in os.listdir(shm_dir) if n.startswith(prefix)}
            except OSError:
                self._before = set()
        self.owned: dict[str, int] = {}  # name -> inode seen while the engine mapped it

    def scan(self, engine_pid: int) -> None:
        """Record the new ``psm_*`` segments the engine and its descendants map now."""
        mine = _mapped_shm(os.getpid(), self.shm_dir)
        for pid in _tree_pids(engine_pid):
            for name in _mapped_shm(pid, self.shm_dir):
                if (name.startswith(self.prefix) and name not in self._before and name not in mine
                        and name not in self.owned):
                    try:
                        self.owned[name] = (self.shm_dir / name).stat().st_ino
                    except OSError:
                        continue  # already unlinked (vLLM does so once every process attached)

    def reap(self) -> list[str]:
        """After the engine exited: unlink its segments that are left and mapped by no process.
        Returns the names unlinked."""
        if not self.owned:
            return []
        left = {}
        for name, ino in self.owned.items():
            try:
                if (self.shm_dir / name).stat().st_ino == ino:
                    left[name] = ino
            except OSError:
                pass
        if left:
            for pid in _all_pids():
                left = {n: i for n, i in left.items() if n not in _mapped_shm(pid, self.shm_dir)}
                if not left:
                    break
        reaped = []
        for name in left:
            try:
                (self.shm_dir / name).unlink()
            except OSError as exc:
                log.warning("cannot remove the engine's shared memory %s: %s", name, exc.strerror)
                continue
            reaped.append(name)
        if reaped:
            log.info("removed shared memory the engine left behind: %s", ", ".join(sorted(reaped)))
        self.owned.clear()
        return reaped
