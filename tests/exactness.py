"""DESIGN.md's exactness rule for comparing two decodes of the same strategy.

Tokens must agree up to the first step whose HF reference shows a tie: a top-2 margin of the
combined next-token scores, or a router top-k boundary margin (any layer, any position so far,
any branch), below ``TIE``. Such ties are returned so callers can count them; any other
divergence fails.
"""

from __future__ import annotations

import torch

from moesteer import steer
from moesteer.lm import LM
from moesteer.models.adapters import find_routers
from moesteer.routing import Bias
from moesteer.strategy import TokenStrategy, as_strategy

TIE = 1e-4


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def reference_margin(lm: LM, strategy, prompt: list[int], prefix: list[int]) -> float:
    """The smallest token or router boundary margin of the HF reference before choosing token
    ``len(prefix)`` after ``prompt``."""
    strategy = as_strategy(strategy)
    assert isinstance(strategy, TokenStrategy)
    ids = torch.tensor([prompt + prefix])
    branch_logprobs, router_margin = [], float("inf")
    routers = find_routers(lm.model, lm.adapter)
    for policy in strategy.branches():
        keys: list = []
        hooks = [
            r.register_forward_hook(lambda m, inp, out, seen=keys: seen.append((m, inp[0]))) for r in routers.values()
        ]
        try:
            with torch.no_grad(), steer(lm.model, policy):
                logits = lm.model(input_ids=ids).logits[0, -1].float()
        finally:
            for h in hooks:
                h.remove()
        branch_logprobs.append(torch.log_softmax(logits, -1))
        bias = _bias_of(policy)
        scoring = lm.adapter.scoring
        for router, hidden in keys:
            router_logits = scoring.logits(router, hidden).float()
            if bias is not None:
                router_logits = router_logits + bias
            depth = min(router_logits.shape[-1] - 1, int(router.top_k) + 2)
            key = scoring.key(scoring.facts(router), router_logits, depth + 1).detach().float()
            ranked = key.sort(dim=-1, descending=True).values[:, : depth + 1]
            gaps = ranked[:, :-1] - ranked[:, 1:]
            gaps = gaps[torch.isfinite(gaps)]  # ranks outside a DeepSeek router's kept groups have no margin
            if gaps.numel():
                router_margin = min(router_margin, float(gaps.min()))
    scores = torch.log_softmax(strategy.combine(torch.stack(branch_logprobs)[None]), -1)[0]
    top2 = scores.topk(2).values
    return min(float(top2[0] - top2[1]), router_margin)


def _bias_of(policy) -> torch.Tensor | None:
    if policy is None:
        return None
    biases = [s.values for s in policy.steps if isinstance(s, Bias) and isinstance(s.values, torch.Tensor)]
    return sum(biases) if biases else None


def assert_same_tokens(
    lm: LM, strategy, prompt: list[int], ours: list[int], reference: list[int], tie: float = TIE
) -> int:
    """Assert agreement under the exactness rule (margins below ``tie`` are ties); return 1 if the
    decodes part at a tie, else 0."""
    step = first_divergence(ours, reference)
    if step is None:
        return 0
    margin = reference_margin(lm, strategy, prompt, reference[:step])
    assert margin < tie, f"tokens differ at step {step} with reference margin {margin:.3g} >= {tie}"
    return 1
