"""Checks shared by the library's validators (one-line ``ValueError``s): integer bounds, and the
"did you mean" hint for an unknown name."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def int_in(value: object, low: int, high: int | None = None) -> bool:
    """Whether ``value`` is an integer (not a bool) in ``low..high`` (no upper bound for ``None``)."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value and (high is None or value <= high)


def check_int(name: str, value: object, low: int = 1, high: int | None = None) -> None:
    """``ValueError`` naming ``name`` and the allowed range unless :func:`int_in` holds."""
    if not int_in(value, low, high):
        allowed = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")


def did_you_mean(name: object, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``known`` to ``name``, or ``""``."""
    hint = difflib.get_close_matches(str(name), list(known), n=1)
    return f" (did you mean {hint[0]!r}?)" if hint else ""
