"""The eval runner: a model × strategy × task, one JSONL line per finished problem, resumable.

``samples.jsonl`` gets one flushed and fsynced line per problem as soon as it is scored, so a run
killed at any point (even ``kill -9``) loses at most the batch in flight; re-running the same
configuration into the same directory skips finished problems (a torn last line is dropped). With
``replicas=N`` the problems are split over N engine replicas on Ray (:mod:`.replicas`), with the
same samples and the same guarantees. A
different configuration (or edited data) in a directory holding samples is refused rather than
mixed in, and a second eval into a directory in use is refused (see :mod:`.rundir`). Every
argument is checked before ``config.json`` is written. ``results.json`` is rewritten from
``samples.jsonl`` at the end of every run.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from moesteer.checks import check_int
from moesteer.evals import sandbox
from moesteer.evals.batch import describe, evaluate, task_sampling
from moesteer.evals.data import read_jsonl
from moesteer.evals.replicas import SHARDS, evaluate_on_replicas, finish, fold_shards
from moesteer.evals.rundir import RESULTS, SAMPLES, claim, locked, read_samples, records_hash
from moesteer.evals.stats import pass_at_k, wilson_interval
from moesteer.evals.tasks import Task, get_task
from moesteer.lm import BACKENDS, LM, check_loadable, load
from moesteer.progress import progress as progress_bar
from moesteer.sampling import MAX_N, MAX_TOKENS, check_seed
from moesteer.strategies.spec import parse
from moesteer.strategy import Strategy

__all__ = ["RESULTS", "SAMPLES", "EvalConfig", "evaluate", "load_problems", "run", "summarise", "task_sampling"]


@dataclass(frozen=True)
class EvalConfig:
    """Everything that determines a run's samples (saved as ``config.json``, checked on resume)."""

    task: str
    strategy: str = "plain()"
    model: str | None = None  # None: the embedded model
    backend: str = "hf"
    split: str | None = None  # None: the task's default split
    limit: int | None = None
    n: int = 1
    seed: int = 0
    temperature: float = 0.0
    max_tokens: int | None = None  # None: the task's default
    data: str | None = None  # a local JSONL file in place of the task's own data
    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.limit is not None:
            check_int("limit", self.limit)
        check_int("n", self.n, 1, MAX_N)
        if self.max_tokens is not None:
            check_int("max_tokens", self.max_tokens, 1, MAX_TOKENS)
        check_seed(self.seed)
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not one of {', '.join(BACKENDS)}")


def run(
    config: EvalConfig,
    output: str | Path,
    *,
    lm: LM | None = None,
    batch_size: int = 32,
    progress: bool = True,
    strategy: Strategy | None = None,
    replicas: int = 1,
    threads: int = 1,
    address: str | None = None,
) -> dict:
    """Run (or resume) ``config`` into ``output`` and return the results dict. ``strategy`` is the
    already parsed ``config.strategy`` when the caller has it (the spec is then not parsed again).
    ``replicas > 1`` evaluates on that many Ray actors of ``threads`` CPU threads each (a local Ray
    unless ``address`` names a cluster); ``lm`` is then not used."""
    task = get_task(config.task)
    if task.executes_code:
        sandbox.require()  # refuse before generating anything if programs could not be run
    strategy = strategy if strategy is not None else parse(config.strategy)
    config = dataclasses.replace(config, strategy=strategy.spec())
    sampling = task_sampling(
        task, temperature=config.temperature, max_tokens=config.max_tokens, seed=config.seed, n=config.n
    )
    problems = load_problems(task, config.split, config.data, config.limit)
    check_int("batch_size", batch_size)
    check_int("replicas", replicas)
    check_int("threads", threads)
    out = Path(output)
    with locked(out):
        done = read_samples(out / SAMPLES, repair=True)
        wanted = {**dataclasses.asdict(config), "data_sha256": records_hash(problems)}
        sharded = (out / SHARDS).is_dir()  # a replica run was interrupted
        if done or sharded:
            claim(out, wanted, resuming=True)
        if sharded:
            with open(out / SAMPLES, "a", encoding="utf-8") as sink:
                fold_shards(out, done, sink)
        todo = [(i, p) for i, p in enumerate(problems) if str(p["id"]) not in done]
        if todo and replicas == 1:  # a model that cannot be loaded leaves the directory as it was
            lm = lm or load(config.model, dtype=config.dtype, backend=config.backend)
        elif todo:
            check_loadable(config.model)  # before any replica starts
        if not done and not sharded:
            claim(out, wanted, resuming=False)
        model = describe(lm) if lm is not None else {"model": config.model, "model_revision": None}
        if todo:
            if replicas > 1:
                source = evaluate_on_replicas(
                    config,
                    strategy,
                    todo,
                    out,
                    replicas=replicas,
                    threads=threads,
                    batch_size=batch_size,
                    address=address,
                    model=model,
                )
            else:
                source = evaluate(lm, task, strategy, sampling, todo, batch_size)
            with (
                open(out / SAMPLES, "a", encoding="utf-8") as sink,
                _progress(len(problems), len(done), progress) as bar,
            ):
                for record in source:
                    if record["id"] in done:  # a batch re-run after a replica restart
                        continue
                    sink.write(json.dumps(record) + "\n")
                    sink.flush()
                    os.fsync(sink.fileno())
                    done[record["id"]] = record
                    bar(record)
        records = [done[str(p["id"])] for p in problems]
        if (out / SHARDS).is_dir():
            finish(out, records)
        results = {**summarise(config, records, model), "task_name": task.name, "data_sha256": wanted["data_sha256"]}
        (out / RESULTS).write_text(json.dumps(results, indent=2) + "\n")
    return results


