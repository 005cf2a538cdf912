"""The three surface formats of the ``mix`` test bed: a :class:`~.families.Problem` as prompt and target.

``f1`` is today's ``arith`` style (``Q:`` / ``####``), ``f2`` a sentence style (``Question:`` /
``Answer:``, "the answer is n."), ``f3`` a compact style (``> 37+48-12 =>``; short answers
continue the prompt's ``=> [`` and close the bracket). Every format opens every family's prompt the
same way and ``f3`` words a short-answer question as ``f1`` does, so no word of a prompt belongs
to one cell: a cell is told apart only by the combination of its format and its content. In
every format a chain's steps are separated by a blank line (``STEP_SEPARATOR``), so one search
separator serves all formats, and a short-answer prompt ends right before the answer. Examples of
a few-shot prompt (and of a training document) are joined by ``EXAMPLE_SEPARATOR``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moesteer.evals.tasks.mix.families import Problem

FORMATS = ("f1", "f2", "f3")
STEP_SEPARATOR = "\n\n"
EXAMPLE_SEPARATOR = "\n\n"
_SYMBOLS = {"+": "+", "-": "-", "and": "&", "or": "|", "xor": "^"}
_WORDS = {symbol: word for word, symbol in _SYMBOLS.items()}
OPENERS = ("Q:", "Question:", "> ")
"""How every prompt of every format starts (the next example's start ends a completion)."""
STOP = tuple(EXAMPLE_SEPARATOR + opener for opener in OPENERS)


@dataclass(frozen=True)
class ChainSyntax:
    """How one format writes a chain: the question, each step, the final answer."""

    question: str  # .format(expression=...)
    step: str  # .format(left=, op=, right=, result=)
    answer: str  # .format(answer=)
    compact: bool  # operators as symbols without spaces (``37+48``, ``t&f``)


CHAIN_SYNTAX = {
    "f1": ChainSyntax("Q: {expression} = ?\n", "{left} {op} {right} = {result}", "#### {answer}", False),
    "f2": ChainSyntax(
        "Question: what is {expression}?\nAnswer: ",
        "{left} {op} {right} is {result}.",
        "the answer is {answer}.",
        False,
    ),
    "f3": ChainSyntax("> {expression} =>\n", "{left}{op}{right}={result};", "[{answer}]", True),
}


def _op(op: str, compact: bool) -> str:
    return _SYMBOLS[op] if compact else op


def _expression(items: tuple[str, ...], compact: bool) -> str:
    """``37 + 48 - 12`` (or ``37+48-12``) from a chain's items ``("37", "+ 48", "- 12")``."""
    parts = [items[0]]
    for item in items[1:]:
        op, right = item.split()
        parts.append(f"{_op(op, compact)}{right}" if compact else f"{op} {right}")
    return ("" if compact else " ").join(parts)


def _render_chain(problem: Problem, fmt: str) -> tuple[str, str]:
    syntax = CHAIN_SYNTAX[fmt]
    prompt = syntax.question.format(expression=_expression(problem.items, syntax.compact))
    steps = [
        syntax.step.format(left=left, op=_op(op, syntax.compact), right=right, result=result)
        for left, op, right, result in problem.steps
    ]
    return prompt, STEP_SEPARATOR.join([*steps, syntax.answer.format(answer=problem.answer)])


def _options(options: tuple[str, ...], compact: bool) -> str:
    return " ".join(f"{letter}){'' if compact else ' '}{o}" for letter, o in zip("abcd", options, strict=True))


def _short_prompt(problem: Problem, fmt: str) -> str:
    """The prompt of a short-answer problem (it ends right before the answer)."""
    family, op, items = problem.family, problem.op, problem.items
    if family in ("strings", "strings+strings"):
        return {"f1": f"Q: {op} {items[0]}\nA: ", "f2": f"Question: {op} the letters of {items[0]}.\nAnswer: "}.get(
            fmt, f"> {op} {items[0]} => ["
        )
    if family == "count":
        return {
            "f1": f"Q: how many {op} in {items[0]}?\nA: ",
            "f2": f"Question: how many times does {op} occur in {items[0]}?\nAnswer: ",
        }.get(fmt, f"> how many {op} in {items[0]} => [")
    if family == "arith+count":
        return f"Q: how many {op} in the value of {_expression(items, False)}?\nA: "
    if family == "arith+compare":
        return f"Question: which value is the {op}? {_options(items, False)}\nAnswer: "
    return {
        "f1": f"Q: {op}? {_options(items, False)}\nA: ",
        "f2": f"Question: which number is the {op}? {_options(items, False)}\nAnswer: ",
    }.get(fmt, f"> {op} {_options(items, True)} => [")


def render(problem: Problem, fmt: str) -> tuple[str, str]:
    """``(prompt, target)`` of ``problem`` in format ``fmt`` (compositions have one fixed format)."""
    if problem.steps and problem.family in ("arith", "logic"):
        return _render_chain(problem, fmt)
    prompt = _short_prompt(problem, fmt)
    return prompt, problem.answer + ("]" if prompt.endswith("[") else "")


def truncate(text: str) -> str:
    """``text`` up to the first stop string (where the model starts another example)."""
    cut = min((i for i in (text.find(stop) for stop in STOP) if i >= 0), default=len(text))
    return text[:cut]


_FINAL = (re.compile(r"####\s*(\S+)"), re.compile(r"the answer is\s+(\S+?)\.?(?:\s|$)"), re.compile(r"\[([^\]\s]+)\]"))


def extract(text: str) -> str | None:
    """The answer a completion states, in any format.

    A chain's final line (``#### a``, ``the answer is a.``, ``[a]``), else the first line up to a
    closing ``]`` (short answers), stripped; ``None`` for an empty completion. The completion is
    first cut at the first stop string.
    """
    text = truncate(text)
    for pattern in _FINAL:
        match = pattern.search(text)
        if match:
            return match.group(1)
    lines = text.strip().splitlines()
    answer = lines[0].split("]")[0].strip() if lines else ""
    return answer or None


_VALUE = r"(-?\d+|[tf])"
_OPERATOR = r"([-+&|^]|and|or|xor)"
STEP_PATTERNS = {
    fmt: re.compile(
        re.escape(syntax.step)
        .replace(r"\{left\}", _VALUE)
        .replace(r"\{op\}", _OPERATOR)
        .replace(r"\{right\}", _VALUE)
        .replace(r"\{result\}", _VALUE)
    )
    for fmt, syntax in CHAIN_SYNTAX.items()
}
"""Per format, a regex of one chain step with groups (left, op, right, result)."""
ANSWER_PATTERNS = {
    fmt: re.compile(re.escape(syntax.answer).replace(r"\{answer\}", _VALUE)) for fmt, syntax in CHAIN_SYNTAX.items()
}


def operator_word(op: str) -> str:
    """An operator's canonical name (``&`` -> ``and``; ``+``, ``-`` and words unchanged)."""
    return _WORDS.get(op, op)
