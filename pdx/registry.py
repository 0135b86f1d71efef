"""A small registry of named implementations, imported lazily.

Transports, store tiers, eviction policies and routing policies are chosen by name
in configs. Each registry maps a name to ``"module:attribute"`` so that an optional
dependency (nixl, ucxx, redis, triton) is imported only when that name is asked
for, never at ``import pdx``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Generic, TypeVar

from pdx.errors import BackendUnavailable, UnknownName

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> lazily imported object (usually a class).

    ``install`` is the command that provides the optional dependency a name
    needs; it goes into the ``BackendUnavailable`` error when the import fails.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._targets: dict[str, tuple[str, str | None]] = {}

    def add(self, name: str, target: str, install: str | None = None) -> None:
        if name in self._targets:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._targets[name] = (target, install)

    def names(self) -> list[str]:
        return sorted(self._targets)

    def __contains__(self, name: object) -> bool:
        return name in self._targets

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> T:
        """Import and return the object registered under ``name``.

        Raises ``UnknownName`` listing the known names, or ``BackendUnavailable``
        with the install command when the optional library is missing.
        """
        try:
            target, install = self._targets[name]
        except KeyError:
            raise UnknownName(
                f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}"
            ) from None
        module_name, _, attr = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            hint = f"; install it with: {install}" if install else ""
            raise BackendUnavailable(
                f"{self.kind} {name!r} is unavailable ({exc}){hint}"
            ) from exc
        obj: T = getattr(module, attr)
        return obj

    def available(self) -> list[str]:
        """Names whose imports succeed on this host."""
        out = []
        for name in self.names():
            try:
                self.get(name)
            except BackendUnavailable:
                continue
            out.append(name)
        return out
