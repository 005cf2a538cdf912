"""Benchmark figures as JSON lines: each script records what it measured, ``summary.py`` prints them.

A figure is one number with its unit, an optional target (``at_most`` or ``at_least``) and the
script that measured it. Lines go to ``$MOESTEER_BENCH_OUT`` (default ``bench/results/figures.jsonl``),
appended, so ``make bench`` empties the file, runs the scripts and then prints one table. ``--quick``
on a script's command line (or ``MOESTEER_BENCH_QUICK=1``, which it sets for the script's child
processes) shrinks its work to check that it runs; quick figures are marked as such.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_OUT = Path(__file__).parent / "results" / "figures.jsonl"
QUICK_ENV = "MOESTEER_BENCH_QUICK"

if "--quick" in sys.argv:
    sys.argv.remove("--quick")
    os.environ[QUICK_ENV] = "1"
QUICK = os.environ.get(QUICK_ENV) == "1"


def scaled(full: int, quick: int) -> int:
    """``full`` normally, ``quick`` under ``--quick``."""
    return quick if QUICK else full


def subset(items: dict) -> dict:
    """``items``, or under ``--quick`` its first entry only (e.g. the smallest model)."""
    return dict(list(items.items())[:1]) if QUICK else items


@dataclass(frozen=True)
class Figure:
    """One measured number; ``met`` is ``None`` when it has no target."""

    script: str
    name: str
    value: float
    unit: str = "×"
    at_most: float | None = None
    at_least: float | None = None
    quick: bool = False

    @property
    def met(self) -> bool | None:
        if self.at_most is None and self.at_least is None:
            return None
        return (self.at_most is None or self.value <= self.at_most) and (
            self.at_least is None or self.value >= self.at_least
        )

    @property
    def target(self) -> str:
        if self.at_most is not None:
            return f"<= {self.at_most:g}"
        return "" if self.at_least is None else f">= {self.at_least:g}"


def table(rows: list[list[str]], header: list[str]) -> str:
    """Rows as left-aligned columns under a ruled header."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*["-" * w for w in widths])] + [fmt.format(*r) for r in rows])


def out_path() -> Path:
    return Path(os.environ.get("MOESTEER_BENCH_OUT") or DEFAULT_OUT)


def record(
    name: str, value: float, *, unit: str = "×", at_most: float | None = None, at_least: float | None = None
) -> Figure:
    """Append one figure of the running script to :func:`out_path`."""
    figure = Figure(Path(sys.argv[0]).stem, name, float(value), unit, at_most, at_least, QUICK)
    path = out_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(asdict(figure)) + "\n")
    return figure


def read(path: Path | None = None) -> list[Figure]:
    """Every figure recorded in ``path`` (default :func:`out_path`), in order."""
    path = path or out_path()
    if not path.exists():
        return []
    return [Figure(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
