"""``mix_steps``: an exact process reward for the ``mix`` test bed's chain families, in every format.

The question is the prompt's last example (a 2-shot prompt's demos are skipped): an ``arith``
(``+``/``-`` on integers) or ``logic`` (and/or/xor on ``t``/``f``) chain in ``f1``
(``Q: 37 + 48 - 12 = ?``), ``f2`` (``Question: what is 37 + 48 - 12?``) or ``f3``
(``> 37+48-12 =>``). Each line of a step must be the format's next equation
(``37 + 48 = 85``, ``37 + 48 is 85.``, ``37+48=85;``) or, once every operator is used, its final
answer (``#### 73``, ``the answer is 73.``, ``[73]``); steps are labelled as in
:mod:`moesteer.verifiers.chain`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import ClassVar

from moesteer.evals.tasks.mix.families import apply_arith, apply_logic
from moesteer.evals.tasks.mix.formats import ANSWER_PATTERNS, STEP_PATTERNS, operator_word
from moesteer.verifiers.base import Verifier
from moesteer.verifiers.chain import label_steps

_QUESTIONS = {
    "f1": re.compile(r"Q: ([^\n]*) = \?\n\Z"),
    "f2": re.compile(r"Question: what is ([^\n]*)\?\nAnswer: \Z"),
    "f3": re.compile(r"> ([^\n]*) =>\n\Z"),
}
_TERM = re.compile(r"\s*([-+&|^]|and|or|xor)?\s*(\d+|[tf])")


def parse_question(prompt: str) -> tuple[str, str, list[tuple[str, str]]]:
    """``(format, first value, [(operator word, operand), ...])`` of the prompt's last chain question."""
    for fmt, pattern in _QUESTIONS.items():
        match = pattern.search(prompt)
        if match:
            terms = _TERM.findall(match.group(1))
            if terms and not terms[0][0] and all(op for op, _ in terms[1:]):
                return fmt, terms[0][1], [(operator_word(op), value) for op, value in terms[1:]]
    raise ValueError(f"mix_steps verifies mix arith/logic chains like 'Q: 37 + 48 - 12 = ?', got {prompt[-60:]!r}")


def _apply(left: str, op: str, right: str) -> str:
    return apply_logic(left, op, right) if op in ("and", "or", "xor") else apply_arith(left, op, right)


class MixSteps(Verifier):
    """Rule verifier for ``mix`` chains (see the module docstring)."""

    name: ClassVar[str] = "mix_steps"

    def score(self, questions, steps, logprobs=None) -> list[list[float]]:
        return [self.score_chain(q, chain) for q, chain in zip(questions, steps, strict=True)]

    @staticmethod
    def score_chain(question: str, steps: Sequence[str]) -> list[float]:
        fmt, start, operations = parse_question(question)

        def read(line: str) -> tuple | None:
            equation = STEP_PATTERNS[fmt].fullmatch(line)
            if equation:
                left, op, right, result = equation.groups()
                return left, operator_word(op), right, result
            answer = ANSWER_PATTERNS[fmt].fullmatch(line)
            return (answer[1],) if answer else None

        return label_steps(steps, start, operations, read, _apply)
