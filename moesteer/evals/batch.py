"""Scoring problems in batches: one engine call per batch, one record per problem.

What a one-process run and every eval replica (:mod:`.replicas`) do with a batch: build the
task's prompts, generate under the strategy (or score the options of a multiple-choice task), and
turn each problem's completions into the record ``samples.jsonl`` keeps. Randomness is keyed by
the problem's index, so a problem gets the same record in whatever batch or process it runs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from moesteer.answers import majority_vote, merged_cost
from moesteer.checks import check_int
from moesteer.evals.tasks import Task
from moesteer.lm import LM
from moesteer.sampling import Completion, SamplingParams
from moesteer.strategies.context import RunContext
from moesteer.strategy import TokenStrategy

__all__ = ["describe", "evaluate", "task_context", "task_sampling"]


def task_sampling(task: Task, *, temperature: float = 0.0, max_tokens: int | None = None, seed: int = 0, n: int = 1):
    """The task's default generation settings with the given overrides (``max_tokens=None``: the task's)."""
    return SamplingParams(
        temperature=temperature,
        max_tokens=task.max_tokens if max_tokens is None else max_tokens,
        stop=task.stop,
        seed=seed,
        n=n,
    )


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
        completions = lm.generate(
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
    cost = merged_cost(outputs)
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
        "forward_passes": cost["forward_passes"],
        "token_rows": cost["token_rows"],
        **({"cost": cost["cost"]} if cost["cost"] else {}),
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


def describe(lm: LM) -> dict:
    """The model of a run, for ``results.json``: its name and hub revision (``None`` for a local one)."""
    return {"model": lm.name, "model_revision": getattr(lm.config, "_commit_hash", None)}
