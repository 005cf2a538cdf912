"""DES n=16 against 16 plain samples of the same problems, on the HF and vLLM engines.

The embedded model, 16 ``arith`` validation problems in one call, 128 tokens at most, temperature
0.8 for both. DES runs step-wise (a pause at every step separator, forks, a verifier call per
step); the 16 samples run in one uninterrupted call with a shared prefill. Target: DES ≤ 1.2× the
samples' time plus the verifier's time, which is reported separately (``arith_steps`` here, a rule
verifier; a PRM adds its own forward passes). Each engine runs in its own process, one after the
other. Run: ``.venv/bin/python bench/bench_search.py [--quick]``.
"""

from __future__ import annotations

import json
import sys
import time

from common import child_results
from figures import record, scaled, table

PROBLEMS, N, TEMPERATURE = scaled(16, 4), scaled(16, 4), 0.8
MAX_TOKENS, REPEATS = scaled(128, 64), scaled(3, 1)


def child(backend: str) -> None:
    """Print ``{"samples": s, "des": s, "verifier": s}`` (best of REPEATS) for one engine."""
    import moesteer
    from moesteer.evals.tasks import get_task
    from moesteer.sampling import SamplingParams
    from moesteer.strategies.des import DES, BeamSearch, BestOfN

    lm = moesteer.load(backend=backend)
    task = get_task("arith")
    prompts = [task.prompt(p) for p in task.load("validation")[:PROBLEMS]]
    samples = SamplingParams(max_tokens=MAX_TOKENS, temperature=TEMPERATURE, n=N)
    searches = {
        "best_of_n": BestOfN(n=N, verifier="arith_steps", temperature=TEMPERATURE),
        "beam_search": BeamSearch(n=N, verifier="arith_steps", temperature=TEMPERATURE),
        "des": DES(n=N, verifier="arith_steps", temperature=TEMPERATURE),
    }
    greedy = SamplingParams(max_tokens=MAX_TOKENS)
    runs = {
        "greedy": lambda: lm.engine.generate(prompts, None, greedy),
        "samples": lambda: lm.engine.generate(prompts, None, samples),
        **{name: (lambda s=s: lm.generate(prompts, s, greedy)) for name, s in searches.items()},
    }
    best = {name: float("inf") for name in runs}
    verifier = float("inf")
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(REPEATS):
        for name, fn in runs.items():
            start = time.perf_counter()
            out = fn()
            best[name] = min(best[name], time.perf_counter() - start)
            if name == "des":
                verifier = min(verifier, sum(c.cost.get("seconds:verifier", 0.0) for c in out))
    print(json.dumps({**best, "verifier": verifier}))


def record_backend(backend: str, t: dict[str, float]) -> None:
    samples = t["samples"]
    record(f"{backend}: (DES - verifier) / {N} samples", (t["des"] - t["verifier"]) / samples, at_most=1.2)
    beam_limit = 1.1 if backend == "vllm" else None
    record(f"{backend}: beam search / {N} samples", t["beam_search"] / samples, at_most=beam_limit)
    record(f"{backend}: best-of-N / {N} samples", t["best_of_n"] / samples)
    record(f"{backend}: {N} samples / greedy", samples / t["greedy"])


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2])
        return
    rows = []
    for backend in ("hf", "vllm"):
        t = child_results(__file__, backend)
        record_backend(backend, t)
        rows.append(
            [
                backend,
                *(f"{t[name]:.2f}" for name in ("greedy", "samples", "best_of_n", "beam_search", "des")),
                f"{t['verifier']:.3f}",
                f"{t['des'] / t['samples']:.2f}",
                f"{(t['des'] - t['verifier']) / t['samples']:.2f}",
            ]
        )
    print(f"== embedded model: {PROBLEMS} arith problems, n={N}, temperature {TEMPERATURE}, <= {MAX_TOKENS} tokens")
    print(f"seconds per call (best of {REPEATS}):")
    header = ["backend", "greedy", f"{N} samples", "Best-of-N", "beam search", "DES", "DES verifier", "DES / samples"]
    header.append("(DES - verifier) / samples")
    print(table(rows, header))
    print("\ntargets: (DES - verifier) / samples <= 1.2; beam search / samples <= 1.1 on vLLM")


if __name__ == "__main__":
    main()
