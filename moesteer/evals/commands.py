"""``moesteer eval``, ``moesteer compare`` and ``moesteer data``: the eval commands of the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import click

from moesteer.cli import _fail, _load, _strategy, _user_errors, main, model_options
from moesteer.evals.compare import comparison_rows, find_runs, format_table, plot
from moesteer.evals.runner import EvalConfig, run


def run_dir(output: Path, task: str, strategy_spec: str) -> Path:
    """``output/<task>/<strategy spec as a file name>``."""
    slug = re.sub(r"[^A-Za-z0-9_.=,-]+", "_", strategy_spec).strip("_")
    return output / task / slug


@main.command("eval")
@click.option("--task", required=True, help="Task name, e.g. arith or gsm8k (see moesteer.evals.tasks).")
@model_options
@click.option("--backend", type=click.Choice(["hf", "vllm"]), default="hf", show_default=True, help="Engine.")
@click.option(
    "--strategy",
    "strategies",
    multiple=True,
    help='Strategy spec (repeatable: each runs on the same problems), e.g. "scmoe(beta=0.5)". Default: plain.',
)
@click.option(
    "-p", "--param", "params", multiple=True, metavar="KEY=VALUE", help="Parameter of a single bare --strategy."
)
@click.option("--split", default=None, help="Data split (default: the task's test split).")
@click.option("--limit", type=int, default=None, help="Evaluate the first N problems only.")
@click.option("--n", type=int, default=1, show_default=True, help="Samples per problem (pass@k and maj@k).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of sampling and routing noise.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--max-tokens", type=int, default=None, help="Tokens per completion (default: the task's).")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Problems per engine call.")
@click.option("--data", type=click.Path(dir_okay=False), default=None, help="Local JSONL file with the task's records.")
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs"),
    show_default=True,
    help="Runs go to OUTPUT/<task>/<strategy>; re-running resumes.",
)
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
) -> None:
    """Evaluate strategies on a task; write samples.jsonl and results.json per strategy, print the comparison.

    Re-running the same command resumes each run where it stopped (also after kill -9); a changed
    configuration in an existing run directory is refused.

    \b
    Examples:
      moesteer eval --task arith --limit 100
      moesteer eval --task arith --strategy plain --strategy "scmoe(beta=0.5)" --strategy "roe(samples=4)"
      moesteer eval --task arith --n 8 --temperature 0.7 --strategy "self_consistency(plain(), n=8)"
      moesteer eval --task gsm8k --model allenai/OLMoE-1B-7B-0924 --data gsm8k.jsonl --limit 50
    """
    if backend == "vllm":
        _fail("the vLLM backend is not available yet; use --backend hf")
    with _user_errors():
        if params and len(strategies) != 1:
            raise ValueError("-p needs exactly one bare --strategy name")
        specs = [_strategy(s, params).spec() for s in strategies] if strategies else ["plain()"]
        configs = [
            EvalConfig(
                task=task,
                strategy=s,
                model=model,
                split=split,
                limit=limit,
                n=n,
                seed=seed,
                temperature=temperature,
                max_tokens=max_tokens,
                data=data,
                dtype=dtype,
            )
            for s in specs
        ]
    lm = _load(model, dtype, device)
    dirs = []
    for config in configs:
        click.echo(f"== {config.task}: {config.strategy}", err=True)
        with _user_errors():
            dirs.append(run_dir(output, task, config.strategy))
            run(config, dirs[-1], lm=lm, batch_size=batch_size)
    header, rows = comparison_rows(find_runs(dirs))
    click.echo(format_table(header, rows))


@main.command()
@click.argument("dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option(
    "--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Also draw accuracy vs cost (PNG)."
)
def compare(dirs: tuple[str, ...], plot_path: str | None) -> None:
    """Compare finished runs: accuracy [95% CI], pass@k, cost relative to the first run, McNemar test.

    \b
    Examples:
      moesteer compare runs/arith
      moesteer compare runs/arith/plain runs/arith/scmoe_beta=0.5 --plot arith.png
    """
    with _user_errors():
        runs = find_runs(list(dirs))
    header, rows = comparison_rows(runs)
    click.echo(format_table(header, rows))
    if plot_path:
        plot(runs, plot_path)
        click.echo(f"wrote {plot_path}", err=True)
