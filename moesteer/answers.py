"""Answers: extracting one from a completion's text, voting, and merging what was voted over.

Below the strategies (self-consistency and the search controllers vote here) and the evals (which
record the votes). An extractor maps a completion's text to its answer (``None``: none found);
:data:`EXTRACTORS` names them for specs (``self_consistency(..., extract='arith')``), and
``"task"`` means the running task's, which a controller finds in its run context.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from moesteer.registry import Registry
from moesteer.sampling import Completion

Extractor = Callable[[str], str | None]

EXTRACTORS: Registry[Extractor] = Registry("answer extractor", {"arith": "moesteer.evals.tasks.arith:extract_answer"})
"""Answer extractors by name; ``arith`` applies GSM8K rules (``#### n``, "the answer is n", the last number)."""
TASK = "task"  # vote with the running task's extractor (GSM8K rules outside an eval)


def resolve_extractor(extract: str | Extractor, task_extract: Extractor | None = None) -> Extractor:
    """The answer extractor: a callable, a name in :data:`EXTRACTORS`, or ``"task"`` (``task_extract``,
    else ``arith``)."""
    if callable(extract):
        return extract
    if extract == TASK:
        if task_extract is not None:
            return task_extract
        extract = "arith"
    if extract not in EXTRACTORS:
        raise ValueError(
            f"self_consistency: extract must be {TASK!r}, one of {', '.join(EXTRACTORS)} or a callable, got {extract!r}"
        )
    return EXTRACTORS.get(extract)


def majority_vote(answers: Sequence[str | None]) -> tuple[str | None, dict[str, int]]:
    """The most frequent non-missing answer and the counts; ties go to the one seen first."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None, {}
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best), dict(counts)


@dataclass(frozen=True)
class Vote:
    """The answers of completions, the majority answer (``None``: no answer found) and the counts."""

    answers: list[str | None]
    winner: str | None
    counts: dict[str, int]


def vote(completions: Sequence[Completion], extract: Extractor) -> Vote:
    """Each completion's answer, majority-voted."""
    answers = [extract(c.text) for c in completions]
    return Vote(answers, *majority_vote(answers))


def merged_cost(completions: Sequence[Completion]) -> dict:
    """The cost of completions decoded side by side: ``forward_passes`` of the longest, ``token_rows``
    and the ``cost`` counters summed (``Completion`` field names)."""
    cost: Counter = Counter()
    for c in completions:
        cost.update(c.cost)
    return {
        "forward_passes": max(c.forward_passes for c in completions),
        "token_rows": sum(c.token_rows for c in completions),
        "cost": dict(cost),
    }


def voted(completions: Sequence[Completion], extract: Extractor) -> Completion:
    """One completion for a majority vote over ``completions``: the first carrying the winning answer
    (the first of all if none has an answer), with the merged cost, the completions as ``samples`` and
    the answers and counts in ``info``."""
    result = vote(completions, extract)
    chosen = completions[result.answers.index(result.winner)] if result.winner is not None else completions[0]
    return dataclasses.replace(
        chosen,
        **merged_cost(completions),
        samples=list(completions),
        info={"answer": result.winner, "answers": result.answers, "votes": result.counts},
    )
