"""Reading and writing the project's JSON files (expert tables, trace files) with one-line errors."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def read_cached(load: Callable[[str], T], path: str) -> T:
    """``load(path)``, read once while the file is unchanged (keyed by its modification time)."""
    return _read(load, path, os.path.getmtime(path) if os.path.isfile(path) else None)


@functools.lru_cache(maxsize=32)
def _read(load: Callable[[str], T], path: str, stamp: float | None) -> T:
    return load(path)


def save_json(path: str | Path, data: Any, *, indent: int | None = None) -> Path:
    path = Path(path)
    path.write_text(json.dumps(data, indent=indent) + "\n", encoding="utf-8")
    return path


def load_json(path: str | Path, kind: str, hint: str, build: Callable[[Any], T]) -> T:
    """``build`` of the JSON at ``path``: ``FileNotFoundError`` naming ``kind`` and how to make one
    (``hint``) when it is missing, a one-line ``ValueError`` when it is not a ``kind``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {kind} at {path}; {hint}")
    try:
        return build(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{path} is not a {kind} ({err})") from None
