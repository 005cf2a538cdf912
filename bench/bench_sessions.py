"""Decode sessions against the closed decode loop they replaced, side by side in one run; and what a fork costs.

1. Speed: plain decoding and SCMoE (batch 1 and 8, 128 new tokens, greedy) through decode sessions
   vs the closed decode loop of ``--baseline`` (default 9b4b36a, the last commit with the closed loop).
   Each engine lives in its own worker process (the old package is extracted with ``git archive``);
   the parent interleaves the two with a pause between runs (OpenMP threads spin after work),
   best of 5. Target: new / old speed ≥ 0.98.
2. Forks: a 200-token prefix forked 16 ways costs no prefill (token rows of the children = 0) and
   time compared with 16 separate prefills.

Run: ``.venv/bin/python bench/bench_sessions.py`` (an idle machine; ~3 min).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NEW_TOKENS = 128
CASES = ["plain b1", "scmoe b1", "plain b8", "scmoe b8"]
MODELS = ["embedded", "random olmoe"]


def worker(source: str) -> None:
    """Serve ``MODEL|CASE`` lines from stdin with one timed run each (seconds on stdout)."""
    sys.path.insert(0, source)
    sys.path.insert(1, str(ROOT / "bench"))
    import torch

    torch.set_num_threads(2)
    from common import MODELS as RANDOM

    import moesteer
    from moesteer.sampling import SamplingParams
    from moesteer.strategies.scmoe import SCMoE

    assert Path(moesteer.__file__).is_relative_to(source), moesteer.__file__
    lms = {"embedded": moesteer.load(), "random olmoe": moesteer.load(RANDOM["random olmoe"]())}
    sampling = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    for line in sys.stdin:
        model, case = line.strip().split("|")
        name, batch = case.split(" b")
        vocab = lms[model].model.config.vocab_size
        prompts = [[t % vocab for t in (5 + i, 17, 42, 9, 77, 31, 12, 8)] for i in range(int(batch))]
        strategy = SCMoE(beta=0.5) if name == "scmoe" else None
        start = time.perf_counter()
        lms[model].engine.generate(prompts, strategy, sampling)
        print(time.perf_counter() - start, flush=True)


def _spawn(source: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, "--worker", source],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        stderr=subprocess.DEVNULL,
    )


def _ask(proc: subprocess.Popen, model: str, case: str) -> float:
    time.sleep(0.5)  # let the other worker's OpenMP threads stop spinning before this one runs
    proc.stdin.write(f"{model}|{case}\n")
    proc.stdin.flush()
    return float(proc.stdout.readline())


def speed(baseline: str, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as old:
        archive = subprocess.run(["git", "archive", baseline, "moesteer"], cwd=ROOT, capture_output=True, check=True)
        with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
            tar.extractall(old, filter="data")
        engines = {"old": _spawn(old), "new": _spawn(str(ROOT))}
        try:
            best = {(e, m, c): float("inf") for e in engines for m in MODELS for c in CASES}
            for model in MODELS:
                for case in CASES:
                    for e in engines:  # warm-up
                        _ask(engines[e], model, case)
                    for _ in range(repeats):
                        for e, proc in engines.items():
                            best[e, model, case] = min(best[e, model, case], _ask(proc, model, case))
        finally:
            for proc in engines.values():
                proc.stdin.close()
                proc.wait()
    print(f"speed, new engine / engine at {baseline} (tokens/s ratio; >= 0.98 wanted), best of {repeats}:")
    print(f"{'model':14} {'case':10} {'old s':>8} {'new s':>8} {'ratio':>6}")
    for model in MODELS:
        for case in CASES:
            o, n = best["old", model, case], best["new", model, case]
            print(f"{model:14} {case:10} {o:8.3f} {n:8.3f} {o / n:6.3f}{'' if o / n >= 0.98 else '  ✗'}")


def forks(repeats: int) -> None:
    import torch

    torch.set_num_threads(2)
    import moesteer
    from moesteer.sampling import SamplingParams
    from moesteer.strategy import Plain

    lm = moesteer.load()
    prefix = [4 + (i * 7) % (lm.model.config.vocab_size - 4) for i in range(200)]
    sampling = SamplingParams(max_tokens=1, ignore_eos=True)

    def forked() -> list[int]:
        with lm.engine.session(sampling) as session:
            (root,) = session.add([prefix], [Plain()], [0])
            children = session.fork(root, 15)
            return [session.seqs[s].token_rows for s in [root, *children]]

    def separate() -> list[int]:
        with lm.engine.session(sampling) as session:
            ids = session.add([prefix] * 16, [Plain()] * 16, list(range(16)))
            return [session.seqs[s].token_rows for s in ids]

    times = {"fork": float("inf"), "16 prefills": float("inf")}
    for _ in range(repeats):
        for name, fn in (("fork", forked), ("16 prefills", separate)):
            start = time.perf_counter()
            rows = fn()
            times[name] = min(times[name], time.perf_counter() - start)
            if name == "fork":
                fork_rows = rows
    print("\n16-way fork of a 200-token prefix (embedded model):")
    print(f"  token rows: root {fork_rows[0]}, children {sorted(set(fork_rows[1:]))} (no prefill)")
    print(
        f"  time: fork {times['fork']:.4f} s, 16 prefills {times['16 prefills']:.4f} s "
        f"({times['16 prefills'] / times['fork']:.1f}x)"
    )
    print(json.dumps({"fork_child_token_rows": sorted(set(fork_rows[1:]))}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="9b4b36a", help="git revision of the engine to compare with")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    speed(args.baseline, args.repeats)
    forks(args.repeats)


if __name__ == "__main__":
    main()
