"""How each controller's cost grows with the batch: time per problem at batch 1, 4, 16 and 32.

The embedded model, the first ``b`` ``arith`` test problems in one call (the task's 128 tokens at
most, its stop strings, greedy; searches sample their rollouts at 0.8), best of ``--repeats``
after a warm-up, on one engine. Prints a markdown table: milliseconds per problem and, in
brackets, the time relative to plain greedy decoding at the same batch, so a row that stays flat
scales like plain decoding and a row that grows costs more per problem as the batch grows.
Run on an otherwise idle machine: ``.venv/bin/python docs/experiments/cost_vs_batch.py [--quick]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

CONTROLLERS = {
    "plain": None,
    "scmoe": "scmoe(beta=0.5)",
    "roe N=4": "roe(samples=4, cache={cache!r})",  # the clean cache on HF; vLLM has the standard one
    "rerouting prefill": "rerouting(every=None)",
    "rerouting every=16": "rerouting(every=16)",
    "c3po kernel": "c3po({refs!r})",
    "c3po ngd": "c3po({refs!r}, surrogate='ngd')",
    "best_of_n n=16": "best_of_n(n=16, verifier='arith_steps')",
    "beam_search n=16": "beam_search(n=16, verifier='arith_steps')",
    "des n=16": "des(n=16, verifier='arith_steps')",
}


def best_seconds(call: Callable[[], object], repeats: int) -> float:
    call()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="hf", choices=("hf", "vllm"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="batches 1 and 2, one repeat, 16 references")
    args = parser.parse_args()
    batches, repeats, references = ((1, 2), 1, 16) if args.quick else ((1, 4, 16, 32), args.repeats, 100)

    import torch

    import moesteer
    from moesteer.c3po import load_embedder
    from moesteer.evals.references import build
    from moesteer.evals.tasks import get_task
    from moesteer.sampling import SamplingParams
    from moesteer.strategies.context import RunContext
    from moesteer.strategies.spec import parse

    torch.set_num_threads(2)
    task = get_task("arith")
    problems = [task.prompt(p) for p in task.load("test")[: max(batches)]]
    greedy = SamplingParams(max_tokens=task.max_tokens, stop=task.stop)
    with tempfile.TemporaryDirectory() as tmp:
        build(moesteer.load(), task, load_embedder(), split="validation", limit=references).save(f"{tmp}/refs")
        lm = moesteer.load(backend=args.backend)
        context = RunContext()
        ms: dict[str, dict[int, float]] = {}
        for name, spec in CONTROLLERS.items():
            cache = "clean" if args.backend == "hf" else "standard"
            strategy = parse(spec.format(refs=f"{tmp}/refs", cache=cache)) if spec else None
            for b in batches:
                call = lambda s=strategy, b=b: lm.generate(problems[:b], s, greedy, context=context)  # noqa: E731
                ms.setdefault(name, {})[b] = 1000 * best_seconds(call, repeats) / b
    header = "| controller | " + " | ".join(f"batch {b}" for b in batches) + " |"
    print(f"ms per problem ({args.backend}, best of {repeats}); in brackets: time relative to plain at that batch\n")
    print(header)
    print("|---" * (len(batches) + 1) + "|")
    for name, by_batch in ms.items():
        cells = [f"{by_batch[b]:.1f} ({by_batch[b] / ms['plain'][b]:.2f}×)" for b in batches]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
