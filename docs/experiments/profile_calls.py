"""Where a call's time goes: cProfile of one search or token-strategy call on the embedded model.

Searches (``des``, ``beam_search``, ``best_of_n``, and ``samples``: n plain samples) use
``bench/bench_search.py``'s settings: ``--problems`` ``arith`` validation problems in one call, ``n``
rollouts, temperature 0.8, 128 tokens at most. Token strategies (``plain``, ``floor``: plain
decoding of two different prompts, ``scmoe``, ``roe``: RoE N=4 with the clean cache) use
``bench/bench_strategies.py``'s: one prompt, 128 tokens, greedy, EOS ignored. After a warm-up call,
prints the wall time, the token rows computed (prompt re-reads included) against the tokens the
completions hold, and the functions with the most cumulative and own time (``--ops``: the torch
operators it runs, counted).
Run: ``.venv/bin/python docs/experiments/profile_calls.py --backend vllm --run des``.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections.abc import Callable

SEARCHES = ("des", "beam_search", "best_of_n", "samples")
TOKEN_STRATEGIES = ("plain", "floor", "scmoe", "roe")


def search_call(lm, run: str, problems: int, n: int) -> Callable[[], list]:
    from moesteer.evals.tasks import get_task
    from moesteer.sampling import SamplingParams
    from moesteer.strategies.des import DES, BeamSearch, BestOfN

    task = get_task("arith")
    prompts = [task.prompt(p) for p in task.load("validation")[:problems]]
    if run == "samples":
        sampling = SamplingParams(max_tokens=128, temperature=0.8, n=n)
        return lambda: lm.engine.generate(prompts, None, sampling)
    strategy = {"des": DES, "beam_search": BeamSearch, "best_of_n": BestOfN}[run](
        n=n, verifier="arith_steps", temperature=0.8
    )
    return lambda: lm.generate(prompts, strategy, SamplingParams(max_tokens=128))


def token_call(lm, run: str) -> Callable[[], list]:
    from moesteer.sampling import SamplingParams
    from moesteer.strategies.roe import RoE
    from moesteer.strategies.scmoe import SCMoE

    prompt = lm.tokenizer("Q: 37 + 48 - 12 * 3 = ?\n")["input_ids"]
    other = [4 + (t - 4 + 20) % (lm.config.vocab_size - 4) for t in prompt]
    greedy = SamplingParams(max_tokens=128, ignore_eos=True)
    prompts = [prompt, other] if run == "floor" else [prompt]
    strategy = {"plain": None, "floor": None, "scmoe": SCMoE(beta=0.5), "roe": RoE(samples=4, cache="clean")}[run]
    return lambda: lm.engine.generate(prompts, strategy, greedy)


def count_ops(call: Callable[[], list], top: int) -> None:
    """Torch operators one call runs (a count that machine load does not change), the most frequent first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    events = prof.key_averages()
    print(f"{sum(e.count for e in events)} torch operator calls")
    for e in sorted(events, key=lambda e: -e.count)[:top]:
        print(f"{e.count:8d}  {e.key}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="vllm", choices=("hf", "vllm"))
    parser.add_argument("--run", default="des", choices=SEARCHES + TOKEN_STRATEGIES)
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--block-size", type=int, help="vLLM's KV block size (default: the engine's)")
    parser.add_argument("--ops", action="store_true", help="count torch operators instead (torch.profiler)")
    parser.add_argument("--out", help="also save the raw profile here")
    args = parser.parse_args()

    import torch

    import moesteer

    torch.set_num_threads(2)
    kwargs = {} if args.block_size is None else {"block_size": args.block_size}
    lm = moesteer.load(backend=args.backend, **kwargs)
    call = search_call(lm, args.run, args.problems, args.n) if args.run in SEARCHES else token_call(lm, args.run)
    call()  # warm-up
    if args.ops:
        count_ops(call, args.top)
        return
    profile = cProfile.Profile()
    start = time.perf_counter()
    out = profile.runcall(call)
    seconds = time.perf_counter() - start
    rows = sum(c.token_rows for c in out)
    tokens = sum(len(s.token_ids) for c in out for s in (c.samples or [c]))
    print(f"{args.backend} {args.run}: {seconds:.2f} s profiled; {rows} token rows computed, {tokens} tokens returned")
    stats = pstats.Stats(profile).strip_dirs()
    if args.out:
        stats.dump_stats(args.out)
    stats.sort_stats("cumulative").print_stats(args.top)
    stats.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
