"""``moesteer compare``: the baseline (greedy plain() by default, or --baseline), run order, task names, width."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from moesteer.cli import main
from moesteer.evals.rundir import RESULTS, SAMPLES, run_path

LONG = "des(n=16, verifier='arith_steps', aggregate='min', select='vote', separator='\\n', temperature=0.7)"


def _run_dir(root: Path, strategy: str, solved: list[bool], *, task: str = "arith", temperature: float = 0.0,
             ledger: dict | None = None) -> Path:  # fmt: skip
    """A finished run folder as ``moesteer eval`` writes it (results.json and samples.jsonl)."""
    out = run_path(root, Path(task).stem, strategy + (f" at {temperature}" if temperature else ""))
    out.mkdir(parents=True)
    accuracy = sum(solved) / len(solved)
    results = {
        "task": task,
        "task_name": Path(task).stem,
        "strategy": strategy,
        "config": {"n": 1, "temperature": temperature},
        "metrics": {"accuracy": accuracy, "accuracy_ci95": [accuracy / 2, min(1.0, accuracy * 1.5)]},
        "cost": {
            "tokens_per_sample": 40.0,
            "forward_passes_per_sample": 40.0 * (1 + len(strategy) % 3),
            "token_rows_per_sample": 40.0,
            "seconds_per_sample": 0.25,
            **(ledger or {}),
        },
    }
    (out / RESULTS).write_text(json.dumps(results))
    lines = [json.dumps({"id": str(i), "correct": c}) for i, c in enumerate(solved)]
    (out / SAMPLES).write_text("\n".join(lines) + "\n")
    return out


@pytest.fixture
def runs(tmp_path) -> Path:
    _run_dir(tmp_path, "beam_search(n=16)", [True, True, True, False])
    _run_dir(tmp_path, "des(n=16)", [True, True, False, False])
    _run_dir(tmp_path, "plain()", [True, False, False, False])
    _run_dir(tmp_path, "plain()", [True, True, False, False], temperature=0.7)
    return tmp_path / "arith"


def _table(*args: str) -> dict[str, str]:
    """``compare``'s Δ acc column by strategy (the task's name is the title line)."""
    result = CliRunner().invoke(main, ["compare", *args])
    assert result.exit_code == 0, result.output
    title, header, _, *rows = result.stdout.splitlines()
    assert title.startswith("arith: ")
    columns = header.split()
    assert columns[0] == "strategy" and "Δ" in columns
    table = {}
    for row in rows[: rows.index(next(r for r in rows if r.startswith("per sample")))]:
        cells = [c.strip() for c in row.split("  ") if c.strip()]
        table[cells[0]] = cells[-2]
    return table


def test_the_greedy_plain_run_is_the_default_baseline_and_runs_keep_their_order(runs):
    rows = _table(str(runs))
    assert list(rows) == ["beam_search(n=16)", "des(n=16)", "plain()", "plain() at T=0.7"]  # the folder's order
    assert rows["plain()"] == "baseline"  # greedy, not the sampled plain()
    assert (
        rows["beam_search(n=16)"] == "+0.500" and rows["des(n=16)"] == "+0.250" and rows["plain() at T=0.7"] == "+0.250"
    )


def test_without_plain_the_first_run_given_is_the_baseline(runs):
    des, beam = runs / "des_n=16", runs / "beam_search_n=16"
    rows = _table(str(des), str(beam))
    assert list(rows) == ["des(n=16)", "beam_search(n=16)"]  # as given, not sorted
    assert rows["des(n=16)"] == "baseline" and rows["beam_search(n=16)"] == "+0.250"


def test_baseline_by_folder_or_by_spec(runs):
    by_folder = _table(str(runs), "--baseline", str(runs / "des_n=16"))
    by_spec = _table(str(runs), "--baseline", "des(n=16)")
    assert by_folder == by_spec
    assert by_spec["des(n=16)"] == "baseline" and by_spec["plain()"] == "-0.250"
    outside = _table(str(runs / "plain"), "--baseline", str(runs / "des_n=16"))  # shown first
    assert list(outside) == ["des(n=16)", "plain()"] and outside["plain()"] == "-0.250"
    missing = CliRunner().invoke(main, ["compare", str(runs), "--baseline", "scmoe(beta=0.5)"])
    assert missing.exit_code == 2
    assert "no run has strategy scmoe(beta=0.5)" in missing.stderr and "des(n=16)" in missing.stderr


def test_a_task_file_shows_by_its_name_and_the_table_fits_120_columns(tmp_path):
    task = str(tmp_path / "tasks" / "my_task.yaml")
    _run_dir(tmp_path, "plain()", [True, False], task=task)
    ledger = {"backward_passes_per_sample": 5.0, "extra_forward_passes_per_sample": 6.0, "seconds:c3po_per_sample": 1.5}
    _run_dir(tmp_path, LONG, [True, True], task=task, ledger=ledger)
    result = CliRunner().invoke(main, ["compare", str(tmp_path / "my_task")])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 120
    assert lines[0] == "my_task: 2 runs" and task not in result.stdout
    plain = next(line for line in lines if line.startswith("plain()"))
    assert "1.00×" in plain and "40.0 tok" in plain and "0.25 s" in plain  # numbers carry units
    assert "backward_passes=5" in result.stdout  # a controller's further counters, below the table
    wide = CliRunner().invoke(main, ["compare", str(tmp_path / "my_task"), "--wide"]).stdout
    assert LONG in wide and max(len(line) for line in wide.splitlines()) > 120
