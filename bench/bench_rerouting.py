"""Rerouting's cost per problem against plain greedy decoding, batch 1 and batch 32, HF and vLLM.

The embedded model, 32 ``arith`` test problems, the task's 128 tokens at most, greedy; batch 1
runs the problems one call each, batch 32 in one call. Prefill-only rerouting (5 steps) adds one
scoring forward and 5 forward+backward passes over the prompt; the online variant (``every=16``)
repeats them on prompt + generated text every 16 tokens and rebuilds the cache. On vLLM the
optimisation runs on the engine's HF copy and decoding in vLLM. The paper reports ~1.9× on
HumanEval; the targets here are prefill-only ≤ 2× at batch 1 and 32, online ≤ 4× at batch 32.
Each engine runs in its own process, one after the other.
Run: ``.venv/bin/python bench/bench_rerouting.py [--quick]``.
"""

from __future__ import annotations

import json
import sys

from common import best_times, child_results
from figures import record, scaled, table

PROBLEMS, REPEATS = scaled(32, 2), scaled(3, 1)
TARGETS = {("prefill", 1): 2.0, ("prefill", PROBLEMS): 2.0, ("online every=16", PROBLEMS): 4.0}
VARIANTS = {"prefill": "rerouting(every=None)", "online every=16": "rerouting(every=16)"}


def child(backend: str) -> None:
    """Print ``{"<variant>@<batch>": seconds}`` (best of REPEATS) for plain and each variant."""
    import moesteer
    from moesteer.evals.tasks import get_task
    from moesteer.sampling import SamplingParams
    from moesteer.strategies.spec import parse

    lm = moesteer.load(backend=backend)
    task = get_task("arith")
    prompts = [task.prompt(p) for p in task.load("test")[:PROBLEMS]]
    greedy = SamplingParams(max_tokens=task.max_tokens, stop=task.stop)
    runs = {}
    for name, spec in {"plain": None, **VARIANTS}.items():
        strategy = parse(spec) if spec else None
        runs[f"{name}@{PROBLEMS}"] = lambda s=strategy: lm.generate(prompts, s, greedy)
        runs[f"{name}@1"] = lambda s=strategy: [lm.generate([p], s, greedy) for p in prompts]
    print(json.dumps(best_times(runs, REPEATS)))


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2])
        return
    rows = []
    for backend in ("hf", "vllm"):
        t = child_results(__file__, backend)
        for batch in (1, PROBLEMS):
            plain = t[f"plain@{batch}"]
            ratios = [f"{t[f'{name}@{batch}'] / plain:.2f}" for name in VARIANTS]
            for name in VARIANTS:
                limit = TARGETS.get((name, batch))
                record(f"{backend} b{batch}: {name} / greedy", t[f"{name}@{batch}"] / plain, at_most=limit)
            rows.append([backend, str(batch), f"{plain / PROBLEMS * 1000:.1f}", *ratios])
    print(f"== embedded model: {PROBLEMS} arith test problems, greedy; time relative to plain (best of {REPEATS})")
    print(table(rows, ["backend", "batch", "plain ms/problem", *VARIANTS]))
    print(f"\ntargets: prefill <= 2.0 at batch 1 and {PROBLEMS} (the paper: ~1.9x), online <= 4.0 at {PROBLEMS}")


if __name__ == "__main__":
    main()
