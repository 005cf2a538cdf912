"""Math-Shepherd labelling of a left-to-right chain, shared by the rule verifiers.

A chain starts from a value and applies the question's operations in order; each line of a step
is either the next operation, ``<running value> <op_i> <operand_i> = <its result>`` (computed
correctly), or the final answer once every operation is used. A step scores 1 when it and every
step before it are right, else 0, so ``last`` and ``min`` aggregate alike. Unparseable lines,
skipped or repeated operations, extra steps after the answer and empty steps score 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Equation = tuple[Any, str, Any, Any]
"""A parsed step line ``(left, op, right, result)``."""


def label_steps(
    steps: Sequence[str],
    start: Any,
    operations: Sequence[tuple[str, Any]],
    read: Callable[[str], Equation | tuple[Any] | None],
    apply: Callable[[Any, str, Any], Any],
) -> list[float]:
    """Per-step 0/1 labels of ``steps``.

    ``read(line)`` parses a line as an equation (4-tuple), a final answer (1-tuple) or ``None``;
    ``apply(left, op, right)`` computes an operation.
    """
    value, done, answered, right, scores = start, 0, False, True, []
    for step in steps:
        lines = [line.strip() for line in step.splitlines() if line.strip()]
        right = right and bool(lines)
        for line in lines if right else ():
            parsed = read(line)
            if parsed is not None and len(parsed) == 4 and not answered and done < len(operations):
                left, op, operand, result = parsed
                right = (left, op, operand) == (value, *operations[done]) and result == apply(left, op, operand)
                value, done = result, done + 1
            elif parsed is not None and len(parsed) == 1 and not answered and done == len(operations):
                right, answered = parsed[0] == value, True
            else:
                right = False
            if not right:
                break
        scores.append(1.0 if right else 0.0)
    return scores
