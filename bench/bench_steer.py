"""steer() overhead: tokens/s of model.generate plain vs under a no-op and a bias policy.

Greedy, 128 new tokens, batch 1; the three runs alternate and the best of 5 counts.
Target: no-op ≥ 0.97× plain. Run: ``.venv/bin/python bench/bench_steer.py [--quick]``.
"""

from __future__ import annotations

import torch
from common import MODELS, best_times, params_millions
from figures import record, scaled, table

from moesteer import steer
from moesteer.routing import Bias

NEW_TOKENS = scaled(128, 16)


def bench_model(label: str, model: torch.nn.Module) -> list[str]:
    ids = torch.tensor([[5, 17, 42, 9, 77, 31, 12, 8]])
    kwargs = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": 0}
    bias = Bias(torch.linspace(-1, 1, model.config.num_experts))

    def plain():
        model.generate(ids, **kwargs)

    def under(policy):
        def run():
            with steer(model, policy):
                model.generate(ids, **kwargs)

        return run

    best = best_times({"plain": plain, "noop": under(None), "bias": under(bias)}, repeats=scaled(5, 1))
    tps = {k: NEW_TOKENS / v for k, v in best.items()}
    record(f"{label}: steer no-op speed / plain", tps["noop"] / tps["plain"], at_least=0.97)
    record(f"{label}: steer bias speed / plain", tps["bias"] / tps["plain"])
    return [
        f"{label} [{params_millions(model):.1f}M]",
        f"{tps['plain']:.0f}",
        f"{tps['noop']:.0f}",
        f"{tps['bias']:.0f}",
        f"{tps['noop'] / tps['plain']:.3f}",
        f"{tps['bias'] / tps['plain']:.3f}",
    ]


def main() -> None:
    torch.set_num_threads(2)
    rows = [bench_model(label, build()) for label, build in MODELS.items()]
    print(table(rows, ["model", "plain tok/s", "no-op tok/s", "bias tok/s", "no-op/plain", "bias/plain"]))
    print("target: no-op/plain >= 0.97")


if __name__ == "__main__":
    main()
