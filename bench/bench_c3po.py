"""C3PO's cost per problem, each surrogate against plain greedy decoding, on the HF and vLLM engines.

The embedded model, 32 ``arith`` test problems in one call, the task's 128 tokens at most, greedy.
The reference set is built once (not timed) from the validation split. Kernel regression adds an
embedding and a weighted mean; the α search adds one forward over the neighbours per grid point;
mode finding one forward (ω⁰) and the mean shift; NGD one forward and one backward over the
neighbours per step (10). On vLLM, ω⁰ and NGD run on the engine's HF copy and decoding in vLLM.
Each engine runs in its own process, one after the other. Targets on HF: kernel ≤ 1.3×, NGD ≤ 6×.
Run: ``.venv/bin/python bench/bench_c3po.py [--quick]``.
"""

from __future__ import annotations

import json
import sys
import tempfile

from common import best_times, child_results
from figures import record, scaled, table

PROBLEMS, REPEATS, REFERENCES = scaled(32, 4), scaled(3, 1), scaled(100, 16)
TARGETS = {"kernel": 1.3, "ngd (10 steps)": 6.0}  # on HF
SURROGATES = {
    "kernel": "c3po({refs!r})",
    "alpha_search=11": "c3po({refs!r}, alpha_search=11)",
    "mode": "c3po({refs!r}, surrogate='mode')",
    "ngd (10 steps)": "c3po({refs!r}, surrogate='ngd')",
}


def child(backend: str, refs: str) -> None:
    """Print ``{name: seconds}`` (best of REPEATS) for plain decoding and each surrogate."""
    import moesteer
    from moesteer.evals.tasks import get_task
    from moesteer.sampling import SamplingParams
    from moesteer.strategies.context import RunContext
    from moesteer.strategies.spec import parse

    lm = moesteer.load(backend=backend)
    task = get_task("arith")
    prompts = [task.prompt(p) for p in task.load("test")[:PROBLEMS]]
    greedy = SamplingParams(max_tokens=task.max_tokens, stop=task.stop)
    context = RunContext()  # the reference set and the embedding model load once, as in an eval
    runs = {"plain": lambda: lm.engine.generate(prompts, None, greedy)}
    for name, spec in SURROGATES.items():
        strategy = parse(spec.format(refs=refs))
        runs[name] = lambda s=strategy: lm.generate(prompts, s, greedy, context=context)
    print(json.dumps(best_times(runs, REPEATS)))


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3])
        return
    import moesteer
    from moesteer.c3po import load_embedder
    from moesteer.evals.references import build
    from moesteer.evals.tasks import get_task

    with tempfile.TemporaryDirectory() as tmp:
        refs = build(moesteer.load(), get_task("arith"), load_embedder(), split="validation", limit=REFERENCES)
        refs.save(f"{tmp}/refs")
        rows = []
        for backend in ("hf", "vllm"):
            t = child_results(__file__, backend, f"{tmp}/refs")
            ratios = [f"{t[name] / t['plain']:.2f}" for name in SURROGATES]
            for name in SURROGATES:
                limit = TARGETS.get(name) if backend == "hf" else None
                record(f"{backend}: {name} / greedy", t[name] / t["plain"], at_most=limit)
            rows.append([backend, f"{t['plain'] / PROBLEMS * 1000:.1f}", *ratios])
    print(f"== embedded model: {PROBLEMS} arith test problems in one call, greedy, {len(refs)} references")
    print(f"plain: ms per problem; the surrogates: time relative to plain (best of {REPEATS})")
    print(table(rows, ["backend", "plain ms/problem", *SURROGATES]))


if __name__ == "__main__":
    main()
