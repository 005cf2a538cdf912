"""Steering on an accelerator, checked against the CPU and timed: one script, torch and transformers only.

    PYTHONPATH=. python bench/gpu_check.py                # on a CUDA machine (about 3 minutes on one H100)
    python bench/gpu_check.py --device cpu --out r.json   # the same checks, small, in seconds (CI runs it)

(A1) Every supported family's tiny model (fp32) decodes on the device and on the CPU under plain,
``topk(1)``, a bias, SCMoE, RoE (sampled, seeded), a position-scoped policy, capacity with a random
drop, and a replayed routing beside ``topk(k > top_k)``: the tokens must be equal, a divergence at a
step whose CPU reference margin is below 1e-4 counting as a near-tie. (A2) vLLM's router hook (on
stand-ins for vLLM's runner and router: the accelerator has no vLLM) and the branch rule, on the
device against the CPU: the experts equal, the weights and rewritten logits within 1e-5. (B) A
random-init model of OLMoE-1B-7B's shapes (bf16 on a GPU; a small fp32 one with ``--device cpu``):
tokens/s of plain, ``topk(4)``, a bias, SCMoE and RoE(4) at batch 1 and 32, the steered/plain
ratios, and the share of wall time the host spends in moesteer's routing code.

Writes one JSON file (``--out``, default ``gpu_check.json``): every check with ``passed`` and a
detail, the timings, the device and versions; exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import device_paths  # noqa: E402  (tests/device_paths.py: the hot-path checks, shared with the meta tests)
import transformers  # noqa: E402
from exactness import reference_margin  # noqa: E402

import moesteer  # noqa: E402
from moesteer.backends.hf.hook import RouterHandle  # noqa: E402
from moesteer.models.adapters import SUPPORTED_FAMILIES  # noqa: E402
from moesteer.routing import Bias, Capacity, Replay, Scoped, TopK  # noqa: E402
from moesteer.sampling import SamplingParams  # noqa: E402
from moesteer.strategies.roe import RoE  # noqa: E402
from moesteer.strategies.scmoe import SCMoE  # noqa: E402
from moesteer.strategy import Plain, Routed, Strategy  # noqa: E402
from moesteer.testing import char_tokenizer, tiny_model  # noqa: E402

TIE = 1e-4
PROMPTS = ["The quick brown fox", "abc def ghi"]


class Report:
    """The checks and timings of one run, written as JSON."""

    def __init__(self, device: torch.device) -> None:
        self.data: dict = {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "checks": [],
            "speed": [],
        }

    def check(self, name: str, run: Callable[[], str]) -> None:
        """Run one check: it returns a detail line, or raises (an exception is a failure)."""
        start = time.perf_counter()
        try:
            detail, passed = run(), True
        except Exception as err:  # a failed check is reported, not raised
            detail, passed = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", False
            traceback.print_exc(limit=3)
        seconds = round(time.perf_counter() - start, 2)
        self.data["checks"].append({"name": name, "passed": passed, "detail": detail, "seconds": seconds})
        print(f"{'ok  ' if passed else 'FAIL'} {name} ({seconds} s): {detail}", flush=True)

    @property
    def passed(self) -> bool:
        return all(c["passed"] for c in self.data["checks"])


# ---- A1: every family on the device against the CPU ---------------------------------------------


def family_strategies(lm_cpu, tokens: int) -> dict[str, tuple[list[Strategy], SamplingParams]]:
    """Per-prompt strategies and sampling of each A1 check, for one family's tiny model."""
    num_experts, top_k = lm_cpu.engine.routing_sizes()
    greedy = SamplingParams(max_tokens=tokens, ignore_eos=True)
    sampled = SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0.8, seed=7)
    (recorded,) = lm_cpu.generate(PROMPTS[:1], Routed(TopK(1)), greedy, trace=True)
    wide = min(top_k + 1, num_experts)
    return {
        "plain": ([Plain()] * 2, greedy),
        "topk1": ([Routed(TopK(1))] * 2, greedy),
        "bias": ([Routed(Bias(torch.linspace(-1.5, 1.5, num_experts)))] * 2, greedy),
        "scmoe": ([SCMoE()] * 2, greedy),
        "roe_sampled": ([RoE(samples=4)] * 2, sampled),
        "scoped": ([Routed(Scoped(TopK(1), "generated"))] * 2, greedy),
        "capacity_random": ([Routed(Capacity(1.0, drop="random"))] * 2, greedy),
        "replay_beside_wide_k": ([Routed(Replay.from_trace(recorded.trace)), Routed(TopK(wide))], greedy),
    }


def compare_decodes(lm_cpu, strategies: list[Strategy], ours, reference) -> str:
    """Equal tokens, or a divergence at a near-tie of the CPU reference; raises otherwise."""
    ties = 0
    for prompt, strategy, a, b in zip(PROMPTS, strategies, ours, reference, strict=True):
        if a.token_ids == b.token_ids:
            continue
        step = next(i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=True)) if x != y)
        ids = lm_cpu.engine.encode(prompt)
        margin = reference_margin(lm_cpu, strategy, ids, b.token_ids[:step]) if _margin_known(strategy) else None
        if margin is None or margin >= TIE:
            raise AssertionError(f"tokens differ at step {step} (CPU reference margin {margin})")
        ties += 1
    return f"{sum(len(c.token_ids) for c in reference)} tokens equal" + (f", {ties} near-tie(s)" if ties else "")


def _margin_known(strategy: Strategy) -> bool:
    """Whether the exactness rule's reference margin covers the strategy (no noise, no batch coupling)."""
    return isinstance(strategy, Plain | SCMoE) or (
        isinstance(strategy, Routed) and isinstance(strategy.policy, TopK | Bias)
    )


