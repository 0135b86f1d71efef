"""The UCX environment pdx sets before NIXL or ucxx loads UCX (see docs/transport-rdma.md).

The NIXL wheel vendors its own libibverbs and libnl (renamed copies). Its UCX
module ``libuct_ib_efa`` also needs the system's ``libefa.so.1`` (Debian's
``ibverbs-providers``, present on most RDMA hosts), which brings the system's
``libibverbs.so.1`` and ``libnl-route-3.so.200`` in beside the vendored copies.
Both copies register the same netlink traffic-control ops, and at process exit
``_dl_fini`` runs ``rtnl_tc_unregister`` of the vendored copy on a list the
other copy changed: every process that loaded NIXL segfaults (exit 139) after
its work is done. Keeping only UCX's EFA module out (``UCX_MODULES=^efa``)
avoids the second copy; InfiniBand/RoCE (``ib``, ``mlx5``) stay loaded and
usable. A ``UCX_MODULES`` the user set is left as it is.

Called by ``load_nixl`` / ``load_ucxx`` before the import, and by code that
starts processes which may load NIXL (``child_env``). Must run before UCX reads
its configuration, i.e. before the first NIXL agent or UCX context exists.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

#: UCX modules kept out by default: the one whose dependencies clash with the NIXL wheel's.
UCX_MODULES_DEFAULT = "^efa"


def prepare(environ: MutableMapping[str, str] | None = None) -> None:
    """Set ``UCX_MODULES`` (unless set) and ``UCX_WARN_UNUSED_ENV_VARS`` in ``environ`` (default ``os.environ``)."""
    env = os.environ if environ is None else environ
    env.setdefault("UCX_MODULES", UCX_MODULES_DEFAULT)
    env.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")


def child_env(base: MutableMapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """A copy of ``base`` (default ``os.environ``) prepared for a child process that may load UCX."""
    env = dict(os.environ if base is None else base)
    env.update(extra)
    prepare(env)
    return env
