"""Counting a function's calls in a test: what each call was given, measured, in call order."""

from __future__ import annotations

from collections.abc import Callable

import pytest


def count_calls(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, measure: Callable[..., int]) -> list[int]:
    """Replace ``owner.name`` with a wrapper that records ``measure(*args)`` of every call and then
    calls the original; returns the list the measures go into."""
    calls: list[int] = []
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(measure(*args))
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls
