"""Scale-out costs on one machine: eval replicas on Ray, and vLLM's engine core in its own process.

1. ``moesteer eval --task arith --limit 300`` (plain, greedy) in one process with 2 threads against
   ``--replicas 2 --threads 1`` (two Ray actors, one thread each), wall time of the whole command
   (Ray start-up and model loads included), and the samples of both compared. On 2 cores the CPU
   is the limit, so expect ≈ 1× (replicas pay Ray's start and a model load each): replicas pay off
   with more cores or machines (``--ray-address``), not here.
2. The vLLM backend with the engine core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the
   default) against its own process (``=1``): plain greedy, batch 16, 64 new tokens, on the
   embedded model, best of 3; each configuration in its own child process, one after the other.

Run: ``.venv/bin/python bench/bench_scaling.py [--quick]`` on an otherwise idle machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from figures import record, scaled, table

PROBLEMS = scaled(300, 20)
BATCH, NEW_TOKENS, REPEATS = scaled(16, 4), scaled(64, 16), scaled(3, 1)
MOESTEER = str(Path(sys.executable).with_name("moesteer"))


def eval_run(out: Path, *replica_args: str) -> tuple[float, list[dict]]:
    """Wall seconds of one ``moesteer eval`` command, and its samples."""
    command = [MOESTEER, "eval", "--task", "arith", "--limit", str(PROBLEMS), "--output", str(out), *replica_args]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    lines = (out / "arith" / "plain" / "samples.jsonl").read_text().splitlines()
    return seconds, [json.loads(line) for line in lines]


def completions(samples: list[dict]) -> list:
    return [(s["id"], s["outputs"], s["correct"]) for s in samples]


def replicas() -> list[list[str]]:
    with tempfile.TemporaryDirectory() as root:
        one, one_samples = eval_run(Path(root) / "one")  # one process; torch uses both cores
        two, two_samples = eval_run(Path(root) / "two", "--replicas", "2", "--threads", "1")
    same = completions(one_samples) == completions(two_samples)
    record(f"eval --limit {PROBLEMS}: 2 Ray replicas speed-up", one / two)
    record(f"eval --limit {PROBLEMS}: replicas give the same completions", float(same), unit="bool", at_least=1.0)
    return [
        ["1 process (2 threads)", f"{one:.1f}", "1.00×", ""],
        ["2 Ray replicas (1 thread each)", f"{two:.1f}", f"{one / two:.2f}×", "yes" if same else "NO"],
    ]


def engine_core_child(multiprocessing: str) -> None:
    """Print the best seconds of one batch-16 decode with the engine core in or out of process."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = multiprocessing
    import moesteer
    from moesteer.sampling import SamplingParams

    lm = moesteer.load(None, backend="vllm")
    prompts = [f"Q: {i} + {i + 3} * 2 = ?\n" for i in range(BATCH)]
    sampling = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    lm.generate(prompts, None, sampling)  # warm-up
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        lm.generate(prompts, None, sampling)
        best = min(best, time.perf_counter() - start)
    print(best)


def engine_core() -> list[list[str]]:
    seconds = {}
    for label, flag in (("in process", "0"), ("own process", "1")):
        out = subprocess.run(
            [sys.executable, __file__, "--engine-core", flag], check=True, capture_output=True, text=True
        )
        seconds[label] = float(out.stdout.strip().splitlines()[-1])
    base = seconds["in process"]
    record(f"vLLM engine core own process / in process, batch {BATCH}", seconds["own process"] / base)
    return [[label, f"{s:.2f}", f"{s / base:.2f}×"] for label, s in seconds.items()]


def main() -> None:
    print(f"moesteer eval --task arith --limit {PROBLEMS} (plain, greedy), whole command")
    print(table(replicas(), ["run", "seconds", "speed-up", "same completions"]))
    print(f"\nvLLM engine core, plain greedy, batch {BATCH} × {NEW_TOKENS} tokens, embedded model (best of {REPEATS})")
    print(table(engine_core(), ["engine core", "seconds", "time vs in process"]))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--engine-core"]:
        engine_core_child(sys.argv[2])
    else:
        main()
