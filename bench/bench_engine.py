"""HF engine cost: our decode loop vs ``model.generate``, and branched decoding vs plain.

128 new tokens, greedy. Ratios are measured side by side in one run (interleaved, best of 5).
Targets: engine plain / model.generate ≥ 1.0× tokens/s at batch 1 and 8; at batch 1 a 2-branch
strategy ≤ 1.3× and a 4-branch strategy ≤ 1.6× the plain time. Batch 8 is reported without target
(this CPU is compute-bound). The "row floor" runs decode 2× / 4× as many different prompts without
branching: what the extra rows alone cost on this CPU, the floor any branched strategy sits on.
Peak memory is measured per configuration in a child process.
Run: ``.venv/bin/python bench/bench_engine.py [--quick]``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from common import MODELS, best_times, other_prompts, params_millions, peak_rss_mib, report_peak
from figures import QUICK, record, scaled, subset, table

import moesteer
from moesteer.routing import Gumbel, Policy, Ranks
from moesteer.sampling import SamplingParams
from moesteer.strategy import Strategy, TokenStrategy

NEW_TOKENS = scaled(128, 16)
BATCHES = (1, 2) if QUICK else (1, 8)


@dataclass(frozen=True)
class MeanOfBranches(Strategy, TokenStrategy):
    """Benchmark strategy: plain branch plus extra routed branches, log-probs averaged."""

    extra: tuple[Policy, ...]
    name: ClassVar[str] = "mean_of_branches"

    def branches(self) -> tuple[Policy | None, ...]:
        return (None, *self.extra)

    def combine(self, logprobs):
        return logprobs.mean(dim=1)


TWO = MeanOfBranches((Ranks(3),))
FOUR = MeanOfBranches((Ranks(3), Gumbel(1.0), Gumbel(2.0)))


def runs_for(lm: moesteer.LM, batch: int) -> dict[str, Callable[[], object]]:
    sampling = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    prompts = [[5 + i, 17, 42, 9, 77, 31, 12, 8] for i in range(batch)]
    shifted = lambda k: other_prompts(prompts, lm.model.config.vocab_size, k)  # noqa: E731
    ids = torch.tensor(prompts)
    return {
        "model.generate": lambda: lm.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        ),
        "engine plain": lambda: lm.engine.generate(prompts, None, sampling),
        "plain, 2x prompts (row floor)": lambda: lm.engine.generate(prompts + shifted(1), None, sampling),
        "plain, 4x prompts (row floor)": lambda: lm.engine.generate(
            prompts + shifted(1) + shifted(2) + shifted(3), None, sampling
        ),
        "engine 2-branch": lambda: lm.engine.generate(prompts, TWO, sampling),
        "engine 4-branch": lambda: lm.engine.generate(prompts, FOUR, sampling),
    }


def bench_batch(label: str, lm: moesteer.LM, batch: int) -> list[list[str]]:
    runs = runs_for(lm, batch)
    best = best_times(runs, repeats=scaled(5 if batch == 1 else 3, 1))
    measured = ("engine plain",) if QUICK else tuple(runs)  # quick: one child process checks the path
    memory = {name: peak_rss_mib(__file__, label, name, str(batch)) for name in measured}
    record_batch(label, batch, best)
    return [
        [
            str(batch),
            name,
            f"{batch * NEW_TOKENS / seconds:.0f}",
            f"{seconds / best['engine plain']:.2f}",
            f"{best['model.generate'] / seconds:.2f}",
            f"{memory[name]:.0f}" if name in memory else "",
        ]
        for name, seconds in best.items()
    ]


def record_batch(label: str, batch: int, best: dict[str, float]) -> None:
    """The figures of one model and batch (targets at batch 1 only for the branched runs)."""
    plain = best["engine plain"]
    record(f"{label} b{batch}: engine plain speed / model.generate", best["model.generate"] / plain, at_least=1.0)
    for rows, run in ((2, "engine 2-branch"), (4, "engine 4-branch")):
        floor = best[f"plain, {rows}x prompts (row floor)"]
        limit = {2: 1.3, 4: 1.6}[rows] if batch == 1 else None
        record(f"{label} b{batch}: {rows}-branch / plain", best[run] / plain, at_most=limit)
        record(f"{label} b{batch}: {rows}-row floor / plain", floor / plain)
        record(f"{label} b{batch}: {rows}-branch / {rows}-row floor", best[run] / floor)


def main() -> None:
    torch.set_num_threads(2)
    if sys.argv[1:2] == ["--memory"]:
        label, name, batch = sys.argv[2:5]
        lm = moesteer.load(MODELS[label]())
        report_peak(runs_for(lm, int(batch))[name])
        return
    for label, build in subset(MODELS).items():
        lm = moesteer.load(build())
        print(f"\n== {label}: {params_millions(lm.model):.1f}M parameters, {NEW_TOKENS} new tokens, greedy")
        rows = [row for batch in BATCHES for row in bench_batch(label, lm, batch)]
        print(table(rows, ["batch", "run", "tok/s", "time / engine plain", "speed vs model.generate", "peak +MiB"]))
    print("\ntargets: engine plain speed vs model.generate >= 1.0; batch 1: 2-branch <= 1.3, 4-branch <= 1.6 time")


if __name__ == "__main__":
    main()
