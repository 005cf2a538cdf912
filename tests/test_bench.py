"""Benchmark scripts: a quick run records its figures, and the summary prints them with their targets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run(script: str, out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MOESTEER_BENCH_OUT": str(out), "OMP_NUM_THREADS": "2"}
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, env=env, timeout=300, check=False
    )


def test_quick_script_records_figures_and_summary_prints_them(tmp_path):
    out = tmp_path / "figures.jsonl"
    done = run("bench_steer.py", out, "--quick")
    assert done.returncode == 0, done.stderr
    figures = [json.loads(line) for line in out.read_text().splitlines()]
    names = [f["name"] for f in figures]
    assert "tiny random olmoe: steer no-op speed / plain" in names
    assert all(f["quick"] and f["script"] == "bench_steer" and f["value"] > 0 for f in figures)
    summary = run("summary.py", out)
    assert summary.returncode == 0, summary.stderr
    assert "steer no-op speed / plain" in summary.stdout and ">= 0.97" in summary.stdout
    assert "targets met" in summary.stdout and "QUICK" in summary.stdout


def test_summary_marks_met_and_missed_targets(tmp_path):
    out = tmp_path / "figures.jsonl"
    rows = [
        {"script": "bench_x", "name": "fast enough", "value": 1.05, "at_most": 1.1},
        {"script": "bench_x", "name": "too slow", "value": 2.5, "at_most": 2.0},
        {"script": "bench_x", "name": "speed-up", "value": 2.1, "at_least": 2.0},
        {"script": "bench_x", "name": "no target", "value": 0.5},
    ]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = run("summary.py", out).stdout.splitlines()
    met = {name: line.split()[-1] for line in lines for name in ("fast enough", "too slow", "speed-up") if name in line}
    assert met == {"fast enough": "yes", "too slow": "NO", "speed-up": "yes"}
    assert "2 of 3 targets met" in "\n".join(lines)


def test_summary_without_figures_fails(tmp_path):
    done = run("summary.py", tmp_path / "none.jsonl")
    assert done.returncode == 1 and "no benchmark figures" in done.stdout
