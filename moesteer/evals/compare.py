"""Compare eval runs side by side: accuracy with intervals, cost ratios, paired tests."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from moesteer.evals.rundir import RESULTS, SAMPLES, read_samples
from moesteer.evals.stats import mcnemar_p


@dataclass(frozen=True)
class Run:
    """One finished run directory: its results and its per-problem verdicts."""

    path: Path
    results: dict
    correct: dict[str, bool]

    @classmethod
    def read(cls, path: str | Path) -> Run:
        path = Path(path)
        if not (path / RESULTS).is_file():
            raise FileNotFoundError(f"{path} has no {RESULTS}; is it a finished `moesteer eval` output directory?")
        results = json.loads((path / RESULTS).read_text())
        correct = {id: bool(r["correct"]) for id, r in read_samples(path / SAMPLES).items()}
        return cls(path, results, correct)

    def same_folder(self, other: Run) -> bool:
        return self.path.resolve() == other.path.resolve()


def find_runs(paths: list[str | Path]) -> list[Run]:
    """Runs in the given directories, in the given order, or in their subdirectories (as ``eval
    --output`` writes them, in name order)."""
    runs = []
    for path in map(Path, paths):
        if (path / RESULTS).is_file():
            runs.append(Run.read(path))
        else:
            found = sorted(p.parent for p in path.glob(f"*/{RESULTS}"))
            if not found:
                raise FileNotFoundError(
                    f"no {RESULTS} in {path} or its subdirectories; give run folders that `moesteer eval` wrote"
                )
            runs.extend(Run.read(p) for p in found)
    return runs


def task_name(results: dict) -> str:
    """The task's name: recorded in ``results.json``, else read from a task file, else the file's stem."""
    task = results.get("task_name") or results["task"]
    if Path(task).suffix not in (".yaml", ".yml", ".json"):
        return task
    from moesteer.evals.tasks import get_task

    try:
        return get_task(task).name
    except (OSError, ValueError):
        return Path(task).stem


def is_greedy_plain(run: Run) -> bool:
    return run.results["strategy"] == "plain()" and not run.results["config"].get("temperature")


def pick_baseline(runs: list[Run], baseline: str | None = None) -> Run:
    """The run everything is measured against: ``baseline`` (a run folder, or a strategy spec one
    of ``runs`` has), by default the greedy ``plain()`` run when there is one, else the first run."""
    if baseline is None:
        return next((run for run in runs if is_greedy_plain(run)), runs[0])
    if (Path(baseline) / RESULTS).is_file():
        given = Run.read(baseline)
        return next((run for run in runs if run.same_folder(given)), given)
    wanted = _canonical(baseline)
    matching = [run for run in runs if _canonical(run.results["strategy"]) == wanted]
    if not matching:
        given = ", ".join(dict.fromkeys(run.results["strategy"] for run in runs))
        raise ValueError(f"no run has strategy {wanted}; give --baseline a run folder or one of: {given}")
    return next((run for run in matching if not run.results["config"].get("temperature")), matching[0])


def _canonical(text: str) -> str:
    """A strategy spec as the parser prints it back (the text itself if it no longer parses)."""
    from moesteer.strategies.spec import parse

    try:
        return parse(text).spec()
    except ValueError:
        return text


def comparison_rows(runs: list[Run], baseline: Run | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows, in the order of ``runs``: cost and accuracy relative to ``baseline`` (by
    default :func:`pick_baseline`'s), the paired test on the problems the two share. Columns that
    would say nothing are left out: the task when all runs share one, ``n`` when every run has one
    sample a problem, ``pass@k`` when no run has it."""
    base = baseline or pick_baseline(runs)
    base_cost = base.results["cost"]
    columns: dict[str, list[str]] = {name: [] for name in COLUMNS}
    for run in runs:
        metrics, cost = run.results["metrics"], run.results["cost"]
        low, high = metrics["accuracy_ci95"]
        shared = sorted(set(base.correct) & set(run.correct))
        is_base = run.same_folder(base)
        cells = [
            task_name(run.results),
            run.results["strategy"] + (f" at T={t}" if (t := run.results["config"].get("temperature")) else ""),
            str(run.results["config"]["n"]),
            f"{metrics['accuracy']:.3f} [{low:.3f}, {high:.3f}]",
            " ".join(f"pass@{k}={v:.3f}" for k, v in metrics.get("pass@k", {}).items()),
            f"{cost['tokens_per_sample']:.1f} tok",
            f"{cost.get('seconds_per_sample', 0.0):.2f} s",
            f"{_ratio(cost, base_cost, 'forward_passes_per_sample'):.2f}×",
            f"{_ratio(cost, base_cost, 'token_rows_per_sample'):.2f}×",
            "baseline" if is_base else f"{metrics['accuracy'] - base.results['metrics']['accuracy']:+.3f}",
            "—" if is_base else f"{_paired_p(base, run, shared):.3g} (n={len(shared)})",
        ]
        for name, cell in zip(COLUMNS, cells, strict=True):
            columns[name].append(cell)
    silent = {
        "task": len(set(columns["task"])) == 1,
        "n": set(columns["n"]) == {"1"},
        "pass@k": not any(columns["pass@k"]),
    }
    header = [name for name in COLUMNS if not silent.get(name)]
    return header, [[columns[name][i] or "—" for name in header] for i in range(len(runs))]


