"""vLLM backend throughput against the HF engine, and the cost of SCMoE / RoE inside vLLM.

64 new tokens (EOS ignored), batch 1 and 16, on the embedded model and a ~60M random OLMoE. Each
engine runs in its own process, one after the other (vLLM in-process changes the torch thread
count, and two engines at once on 2 cores ruin both). Targets: vLLM ≥ 2× HF plain throughput at
batch 16 on the larger model; vLLM SCMoE ≤ 1.3× vLLM plain time at batch 1.
Run: ``.venv/bin/python bench/bench_vllm.py [--quick]``.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from common import results_per_model
from figures import QUICK, record, scaled, table

NEW_TOKENS = scaled(64, 16)
BATCHES = (1, 4) if QUICK else (1, 16)
REPEATS = scaled(3, 1)
RUNS = {"hf": ("plain",), "vllm": ("plain", "scmoe", "roe N=4")}


def child(backend: str, path: str) -> None:
    """Print ``{run: {batch: best seconds}}`` for one engine on one model."""
    import moesteer
    from moesteer.sampling import SamplingParams
    from moesteer.strategies.roe import RoE
    from moesteer.strategies.scmoe import SCMoE

    torch.set_num_threads(2)
    lm = moesteer.load(path, backend=backend)
    strategies = {"plain": None, "scmoe": SCMoE(beta=0.5), "roe N=4": RoE(samples=4, tau=0.3)}
    sampling = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    vocab = lm.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, vocab, (16,), generator=generator).tolist() for _ in range(max(BATCHES))]
    results: dict[str, dict[int, float]] = {}
    for name in RUNS[backend]:
        for batch in BATCHES:
            args = (prompts[:batch], strategies[name], sampling)
            lm.engine.generate(*args)  # warm-up
            best = float("inf")
            for _ in range(REPEATS):
                start = time.perf_counter()
                lm.engine.generate(*args)
                best = min(best, time.perf_counter() - start)
            results.setdefault(name, {})[batch] = best
    print(json.dumps(results))


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(*sys.argv[2:4])
        return
    for label, measured in results_per_model(__file__, tuple(RUNS)):
        times = {
            backend: {run: {int(b): s for b, s in by_batch.items()} for run, by_batch in runs.items()}
            for backend, runs in measured.items()
        }
        print(f"\n== {label}: {NEW_TOKENS} new tokens")
        rows = []
        for batch in BATCHES:
            hf, vl = times["hf"]["plain"][batch], times["vllm"]
            rows.append(
                [
                    str(batch),
                    f"{batch * NEW_TOKENS / hf:.0f}",
                    f"{batch * NEW_TOKENS / vl['plain'][batch]:.0f}",
                    f"{hf / vl['plain'][batch]:.2f}",
                    f"{vl['scmoe'][batch] / vl['plain'][batch]:.2f}",
                    f"{vl['roe N=4'][batch] / vl['plain'][batch]:.2f}",
                ]
            )
        for batch in BATCHES:
            hf, vl = times["hf"]["plain"][batch], times["vllm"]
            plain = vl["plain"][batch]
            speed_limit = 2.0 if label == "random olmoe" and batch == max(BATCHES) else None
            record(f"{label} b{batch}: vLLM / HF plain speed", hf / plain, at_least=speed_limit)
            scmoe_limit = 1.3 if batch == 1 else None
            record(f"{label} b{batch}: vLLM scmoe / vLLM plain", vl["scmoe"][batch] / plain, at_most=scmoe_limit)
            record(f"{label} b{batch}: vLLM roe N=4 / vLLM plain", vl["roe N=4"][batch] / plain)
        header = ["batch", "HF tok/s", "vLLM tok/s", "vLLM / HF speed", "SCMoE / plain", "RoE N=4 / plain"]
        print(table(rows, header))
    print("(SCMoE and RoE columns: vLLM time relative to vLLM plain)")
    print("\ntargets: vLLM / HF speed >= 2 at batch 16 on the larger model; SCMoE / plain time <= 1.3 at batch 1")


if __name__ == "__main__":
    main()
