"""``moesteer compare``: finished runs side by side against a baseline."""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

import click

from moesteer.cli.common import ImageFile, fail
from moesteer.cli.table import TABLE_WIDTH, format_table, wide_option
from moesteer.evals.compare import (
    WRAPPED,
    Run,
    comparison_rows,
    find_runs,
    legend,
    other_costs,
    overlap_rows,
    pick_baseline,
    plot,
    task_name,
)


@click.command()
@click.argument("dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option(
    "--plot", "plot_path", type=ImageFile(), default=None, help="Also draw accuracy vs cost (.png, .pdf, ...)."
)
@click.option("--overlap", is_flag=True, help="Also print the Jaccard similarity of the problems each run solved.")
@click.option(
    "--baseline",
    default=None,
    metavar="RUN",
    help='What the others are measured against: a run folder or a strategy spec, e.g. plain or "scmoe(beta=0.5)" '
    "(default: the greedy plain() run, else the first run given).",
)
@wide_option
def compare(dirs: tuple[str, ...], plot_path: Path | None, overlap: bool, baseline: str | None, wide: bool) -> None:
    """Compare finished runs: accuracy [95% CI], pass@k, cost and accuracy relative to a baseline, McNemar test.

    Runs are shown in the order given (a folder's runs in name order); the baseline is the greedy
    plain() run when there is one, else the first run, unless --baseline names another.

    \b
    Examples:
      moesteer compare runs/arith
      moesteer compare runs/arith --baseline "scmoe(beta=0.1)"
      moesteer compare runs/arith/plain runs/arith/scmoe_beta=0.1 --plot arith.png
      moesteer compare runs/arith/with_k* --overlap     # which problems each k solves
    """
    if plot_path and importlib.util.find_spec("matplotlib") is None:
        fail("--plot draws with matplotlib: pip install 'moesteer[plot]'")
    runs = print_comparison(find_runs(list(dirs)), baseline, wide)
    if overlap:
        click.echo(
            "\n" + format_table(*overlap_rows(runs), width=None if wide else TABLE_WIDTH, wrap=("solved (Jaccard)",))
        )
    if plot_path:
        plot(runs, plot_path)
        click.echo(f"wrote {plot_path}", err=True)


def print_comparison(runs: list[Run], baseline: str | None = None, wide: bool = False) -> list[Run]:
    """Print the comparison table of ``runs`` against ``baseline`` (see :func:`pick_baseline`), 120
    columns wide unless ``wide``; return the runs shown (a baseline folder not among them first)."""
    base = pick_baseline(runs, baseline)
    if not any(run.same_folder(base) for run in runs):
        runs = [base, *runs]
    header, rows = comparison_rows(runs, base)
    width = None if wide else TABLE_WIDTH
    if "task" not in header:
        click.echo(f"{task_name(runs[0].results)}: {len(runs)} run{'s' * (len(runs) != 1)}")
    click.echo(format_table(header, rows, width=width, wrap=WRAPPED))
    notes = [legend(base)]
    if costs := other_costs(runs):
        notes += ["other cost per sample:", *(f"  {spec}: {counters}" for spec, counters in costs)]
    for note in notes:
        click.echo("\n".join(textwrap.wrap(note, width, subsequent_indent="    ")) if width else note)
    return runs
