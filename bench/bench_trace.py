"""The cost of recording routing traces: ``generate(trace=True)`` against the same call untraced.

64 new tokens (EOS ignored) for 16 prompts, plain and SCMoE, and 4 samples of each prompt, on the
embedded model (6.6M) and a ~60M random OLMoE. On HF a trace copies every router call's experts,
weights and positions to the CPU and then splits them into each completion's own records; on vLLM
they also cross back from the workers as data, and a traced request shares no prefix-cache blocks
(so that its trace holds every prompt position). The cost is per router call and batch row, not
per parameter, so its share shrinks as the model grows. Each engine runs in its own process, one
after the other. Target: traced ≤ 1.3× untraced time.
Run: ``.venv/bin/python bench/bench_trace.py [--quick]``.
"""

from __future__ import annotations

import functools
import json
import sys

import torch
from common import best_times, results_per_model
from figures import record, scaled, table

NEW_TOKENS, PROMPTS, SAMPLES = scaled(64, 16), scaled(16, 4), 4
REPEATS = scaled(3, 1)


def child(backend: str, path: str) -> None:
    """Print ``{run: [untraced seconds, traced seconds]}`` (best of 3, interleaved, after a warm-up)."""
    import moesteer
    from moesteer.sampling import SamplingParams
    from moesteer.strategies.scmoe import SCMoE

    torch.set_num_threads(2)
    lm = moesteer.load(path, backend=backend)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, lm.config.vocab_size, (24,), generator=generator).tolist() for _ in range(PROMPTS)]
    greedy = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    sampled = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, n=SAMPLES, temperature=0.8)
    calls = {"plain": (None, greedy), "scmoe": (SCMoE(beta=0.5), greedy), f"plain n={SAMPLES}": (None, sampled)}
    results: dict[str, list[float]] = {}
    for name, (strategy, sampling) in calls.items():
        call = functools.partial(lm.engine.generate, prompts, strategy, sampling)
        best = best_times({"untraced": call, "traced": functools.partial(call, trace=True)}, repeats=REPEATS)
        results[name] = [best["untraced"], best["traced"]]
    print(json.dumps(results))


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(*sys.argv[2:4])
        return
    for label, measured in results_per_model(__file__, ("hf", "vllm")):
        for backend, runs in measured.items():
            for name, (plain, traced) in runs.items():
                record(f"{label} {backend} {name}: traced / untraced", traced / plain, at_most=1.3)
        rows = [
            [backend, name, f"{plain:.2f}", f"{traced:.2f}", f"{traced / plain:.2f}"]
            for backend, runs in measured.items()
            for name, (plain, traced) in runs.items()
        ]
        print(f"\n== {label}: {PROMPTS} prompts x {NEW_TOKENS} new tokens")
        print(table(rows, ["backend", "run", "untraced s", "traced s", "traced / untraced"]))
    print("\ntarget: traced / untraced <= 1.3")


if __name__ == "__main__":
    main()
