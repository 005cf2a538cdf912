"""Checks shared by the library's validators (one-line ``ValueError``s): integer bounds, the
"did you mean" hint for an unknown name, and ``key=value`` lists (``-p``, lm-eval's ``model_args``)."""

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


def parse_kv(items: Iterable[str], what: str = "parameter", example: str = "beta=0.5") -> dict[str, str]:
    """``["k=1", "beta = 0.5"]`` -> ``{"k": "1", "beta": "0.5"}``: each key an identifier, given once;
    ``what`` and ``example`` name the items in the errors."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"bad {what} {item!r}: expected KEY=VALUE, e.g. {example}")
        if key in out:
            raise ValueError(f"{what} {key!r} is given twice")
        out[key] = value.strip()
    return out


def split_top_level(text: str) -> list[str]:
    """``"a=1,s=scmoe(beta=0.5, alpha=0.1)"`` -> ``["a=1", "s=scmoe(beta=0.5, alpha=0.1)"]``: split
    on the commas outside brackets; blank items are dropped."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    return [item for item in items if item.strip()]
