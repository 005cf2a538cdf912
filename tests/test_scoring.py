"""Answer extraction and scoring: GSM8K numbers, math-verify equivalence, multiple-choice letters."""

from __future__ import annotations

import threading

import pytest

from moesteer.evals.scoring import (
    Extraction,
    extract_choice,
    extract_gsm8k,
    gsm8k_gold,
    normalize_number,
    score_math,
    score_number,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She makes 9 * 2 = $18.\n#### 18", Extraction("18", "strict")),
        ("#### 1,234", Extraction("1234", "strict")),
        ("#### -7", Extraction("-7", "strict")),
        ("Step 1 gives 5. So the answer is 42.", Extraction("42", "strict")),
        ("The answer is $1,000.", Extraction("1000", "strict")),
        ("The final answer is **72**", Extraction("72", "strict")),
        ("The answer is $\\boxed{16}$.", Extraction("16", "strict")),
        ("the ANSWER IS -3.50", Extraction("-3.5", "strict")),
        ("#### 7\nThe answer is 8", Extraction("7", "strict")),  # '####' outranks 'answer is'
        ("First 3 apples, then 4 more: 7 apples.", Extraction("7", "flexible")),
        ("costs $1,234.50 in total", Extraction("1234.5", "flexible")),
        ("He owes -$5", Extraction("-5", "flexible")),
        ("a list 1,2,3", Extraction("3", "flexible")),  # not thousands separators
        ("18.0", Extraction("18", "flexible")),
        ("I do not know.", Extraction(None, None)),
        ("", Extraction(None, None)),
    ],
)
def test_extract_gsm8k(text: str, expected: Extraction) -> None:
    assert extract_gsm8k(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1,000", "1000"), ("$5", "5"), ("18.", "18"), ("18.0", "18"), ("0.50", "0.5"), ("-0", "0"), ("x", None)],
)
def test_normalize_number(text: str, expected: str | None) -> None:
    assert normalize_number(text) == expected


def test_score_number() -> None:
    assert score_number("1000", "1,000")
    assert score_number("18.00", "18")
    assert score_number("-3", "-3")
    assert not score_number("3", "-3")
    assert not score_number(None, "18")
    assert not score_number("eighteen", "18")
    with pytest.raises(ValueError, match="not a number"):
        score_number("1", "n/a")


def test_gsm8k_gold() -> None:
    assert gsm8k_gold("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 2,125") == "2125"
    with pytest.raises(ValueError):
        gsm8k_gold("no marker")


@pytest.mark.parametrize(
    ("prediction", "gold"),
    [
        ("The answer is $\\boxed{0.5}$", "\\frac{1}{2}"),
        ("so it is 1/2", "\\frac{1}{2}"),
        ("\\boxed{\\frac12}", "$\\frac{1}{2}$"),
        ("\\boxed{\\frac{3}{4}}", "\\dfrac{3}{4}"),
        ("There are $\\boxed{1,000}$ apples", "1000"),
        ("\\boxed{-3}", "-3"),
        ("\\boxed{\\sqrt 2}", "\\sqrt{2}"),
        ("$(x+1)^2$", "x^2+2x+1"),
        ("Therefore the answer is $\\boxed{(3, \\pi/2)}$.", "We get $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$."),
        ("\\boxed{[2,5)}", "[2,5)"),
    ],
)
def test_score_math_equivalent(prediction: str, gold: str) -> None:
    assert score_math(prediction, gold)


@pytest.mark.parametrize(
    ("prediction", "gold"),
    [
        ("\\boxed{3}", "-3"),
        ("\\boxed{41} and later 42", "42"),  # the boxed answer wins over a later number
        ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}"),
        ("I could not solve it.", "18"),  # answer not found: False, not an exception
        ("", "18"),
    ],
)
def test_score_math_wrong(prediction: str, gold: str) -> None:
    assert not score_math(prediction, gold)


def test_score_math_gold_without_answer_raises() -> None:
    with pytest.raises(ValueError, match="no answer in gold"):
        score_math("\\boxed{1}", "")


def test_score_math_from_a_thread() -> None:
    results = []
    thread = threading.Thread(target=lambda: results.append(score_math("\\boxed{0.5}", "\\frac{1}{2}")))
    thread.start()
    thread.join()
    assert results == [True]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is (B)", "B"),
        ("Answer: D", "D"),
        ("The correct answer is: **C**", "C"),
        ("the correct option is A.", "A"),
        ("B.", "B"),
        ("C", "C"),
        ("(A) because mass is conserved", "A"),
        ("**C**", "C"),
        ("Let me think step by step.\n\nD\n", "D"),
        ("It must be **B**, not (A)", "B"),  # bold before brackets: rule 4 takes the first match
        ("Options (A) and (C) are wrong... Answer: B", "B"),  # an answer phrase outranks earlier letters
        ("A cat sat on the mat.", None),  # the article is not an answer
        ("the answer is b", None),  # lower case is not a letter option
        ("Answer: Both", None),
        ("I am not sure.", None),
    ],
)
def test_extract_choice(text: str, expected: str | None) -> None:
    assert extract_choice(text) == expected


def test_extract_choice_letters() -> None:
    assert extract_choice("The answer is E", letters="ABCDE") == "E"
    assert extract_choice("The answer is E") is None
