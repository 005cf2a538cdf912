"""A run directory: its lock, its configuration and its ``samples.jsonl``.

One eval at a time owns a directory (an ``fcntl.flock`` on ``.lock``, released by the OS when the
process dies, also after ``kill -9``). ``config.json`` names what the samples were made with,
including a hash of the problems; a directory holding samples is resumed only by the same
configuration. ``samples.jsonl`` is append-only: after a crash its last line may be torn (and is
dropped), but a corrupt line before it is an error naming the line, never silently skipped.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SAMPLES, RESULTS, CONFIG, LOCK = "samples.jsonl", "results.json", "config.json", ".lock"


def run_path(output: Path, task: str, strategy_spec: str) -> Path:
    """``output/<task name>/<strategy spec>``, each made a plain file name, so runs stay under ``output``."""
    return output / _file_name(task) / _file_name(strategy_spec)


def _file_name(text: str) -> str:
    """``text`` as one safe path component: no separators, never ``.``, ``..`` or hidden."""
    return re.sub(r"[^A-Za-z0-9_.=,-]+", "_", text).strip("_").lstrip(".") or "_"


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Create ``out`` and hold its lock for the block; ``OSError`` if another process holds it."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OSError(
                f"{out} is in use by another moesteer eval; wait for it to finish or use another --output"
            ) from None
        yield


def records_hash(records: list[dict]) -> str:
    """sha256 of the problems a run evaluates (their content, independent of file formatting)."""
    text = json.dumps(records, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def claim(out: Path, wanted: dict, resuming: bool) -> None:
    """Write ``wanted`` as the directory's configuration, or, when ``resuming`` its samples, check
    that it is the saved one (``ValueError`` naming what changed)."""
    path = out / CONFIG
    if not resuming:
        path.write_text(json.dumps(wanted, indent=2) + "\n")
        return
    saved = json.loads(path.read_text()) if path.exists() else {}
    changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in wanted.items() if saved.get(k) != v]
    if changed:
        raise ValueError(f"{out} holds a run with another configuration ({'; '.join(changed)}); use another --output")


def read_samples(path: Path, *, repair: bool = False) -> dict[str, dict]:
    """Finished problems by id. A torn last line (killed mid-write) is ignored, and cut from the file
    when ``repair``; any other line that is not a sample record is a ``ValueError`` naming it."""
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    records: dict[str, dict] = {}
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            ok = line.endswith("\n") and isinstance(record, dict) and isinstance(record.get("id"), str)
        except json.JSONDecodeError:
            ok = False
        if not ok and number == len(lines):
            if repair:
                path.write_text("".join(lines[:-1]), encoding="utf-8")
            break
        if not ok:
            raise ValueError(f"{path}:{number}: corrupt sample line; repair or delete it (or use another --output)")
        records[record["id"]] = record
    return records
