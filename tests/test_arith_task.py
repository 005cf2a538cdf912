"""The synthetic arithmetic task: splits, format, answer extraction, scoring, registry."""

from __future__ import annotations

import itertools

import pytest

from moesteer.evals.tasks import ARITH, TASKS, get_task
from moesteer.evals.tasks.arith import (
    SPLIT_SIZES,
    TRAIN_SIZE,
    ArithConfig,
    extract_answer,
    load_split,
    score,
    train_stream,
)


def _evaluate_left_to_right(prompt: str) -> int:
    tokens = prompt.removeprefix("Q: ").removesuffix(" = ?\n").split()
    value = int(tokens[0])
    for op, operand in zip(tokens[1::2], tokens[2::2], strict=True):
        value = {"+": value + int(operand), "-": value - int(operand), "*": value * int(operand)}[op]
    return value


def test_split_sizes_and_ids_are_unique() -> None:
    validation, test = load_split("validation"), load_split("test")
    assert len(validation) == SPLIT_SIZES["validation"] >= 200
    assert len(test) == SPLIT_SIZES["test"] >= 500
    ids = [p["id"] for p in validation + test]
    assert len(set(ids)) == len(ids)


def test_splits_are_disjoint_and_train_avoids_held_out() -> None:
    validation = {p["prompt"] for p in load_split("validation")}
    test = {p["prompt"] for p in load_split("test")}
    assert len(validation) == SPLIT_SIZES["validation"] and len(test) == SPLIT_SIZES["test"]
    assert not validation & test
    train = {p["prompt"] for p in itertools.islice(train_stream(), 20000)}
    assert not train & (validation | test)


def test_train_rejects_held_out_prompts_it_would_draw() -> None:
    """With a tiny problem space the raw draws hit held-out prompts; the stream must skip them."""
    config = ArithConfig(min_steps=1, max_steps=1, max_operand=40, mul_prob=0.0)
    held_out = {p["prompt"] for s in ("validation", "test") for p in load_split(s, config)}
    train = [p["prompt"] for p in itertools.islice(train_stream(config), 2000)]
    assert not held_out & set(train)


def test_splits_are_deterministic_and_depend_on_seed() -> None:
    assert load_split("test") == load_split("test")
    first = list(itertools.islice(train_stream(seed=3), 50))
    assert first == list(itertools.islice(train_stream(seed=3), 50))
    assert first != list(itertools.islice(train_stream(seed=4), 50))
    assert load_split("test", ArithConfig(seed=1)) != load_split("test")


def test_problem_format_and_answers() -> None:
    config = ArithConfig()
    problems = load_split("test")
    for p in problems:
        assert p["prompt"].startswith("Q: ") and p["prompt"].endswith(" = ?\n")
        lines = p["target"].split("\n\n")
        assert lines[-1] == f"#### {p['answer']}"
        assert config.min_steps <= len(lines) - 1 <= config.max_steps
        assert int(p["answer"]) == _evaluate_left_to_right(p["prompt"])
        assert score(p["target"], p["answer"])
        for line in lines[:-1]:
            left, result = line.split(" = ")
            a, op, b = left.split()
            assert int(result) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    steps = [p["target"].count("\n\n") for p in problems]
    assert {s: steps.count(s) for s in set(steps)} == {2: 167, 3: 167, 4: 166}
    assert any(" * " in p["prompt"] for p in problems)


def test_example_from_the_task_description() -> None:
    text = "Q: 37 + 48 - 12 = ?\n37 + 48 = 85\n\n85 - 12 = 73\n\n#### 73"
    assert _evaluate_left_to_right(text.split("\n")[0] + "\n") == 73
    assert extract_answer(text) == "73"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5 + 7 = 12\n\n12 - 24 = -12\n\n#### -12", "-12"),
        ("#### 1,234", "1234"),
        ("####73", "73"),
        ("The answer is 7.", "7"),
        ("so the answer is: 1,234. Then 5", "1234"),
        ("I think 3, then 4, maybe 12", "12"),
        ("total 1,234,567 apples", "1234567"),
        ("it is -8.0", "-8"),
        ("halves: 2.5", "2.5"),
        ("no number here", None),
        ("", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_score() -> None:
    assert score("#### 1,234", "1234")
    assert score("12 + 1 = 13\n\n#### 13 and then 99", "13")
    assert not score("#### 14", "13")
    assert not score("nothing", "13")
    assert score("The answer is -5.", "-5")


def test_registry() -> None:
    assert TASKS["arith"] is ARITH is get_task("arith")
    problem = ARITH.load("validation")[0]
    assert ARITH.prompt(problem) == problem["prompt"]
    assert ARITH.score(problem["target"], problem)
    assert ARITH.extract(problem["target"]).answer == problem["answer"]
    with pytest.raises(ValueError, match=r"did you mean 'arith'\?.*known: .*arith"):
        get_task("arithm")
    with pytest.raises(ValueError, match="known: "):
        get_task("zzz")
    train = load_split("train")
    assert len(train) == TRAIN_SIZE and train[:50] == list(itertools.islice(train_stream(), 50))
    with pytest.raises(ValueError, match="unknown split"):
        load_split("dev")
