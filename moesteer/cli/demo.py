"""``moesteer demo``: steering strategies on an embedded model's test split, compared."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from moesteer.cli.common import load_lm, positive
from moesteer.cli.compare import print_comparison
from moesteer.cli.table import wide_option
from moesteer.evals.compare import find_runs
from moesteer.evals.rundir import run_path
from moesteer.evals.runner import EvalConfig, run


@dataclass(frozen=True)
class Demo:
    """A test bed the demo evaluates: its model, its task (test split), its strategies, its problems."""

    model: str | None  # None: the embedded arith model
    task: str
    runs: tuple[tuple[str, float], ...]  # (strategy spec, temperature)
    limit: int


# Settings as tuned on each bed's validation split (README, "Results"); self-consistency samples,
# the others decode greedily (DES's rollouts sample at its own temperature, 0.8).
DEMOS = {
    "arith": Demo(
        None,
        "arith",
        (
            ("plain()", 0.0),
            ("scmoe(beta=0.1)", 0.0),
            ("roe(samples=4, tau=0.1917)", 0.0),
            ("self_consistency(plain(), n=8)", 0.7),
            ("des(n=16, verifier='arith_steps')", 0.0),
            ("rerouting(every=None, lr=0.02)", 0.0),
        ),
        200,
    ),
    "mix": Demo(
        "mix",
        "mix_s1",
        (
            ("plain()", 0.0),
            ("scmoe(beta=0.9, weak='topk')", 0.0),
            ("roe(samples=8, tau=0.1, skip=1, cache='clean')", 0.0),
            ("self_consistency(plain(), n=8)", 0.8),
            ("rerouting(every=None, lr=0.05)", 0.0),
        ),
        100,
    ),
    "mix3": Demo(
        "mix3",
        "mix3_s1",
        (
            ("plain()", 0.0),
            ("scmoe(beta=0.1, weak='topk')", 0.0),
            ("roe(samples=8, tau=0.1, skip=1, cache='clean')", 0.0),
            ("self_consistency(plain(), n=8)", 0.8),
            ("rerouting(every=None, lr=0.01)", 0.0),
        ),
        100,
    ),
}


@click.command()
@click.option(
    "--model",
    "bed",
    type=click.Choice(sorted(DEMOS)),
    default="arith",
    show_default=True,
    help="The test bed: arith (the embedded model's task), or mix / mix3 (revisions 2 and 3 of the multi-task "
    "model, on its held-out-cell shift S1).",
)
@click.option(
    "--limit",
    type=positive(),
    default=None,
    help="Test problems per strategy (default: " + ", ".join(f"{n} {d.limit}" for n, d in DEMOS.items()) + ").",
)
@click.option(
    "--output", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"), show_default=True
)
@wide_option
def demo(bed: str, limit: int | None, output: Path, wide: bool) -> None:
    """Evaluate steering strategies on an embedded model's test split and print the comparison.

    Each strategy's run is resumable and kept in OUTPUT; `moesteer compare OUTPUT/arith --plot out.png`
    draws accuracy against cost.

    \b
    Examples:
      moesteer demo --limit 100
      moesteer demo --model mix3
    """
    chosen = DEMOS[bed]
    lm = load_lm(chosen.model, None, None)
    dirs = []
    for spec, temperature in chosen.runs:
        click.echo(f"== {chosen.task}: {spec}" + (f" at temperature {temperature}" if temperature else ""), err=True)
        config = EvalConfig(
            task=chosen.task, strategy=spec, model=chosen.model, limit=limit or chosen.limit, temperature=temperature
        )
        dirs.append(run_path(output, chosen.task, config.strategy))
        run(config, dirs[-1], lm=lm, batch_size=16)
    print_comparison(find_runs(dirs), wide=wide)
