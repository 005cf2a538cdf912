"""Experts tied to one kind of arith step, switched off (issue 17): does it hurt that kind more?

Positive records: the `*` lines of the 200 validation chains (span = the line, prompt = the
question and the lines before it); negative: the `+`/`-` lines. `risk_difference` ranks the
experts; `steermoe(..., deactivate=n, reverse=True)` switches off the n most `*`-tied experts
(plain `deactivate=n`: the n most `+`/`-`-tied). Greedy on the same 300 test problems as the
README's table; a step `a op b = c` is correct when c is a op b. Run from the repository root:
``.venv/bin/python docs/experiments/step_experts.py`` (~1 min on 2 cores).
"""

from __future__ import annotations

import re

import moesteer
from moesteer.analysis.experts import risk_difference
from moesteer.evals.tasks import get_task
from moesteer.routing import SteerMoE
from moesteer.sampling import SamplingParams

STEP = re.compile(r"^(-?\d+) ([*+-]) (-?\d+) = (-?\d+)$")
TABLE = "step_experts.json"


def step_records(problems: list[dict]) -> tuple[list[dict], list[dict]]:
    multiply, add_subtract = [], []
    for p in problems:
        lines = p["target"].split("\n\n")[:-1]
        for i, line in enumerate(lines):
            record = {"prompt": p["prompt"] + "".join(f"{previous}\n\n" for previous in lines[:i]), "span": line}
            (multiply if " * " in line else add_subtract).append(record)
    return multiply, add_subtract


def step_accuracy(texts: list[str]) -> dict[str, tuple[float, int]]:
    tally = {"*": [0, 0], "+-": [0, 0]}
    for text in texts:
        for line in text.split("\n"):
            m = STEP.match(line.strip())
            if m:
                a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
                kind = tally["*" if op == "*" else "+-"]
                kind[0] += {"+": a + b, "-": a - b, "*": a * b}[op] == c
                kind[1] += 1
    return {k: (right / total if total else float("nan"), total) for k, (right, total) in tally.items()}


def main() -> None:
    lm, task = moesteer.load(), get_task("arith")
    multiply, add_subtract = step_records(task.load("validation"))
    table = risk_difference(lm.engine, multiply, add_subtract)
    table.save(TABLE)
    print(f"{len(multiply)} '*' lines, {len(add_subtract)} '+'/'-' lines; top experts (layer, expert, Δ):")
    for row in table.experts[:4]:
        print(f"  {row.layer}, {row.expert}, {row.score:+.3f}")
    test = task.load("test")[:300]
    sampling = SamplingParams(max_tokens=task.max_tokens, stop=task.stop)
    runs = {"plain": None}
    runs |= {f"off: {n} most '*'-tied": SteerMoE(TABLE, deactivate=n, reverse=True) for n in (2, 4, 8)}
    runs |= {f"off: {n} most '+/-'-tied": SteerMoE(TABLE, deactivate=n) for n in (2, 4, 8)}
    print("| experts switched off | test accuracy | '*' steps correct (n) | '+'/'-' steps correct (n) |")
    print("|---|---|---|---|")
    for name, policy in runs.items():
        prompts = [p["prompt"] for p in test]
        batches = (lm.engine.generate(prompts[i : i + 32], policy, sampling) for i in range(0, len(prompts), 32))
        out = [c for batch in batches for c in batch]
        accuracy = sum(task.score(c.text, p) for c, p in zip(out, test, strict=True)) / len(test)
        steps = step_accuracy([c.text for c in out])
        times, plus_minus = steps["*"], steps["+-"]
        print(f"| {name} | {accuracy:.3f} | {times[0]:.3f} ({times[1]}) | {plus_minus[0]:.3f} ({plus_minus[1]}) |")


if __name__ == "__main__":
    main()
