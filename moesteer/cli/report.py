"""``moesteer report``: one self-contained HTML page of finished runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import click

from moesteer.cli.common import fail, load_lm
from moesteer.evals.compare import find_runs


@click.command()
@click.argument("dirs", nargs=-1, required=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("report.html"), show_default=True)
@click.option("--no-usage", is_flag=True, help="Leave out the expert-usage pictures (they re-run each strategy once).")
@click.option("--model", default=None, help="Model for the usage pictures (default: the runs' own).")
def report(dirs: tuple[str, ...], out: Path, no_usage: bool, model: str | None) -> None:
    """Write one self-contained HTML page of finished runs: the compare table, accuracy against cost,
    and each run's expert usage on its first problem.

    \b
    Example:
      moesteer report runs/arith --out arith.html
    """
    if importlib.util.find_spec("matplotlib") is None:
        fail("report draws with matplotlib: pip install 'moesteer[plot]'")
    from moesteer.evals.report import write_report

    runs = find_runs(list(dirs))
    lm = None if no_usage else load_lm(model or runs[0].results.get("model"), None, None)
    click.echo(f"wrote {write_report(runs, out, lm)}", err=True)
