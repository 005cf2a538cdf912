"""The verifier protocol: per-step scores of reasoning chains, and how they are aggregated.

A chain is a question and the steps of one candidate solution (texts, the step separator removed).
``score(questions, steps, logprobs)`` scores many chains at once — ``questions[i]`` with
``steps[i]`` — and returns one score per step (higher = better), as a process reward model does.
``logprobs[i][j]`` are the policy model's token log-probs of step ``j`` of chain ``i``; verifiers
that read them (``confidence``) set ``needs_logprobs``. search-and-learn's ``PRM.score(questions,
outputs)`` shape (``[question][completion][step]``, steps split from each output) is
:func:`score_outputs`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

AGGREGATES = ("last", "min", "prod")


class Verifier:
    """Base of verifiers: subclasses set ``name`` and implement ``score``."""

    name: ClassVar[str]
    needs_logprobs: ClassVar[bool] = False
    gives_scores: ClassVar[bool] = True

    def score(
        self,
        questions: Sequence[str],
        steps: Sequence[Sequence[str]],
        logprobs: Sequence[Sequence[Sequence[float]]] | None = None,
    ) -> list[list[float]]:
        raise NotImplementedError


class NoScores(Verifier):
    """``none``: every step scores 0 — search keeps candidates in rollout order; answers are voted."""

    name: ClassVar[str] = "none"
    gives_scores: ClassVar[bool] = False

    def score(self, questions, steps, logprobs=None) -> list[list[float]]:
        return [[0.0] * len(chain) for chain in steps]


def aggregate(step_scores: Sequence[float], how: str) -> float:
    """One score for a chain: its ``last`` step's, the ``min`` over steps, or their ``prod``
    (search-and-learn's ``aggregate_scores``); a chain without steps scores 0."""
    if not step_scores:
        return 0.0
    if how == "last":
        return float(step_scores[-1])
    if how == "min":
        return float(min(step_scores))
    if how == "prod":
        return float(math.prod(step_scores))
    raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {how!r}")


def split_steps(text: str, separator: str) -> list[str]:
    """The steps of a solution text: split on ``separator``, stripped, empty pieces dropped."""
    return [s.strip() for s in text.split(separator) if s.strip()]


def score_outputs(
    verifier: Verifier, questions: Sequence[str], outputs: Sequence[Sequence[str]], separator: str = "\n\n"
) -> list[list[list[float]]]:
    """search-and-learn's shape: ``[question][completion][step]`` scores of whole output texts."""
    flat_q = [q for q, outs in zip(questions, outputs, strict=True) for _ in outs]
    flat_steps = [split_steps(o, separator) for outs in outputs for o in outs]
    scores = iter(verifier.score(flat_q, flat_steps))
    return [[next(scores) for _ in outs] for outs in outputs]
