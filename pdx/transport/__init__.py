"""Transports: one interface (``pdx.transport.base``), one module per backend.

``create("tcp", config, fingerprint)`` imports the backend lazily; a backend
whose library is missing raises ``BackendUnavailable`` with the install command.
"""

from __future__ import annotations

from pdx.config import TransportConfig
from pdx.registry import Registry
from pdx.transport.base import Transport

TRANSPORTS: Registry[type[Transport]] = Registry("transport")
TRANSPORTS.add("tcp", "pdx.transport.tcp:TcpTransport")
TRANSPORTS.add("shm", "pdx.transport.shm:ShmTransport")
TRANSPORTS.add("nixl", "pdx.transport.nixl:NixlTransport", install="pip install 'pdx[nixl]' && pip install --no-deps nixl==1.5.1")
TRANSPORTS.add("ucx", "pdx.transport.ucx:UcxTransport", install="pip install 'pdx[ucx]'")
TRANSPORTS.add("cuda_ipc", "pdx.transport.cuda_ipc:CudaIpcTransport", install="pip install torch (a CUDA build) on a machine with an NVIDIA GPU")


def create(name: str, config: TransportConfig, fingerprint: str) -> Transport:
    """Instantiate backend ``name``. Raises ``UnknownName`` or ``BackendUnavailable``."""
    cls = TRANSPORTS.get(name)
    return cls(config, fingerprint)
