"""Self-consistency: n samples of any strategy, answers extracted and voted.

Wang et al., "Self-Consistency Improves Chain of Thought Reasoning in Language Models" (2022).
The n samples run as rows of one decode call after one shared prefill per prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from moesteer.evals.stats import majority_vote
from moesteer.routing import Policy
from moesteer.sampling import Completion, SamplingParams
from moesteer.strategies.base import Controller, Plain, Strategy, as_strategy

EXTRACTORS: dict[str, str] = {"gsm8k": "moesteer.evals.tasks.arith:extract_answer"}
VOTES = ("majority",)


def resolve_extractor(extract: str | Callable[[str], str | None]) -> Callable[[str], str | None]:
    if callable(extract):
        return extract
    if extract not in EXTRACTORS:
        raise ValueError(
            f"self_consistency: extract must be one of {', '.join(EXTRACTORS)} or a callable, got {extract!r}"
        )
    import importlib

    module, attr = EXTRACTORS[extract].split(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class SelfConsistency(Controller):
    """``n`` samples of ``inner`` (any token strategy or routing policy), majority-voted.

    The returned completion is the first sample carrying the winning answer; ``samples`` holds all
    n, ``info`` the extracted answers and vote counts. Cost counters: ``forward_passes`` of the
    batched call, ``token_rows`` summed over samples. Sample with ``temperature > 0``.
    """

    inner: Strategy | Policy = dataclasses.field(default_factory=Plain)
    n: int = 8
    vote: str = "majority"
    extract: str | Callable[[str], str | None] = "gsm8k"

    name: ClassVar[str] = "self_consistency"
    paper: ClassVar[str] = "Self-Consistency Improves Chain of Thought Reasoning (Wang et al. 2022)"
    positional: ClassVar[tuple[str, ...]] = ("inner",)

    def validate(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"self_consistency: n must be an integer >= 1, got {self.n!r}")
        if self.vote not in VOTES:
            raise ValueError(f"self_consistency: vote must be one of {', '.join(VOTES)}, got {self.vote!r}")
        if isinstance(as_strategy(self.inner), Controller):
            raise ValueError("self_consistency: inner must be a token strategy or routing policy, not a controller")
        resolve_extractor(self.extract)

    def run(self, engine, prompts: list, sampling: SamplingParams, **options) -> list[Completion]:
        extract = resolve_extractor(self.extract)
        samples = engine.generate(prompts, as_strategy(self.inner), dataclasses.replace(sampling, n=self.n), **options)
        voted = []
        for p in range(len(prompts)):
            group = samples[p * self.n : (p + 1) * self.n]
            answers = [extract(c.text) for c in group]
            winner, counts = majority_vote(answers)
            chosen = group[answers.index(winner)] if winner is not None else group[0]
            voted.append(
                dataclasses.replace(
                    chosen,
                    forward_passes=max(c.forward_passes for c in group),
                    token_rows=sum(c.token_rows for c in group),
                    samples=group,
                    info={"answer": winner, "answers": answers, "votes": counts},
                )
            )
        return voted
