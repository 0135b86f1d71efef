"""The credentials of one local deployment: the agents' shared secret and the proxy's keys.

``Deployment.start`` (``pdx up``) calls ``prepare`` before it starts anything. It writes, in
the deployment's folder and with mode 0600 (owner only):

- ``secret``: a fresh random deployment secret. Every agent gets its path as
  ``transport.secret_file``: agents that hold it authenticate each other; nothing else does.
- ``api_key``: the key clients of the proxy's OpenAI endpoints send (``proxy.api_key`` when the
  deployment config sets one, else a fresh random one), so the proxy is never open by default.

The proxy's ``admin_key`` (agents' announcements, ``/admin/...``) is ``proxy.admin_key`` when set,
else a fresh random key, never the api key: a client must not be able to register a worker. It
reaches the proxy and the agents only inside their config files, which are owner-only too.
``remove`` deletes the files again (``Deployment.stop``). Raises ``OSError`` when the folder is
not writable.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

SECRET_FILE = "secret"
API_KEY_FILE = "api_key"


@dataclass(frozen=True)
class Credentials:
    secret_file: Path
    api_key_file: Path
    api_key: str
    admin_key: str


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (0600), whatever was there before,
    and never visible with looser permissions, even for a moment."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode is masked by the umask; an old tmp file kept its own
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def prepare(folder: Path, api_key: str = "", admin_key: str = "") -> Credentials:
    """Generate this deployment's secret (always fresh) and settle the proxy's keys."""
    folder.mkdir(parents=True, exist_ok=True)
    creds = Credentials(secret_file=folder / SECRET_FILE, api_key_file=folder / API_KEY_FILE,
                        api_key=api_key or secrets.token_urlsafe(24),
                        admin_key=admin_key or secrets.token_urlsafe(24))
    write_private(creds.secret_file, secrets.token_hex(32) + "\n")
    write_private(creds.api_key_file, creds.api_key + "\n")
    return creds


def remove(creds: Credentials) -> None:
    for path in (creds.secret_file, creds.api_key_file):
        path.unlink(missing_ok=True)
