"""``confidence``: the policy model's own certainty about each step, no extra model.

A step's score is the geometric mean of its tokens' probabilities, ``exp(mean log p)`` (in (0, 1],
so ``prod`` aggregation stays a probability-like product); a step without tokens scores 0.
"""

from __future__ import annotations

import math
from typing import ClassVar

from moesteer.verifiers.base import Verifier


class Confidence(Verifier):
    name: ClassVar[str] = "confidence"
    needs_logprobs: ClassVar[bool] = True

    def score(self, questions, steps, logprobs=None) -> list[list[float]]:
        if logprobs is None:
            raise ValueError("the confidence verifier needs the steps' token log-probs")
        return [[math.exp(sum(lp) / len(lp)) if lp else 0.0 for lp in chain] for chain in logprobs]
