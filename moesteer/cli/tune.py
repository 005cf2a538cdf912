"""``moesteer tune``: search a strategy's parameters on a task's validation split."""

from __future__ import annotations

import click

from moesteer.checks import parse_kv
from moesteer.cli.common import SEED, load_lm, model_options, positive, unsafe_exec_option
from moesteer.evals import sandbox
from moesteer.sampling import MAX_TOKENS


@click.command()
@click.option("--task", required=True, help="Task whose validation split is searched.")
@model_options
@click.option("--strategy", "name", required=True, help="Bare strategy name, e.g. roe or scmoe.")
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE", help="Fixed parameter (repeatable).")
@click.option(
    "-s",
    "--search",
    "dimensions",
    multiple=True,
    required=True,
    metavar="NAME=SPACE",
    help="Searched parameter: name=a,b,c (choices) or name=low:high (range). Repeatable.",
)
@click.option(
    "--split", default=None, help="Split to tune on (default: the task's validation split; never its test split)."
)
@click.option("--limit", type=positive(), default=None, help="Use the first N problems of the split.")
@click.option("--trials", type=positive(), default=20, show_default=True, help="Optuna trials (grid: all points).")
@click.option("--method", type=click.Choice(["optuna", "grid"]), default="optuna", show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option(
    "--max-tokens", type=positive(MAX_TOKENS), default=None, help="Tokens per completion (default: the task's)."
)
@click.option("--batch-size", type=positive(), default=32, show_default=True)
@unsafe_exec_option
def tune(
    task,
    model,
    dtype,
    device,
    name,
    params,
    dimensions,
    split,
    limit,
    trials,
    method,
    seed,
    max_tokens,
    batch_size,
    unsafe_exec,
) -> None:
    """Search a strategy's parameters on a validation split; print the best spec to stdout.

    Greedy accuracy is the objective. Optuna's TPE sampler is used when optuna is installed
    (pip install 'moesteer[tune]'), a grid otherwise.

    \b
    Examples:
      moesteer tune --task arith --strategy roe -p samples=4 -s tau=0:0.5 -s skip=0,1 --trials 12
      moesteer tune --task arith --strategy scmoe -s beta=0.1,0.3,0.5,0.7,0.9 --method grid
    """
    from moesteer.evals.runner import load_problems, task_sampling
    from moesteer.evals.tasks import get_task
    from moesteer.evals.tuning import Dimension, tuning_split
    from moesteer.evals.tuning import tune as run_tune

    sandbox.allow_unsafe_exec(unsafe_exec)
    the_task = get_task(task)
    if the_task.executes_code:
        sandbox.require()
    split = tuning_split(the_task, split)
    problems = load_problems(the_task, split, limit=limit)
    task_sampling(the_task, max_tokens=max_tokens, seed=seed)  # checked before the model loads
    space = [Dimension.parse(d) for d in dimensions]
    fixed = parse_kv(params, "parameter", "-p samples=4")
    lm = load_lm(model, dtype, device)
    report = lambda trial: click.echo(f"  {trial.accuracy:.3f}  {trial.spec}", err=True)  # noqa: E731
    result = run_tune(
        lm,
        the_task,
        name,
        space,
        fixed=fixed,
        problems=problems,
        trials=trials,
        method=method,
        seed=seed,
        max_tokens=max_tokens,
        batch_size=batch_size,
        report=report,
    )
    click.echo(
        f"best ({result.method}, {len(result.trials)} trials, {len(problems)} {split} problems): "
        f"accuracy {result.best.accuracy:.3f}",
        err=True,
    )
    click.echo(result.best.spec)
