"""Per-program overhead of the OS sandbox (bubblewrap) vs the in-process guard it replaced.

Times ``run_program`` (bwrap: namespaces, read-only binds, per-run uid, nonce check) against
``run_guarded`` (the old guard, now ``--unsafe-exec``) on the same small HumanEval-style program,
interleaved, one at a time; prints the median of each and the ratio. Run:
``.venv/bin/python bench/bench_sandbox.py [--quick]`` (~20 s).
"""

from __future__ import annotations

import statistics
import time

from figures import record, scaled

from moesteer.evals.guard import run_guarded
from moesteer.evals.sandbox import run_program

PROGRAM = """
def add(a, b):
    return a + b


def check(candidate):
    assert candidate(2, 3) == 5


check(add)
"""
REPEATS = scaled(40, 5)


def main() -> None:
    runners = {"guard (old)": run_guarded, "bwrap (new)": run_program}
    for runner in runners.values():  # warm-up; the sandbox probes the machine once
        assert runner(PROGRAM).passed
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(REPEATS):
        for name, runner in runners.items():
            start = time.perf_counter()
            assert runner(PROGRAM).passed
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, median in medians.items():
        print(f"{name:12s} median {1000 * median:7.1f} ms/program (n={REPEATS})")
    print(f"overhead ratio bwrap/guard: {medians['bwrap (new)'] / medians['guard (old)']:.2f}x")
    record("bwrap sandbox time / in-process guard, a program", medians["bwrap (new)"] / medians["guard (old)"])
    record("bwrap sandbox, a program", medians["bwrap (new)"], unit="s")


if __name__ == "__main__":
    main()
