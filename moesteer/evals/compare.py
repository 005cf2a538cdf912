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


def find_runs(paths: list[str | Path]) -> list[Run]:
    """Runs in the given directories, or in their subdirectories (as ``eval --output`` writes them)."""
    runs = []
    for path in map(Path, paths):
        if (path / RESULTS).is_file():
            runs.append(Run.read(path))
        else:
            found = sorted(p.parent for p in path.glob(f"*/{RESULTS}"))
            if not found:
                raise FileNotFoundError(f"no {RESULTS} in {path} or its subdirectories")
            runs.extend(Run.read(p) for p in found)
    return runs


def comparison_rows(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: everything relative to the first run; the paired test uses shared problems."""
    base = runs[0]
    base_cost = base.results["cost"]
    header = [
        "task",
        "strategy",
        "n",
        "accuracy [95% CI]",
        "pass@k / maj@k",
        "tokens/sample",
        "fwd passes ×",
        "token rows ×",
        "Δ acc",
        "McNemar p (shared)",
    ]
    ledgers = [_ledger(run.results["cost"]) for run in runs]
    if any(ledgers):
        header.append("other cost / sample")
    rows = []
    for run, ledger in zip(runs, ledgers, strict=True):
        metrics, cost = run.results["metrics"], run.results["cost"]
        low, high = metrics["accuracy_ci95"]
        shared = sorted(set(base.correct) & set(run.correct))
        extra = " ".join(f"pass@{k}={v:.3f}" for k, v in metrics.get("pass@k", {}).items())
        rows.append(
            [
                run.results["task"],
                run.results["strategy"],
                str(run.results["config"]["n"]),
                f"{metrics['accuracy']:.3f} [{low:.3f}, {high:.3f}]",
                extra or "—",
                f"{cost['tokens_per_sample']:.1f}",
                f"{cost['forward_passes_per_sample'] / max(base_cost['forward_passes_per_sample'], 1e-9):.2f}",
                f"{cost['token_rows_per_sample'] / max(base_cost['token_rows_per_sample'], 1e-9):.2f}",
                "—" if run is base else f"{metrics['accuracy'] - base.results['metrics']['accuracy']:+.3f}",
                "—" if run is base else f"{_paired_p(base, run, shared):.3g} ({len(shared)})",
            ]
        )
        if any(ledgers):
            rows[-1].append(" ".join(f"{k}={v:.3g}" for k, v in ledger.items()) or "—")
    return header, rows


_STANDARD_COST = {"tokens_per_sample", "forward_passes_per_sample", "token_rows_per_sample", "seconds_per_sample"}


def _ledger(cost: dict) -> dict[str, float]:
    """A controller's further counters (backward passes, verifier calls, time per phase)."""
    return {k.removesuffix("_per_sample"): v for k, v in cost.items() if k not in _STANDARD_COST}


def _paired_p(base: Run, run: Run, shared: list[str]) -> float:
    return mcnemar_p([base.correct[i] for i in shared], [run.correct[i] for i in shared])


def overlap_rows(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Pairwise Jaccard similarity of the sets of problems each run solved (on the problems all
    share), plus a last row: how many the union solves relative to the best single run — DES's
    motivating observation when the runs differ only in k."""
    shared = sorted(set.intersection(*(set(r.correct) for r in runs)))
    solved = [{i for i in shared if r.correct[i]} for r in runs]
    names = [r.results["strategy"] for r in runs]
    header = ["solved (Jaccard)", *names]
    rows = [
        [f"{name} ({len(a)})", *(f"{len(a & b) / max(len(a | b), 1):.2f}" for b in solved)]
        for name, a in zip(names, solved, strict=True)
    ]
    union, best = len(set().union(*solved)), max(len(a) for a in solved)
    rows.append(
        [f"union of all: {union} of {len(shared)} = {union / max(best, 1):.2f}x the best run", *[""] * len(runs)]
    )
    return header, rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


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
    ax.set_title(f"{runs[0].results['task']}: accuracy vs cost")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
