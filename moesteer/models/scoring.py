"""How each MoE family scores its router: logits, the key top-k ranks, and the mixing weights.

Each scorer reproduces its transformers router op for op (checked against transformers 5.16-5.19),
so that an untouched selection gives bit-identical weights. ``weights`` takes any selection
``idx [T, K]`` with an ``active [T, K]`` mask (inactive slots hold real, distinct expert ids and get
weight exactly 0, which every experts kernel accepts) and generalises the family's rule to it:
renormalisation, where the family renormalises, runs over the active slots only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Scoring:
    """Base scorer: top-k over the key, sorted (what ``torch.topk`` does by default)."""

    sorted_topk: bool = True

    def logits(self, router: nn.Module, hidden: Tensor) -> Tensor:
        return F.linear(hidden.reshape(-1, router.weight.shape[1]), router.weight)

    def key(self, router: nn.Module, logits: Tensor, needed: int) -> Tensor:
        """Score that selection ranks; ``needed`` experts must be selectable."""
        return logits

    def distribution(self, router: nn.Module, logits: Tensor) -> Tensor:
        """The router's distribution over all experts ``[T, E]`` (sums to 1): softmax of the logits."""
        return torch.softmax(logits.detach(), dim=-1, dtype=torch.float)

    def weights(
        self, router: nn.Module, logits: Tensor, idx: Tensor, active: Tensor, hidden_dtype: torch.dtype
    ) -> Tensor:
        raise NotImplementedError


def _renormalise(w: Tensor, eps: float | None = None) -> Tensor:
    total = w.sum(dim=-1, keepdim=True)
    return w / (total if eps is None else total + eps)


@dataclass(frozen=True)
class SoftmaxTopK(Scoring):
    """``p = softmax(logits)``, top-k of ``p``, renormalise if ``norm_topk_prob`` (Mixtral: always).

    Mixtral keeps its weights in fp32; the others cast them back to the logits dtype.
    """

    always_renormalise: bool = False
    cast_weights: bool = True

    def key(self, router: nn.Module, logits: Tensor, needed: int) -> Tensor:
        return torch.softmax(logits, dim=-1, dtype=torch.float)

    def weights(self, router, logits, idx, active, hidden_dtype):
        w = torch.softmax(logits, dim=-1, dtype=torch.float).gather(-1, idx)
        w = torch.where(active, w, torch.zeros_like(w))
        if self.always_renormalise or router.norm_topk_prob:
            w = _renormalise(w)
        return w.to(logits.dtype) if self.cast_weights else w


def _group_mask(key: Tensor, router: nn.Module, needed: int, group_score: Tensor) -> Tensor:
    """Experts in the best groups: ``topk_group`` of them, widened so that ``needed`` fit."""
    groups = router.num_group
    per_group = router.num_experts // groups
    keep = min(groups, max(router.topk_group, math.ceil(needed / per_group)))
    group_idx = torch.topk(group_score, k=keep, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_score).scatter_(1, group_idx, 1)
    return group_mask.unsqueeze(-1).expand(-1, groups, per_group).reshape(-1, router.num_experts).bool()


@dataclass(frozen=True)
class DeepseekV2Scoring(Scoring):
    """DeepSeek-V2: fp32 softmax; optional group-limited greedy (group score = max); × routed scale.

    No renormalisation (the config's ``norm_topk_prob`` is ignored, as in transformers).
    """

    sorted_topk: bool = False

    def logits(self, router, hidden):
        return F.linear(hidden.view(-1, router.hidden_dim).type(torch.float32), router.weight.type(torch.float32))

    def key(self, router, logits, needed):
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        if router.topk_method != "group_limited_greedy":
            return scores
        group_score = scores.view(-1, router.num_group, router.num_experts // router.num_group).max(dim=-1).values
        return scores.masked_fill(~_group_mask(scores, router, needed, group_score), 0.0)

    def weights(self, router, logits, idx, active, hidden_dtype):
        w = logits.softmax(dim=-1, dtype=torch.float32).gather(-1, idx)
        return torch.where(active, w, torch.zeros_like(w)) * router.routed_scaling_factor


@dataclass(frozen=True)
class DeepseekV3Scoring(Scoring):
    """DeepSeek-V3: ``s = sigmoid(logits)``; selection on ``s + e_score_correction_bias`` within the
    best groups (group score = sum of its top-2); weights ``s`` renormalised (+1e-20) if
    ``norm_topk_prob``; × routed scale."""

    sorted_topk: bool = False

    def logits(self, router, hidden):
        return F.linear(hidden.view(-1, router.hidden_dim).type(torch.float32), router.weight.type(torch.float32))

    def distribution(self, router, logits):
        scores = logits.detach().float().sigmoid()
        return scores / scores.sum(dim=-1, keepdim=True)

    def key(self, router, logits, needed):
        choice = logits.sigmoid() + router.e_score_correction_bias
        per_group = router.num_experts // router.num_group
        group_score = choice.view(-1, router.num_group, per_group).topk(2, dim=-1)[0].sum(dim=-1)
        return choice.masked_fill(~_group_mask(choice, router, needed, group_score), float("-inf"))

    def weights(self, router, logits, idx, active, hidden_dtype):
        w = logits.sigmoid().gather(1, idx)
        w = torch.where(active, w, torch.zeros_like(w))
        if router.norm_topk_prob:
            w = _renormalise(w, eps=1e-20)
        return w * router.routed_scaling_factor


@dataclass(frozen=True)
class TopKSoftmax(Scoring):
    """Top-k of the raw logits, then softmax over the chosen logits only (GPT-OSS, GraniteMoE).

    GPT-OSS has a router bias and keeps the logits dtype; Granite scores in fp32 and casts the
    weights to the hidden dtype.
    """

    fp32_logits: bool = False

    def logits(self, router, hidden):
        logits = F.linear(hidden, router.weight, getattr(router, "bias", None))
        return logits.float() if self.fp32_logits else logits

    def weights(self, router, logits, idx, active, hidden_dtype):
        chosen = logits.gather(-1, idx).masked_fill(~active, float("-inf"))
        if self.fp32_logits:
            return torch.softmax(chosen, dim=-1).type(hidden_dtype)
        return torch.softmax(chosen, dim=1, dtype=chosen.dtype)


@dataclass(frozen=True)
class SparseMixer(Scoring):
    """PhiMoE's sparsemixer (eval semantics), generalised from 2 slots to any selection.

    Slot ``j`` weighs its expert by a softmax over the experts not chosen in earlier slots whose
    logits lie within ``2·jitter_eps`` (relative) of the best of them; the slot's own expert is
    exempt from that threshold, so forced or rank-picked experts keep a weight.
    """

    def logits(self, router, hidden):
        return F.linear(hidden, router.weight, router.bias)

    def weights(self, router, logits, idx, active, hidden_dtype):
        eps = router.router_jitter_noise
        remaining, slots = logits, []
        for j in range(idx.shape[1]):
            chosen = idx[:, j : j + 1]
            with torch.no_grad():
                threshold = remaining.max(dim=-1, keepdim=True).values
                factor = logits.abs().clamp(min=threshold)
                far = ((threshold - logits) / factor) > (2 * eps)
                far = far.scatter(-1, chosen, False)
            slots.append(torch.softmax(remaining.masked_fill(far, float("-inf")), dim=-1).gather(-1, chosen))
            remaining = torch.scatter(remaining, -1, chosen, float("-inf"))
        w = torch.cat(slots, dim=-1)
        return torch.where(active, w, torch.zeros_like(w))
