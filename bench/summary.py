"""One table of every figure the benchmark scripts recorded: value, target, met or not.

Reads ``$MOESTEER_BENCH_OUT`` (default ``bench/results/figures.jsonl``; see ``figures.py``).
Exits 1 when no figure was recorded. Run: ``.venv/bin/python bench/summary.py [FILE]``.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

from figures import out_path, read, table


def main() -> int:
    path = Path(sys.argv[1]) if sys.argv[1:] else out_path()
    figures = read(path)
    if not figures:
        print(f"no benchmark figures in {path}")
        return 1
    rows = [
        [
            f.script.removeprefix("bench_"),
            f.name,
            f"{f.value:.3g}" if f.unit != "s" else f"{f.value:.3f}",
            f.unit,
            f.target,
            {True: "yes", False: "NO", None: ""}[f.met],
        ]
        for f in figures
    ]
    quick = any(f.quick for f in figures)
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
    machine = f"{platform.node()}, {platform.machine()}, {os.cpu_count()} CPUs"
    print(f"\n== benchmark summary ({when}, {machine}{', QUICK runs' if quick else ''})")
    print(table(rows, ["script", "figure", "value", "unit", "target", "met"]))
    targeted = [f for f in figures if f.met is not None]
    print(f"\n{sum(bool(f.met) for f in targeted)} of {len(targeted)} targets met")
    if quick:
        print("(--quick: fewer problems and tokens; these numbers check that the scripts run, they are not results)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
