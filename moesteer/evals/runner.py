"""The eval runner: a model × strategy × task, one JSONL line per finished problem, resumable.

``samples.jsonl`` gets one flushed and fsynced line per problem as soon as it is scored, so a run
killed at any point (even ``kill -9``) loses at most the batch in flight; re-running the same
configuration into the same directory skips finished problems (a torn last line is dropped). A
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
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from moesteer.checks import check_int
from moesteer.evals import sandbox
from moesteer.evals.data import read_jsonl
from moesteer.evals.rundir import RESULTS, SAMPLES, claim, locked, read_samples, records_hash
from moesteer.evals.stats import majority_vote, pass_at_k, wilson_interval
from moesteer.evals.tasks import Task, get_task
from moesteer.lm import BACKENDS, LM, load
from moesteer.sampling import MAX_N, MAX_TOKENS, Completion, SamplingParams, check_seed
from moesteer.strategies.base import Strategy, TokenStrategy
from moesteer.strategies.context import RunContext
from moesteer.strategies.spec import parse

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
) -> dict:
    """Run (or resume) ``config`` into ``output`` and return the results dict. ``strategy`` is the
    already parsed ``config.strategy`` when the caller has it (the spec is then not parsed again)."""
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
    out = Path(output)
    with locked(out):
        done = read_samples(out / SAMPLES, repair=True)
        wanted = {**dataclasses.asdict(config), "data_sha256": records_hash(problems)}
        if done:
            claim(out, wanted, resuming=True)
        todo = [(i, p) for i, p in enumerate(problems) if str(p["id"]) not in done]
        if todo:  # a model that cannot be loaded leaves the directory as it was
            lm = lm or load(config.model, dtype=config.dtype, backend=config.backend)
        if not done:
            claim(out, wanted, resuming=False)
        if todo:
            with (
                open(out / SAMPLES, "a", encoding="utf-8") as sink,
                _progress(len(problems), len(done), progress) as bar,
            ):
                for record in evaluate(lm, task, strategy, sampling, todo, batch_size):
                    sink.write(json.dumps(record) + "\n")
                    sink.flush()
                    os.fsync(sink.fileno())
                    done[record["id"]] = record
                    bar(record)
        records = [done[str(p["id"])] for p in problems]
        results = {**summarise(config, records, lm), "data_sha256": wanted["data_sha256"]}
        (out / RESULTS).write_text(json.dumps(results, indent=2) + "\n")
    return results


def task_sampling(task: Task, *, temperature: float = 0.0, max_tokens: int | None = None, seed: int = 0, n: int = 1):
    """The task's default generation settings with the given overrides (``max_tokens=None``: the task's)."""
    return SamplingParams(
        temperature=temperature,
        max_tokens=task.max_tokens if max_tokens is None else max_tokens,
        stop=task.stop,
        seed=seed,
        n=n,
    )


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


def evaluate(
    lm: LM, task: Task, strategy, sampling: SamplingParams, problems: list[tuple[int, dict]], batch_size: int = 32
) -> Iterator[dict]:
    """Scored records of ``(index, problem)`` pairs, batch by batch (``index`` keys the randomness)."""
    check_int("batch_size", batch_size)
    return (
        record
        for start in range(0, len(problems), batch_size)
        for record in _evaluate(lm, task, strategy, sampling, problems[start : start + batch_size])
    )


def _evaluate(lm: LM, task: Task, strategy, sampling: SamplingParams, chunk: list[tuple[int, dict]]) -> list[dict]:
    start = time.perf_counter()
    prompts = [task.prompt(p) for _, p in chunk]
    if task.multiple_choice:
        records = _choose(lm, task, strategy, chunk, prompts)
    else:
        completions = lm.engine.generate(
            prompts, strategy, sampling, prompt_keys=[i for i, _ in chunk], context=task_context(task)
        )
        per_problem = len(completions) // len(chunk)
        records = [
            _record(task, index, problem, prompt, completions[j * per_problem : (j + 1) * per_problem])
            for j, ((index, problem), prompt) in enumerate(zip(chunk, prompts, strict=True))
        ]
    seconds = (time.perf_counter() - start) / len(chunk)
    return [{**r, "seconds": seconds} for r in records]


def task_context(task: Task) -> RunContext:
    """The context controllers run in for ``task``: they vote with the extractor the runner scores with."""
    extract = task.extract
    return RunContext(extract=(lambda text: extract(text).answer) if extract is not None else None)


def _record(task: Task, index: int, problem: dict, prompt: str, outputs: list[Completion]) -> dict:
    extracted = [task.extract(c.text) for c in outputs]
    answers = [e.answer for e in extracted]
    correct = [task.score(c.text, problem) for c in outputs]
    voted, votes = majority_vote(answers)
    inner = [s for c in outputs for s in (c.samples or [c])]
    return {
        "id": str(problem["id"]),
        "index": index,
        "prompt": prompt,
        "outputs": [c.text for c in outputs],
        "answers": answers,
        "rules": [e.rule for e in extracted],
        "gold": task.gold(problem),
        "correct_outputs": correct,
        "correct": correct[0] if len(outputs) == 1 else voted is not None and correct[answers.index(voted)],
        "votes": outputs[0].info.get("votes", votes) if len(outputs) == 1 else votes,
        "tokens": sum(s.num_tokens for s in inner),
        "forward_passes": max(c.forward_passes for c in outputs),
        "token_rows": sum(c.token_rows for c in outputs),
        **({"cost": dict(sum((Counter(c.cost) for c in outputs), Counter()))} if any(c.cost for c in outputs) else {}),
    }


def _choose(lm: LM, task: Task, strategy, chunk: list[tuple[int, dict]], prompts: list[str]) -> list[dict]:
    """Multiple choice: each option's summed log-probability after the prompt, under the strategy."""
    if not isinstance(strategy, TokenStrategy):
        raise ValueError(
            f"{task.name} is scored by log-likelihood, which needs a token strategy, not {strategy.spec()}"
        )
    options = [task.choices(p) for _, p in chunk]
    flat_prompts = [prompt for prompt, opts in zip(prompts, options, strict=True) for _ in opts]
    scored = lm.engine.score(flat_prompts, [o for opts in options for o in opts], strategy)
    branches, records, at = len(strategy.branches()), [], 0
    for (index, problem), prompt, opts in zip(chunk, prompts, options, strict=True):
        totals = [float(s.sum()) for s in scored[at : at + len(opts)]]
        rows = branches * sum(len(lm.engine.encode(prompt)) + len(s) for s in scored[at : at + len(opts)])
        at += len(opts)
        choice = max(range(len(opts)), key=totals.__getitem__)
        correct = str(choice) == task.gold(problem)
        records.append(
            {
                "id": str(problem["id"]),
                "index": index,
                "prompt": prompt,
                "outputs": [opts[choice]],
                "answers": [str(choice)],
                "rules": ["loglikelihood"],
                "gold": task.gold(problem),
                "correct_outputs": [correct],
                "correct": correct,
                "votes": {},
                "loglikelihoods": totals,
                "tokens": 0,
                "forward_passes": 1,
                "token_rows": rows,
            }
        )
    return records


@contextmanager
def _progress(total: int, done: int, enabled: bool) -> Iterator[Callable[[dict], None]]:
    """Yield ``bar(record)``, which advances a progress bar showing accuracy so far and tokens/s."""
    bar = tqdm(total=total, initial=done, disable=not enabled, desc="eval", unit="problem", file=sys.stderr)
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


def summarise(config: EvalConfig, records: list[dict], lm: LM | None) -> dict:
    """Metrics, cost per sample and provenance for ``results.json``."""
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
        "model": lm.name if lm is not None else config.model,
        "model_revision": getattr(lm.config, "_commit_hash", None) if lm is not None else None,
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