COLUMNS = (
    "task",
    "strategy",
    "n",
    "accuracy [95% CI]",
    "pass@k",
    "tokens",
    "time",
    "fwd passes",
    "token rows",
    "Δ acc",
    "McNemar p",
)
WRAPPED = ("strategy", "pass@k")
"""Columns of :func:`comparison_rows` that may wrap in a narrow table."""


def legend(base: Run) -> str:
    """What the columns of :func:`comparison_rows` measure."""
    return (
        f"per sample: tokens, time; relative to {base.results['strategy']}: fwd passes, token rows, Δ acc; "
        "McNemar p: paired (n shared)"
    )


def other_costs(runs: list[Run]) -> list[tuple[str, str]]:
    """``(strategy, "counter=value ...")`` per sample for each run with a controller's further
    counters (backward passes, verifier calls, time per phase)."""
    return [
        (run.results["strategy"], " ".join(f"{k}={v:.3g}" for k, v in ledger.items()))
        for run in runs
        if (ledger := _ledger(run.results["cost"]))
    ]


def _ratio(cost: dict, base_cost: dict, key: str) -> float:
    return cost[key] / max(base_cost[key], 1e-9)


_STANDARD_COST = {"tokens_per_sample", "forward_passes_per_sample", "token_rows_per_sample", "seconds_per_sample"}


def _ledger(cost: dict) -> dict[str, float]:
    """A controller's further counters (backward passes, verifier calls, time per phase)."""
    return {k.removesuffix("_per_sample"): v for k, v in cost.items() if k not in _STANDARD_COST}


def _paired_p(base: Run, run: Run, shared: list[str]) -> float:
    return mcnemar_p([base.correct[i] for i in shared], [run.correct[i] for i in shared])


def overlap_rows(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Pairwise Jaccard similarity of the sets of problems each run solved (on the problems all
    share), the runs numbered #1, #2, ... in the rows' order, plus a last row: how many the union
    solves relative to the best single run — DES's motivating observation when the runs differ
    only in k."""
    shared = sorted(set.intersection(*(set(r.correct) for r in runs)))
    solved = [{i for i in shared if r.correct[i]} for r in runs]
    labels = [f"#{i}" for i in range(1, len(runs) + 1)]
    header = ["solved (Jaccard)", *labels]
    rows = [
        [f"{label} {run.results['strategy']} ({len(a)})", *(f"{len(a & b) / max(len(a | b), 1):.2f}" for b in solved)]
        for label, run, a in zip(labels, runs, solved, strict=True)
    ]
    union, best = len(set().union(*solved)), max(len(a) for a in solved)
    rows.append(
        [f"union of all: {union} of {len(shared)} = {union / max(best, 1):.2f}x the best run", *[""] * len(runs)]
    )
    return header, rows


def plot(runs: list[Run], out: str | Path) -> None:
    """Accuracy (with 95% intervals) against token rows per problem, one point per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        metrics = run.results["metrics"]
        x = run.results["cost"]["token_rows_per_sample"]
        low, high = metrics["accuracy_ci95"]
        ax.errorbar(
            x,
            metrics["accuracy"],
            yerr=[[metrics["accuracy"] - low], [high - metrics["accuracy"]]],
            fmt="o",
            capsize=4,
            label=run.results["strategy"],
        )
    costs = [run.results["cost"]["token_rows_per_sample"] for run in runs]
    wide = max(costs) > 3 * min(costs)  # a log axis only where the costs span one
    if wide:
        ax.set_xscale("log")
    ax.set_xlabel("token rows per problem (compute" + (", log scale)" if wide else ")"))
    ax.set_ylabel("accuracy")
    ax.set_title(f"{task_name(runs[0].results)}: accuracy vs cost")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
