"""``arith_steps``: an exact process reward for the ``arith`` task (the embedded model's).

A question ``Q: a op1 b1 op2 b2 ... = ?`` is evaluated left to right. Each line of a step must be
either the next operation, ``<previous result> <op_i> <b_i> = <its value>`` (the question's next
operator and operand applied to the chain's running value, computed correctly), or the final
``#### <value>`` once every operator is used; steps are labelled as in
:mod:`moesteer.verifiers.chain` (Math-Shepherd: a step is good while the solution can still be right).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from typing import ClassVar

from moesteer.verifiers.base import Verifier
from moesteer.verifiers.chain import label_steps

_QUESTION = re.compile(r"Q:\s*(-?\d+)((?:\s*[-+*]\s*\d+)+)\s*=\s*\?")
_OPERATION = re.compile(r"([-+*])\s*(\d+)")
_EQUATION = re.compile(r"(-?\d+)\s*([-+*])\s*(\d+)\s*=\s*(-?\d+)")
_ANSWER = re.compile(r"####\s*(-?\d+)")
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def parse_question(question: str) -> tuple[int, list[tuple[str, int]]]:
    """``(first operand, [(operator, operand), ...])`` of an arith question."""
    match = _QUESTION.search(question)
    if match is None:
        raise ValueError(f"arith_steps verifies arith questions like 'Q: 37 + 48 - 12 = ?', got {question[:60]!r}")
    return int(match.group(1)), [(op, int(b)) for op, b in _OPERATION.findall(match.group(2))]


class ArithSteps(Verifier):
    """Rule verifier for ``arith`` chains (see the module docstring)."""

    name: ClassVar[str] = "arith_steps"

    def score(self, questions, steps, logprobs=None) -> list[list[float]]:
        return [self.score_chain(q, chain) for q, chain in zip(questions, steps, strict=True)]

    @staticmethod
    def score_chain(question: str, steps: Sequence[str]) -> list[float]:
        value, operations = parse_question(question)
        return label_steps(steps, value, operations, _read_line, lambda a, op, b: _APPLY[op](a, b))


def _read_line(line: str) -> tuple | None:
    """An equation line as ``(a, op, b, c)``, a ``#### n`` line as ``(n,)``, else ``None``."""
    equation, answer = _EQUATION.fullmatch(line), _ANSWER.fullmatch(line)
    if equation:
        return int(equation[1]), equation[2], int(equation[3]), int(equation[4])
    return (int(answer[1]),) if answer else None
