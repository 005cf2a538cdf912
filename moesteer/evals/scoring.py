"""Answer extraction and scoring for GSM8K-style numbers, competition maths and multiple choice.

* Numbers (GSM8K): lm-eval's two filters. ``strict`` takes the first ``#### N`` (the GSM8K target
  format), else the first ``The answer is N`` (gsm8k_cot / OLMES few-shot format); ``flexible`` takes
  the last number in the text (lm-eval ``flexible-extract``). Answers are compared as numbers after
  dropping thousands commas, ``$`` and a trailing ``.``.
* Maths (MATH-500, AIME): math-verify (HuggingFace, as in lighteval) parses gold and prediction to
  sympy and tests equivalence, so ``\\frac{1}{2}``, ``0.5`` and ``1/2`` agree.
* Multiple choice (ARC, MMLU, GPQA): a letter picked out of free text by a few ordered rules.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Literal

from math_verify import parse, verify

_NUMBER = r"-?\$?-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
_HASHES = re.compile(rf"####\s*({_NUMBER})")
_ANSWER_IS = re.compile(rf"\banswer is\s*:?[\s*$(]*(?:\\boxed\{{)?\s*({_NUMBER})", re.IGNORECASE)
_ANY_NUMBER = re.compile(_NUMBER)


@dataclass(frozen=True)
class Extraction:
    """An extracted answer (normalised, e.g. ``"1234"``) and the rule that found it (``None`` if none did)."""

    answer: str | None
    rule: Literal["strict", "flexible"] | None


def normalize_number(text: str) -> str | None:
    """Canonical form of a number: ``"$1,234.50"`` -> ``"1234.5"``, ``"18.0"`` -> ``"18"``; ``None`` if not a number."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    return "0" if value == 0 else format(value.normalize(), "f")


def extract_gsm8k(text: str) -> Extraction:
    """The final numeric answer of a GSM8K-style solution (lm-eval ``strict-match``, then ``flexible-extract``)."""
    for pattern in (_HASHES, _ANSWER_IS):
        match = pattern.search(text)
        if match:
            return Extraction(normalize_number(match.group(1)), "strict")
    numbers = _ANY_NUMBER.findall(text)
    if numbers:
        return Extraction(normalize_number(numbers[-1]), "flexible")
    return Extraction(None, None)


def gsm8k_gold(answer: str) -> str:
    """The gold number of a GSM8K ``answer`` field (the text after its last ``####``), normalised."""
    gold = normalize_number(answer.split("####")[-1])
    if gold is None:
        raise ValueError(f"no number after '####' in GSM8K answer {answer[-40:]!r}")
    return gold


def score_number(pred: str | None, gold: str) -> bool:
    """Numeric equality after normalisation (``"1,000"`` == ``"1000.0"``); a missing or non-numeric pred is wrong."""
    if pred is None:
        return False
    pred_norm, gold_norm = normalize_number(pred), normalize_number(gold)
    if gold_norm is None:
        raise ValueError(f"gold answer {gold!r} is not a number")
    return pred_norm == gold_norm


def score_math(prediction_text: str, gold: str) -> bool:
    """Whether ``prediction_text`` states an answer equivalent to ``gold`` (math-verify).

    ``gold`` is a worked solution whose last ``\\boxed{}`` holds the answer (MATH ``solution``, which is
    more reliable than pre-normalised answer strings), or a bare answer such as ``\\frac{1}{2}`` or
    ``18``. The prediction's answer is found by math-verify's default extraction (``\\boxed{}`` first,
    then "final answer is" anchors, then the last expression). A prediction without an extractable
    answer scores False; a gold without one raises ``ValueError``.

    Threads: math-verify bounds parsing and comparison with ``signal.alarm`` (5 s each), which only
    works in the main thread. Called from the main thread (or a worker process) the timeouts apply;
    called from any other thread they are switched off, so a pathological expression can hang.
    """
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    if "\\boxed" not in gold and "$" not in gold:
        gold = f"$\\boxed{{{gold}}}$"
    gold_parsed = parse(gold, parsing_timeout=timeout)
    if not gold_parsed:
        raise ValueError(f"math-verify found no answer in gold {gold[-60:]!r}")
    pred_parsed = parse(prediction_text, parsing_timeout=timeout)
    return bool(pred_parsed) and verify(gold_parsed, pred_parsed, timeout_seconds=timeout)


def extract_choice(text: str, letters: str = "ABCD") -> str | None:
    """The option letter a free-text answer picks, or ``None``.

    Rules, tried in order; the first rule that matches wins, at its first match in the text:

    1. an answer phrase: ``The answer is (B)``, ``Answer: D``, ``correct option is **C**``;
    2. the text opens with the letter: ``B``, ``B.``, ``(B) Paris``, ``**C**`` (not ``A cat ...``);
    3. a line holding only the (decorated) letter;
    4. a bold or bracketed letter anywhere: ``**C**``, ``(C)``.

    Letters must be upper case (lower-case ``a`` is too often the article).
    """
    for pattern in _choice_patterns(letters):
        match = pattern.search(text)
        if match:
            return next(group for group in match.groups() if group)
    return None


@lru_cache(maxsize=8)
def _choice_patterns(letters: str) -> tuple[re.Pattern[str], ...]:
    """The compiled rules of :func:`extract_choice` for one set of option letters."""
    choice = "[" + re.escape(letters) + "]"
    return tuple(
        re.compile(rule)
        for rule in (
            rf"\b(?i:answer|option|choice)(?:\s+is)?\s*[:：]?\s*[(\[*]*\s*({choice})\b",
            rf"\A\s*[(\[*]*({choice})(?:[).\]:*]|\s*\Z|\s*\n)",
            rf"(?m)^\s*[(\[*]*({choice})[)\].:*]*\s*$",
            rf"\*\*\s*({choice})\s*\*\*|[(\[]({choice})[)\]]",
        )
    )
