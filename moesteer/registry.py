"""Name tables: strategies, model families, tasks, verifiers, answer extractors, C3PO kernels.

A :class:`Registry` maps a name to an object, or to a ``"module:attr"`` string that is imported on
first use (so a table can list what it does not yet import). An unknown name is one line with a
"did you mean" hint and the names there are.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

from moesteer.checks import did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """Names of one ``kind`` (``"strategy"``, ``"task"`` ...); iterates in registration order."""

    def __init__(self, kind: str, entries: Mapping[str, T | str] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, T | str] = dict(entries or {})

    def register(self, name: str, entry: T | str, *, replace: bool = False) -> None:
        """Add ``entry`` (or a lazy ``"module:attr"``) as ``name``; a taken name needs ``replace=True``."""
        if name in self._entries and not replace:
            raise ValueError(f"{self.kind} {name!r} is already registered; pass replace=True to replace it")
        self._entries[name] = entry

    def get(self, name: str) -> T:
        """The entry called ``name``, imported if lazy; a one-line "did you mean" ``ValueError`` if unknown."""
        if name not in self._entries:
            raise ValueError(self.unknown(name))
        entry = self._entries[name]
        if isinstance(entry, str):
            module, attr = entry.split(":")
            entry = self._entries[name] = getattr(importlib.import_module(module), attr)
        return entry

    __getitem__ = get

    def unknown(self, name: object) -> str:
        """The message for a name that is not registered."""
        return f"unknown {self.kind} {name!r}{did_you_mean(name, self._entries)}; known: {', '.join(self.names())}"

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)
