"""What a controller is handed besides the engine: the task's extractor, shared resources, a cost ledger.

An eval builds one :class:`RunContext` per run: controllers vote with the task's own extractor (the
same one the runner's ``--n`` vote uses), load verifiers and embedding models once through
``resources``, and add what they spend beyond forward passes (backward passes, verifier calls, time
per phase) to each completion's ``cost`` with :class:`CostLedger`. Called without an eval, a
controller gets an empty context: GSM8K-style extraction and a private resource cache.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from moesteer.answers import Extractor


class Resources:
    """Objects loaded once and shared for the life of an eval, by key (``get(key, factory)``)."""

    def __init__(self) -> None:
        self._items: dict[str, Any] = {}

    def get(self, key: str, factory: Callable[[], Any]) -> Any:
        if key not in self._items:
            self._items[key] = factory()
        return self._items[key]

    def __contains__(self, key: str) -> bool:
        return key in self._items


@dataclass
class CostLedger:
    """Counters beyond a completion's forward passes and token rows: ``backward_passes``,
    ``verifier_calls``, ``rebuild_passes``, ``seconds:<phase>``, ... Merged into ``Completion.cost``."""

    counts: Counter = field(default_factory=Counter)

    def add(self, name: str, amount: float = 1) -> None:
        self.counts[name] += amount

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a block into ``seconds:<name>``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.counts[f"seconds:{name}"] += time.perf_counter() - start

    def as_dict(self) -> dict[str, float]:
        return dict(self.counts)


@dataclass
class RunContext:
    """A controller's view of the run it is part of. ``extract`` maps a completion's text to its
    answer (``None``: the controller's own default); ``resources`` is shared across calls."""

    extract: Extractor | None = None
    resources: Resources = field(default_factory=Resources)
