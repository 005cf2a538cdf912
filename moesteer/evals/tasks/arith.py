"""Synthetic multi-step integer arithmetic with chain-of-thought (the embedded model's task).

A problem is evaluated left to right (no operator precedence); the chain of thought has one
line per operator, blank lines between them, and a GSM8K-style final line::

    Q: 37 + 48 - 12 = ?
    37 + 48 = 85

    85 - 12 = 73

    #### 73

``prompt`` is the first line (with its newline), ``target`` the rest. Validation and test are
fixed lists (stratified over step counts); the training stream is endless and never yields a
validation or test prompt, and the ``train`` split is its first ``TRAIN_SIZE`` problems (the
first problems the embedded model was trained on; C3PO builds its reference sets from them).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from moesteer.evals.scoring import extract_gsm8k, score_number

SPLIT_SIZES = {"validation": 200, "test": 500}
"""Number of problems in the fixed splits."""
TRAIN_SIZE = 5000
"""Number of problems in the ``train`` split (a prefix of :func:`train_stream`)."""


@dataclass(frozen=True)
class ArithConfig:
    """How problems are drawn.

    Each problem has ``min_steps..max_steps`` operators. Every step is ``* d`` (d in 2..9)
    with probability ``mul_prob``, otherwise an operator from ``ops`` with an operand in
    ``0..max_operand``; the first operand is also in ``0..max_operand``.
    """

    seed: int = 0
    min_steps: int = 2
    max_steps: int = 4
    max_operand: int = 99
    ops: tuple[str, ...] = ("+", "-")
    mul_prob: float = 0.25


def make_problem(rng: random.Random, config: ArithConfig, steps: int, id: str) -> dict[str, str]:
    """Draw one problem with ``steps`` operators: ``{"id", "prompt", "target", "answer"}``."""
    value = rng.randint(0, config.max_operand)
    question, lines = [str(value)], []
    for _ in range(steps):
        if rng.random() < config.mul_prob:
            op, operand = "*", rng.randint(2, 9)
        else:
            op, operand = rng.choice(config.ops), rng.randint(0, config.max_operand)
        new = {"+": value + operand, "-": value - operand, "*": value * operand}[op]
        lines.append(f"{value} {op} {operand} = {new}")
        question.append(f"{op} {operand}")
        value = new
    return {
        "id": id,
        "prompt": f"Q: {' '.join(question)} = ?\n",
        "target": "\n\n".join([*lines, f"#### {value}"]),
        "answer": str(value),
    }


@lru_cache(maxsize=8)
def _fixed_splits(config: ArithConfig) -> dict[str, tuple[dict[str, str], ...]]:
    """Validation then test, stratified over step counts, unique prompts across both."""
    seen: set[str] = set()
    splits: dict[str, tuple[dict[str, str], ...]] = {}
    for name, size in SPLIT_SIZES.items():
        rng = random.Random(f"arith/{name}/{config.seed}")
        problems: list[dict[str, str]] = []
        while len(problems) < size:
            steps = config.min_steps + len(problems) % (config.max_steps - config.min_steps + 1)
            problem = make_problem(rng, config, steps, f"arith-{name}-{len(problems)}")
            if problem["prompt"] not in seen:
                seen.add(problem["prompt"])
                problems.append(problem)
        splits[name] = tuple(problems)
    return splits


def train_stream(config: ArithConfig = ArithConfig(), seed: int = 0) -> Iterator[dict[str, str]]:
    """Endless training problems (seeded by ``seed``) that never repeat a held-out prompt."""
    held_out = {p["prompt"] for split in _fixed_splits(config).values() for p in split}
    rng = random.Random(f"arith/train/{config.seed}/{seed}")
    index = 0
    while True:
        steps = rng.randint(config.min_steps, config.max_steps)
        problem = make_problem(rng, config, steps, f"arith-train-{index}")
        if problem["prompt"] not in held_out:
            index += 1
            yield problem


def load_split(split: str, config: ArithConfig = ArithConfig()) -> list[dict[str, str]]:
    """The fixed ``train``, ``validation`` or ``test`` problems (more training problems:
    :func:`train_stream`)."""
    if split == "train":
        return list(itertools.islice(train_stream(config), TRAIN_SIZE))
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown split {split!r}; arith has train, {', '.join(SPLIT_SIZES)}")
    return [dict(p) for p in _fixed_splits(config)[split]]


def extract_answer(text: str) -> str | None:
    """GSM8K-style answer (``#### n``, else "the answer is n", else the last number), normalised."""
    return extract_gsm8k(text).answer


def score(prediction_text: str, gold_answer: str) -> bool:
    """Exact numeric match of the extracted answer with the gold integer."""
    return score_number(extract_answer(prediction_text), gold_answer)
