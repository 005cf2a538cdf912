"""Printing strategies and routing primitives as text specs, e.g. ``scmoe(beta=0.5)``.

A spec prints the parameters it was given (in their order), then any others that differ from their
defaults; ``positional`` fields of a class print first without a name, and a ``varargs`` class
prints its first field's items positionally (``ranks(2)``, ``mask(0, 3)``). The parser is
:mod:`moesteer.strategies.spec`; this module needs no registry, so strategies can print themselves
(it sits below the engines, with :mod:`moesteer.strategy`).
"""

from __future__ import annotations

import dataclasses
import re
import typing


def parameters(cls: type) -> list[tuple[str, str, object]]:
    """``(name, type, default)`` for each parameter of a dataclass strategy or primitive."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "required"
        out.append((f.name, _type_name(hints.get(f.name)), default))
    return out


def _type_name(hint: object) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return re.sub(r"\b(?:typing|collections\.abc|moesteer(?:\.\w+)*)\.(\w+)", r"\1", str(hint))


def to_spec(obj: object) -> str:
    """The canonical text spec of a strategy or routing primitive (``ValueError`` if it has none)."""
    alias = getattr(type(obj), "printed_as", None)  # a wrapper printed as the field it wraps
    if alias is not None:
        return to_spec(getattr(obj, alias))
    name = getattr(type(obj), "name", None)
    if not isinstance(name, str) or not dataclasses.is_dataclass(obj):
        raise ValueError(f"{obj!r} has no text spec (composed or tensor-valued policies exist only in Python)")
    if getattr(type(obj), "varargs", False):
        return f"{name}({', '.join(_value(v) for v in getattr(obj, dataclasses.fields(obj)[0].name))})"
    positional = getattr(type(obj), "positional", ())
    given = getattr(obj, "_spec_keys", ())
    defaults = {field: default for field, _, default in parameters(type(obj))}
    changed = [f for f, d in defaults.items() if f not in given and (d == "required" or getattr(obj, f) != d)]
    parts = [_value(getattr(obj, f)) for f in positional]
    parts += [f"{f}={_value(getattr(obj, f))}" for f in (*given, *changed) if f not in positional]
    return f"{name}({', '.join(parts)})"


def _value(value: object) -> str:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_spec(value)
    if isinstance(value, tuple):
        inner = ", ".join(_value(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    return repr(value)
