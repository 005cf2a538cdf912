"""Shared benchmark helpers: models, interleaved best-of-N timing, peak memory in a child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from figures import QUICK

from moesteer.testing import tiny_model

MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "tiny random olmoe": lambda: tiny_model("olmoe"),
    "random olmoe": lambda: tiny_model(
        "olmoe",
        hidden_size=512,
        intermediate_size=512,
        num_hidden_layers=4,
        num_experts=16,
        vocab_size=8192,
        num_attention_heads=8,
        num_key_value_heads=8,
        head_dim=64,
    ),
}


def params_millions(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def other_prompts(prompts: list[list[int]], vocab: int, k: int) -> list[list[int]]:
    """Prompts of the same lengths with other token ids (each id moved by ``20 k`` within the
    vocabulary, ids 0-3 left out): extra rows of the same cost that are not copies."""
    return [[4 + (t - 4 + 20 * k) % (vocab - 4) for t in p] for p in prompts]


def best_times(runs: dict[str, Callable[[], object]], repeats: int = 5) -> dict[str, float]:
    """Best wall time of each callable; the callables are interleaved so drift hits all alike."""
    for fn in runs.values():  # warm-up
        fn()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def peak_rss_mib(script: str, *args: str) -> float:
    """Peak resident memory (MiB) added by ``script --memory ARGS`` in a fresh process, which prints it.

    A fresh interpreter (not fork: forking after torch started its thread pool can deadlock) keeps
    configurations from inheriting each other's peak.
    """
    out = subprocess.run([sys.executable, script, "--memory", *args], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def report_peak(fn: Callable[[], object]) -> None:
    """In the child: run ``fn`` and print the peak resident memory it added (MiB), sampled every ms."""
    base = _rss_bytes()
    peak, done = [base], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    fn()
    done.set()
    watcher.join()
    print((max(peak[0], _rss_bytes()) - base) / 2**20)


def child_results(script: str, *args: str) -> dict:
    """Run ``script --child ARGS`` in a fresh process on 2 threads; the JSON of its last stdout line."""
    out = subprocess.run(
        [sys.executable, script, "--child", *args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    return json.loads(out.stdout.splitlines()[-1])


def model_dirs(root: Path) -> dict[str, str]:
    """``label -> model folder``: the embedded model, and (not under ``--quick``) the ~60M random OLMoE
    saved under ``root``."""
    from moesteer.assets import default_model_path
    from moesteer.testing import char_tokenizer

    dirs = {"embedded arith model": default_model_path()}
    if QUICK:
        return dirs
    model = MODELS["random olmoe"]()
    model.save_pretrained(root / "random-olmoe")
    char_tokenizer(model.config.vocab_size).save_pretrained(root / "random-olmoe")
    dirs["random olmoe"] = str(root / "random-olmoe")
    return dirs


def results_per_model(script: str, backends: tuple[str, ...]) -> Iterator[tuple[str, dict[str, dict]]]:
    """For each model of :func:`model_dirs`: its label and ``{backend: script --child BACKEND DIR's
    results}``, each engine in its own process, one after the other."""
    with tempfile.TemporaryDirectory() as tmp:
        for label, path in model_dirs(Path(tmp)).items():
            yield label, {backend: child_results(script, backend, path) for backend in backends}
