"""Strategies, policies and sampling parameters as JSON-safe data, and back.

What crosses a process boundary into vLLM's workers (``SamplingParams.extra_args``, through vLLM's
msgpack serialiser, which turns tuples into lists and knows no Python classes) is data, never
objects. :func:`to_wire` writes a frozen spec (a dataclass of moesteer's, or a user's subclass of
``Policy`` / ``Strategy``) as nested dicts, lists, strings and numbers; :func:`from_wire` rebuilds
an equal object by calling its class with the recorded fields, so construction checks run again:

* a dataclass → ``{"@type": "module:QualName", "fields": {...}}`` (only ``Policy``, ``Strategy``
  and ``SamplingParams`` subclasses are rebuilt: the data names no other class);
* a tensor → ``{"@tensor": base64 of its bytes, "dtype", "shape"}`` (bit for bit);
* a tuple → ``{"@tuple": [...]}``; a mapping → ``{"@map": [[key, value], ...]}`` (any key type);
* a non-finite float → ``{"@float": "inf" | "-inf" | "nan"}`` (JSON has none);
* a module-level function (a :class:`~moesteer.routing.RouterLogits` rule) → ``{"@function":
  "module:qualname"}``, imported again in the workers (a lambda or a nested function has no name
  to import and is refused).

:func:`dumps` gives the canonical text (sorted keys), which workers use as a cache key, so equal
specs share one rebuilt object (and one routing group).
"""

from __future__ import annotations

import base64
import importlib
import json
import math
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from types import FunctionType
from typing import Any

import torch
from torch import Tensor

from moesteer.routing import Policy
from moesteer.sampling import SamplingParams
from moesteer.strategy import Strategy

REBUILDABLE = (Policy, Strategy, SamplingParams)


def to_wire(value: Any) -> Any:
    """``value`` as JSON-safe data (module docstring); raises ``TypeError`` for what has no form."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"@float": repr(value)}
    if isinstance(value, Tensor):
        t = value.detach().to("cpu").contiguous()
        return {
            "@tensor": base64.b64encode(t.reshape(-1).view(torch.uint8).numpy().tobytes()).decode("ascii"),
            "dtype": str(t.dtype).removeprefix("torch."),
            "shape": list(t.shape),
        }
    if isinstance(value, tuple):
        return {"@tuple": [to_wire(v) for v in value]}
    if isinstance(value, list):
        return [to_wire(v) for v in value]
    if isinstance(value, Mapping):
        return {"@map": [[to_wire(k), to_wire(v)] for k, v in value.items()]}
    if is_dataclass(value) and isinstance(value, REBUILDABLE):
        cls = type(value)
        return {
            "@type": f"{cls.__module__}:{cls.__qualname__}",
            "fields": {f.name: to_wire(getattr(value, f.name)) for f in fields(value) if f.init},
        }
    if isinstance(value, FunctionType):
        if "<" in value.__qualname__ or value.__module__ is None:
            raise TypeError(f"cannot send {value.__qualname__} to vLLM's workers: define the function at module level")
        return {"@function": f"{value.__module__}:{value.__qualname__}"}
    raise TypeError(f"cannot send a {type(value).__name__} to vLLM's workers: {value!r}")


def from_wire(data: Any) -> Any:
    """The object :func:`to_wire` wrote (lists that msgpack made of tuples are tagged, so come back as tuples)."""
    if isinstance(data, list):
        return [from_wire(v) for v in data]
    if not isinstance(data, dict):
        return data
    if "@float" in data:
        return float(data["@float"])
    if "@tensor" in data:
        dtype = getattr(torch, data["dtype"])
        raw = bytearray(base64.b64decode(data["@tensor"]))
        flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        return flat.view(dtype).reshape(data["shape"]).clone()
    if "@tuple" in data:
        return tuple(from_wire(v) for v in data["@tuple"])
    if "@map" in data:
        return {_hashable(from_wire(k)): from_wire(v) for k, v in data["@map"]}
    if "@type" in data:
        cls = _resolve(data["@type"])
        return cls(**{name: from_wire(v) for name, v in data["fields"].items()})
    if "@function" in data:
        function = _import(data["@function"])
        if not isinstance(function, FunctionType):
            raise ValueError(f"wire data names {data['@function']}, which is not a function")
        return function
    raise ValueError(f"not moesteer wire data: keys {sorted(data)}")


def dumps(value: Any) -> str:
    """The canonical JSON text of ``value``'s wire form."""
    return json.dumps(to_wire(value), sort_keys=True, separators=(",", ":"))


def loads(text: str) -> Any:
    return from_wire(json.loads(text))


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def _import(name: str) -> Any:
    module, _, qualname = name.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _resolve(name: str) -> type:
    obj = _import(name)
    if not (isinstance(obj, type) and issubclass(obj, REBUILDABLE)):
        raise ValueError(f"wire data names {name}, which is not a moesteer policy, strategy or sampling class")
    return obj
