"""Self-consistency: n samples of any strategy, answers extracted and voted.

Wang et al., "Self-Consistency Improves Chain of Thought Reasoning in Language Models" (2022).
The n samples run as rows of one decode call after one shared prefill per prompt.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from moesteer.checks import check_int
from moesteer.evals.stats import majority_vote
from moesteer.routing import Policy
from moesteer.sampling import MAX_N, Completion, SamplingParams
from moesteer.strategies.base import Controller, Plain, Strategy, as_strategy
from moesteer.strategies.context import RunContext

EXTRACTORS: dict[str, str] = {"arith": "moesteer.evals.tasks.arith:extract_answer"}
TASK = "task"  # vote with the running task's extractor (GSM8K rules outside an eval)
VOTES = ("majority",)


def resolve_extractor(extract: str | Callable[[str], str | None], context: RunContext | None = None):
    """The answer extractor: a callable, a name in ``EXTRACTORS``, or ``"task"`` (the context's)."""
    if callable(extract):
        return extract
    if extract == TASK:
        if context is not None and context.extract is not None:
            return context.extract
        extract = "arith"
    if extract not in EXTRACTORS:
        raise ValueError(
            f"self_consistency: extract must be {TASK!r}, one of {', '.join(EXTRACTORS)} or a callable, got {extract!r}"
        )
    module, attr = EXTRACTORS[extract].split(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class SelfConsistency(Controller):
    """``n`` samples of ``inner`` (a token strategy, routing policy or controller), majority-voted;
    ``1 <= n <= MAX_N`` (1024, as ``SamplingParams.n``).

    Each returned completion is the first sample carrying the winning answer; ``samples`` holds its
    n, ``info`` the extracted answers and vote counts. ``extract="task"`` votes with the running
    task's extractor — the one the eval runner scores with — and GSM8K rules (``####``, "the answer
    is", last number) outside an eval. Asked for ``sampling.n`` completions, it votes ``sampling.n``
    times over disjoint sets of ``n`` samples. Cost counters: ``forward_passes`` of the batched
    call, ``token_rows`` summed over samples. Sample with ``temperature > 0``.

    Args:
        inner: the strategy each sample decodes with (token strategy, routing policy or controller).
        n: samples voted over, 1..1024.
        vote: how the answers are voted: 'majority'.
        extract: answer extractor: 'task' (the running task's; GSM8K rules outside an eval) or a callable.

    Example: self_consistency(roe(samples=4), n=8)
    """

    inner: Strategy | Policy = dataclasses.field(default_factory=Plain)
    n: int = 8
    vote: str = "majority"
    extract: str | Callable[[str], str | None] = TASK

    name: ClassVar[str] = "self_consistency"
    paper: ClassVar[str] = (
        "Self-Consistency Improves Chain of Thought Reasoning in Language Models (Wang et al., arXiv 2203.11171)"
    )
    positional: ClassVar[tuple[str, ...]] = ("inner",)

    def validate(self) -> None:
        check_int("self_consistency: n", self.n, 1, MAX_N)
        if self.vote not in VOTES:
            raise ValueError(f"self_consistency: vote must be one of {', '.join(VOTES)}, got {self.vote!r}")
        as_strategy(self.inner)
        resolve_extractor(self.extract)

    def run(self, engine, prompts: list, sampling: SamplingParams, context: RunContext, **options) -> list[Completion]:
        extract = resolve_extractor(self.extract, context)
        inner, per_prompt = as_strategy(self.inner), sampling.n * self.n
        inner_sampling = dataclasses.replace(sampling, n=per_prompt)
        if isinstance(inner, Controller):
            samples = inner.run(engine, prompts, inner_sampling, context, **options)
        else:
            samples = engine.generate(prompts, inner, inner_sampling, **options)
        groups = [samples[g * self.n : (g + 1) * self.n] for g in range(len(prompts) * sampling.n)]
        return [self._voted(group, extract) for group in groups]

    @staticmethod
    def _voted(group: list[Completion], extract) -> Completion:
        answers = [extract(c.text) for c in group]
        winner, counts = majority_vote(answers)
        chosen = group[answers.index(winner)] if winner is not None else group[0]
        cost: Counter = Counter()
        for c in group:
            cost.update(c.cost)
        return dataclasses.replace(
            chosen,
            forward_passes=max(c.forward_passes for c in group),
            token_rows=sum(c.token_rows for c in group),
            samples=group,
            info={"answer": winner, "answers": answers, "votes": counts},
            cost=dict(cost),
        )
