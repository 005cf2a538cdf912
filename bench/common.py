"""Shared benchmark helpers: models, interleaved best-of-N timing, peak memory in a child process."""

from __future__ import annotations

import multiprocessing as mp
import resource
import time
from collections.abc import Callable

import torch

from moesteer.models.tiny import tiny_model

MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "tiny olmoe (0.5M)": lambda: tiny_model("olmoe"),
    "random olmoe (~60M)": lambda: tiny_model(
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


def _peak_child(fn: Callable[[], object], queue) -> None:
    torch.set_num_threads(2)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    queue.put((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)


def peak_rss_mib(fn: Callable[[], object]) -> float:
    """Peak resident memory added by ``fn`` (MiB), measured in a fresh child process."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_child, args=(fn, queue))
    proc.start()
    proc.join()
    return queue.get()


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*["-" * w for w in widths])] + [fmt.format(*r) for r in rows])