def load_problems(
    task: Task, split: str | None = None, data: str | None = None, limit: int | None = None
) -> list[dict]:
    """The problems of ``split`` (checked against the task's splits; ``None``: the test split), or of
    the local JSONL file ``data``, the first ``limit`` of them; ``ValueError`` if there are none."""
    split = task.split(split)
    if limit is not None:
        check_int("limit", limit)
    if data is not None:
        if not Path(data).is_file():
            raise FileNotFoundError(f"--data file {data} does not exist")
        problems, source = read_jsonl(Path(data)), f"--data file {data}"
    else:
        problems, source = task.load(split), f"the {split} split of {task.name}"
    if not problems:
        raise ValueError(f"{source} has no records")
    return problems[:limit]


@contextmanager
def _progress(total: int, done: int, enabled: bool) -> Iterator[Callable[[dict], None]]:
    """Yield ``bar(record)``, which advances a progress bar showing accuracy so far and tokens/s."""
    bar = progress_bar(total=total, initial=done, disable=not enabled, desc="eval", unit="problem")
    seen = {"problems": 0, "correct": 0, "tokens": 0, "seconds": 0.0}

    def update(record: dict) -> None:
        seen["problems"] += 1
        seen["correct"] += bool(record["correct"])
        seen["tokens"] += record["tokens"]
        seen["seconds"] += record["seconds"]
        rate = seen["tokens"] / max(seen["seconds"], 1e-9)
        bar.set_postfix(acc=f"{seen['correct'] / seen['problems']:.3f}", tok_s=f"{rate:.0f}")
        bar.update(1)

    try:
        yield update
    finally:
        bar.close()


def summarise(config: EvalConfig, records: list[dict], model: dict) -> dict:
    """Metrics, cost per sample and provenance (``model``: :func:`describe`'s) for ``results.json``."""
    total = len(records)
    correct = sum(bool(r["correct"]) for r in records)
    n = config.n
    metrics: dict = {"accuracy": correct / total if total else 0.0, "accuracy_ci95": wilson_interval(correct, total)}
    if n > 1:
        ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k <= n]
        metrics["pass@k"] = {
            str(k): sum(pass_at_k(n, sum(r["correct_outputs"]), k) for r in records) / total for k in ks
        }
        metrics[f"maj@{n}"] = metrics["accuracy"]
    per = lambda key: sum(r[key] for r in records) / total if total else 0.0  # noqa: E731
    ledger = sum((Counter(r.get("cost", {})) for r in records), Counter())
    return {
        "task": config.task,
        "strategy": config.strategy,
        "config": dataclasses.asdict(config),
        "num_samples": total,
        "metrics": metrics,
        "cost": {
            "tokens_per_sample": per("tokens"),
            "forward_passes_per_sample": per("forward_passes"),
            "token_rows_per_sample": per("token_rows"),
            "seconds_per_sample": per("seconds"),
            **{f"{key}_per_sample": value / total for key, value in sorted(ledger.items())},
        },
        "wall_time": sum(r["seconds"] for r in records),
        **model,
        "versions": _versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _versions() -> dict[str, str]:
    import torch
    import transformers

    import moesteer

    return {
        "moesteer": moesteer.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
