"""The five problem families of the ``mix`` test bed, drawn as format-free problems.

A family draws a :class:`Problem` of a given *size* (operators, word length, digits): chain-of-thought
families (``arith``, ``logic``) record every step ``(left, op, right, result)`` of a left-to-right
evaluation; short-answer families (``strings``, ``count``, ``compare``) record the question's
parts and the answer. :mod:`~moesteer.evals.tasks.mix.formats` renders a problem as text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FAMILIES = ("arith", "logic", "strings", "count", "compare")
CHAIN_FAMILIES = ("arith", "logic")

STRING_LETTERS = "abcdefghij"
COUNT_LETTERS = "abcde"
STRING_OPS = ("sort", "reverse", "dedupe")
LOGIC_OPS = ("and", "or", "xor")
MAX_OPERAND = 19


@dataclass(frozen=True)
class Problem:
    """One format-free problem.

    ``family``: one of :data:`FAMILIES` (or ``a+b`` for an S3 composition); ``op``: the family's
    operation (``sort``, ``largest``, a count's letter, ...); ``items``: the operands (a chain's
    first value, a word, the options); ``steps``: a chain's ``(left, op, right, result)`` lines;
    ``answer``: the gold answer as text.
    """

    family: str
    op: str
    items: tuple[str, ...]
    steps: tuple[tuple[str, str, str, str], ...]
    answer: str


def apply_logic(left: str, op: str, right: str) -> str:
    """``t``/``f`` result of ``left op right`` for ``op`` in and/or/xor."""
    a, b = left == "t", right == "t"
    return "t" if {"and": a and b, "or": a or b, "xor": a != b}[op] else "f"


def apply_arith(left: str, op: str, right: str) -> str:
    """Integer result of ``left op right`` for ``op`` in ``+``/``-``."""
    return str(int(left) + int(right) if op == "+" else int(left) - int(right))


def apply_string(op: str, word: str) -> str:
    """``sort`` (alphabetical), ``reverse``, or ``dedupe`` (keep each letter's first occurrence)."""
    if op == "sort":
        return "".join(sorted(word))
    if op == "reverse":
        return word[::-1]
    return "".join(dict.fromkeys(word))


def _chain(family: str, start: str, ops: list[tuple[str, str]]) -> Problem:
    apply = apply_arith if family == "arith" else apply_logic
    value, steps = start, []
    for op, right in ops:
        result = apply(value, op, right)
        steps.append((value, op, right, result))
        value = result
    return Problem(family, "", (start, *(f"{op} {right}" for op, right in ops)), tuple(steps), value)


def draw_arith(rng: random.Random, size: int, max_operand: int = MAX_OPERAND) -> Problem:
    """``size`` operators ``+``/``-``, operands 0..max_operand, evaluated left to right."""
    ops = [(rng.choice("+-"), str(rng.randint(0, max_operand))) for _ in range(size)]
    return _chain("arith", str(rng.randint(0, max_operand)), ops)


def draw_logic(rng: random.Random, size: int) -> Problem:
    """``size`` operators and/or/xor on ``t``/``f``, evaluated left to right."""
    ops = [(rng.choice(LOGIC_OPS), rng.choice("tf")) for _ in range(size)]
    return _chain("logic", rng.choice("tf"), ops)


def draw_strings(rng: random.Random, size: int) -> Problem:
    """A word of ``size`` letters a..j and one of sort/reverse/dedupe."""
    word = "".join(rng.choice(STRING_LETTERS) for _ in range(size))
    op = rng.choice(STRING_OPS)
    return Problem("strings", op, (word,), (), apply_string(op, word))


def draw_count(rng: random.Random, size: int) -> Problem:
    """A word of ``size`` letters a..e and a letter a..e; the answer is how often it occurs."""
    word = "".join(rng.choice(COUNT_LETTERS) for _ in range(size))
    letter = rng.choice(COUNT_LETTERS)
    return Problem("count", letter, (word,), (), str(word.count(letter)))


def _options(rng: random.Random, digits: int) -> list[int]:
    """Four distinct numbers: a ``digits``-digit base, permutations of its digits, and shorter ones."""
    low = 10 ** (digits - 1)
    base = rng.randint(low, 10 * low - 1)
    options = {base}
    while len(options) < 4:
        if rng.random() < 0.6:
            shuffled = list(str(base))
            rng.shuffle(shuffled)
            candidate = int("".join(shuffled))
        else:
            candidate = rng.randint(max(1, low // 10), 10 * low - 1)
        options.add(candidate)
    ordered = sorted(options)
    rng.shuffle(ordered)
    return ordered


def draw_compare(rng: random.Random, size: int) -> Problem:
    """Four options of up to ``size`` digits (digit permutations as distractors); which is largest or smallest."""
    options = _options(rng, size)
    op = rng.choice(("largest", "smallest"))
    best = max(options) if op == "largest" else min(options)
    return Problem("compare", op, tuple(map(str, options)), (), "abcd"[options.index(best)])


DRAW = {
    "arith": draw_arith,
    "logic": draw_logic,
    "strings": draw_strings,
    "count": draw_count,
    "compare": draw_compare,
}


def draw_arith_count(rng: random.Random, size: int) -> Problem:
    """S3: how often a digit occurs in the value of a ``size``-operator arith chain."""
    chain = draw_arith(rng, size)
    digit = rng.choice("0123456789")
    return Problem("arith+count", digit, chain.items, chain.steps, str(chain.answer.count(digit)))


def draw_arith_compare(rng: random.Random, size: int) -> Problem:
    """S3: which of four one-operator arith expressions (operands up to ``10**size``) is largest or smallest."""
    expressions: list[str] = []
    values: list[int] = []
    while len(values) < 4:
        a, b, sign = rng.randint(0, 10**size - 1), rng.randint(0, 10**size - 1), rng.choice("+-")
        value = int(apply_arith(str(a), sign, str(b)))
        if value not in values:
            expressions.append(f"{a} {sign} {b}")
            values.append(value)
    op = rng.choice(("largest", "smallest"))
    best = max(values) if op == "largest" else min(values)
    return Problem("arith+compare", op, tuple(expressions), (), "abcd"[values.index(best)])


STRING_PAIRS = (("reverse", "sort"), ("reverse", "dedupe"), ("dedupe", "reverse"), ("sort", "dedupe"))
"""Ordered pairs ``(outer, inner)`` whose composition differs from each operation alone."""


def draw_strings_twice(rng: random.Random, size: int) -> Problem:
    """S3: two string operations in a row, ``outer(inner(word))``."""
    word = "".join(rng.choice(STRING_LETTERS) for _ in range(size))
    outer, inner = rng.choice(STRING_PAIRS)
    return Problem("strings+strings", f"{outer} {inner}", (word,), (), apply_string(outer, apply_string(inner, word)))


COMPOSITIONS = {
    "arith+count": draw_arith_count,
    "arith+compare": draw_arith_compare,
    "strings+strings": draw_strings_twice,
}
