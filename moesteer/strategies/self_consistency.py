"""Self-consistency: n samples of any strategy, answers extracted and voted.

Wang et al., "Self-Consistency Improves Chain of Thought Reasoning in Language Models" (2022).
The n samples run as rows of one decode call after one shared prefill per prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from moesteer.answers import TASK, resolve_extractor, voted
from moesteer.checks import check_int
from moesteer.routing import Policy
from moesteer.sampling import MAX_N, Completion, SamplingParams
from moesteer.strategies.base import Controller, run
from moesteer.strategies.context import RunContext
from moesteer.strategy import Plain, Strategy, as_strategy

if TYPE_CHECKING:
    from moesteer.backends.base import Engine

VOTES = ("majority",)


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

    def run(
        self, engine: Engine, prompts: list, sampling: SamplingParams, context: RunContext, **options
    ) -> list[Completion]:
        extract = resolve_extractor(self.extract, context.extract)
        inner_sampling = dataclasses.replace(sampling, n=sampling.n * self.n)
        samples = run(self.inner, engine, prompts, inner_sampling, context=context, **options)
        groups = [samples[g * self.n : (g + 1) * self.n] for g in range(len(prompts) * sampling.n)]
        return [voted(group, extract) for group in groups]
