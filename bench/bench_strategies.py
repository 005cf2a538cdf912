"""Token strategies and self-consistency: cost relative to plain decoding, measured side by side.

Batch 1, 128 new tokens, on the embedded model and a ~60M random MoE. Targets: SCMoE ≤ 1.3× plain
time and ≤ 1.1× the "row floor" (plain decoding of two different prompts: what the second row alone
costs); RoE N=4 with the clean cache ≤ 1.6× (N=16 reported); peak memory of the clean vs the standard
cache at N=16 (target: clean ≤ 1.2× plain). SelfConsistency n=8 (one call, shared prefill) vs 8
sequential single-sample calls. Run: ``.venv/bin/python bench/bench_strategies.py [--quick]``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from common import MODELS, best_times, other_prompts, params_millions, peak_rss_mib, report_peak
from figures import QUICK, record, scaled, subset, table

import moesteer
from moesteer.sampling import SamplingParams
from moesteer.strategies.roe import RoE
from moesteer.strategies.scmoe import SCMoE
from moesteer.strategies.self_consistency import SelfConsistency

NEW_TOKENS = scaled(128, 16)
ALL_MODELS: dict[str, Callable[[], object]] = {
    "embedded arith model": lambda: moesteer.load(),
    **{
        label: (lambda build=build: moesteer.load(build()))
        for label, build in MODELS.items()
        if label != "tiny random olmoe"
    },
}


def runs_for(lm: moesteer.LM) -> dict[str, Callable[[], object]]:
    greedy = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    sampled = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, temperature=0.7)
    prompt = lm.tokenizer("Q: 37 + 48 - 12 * 3 = ?\n")["input_ids"] if lm.tokenizer else [5, 17, 42, 9, 77, 31, 12, 8]
    other = other_prompts([prompt], lm.config.vocab_size, 1)
    generate = lm.generate
    return {
        "plain": lambda: generate([prompt], None, greedy),
        "plain, 2 prompts (row floor)": lambda: generate([prompt, *other], None, greedy),
        "scmoe": lambda: generate([prompt], SCMoE(beta=0.5), greedy),
        "roe N=4 clean": lambda: generate([prompt], RoE(samples=4, cache="clean"), greedy),
        "roe N=4 standard": lambda: generate([prompt], RoE(samples=4), greedy),
        "roe N=16 clean": lambda: generate([prompt], RoE(samples=16, cache="clean"), greedy),
        "roe N=16 standard": lambda: generate([prompt], RoE(samples=16), greedy),
        "sc n=8 (one call)": lambda: generate([prompt], SelfConsistency(n=8), sampled),
        "8 sequential calls": lambda: [
            generate([prompt], None, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, temperature=0.7, seed=s))
            for s in range(8)
        ],
    }


def record_model(label: str, best: dict[str, float], memory: dict[str, float]) -> None:
    plain = best["plain"]
    record(f"{label}: scmoe / plain", best["scmoe"] / plain, at_most=1.3)
    record(f"{label}: scmoe / two-row floor", best["scmoe"] / best["plain, 2 prompts (row floor)"], at_most=1.1)
    record(f"{label}: roe N=4 clean / plain", best["roe N=4 clean"] / plain, at_most=1.6)
    for name in ("roe N=4 standard", "roe N=16 clean", "roe N=16 standard"):
        record(f"{label}: {name} / plain", best[name] / plain)
    record(f"{label}: roe N=16 clean peak memory / plain", memory["roe N=16 clean"] / memory["plain"], at_most=1.2)
    record(f"{label}: sc n=8 one call / 8 sequential calls", best["sc n=8 (one call)"] / best["8 sequential calls"])


def main() -> None:
    torch.set_num_threads(2)
    if sys.argv[1:2] == ["--memory"]:
        label, name = sys.argv[2:4]
        report_peak(runs_for(ALL_MODELS[label]())[name])
        return
    for label, build in subset(ALL_MODELS).items():
        lm = build()
        print(f"\n== {label}: {params_millions(lm.model):.1f}M parameters, batch 1, {NEW_TOKENS} new tokens")
        runs = runs_for(lm)
        best = best_times(runs, repeats=scaled(3, 1))
        measured = ("plain", "roe N=16 clean") if QUICK else ("plain", "roe N=16 clean", "roe N=16 standard")
        memory = {name: peak_rss_mib(__file__, label, name) for name in measured}
        record_model(label, best, memory)
        rows = [
            [name, f"{seconds:.2f}", f"{seconds / best['plain']:.2f}", f"{memory[name]:.1f}" if name in memory else ""]
            for name, seconds in best.items()
        ]
        print(table(rows, ["run", "seconds", "time / plain", "peak +MiB"]))
        print(f"sc n=8 one call / 8 sequential calls: {best['sc n=8 (one call)'] / best['8 sequential calls']:.2f}")
    print("\ntargets: scmoe <= 1.3, roe N=4 clean <= 1.6 (time / plain); roe N=16 clean memory <= 1.2x plain")


if __name__ == "__main__":
    main()
