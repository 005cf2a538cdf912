"""``moesteer eval``: evaluate strategies on a task, one resumable run folder per strategy."""

from __future__ import annotations

from pathlib import Path

import click

from moesteer.cli.common import (
    SEED,
    backend_option,
    load_lm,
    model_options,
    parse_strategy,
    positive,
    unsafe_exec_option,
)
from moesteer.cli.compare import print_comparison
from moesteer.cli.table import wide_option
from moesteer.evals import sandbox
from moesteer.evals.compare import find_runs
from moesteer.evals.rundir import run_path
from moesteer.evals.runner import EvalConfig, run
from moesteer.sampling import MAX_N, MAX_TOKENS


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
