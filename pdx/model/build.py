"""Build the embedded model on first use and cache it: ``ensure_model("tiny") -> Path``.

Layout of the cache: ``<data dir>/models/<name>-<spec hash>/`` holding ``config.json``,
``model.safetensors``, the tokenizer files and ``pdx-model.json`` (the spec and the
sha256 of every file). A folder without ``pdx-model.json`` is never used.

Concurrency: the build runs in ``.tmp-<folder>-<pid>`` under an exclusive ``flock`` on
``.<folder>.lock`` and is published with one ``rename``, so readers see either nothing
or the complete folder, and two processes asking at once build it once. Blocking; the
lock wait has a timeout. Safe to call from several threads and processes.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from pdx.config import data_dir
from pdx.errors import ModelError
from pdx.model import tokenizer, weights
from pdx.model.spec import BUILD_VERSION, ModelSpec, preset

MANIFEST = "pdx-model.json"
DEFAULT_LOCK_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class BuiltModel:
    """A model folder ready for vLLM (``--model path``) and ``AutoTokenizer``."""

    spec: ModelSpec
    path: Path
    vocab_size: int
    num_params: int
    files: dict[str, str]  # file name -> sha256


def models_dir(root: str | os.PathLike[str] = "") -> Path:
    """``<data dir>/models``; ``root`` overrides the data dir (see ``pdx.config.data_dir``)."""
    return data_dir(root) / "models"


def model_path(spec: ModelSpec | str, root: str | os.PathLike[str] = "") -> Path:
    """Where ``spec`` is (or will be) cached. Does not build."""
    s = preset(spec) if isinstance(spec, str) else spec
    return models_dir(root) / s.folder_name


def load(path: Path) -> BuiltModel:
    """Read the manifest of a built model folder; ``ModelError`` if it is not one."""
    try:
        info = json.loads((path / MANIFEST).read_text())
        spec = ModelSpec(**info["spec"])
        return BuiltModel(spec=spec, path=path, vocab_size=int(info["vocab_size"]),
                          num_params=int(info["num_params"]), files=dict(info["files"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{path} is not a complete pdx model folder: {exc}") from exc


def verify(model: BuiltModel) -> None:
    """Re-hash every file against the manifest; ``ModelError`` naming the first mismatch."""
    for name, digest in model.files.items():
        if _sha256(model.path / name) != digest:
            raise ModelError(f"{model.path / name}: contents do not match the manifest; "
                             "delete the folder to rebuild it")


def ensure_model(spec: ModelSpec | str = "tiny", root: str | os.PathLike[str] = "",
                 lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> BuiltModel:
    """Return the cached model for ``spec`` (a preset name or a spec), building it if needed."""
    s = preset(spec) if isinstance(spec, str) else spec
    final = model_path(s, root)
    if (final / MANIFEST).is_file():
        return load(final)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _FileLock(parent / f".{final.name}.lock", lock_timeout_s):
        if (final / MANIFEST).is_file():  # another process built it while we waited
            return load(final)
        if final.exists():  # left by something else: never half-trust a folder
            shutil.rmtree(final)
        # Holding the lock, any temp folder for this model is a crashed build's leftover.
        for stale in parent.glob(f".tmp-{final.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = parent / f".tmp-{final.name}-{os.getpid()}"
        tmp.mkdir()
        try:
            build_into(s, tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return load(final)


def build_into(spec: ModelSpec, folder: Path) -> None:
    """Write the whole model into an existing empty ``folder`` (no lock, not atomic)."""
    try:
        special = tokenizer.save(spec, folder)
        num_params = weights.save(spec, folder, spec.vocab_size, special)
    except ModelError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"building model {spec.name!r} failed: {exc}") from exc
    for p in folder.iterdir():
        p.chmod(0o644)  # safetensors writes 0600; the cache is read by agents and engines alike
    files = {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}
    manifest = {"spec": spec.to_dict(), "build_version": BUILD_VERSION, "vocab_size": spec.vocab_size,
                "num_params": num_params, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _FileLock:
    """Exclusive ``flock`` with a deadline (polls every 50 ms). Released on process death."""

    def __init__(self, path: Path, timeout_s: float) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self._fd = -1

    def __enter__(self) -> _FileLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise ModelError(f"cannot lock {self.path}: {exc.strerror}") from exc
            if time.monotonic() >= deadline:
                os.close(fd)
                raise ModelError(f"timed out after {self.timeout_s:.0f}s waiting for another process "
                                 f"building the model (lock {self.path})")
            time.sleep(0.05)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1