def family_checks(report: Report, device: torch.device, tokens: int) -> None:
    for family in SUPPORTED_FAMILIES:
        model_cpu = tiny_model(family)
        tokenizer = char_tokenizer(model_cpu.config.vocab_size)
        lm_cpu = moesteer.load(model_cpu, tokenizer=tokenizer)
        lm_dev = moesteer.load(tiny_model(family).to(device), tokenizer=tokenizer)
        cases = family_strategies(lm_cpu, tokens)
        for name, (strategies, sampling) in cases.items():

            def run(strategies=strategies, sampling=sampling, ours=lm_dev, reference=lm_cpu) -> str:
                decoded = ours.generate(PROMPTS, strategies, sampling)
                return compare_decodes(
                    reference, strategies, decoded, reference.generate(PROMPTS, strategies, sampling)
                )

            report.check(f"A1/{family}/{name}", run)


# ---- A2: vLLM's router hook and the branch rule on the device -------------------------------------


def compare_tensors(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> str:
    for a, b in zip(ours, reference, strict=True):
        a = a.cpu()
        if a.dtype.is_floating_point:
            if not torch.allclose(a, b, atol=1e-5, rtol=1e-5, equal_nan=True):
                raise AssertionError(f"values differ by {float((a - b).nan_to_num().abs().max()):.2g}")
        elif not torch.equal(a, b):
            raise AssertionError(f"{int((a != b).sum())} of {a.numel()} entries differ")
    return f"{len(ours)} tensors equal (ids exact, floats within 1e-5)"


def hook_checks(report: Report, device: torch.device) -> None:
    for name, check in device_paths.all_checks().items():
        report.check(f"A2/{name}", lambda check=check: compare_tensors(check(device), check("cpu")))


# ---- B: speed on realistic layer shapes -----------------------------------------------------------


def olmoe_shapes(device: torch.device):
    """A random-init model of OLMoE-1B-7B's shapes (bf16, 16 layers, 64 experts top-8) on a GPU; a
    small fp32 one on the CPU."""
    if device.type == "cuda":
        sizes = dict(hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16)
        sizes |= dict(num_key_value_heads=16, head_dim=128, num_experts=64, num_experts_per_tok=8, vocab_size=50304)
        dtype = torch.bfloat16
    else:
        sizes = dict(hidden_size=128, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        sizes |= dict(num_key_value_heads=4, head_dim=32, num_experts=16, num_experts_per_tok=4, vocab_size=512)
        dtype = torch.float32
    with torch.device(device):
        model = tiny_model("olmoe", **sizes).to(dtype)
    model.config._attn_implementation = "sdpa"
    return moesteer.load(model, tokenizer=char_tokenizer(sizes["vocab_size"]))


def timed(lm, strategy, batch: int, tokens: int, device: torch.device) -> tuple[float, float]:
    """Best of 2 (after a warm-up): wall seconds of one generate call, and the host seconds spent in
    moesteer's router interception during it."""
    prompts = [f"prompt {i}: " + "abcdefgh" * 4 for i in range(batch)]
    sampling = SamplingParams(max_tokens=tokens, ignore_eos=True)
    spent = [0.0]
    original = RouterHandle.route

    def route(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    best = (float("inf"), 0.0)
    RouterHandle.route = route
    try:
        for attempt in range(3):
            spent[0] = 0.0
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            lm.generate(prompts, strategy, sampling)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wall = time.perf_counter() - start
            if attempt and wall < best[0]:
                best = (wall, spent[0])
    finally:
        RouterHandle.route = original
    return best


def speed(report: Report, device: torch.device) -> None:
    lm = olmoe_shapes(device)
    top_k = lm.model.config.num_experts_per_tok
    strategies = {
        "plain": Plain(),
        f"topk({top_k // 2})": Routed(TopK(top_k // 2)),
        "bias": Routed(Bias(torch.linspace(-1.0, 1.0, lm.model.config.num_experts))),
        "scmoe": SCMoE(),
        "roe(4)": RoE(samples=4),
    }
    tokens = 32 if device.type == "cuda" else 4
    for batch in (1, 32) if device.type == "cuda" else (1, 4):
        plain = None
        for name, strategy in strategies.items():
            wall, routing = timed(lm, strategy, batch, tokens, device)
            plain = plain or wall
            row = {
                "batch": batch,
                "strategy": name,
                "tokens_per_s": round(batch * tokens / wall, 1),
                "ratio_to_plain": round(wall / plain, 3),
                "host_share_in_routing": round(routing / wall, 3),
            }
            report.data["speed"].append(row)
            print(f"B batch {batch:>2} {name:<8} {row}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="the device under test (default cuda; cpu: small, seconds)")
    parser.add_argument("--out", default="gpu_check.json", help="where to write the JSON result")
    parser.add_argument("--skip-speed", action="store_true", help="run the checks only (A1, A2), no timings")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; use --device cpu for the small run")
    report = Report(device)
    start = time.perf_counter()
    family_checks(report, device, tokens=16 if device.type == "cuda" else 4)
    hook_checks(report, device)
    if not args.skip_speed:
        speed(report, device)
    report.data["seconds"] = round(time.perf_counter() - start, 1)
    report.data["passed"] = report.passed
    Path(args.out).write_text(json.dumps(report.data, indent=1) + "\n", encoding="utf-8")
    failed = [c["name"] for c in report.data["checks"] if not c["passed"]]
    print(f"{len(report.data['checks']) - len(failed)}/{len(report.data['checks'])} checks passed; {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
