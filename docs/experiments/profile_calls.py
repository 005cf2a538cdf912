"""Where a call's time goes: cProfile of one search or token-strategy call on the embedded model.

Controllers (``rerouting``, ``rerouting_online``: ``every=16``, ``c3po_kernel``, ``c3po_ngd``,
with 100 references built from ``arith`` validation) use ``bench/bench_rerouting.py``'s and
``bench/bench_c3po.py``'s: ``--problems`` ``arith`` test problems in one call, greedy, the task's
128 tokens and stop strings. Searches (``des``, ``beam_search``, ``best_of_n``, and ``samples``: n plain samples) use
``bench/bench_search.py``'s settings: ``--problems`` ``arith`` validation problems in one call, ``n``
rollouts, temperature 0.8, 128 tokens at most. Token strategies (``plain``, ``floor``: plain
decoding of two different prompts, ``scmoe``, ``roe``: RoE N=4 with the clean cache) use
``bench/bench_strategies.py``'s: one prompt, 128 tokens, greedy, EOS ignored. After a warm-up call,
prints the wall time, the token rows computed (prompt re-reads included) against the tokens the
completions hold, and the functions with the most cumulative and own time (``--ops``: the torch
operators it runs, counted; ``--lineage``: on vLLM, a search's token rows by what they compute).
Run: ``.venv/bin/python docs/experiments/profile_calls.py --backend vllm --run des``.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from collections.abc import Callable

SEARCHES = ("des", "beam_search", "best_of_n", "samples")
TOKEN_STRATEGIES = ("plain", "floor", "scmoe", "roe")
CONTROLLERS = {
    "greedy": None,
    "rerouting": "rerouting(every=None)",
    "rerouting_online": "rerouting(every=16)",
    "c3po_kernel": "c3po({refs!r})",
    "c3po_ngd": "c3po({refs!r}, surrogate='ngd')",
}


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


def controller_call(lm, run: str, problems: int, refs: str) -> Callable[[], list]:
    from moesteer.evals.tasks import get_task
    from moesteer.sampling import SamplingParams
    from moesteer.strategies.spec import parse

    task = get_task("arith")
    prompts = [task.prompt(p) for p in task.load("test")[:problems]]
    greedy = SamplingParams(max_tokens=task.max_tokens, stop=task.stop)
    spec = CONTROLLERS[run]
    strategy = parse(spec.format(refs=refs)) if spec else None
    return lambda: lm.generate(prompts, strategy, greedy)


def c3po_references(folder: str) -> str:
    """100 references from ``arith`` validation, as ``bench/bench_c3po.py`` builds them."""
    import moesteer
    from moesteer.c3po import load_embedder
    from moesteer.evals.references import build
    from moesteer.evals.tasks import get_task

    build(moesteer.load(), get_task("arith"), load_embedder(), split="validation", limit=100).save(folder)
    return folder


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


def rows_by_lineage(call: Callable[[], list]) -> None:
    """A vLLM search's token rows by what they compute, counted in :class:`PrefixSession`'s runs.

    ``prompt``: first reads of the problems; ``new``: the tokens each run decodes; the rest are
    re-reads of the part of a sequence past its last full KV block, which every continuation
    recomputes. They split into re-reads by a sequence that continues its own request or is the
    first child of a sequence that ran (a request kept in flight between runs would save these) and
    re-reads by further children of a fork (the prefix cache shares full blocks only, so no request
    kept in flight saves these)."""
    from moesteer.backends.vllm.session import PrefixSession

    parent_of: dict[int, int] = {}
    ran: set[int] = set()
    rows = {"prompt": 0, "new": 0, "re-read, own or first child": 0, "re-read, further fork children": 0}
    fork, run = PrefixSession.fork, PrefixSession.run

    def counting_fork(self, seq_id, copies, sample_keys=None):
        children = fork(self, seq_id, copies, sample_keys)
        parent_of.update((child, seq_id) for child in children)
        return children

    def counting_run(self, max_steps=None, until=None):
        live = self.live()
        before = {sid: (len(self.seqs[sid].tokens), self.seqs[sid].token_rows) for sid in live}
        claimed: set[int] = set()
        kinds = {}
        for sid in sorted(live):
            origin = sid
            while origin not in ran and origin in parent_of:
                origin = parent_of[origin]
            if origin not in ran:
                kinds[sid] = "prompt"
            elif origin in claimed:
                kinds[sid] = "re-read, further fork children"
            else:
                claimed.add(origin)
                kinds[sid] = "re-read, own or first child"
        paused = run(self, max_steps, until)
        for sid in live:
            seq, (length, computed) = self.seqs[sid], before[sid]
            new = len(seq.tokens) - length
            reread = seq.token_rows - computed - max(new - 1, 0)
            rows["new"] += max(new - 1, 0)
            rows[kinds[sid]] += reread
        ran.update(live)
        return paused

    PrefixSession.fork, PrefixSession.run = counting_fork, counting_run
    try:
        call()
    finally:
        PrefixSession.fork, PrefixSession.run = fork, run
    total = sum(rows.values())
    for kind, count in rows.items():
        print(f"{count:8d}  {count / total:6.1%}  {kind}")
    print(f"{total:8d}  token rows in all")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="vllm", choices=("hf", "vllm"))
    parser.add_argument("--run", default="des", choices=SEARCHES + TOKEN_STRATEGIES + tuple(CONTROLLERS))
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--block-size", type=int, help="vLLM's KV block size (default: the engine's)")
    parser.add_argument("--ops", action="store_true", help="count torch operators instead (torch.profiler)")
    parser.add_argument("--lineage", action="store_true", help="vLLM searches: token rows by what they compute")
    parser.add_argument("--out", help="also save the raw profile here")
    args = parser.parse_args()

    import torch

    import moesteer

    torch.set_num_threads(2)
    kwargs = {} if args.block_size is None else {"block_size": args.block_size}
    refs = c3po_references(f"{tempfile.mkdtemp()}/refs") if args.run.startswith("c3po") else ""
    lm = moesteer.load(backend=args.backend, **kwargs)
    if args.run in SEARCHES:
        call = search_call(lm, args.run, args.problems, args.n)
    elif args.run in CONTROLLERS:
        call = controller_call(lm, args.run, args.problems, refs)
    else:
        call = token_call(lm, args.run)
    call()  # warm-up
    if args.ops:
        count_ops(call, args.top)
        return
    if args.lineage:
        rows_by_lineage(call)
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
