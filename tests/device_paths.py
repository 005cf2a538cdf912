"""The routing hot paths as device checks, shared by ``test_devices.py`` (on PyTorch's ``meta``
device, in CI) and ``bench/gpu_check.py`` (on CUDA against the CPU).

Each check runs one piece of per-step code with every model-side tensor on a given device: one router
call of a tiny model through HF's router interception, one router call through vLLM's router hook
(on :mod:`moesteer.backends.vllm.standin`'s runner and router, so no vLLM is needed), or one step of
the branch rule. Inputs are drawn on the CPU from fixed seeds and moved, so two devices see the same
numbers. A tensor built on the wrong device fails the check: PyTorch refuses to mix devices in one
op, and on ``meta`` also refuses to read a value back (a host sync) anywhere but where it is allowed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from moesteer.backends.hf.hook import BatchLayout, router_handle
from moesteer.backends.vllm.registry import Registry
from moesteer.backends.vllm.router_hook import RouterHook
from moesteer.backends.vllm.standin import ScheduledRow, StandInRouter, branch_rows, runner
from moesteer.backends.vllm.step_tokens import combine_rows
from moesteer.models.adapters import get_adapter
from moesteer.routing import Bias, Capacity, Policy, Replay, Scoped, TopK
from moesteer.sampling import SamplingParams
from moesteer.strategies.roe import RoE
from moesteer.strategies.scmoe import SCMoE
from moesteer.strategy import Plain, Routed, TokenStrategy
from moesteer.testing import tiny_config, tiny_model

FAMILY = "olmoe"
TOKENS = 5  # tokens per row in a prefill
RECORDED = 16  # positions a replayed recording covers


def _config():
    return tiny_config(FAMILY)


def replay(num_experts: int, top_k: int, layers: range) -> Replay:
    """A recorded routing of ``RECORDED`` positions (fixed draws), to replay beside a wider k."""
    g = torch.Generator().manual_seed(1)
    experts = {
        layer: torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(RECORDED)])
        for layer in layers
    }
    weights = {layer: torch.rand(RECORDED, top_k, generator=g).softmax(-1) for layer in layers}
    return Replay(experts, weights)


def policies(num_experts: int, top_k: int, layers: range) -> dict[str, Policy]:
    """The routing policies of the checks, by name."""
    return {
        "topk1": TopK(1),
        "wide": TopK(top_k + 2),  # more slots than the router's top-k: the others are padded
        "bias": Bias(torch.linspace(-2.0, 2.0, num_experts)),
        "capacity": Capacity(1.0, drop="random"),
        "replay": replay(num_experts, top_k, layers),
        "scoped": Scoped(TopK(1), "last_prompt"),
    }


def hf_cases() -> dict[str, list[Policy | None]]:
    """HF checks: one policy per batch row (``None``: the model's routing)."""
    config = _config()
    p = policies(config.num_experts, config.num_experts_per_tok, range(config.num_hidden_layers))
    return {
        "mixed": [None, p["topk1"], p["bias"], p["wide"]],
        "scmoe": [*SCMoE().branches()] * 2,
        "roe": list(RoE(samples=4).branches()),
        "capacity_random": [p["capacity"]] * 2,
        "replay_padded": [p["replay"], p["wide"]],
        "scoped": [p["scoped"], None],
    }


def hf_route(
    policies_of_rows: list[Policy | None], device: torch.device | str, hidden: Tensor | None = None
) -> list[Tensor]:
    """One call of a tiny model's first MoE router under ``policies_of_rows`` (a prefill of
    ``TOKENS`` tokens a row; ``hidden`` states drawn from a fixed seed unless given), on ``device``;
    the router's outputs."""
    model = tiny_model(FAMILY).to(device)
    rows = len(policies_of_rows)
    if hidden is None:
        hidden = torch.randn(rows * TOKENS, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    hidden = hidden.to(device)
    positions = torch.arange(TOKENS).expand(rows, TOKENS).to(device)
    keys = torch.arange(rows).to(device)
    layout = BatchLayout(
        policies_of_rows,
        keys,
        torch.zeros_like(keys),
        keys % 2,
        positions,
        seed=3,
        prompt_lengths=torch.full((rows,), TOKENS - 1).to(device),
        bound=TOKENS,
    )
    with router_handle(model) as handle, handle.routing(layout):
        out = next(iter(handle.routers.values()))(hidden)
    return [t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, Tensor)]


def vllm_cases() -> dict[str, list[ScheduledRow]]:
    """vLLM checks: the requests a step schedules (prefills of ``TOKENS`` tokens, or a decode step)."""
    config = _config()
    p = policies(config.num_experts, config.num_experts_per_tok, range(config.num_hidden_layers))

    def prefill(*strategies: TokenStrategy, **kw) -> list[ScheduledRow]:
        return [
            r for i, s in enumerate(strategies) for r in branch_rows(s, i, TOKENS, computed=0, scheduled=TOKENS, **kw)
        ]

    def decode(*strategies: TokenStrategy) -> list[ScheduledRow]:
        return [r for i, s in enumerate(strategies) for r in branch_rows(s, i, TOKENS, computed=TOKENS, scheduled=1)]

    return {
        "topk_all": prefill(Routed(TopK(2)), Routed(TopK(2))),
        "scmoe": prefill(SCMoE()),
        "mixed": prefill(Plain(), Routed(p["topk1"]), Routed(p["bias"]), Routed(p["wide"])),
        "mixed_decode": decode(Plain(), Routed(p["topk1"]), Routed(p["bias"]), Routed(p["wide"])),
        "scoped": prefill(Routed(p["scoped"]), Plain()),
        "capacity_random": prefill(Routed(p["capacity"]), Routed(p["capacity"])),
        "replay_padded": prefill(Routed(p["replay"]), Routed(p["wide"])),
        "traced": prefill(SCMoE(), trace=True),
    }


def vllm_route(
    rows: list[ScheduledRow], device: torch.device | str, logits: Tensor | None = None
) -> tuple[RouterHook, list[Tensor]]:
    """One call of a stand-in fused-MoE router, hooked, for the step that schedules ``rows``
    (router ``logits`` drawn from a fixed seed unless given)."""
    config = _config()
    hook = RouterHook(Registry(), get_adapter(config))
    router = StandInRouter(config.num_experts_per_tok, config.num_experts, bool(config.norm_topk_prob))
    hook.hook_router(0, 0, 1, router)
    total = sum(row.scheduled for row in rows)
    positions = torch.zeros(total, dtype=torch.long, device=device)  # the plan reads the host's copy
    hook.plan = hook._plan(runner(rows), positions)
    g = torch.Generator().manual_seed(2)
    if logits is None:
        logits = torch.randn(total, config.num_experts, generator=g) * 2
    logits = logits.to(device)
    try:
        weights, ids = router._compute_routing(logits, logits, None)  # the stand-in reads no hidden states
    finally:
        hook.plan = None
    return hook, [weights, ids]


COMBINE_CASES: dict[str, tuple[TokenStrategy, SamplingParams]] = {
    "scmoe_greedy": (SCMoE(), SamplingParams()),
    "roe_sampled": (RoE(samples=4), SamplingParams(temperature=0.8, seed=5)),
}


def combine_step(strategy: TokenStrategy, sampling: SamplingParams, device: torch.device | str) -> tuple[Tensor, list]:
    """One decode step of the branch rule for two sequences: the rewritten logits and each
    sequence's chosen log-probs."""
    config = _config()
    generated = [7, 9]  # tokens each sequence has generated so far
    rows = [
        r
        for seq in range(2)
        for r in branch_rows(
            strategy, seq, TOKENS, computed=TOKENS + len(generated) - 1, scheduled=1, sampling=sampling, prompt_key=seq
        )
    ]
    registry = Registry()
    hook = RouterHook(registry, get_adapter(config))
    hook._plan(runner(rows), torch.zeros(len(rows), dtype=torch.long, device=device))  # which rows sample now
    by_row = {i: (registry.lookup(row.extra_args)[0], list(generated)) for i, row in enumerate(rows)}
    logits = torch.randn(len(rows), config.vocab_size, generator=torch.Generator().manual_seed(4)).to(device)
    combine_rows(registry, logits, by_row)
    return logits, [registry.sequences[seq].logprobs for seq in range(2)]


Check = Callable[[torch.device | str], list[Tensor]]


def all_checks() -> dict[str, Check]:
    """Every check by name (``hf/…``, ``vllm/…``, ``combine/…``), each a function of the device."""
    checks: dict[str, Check] = {}
    for name, case in hf_cases().items():
        checks[f"hf/{name}"] = lambda device, case=case: hf_route(case, device)
    for name, case in vllm_cases().items():
        checks[f"vllm/{name}"] = lambda device, case=case: vllm_route(case, device)[1]
    for name, (strategy, sampling) in COMBINE_CASES.items():
        checks[f"combine/{name}"] = lambda device, s=strategy, p=sampling: [combine_step(s, p, device)[0]]
    return checks
