"""How each MoE family scores its router: logits, the key top-k ranks, and the mixing weights.

Each scorer reproduces its transformers router op for op (checked against transformers 5.16-5.19),
so that an untouched selection gives bit-identical weights. The family's rule reads the router only
through :class:`RouterFacts`, which each backend fills from its own router (HF: the transformers
module, :meth:`Scoring.facts`; vLLM: its fused-MoE router), so both backends apply one rule.
``weights`` takes any selection ``idx [T, K]`` with an ``active [T, K]`` mask (inactive slots hold
real, distinct expert ids and get weight exactly 0, which every experts kernel accepts) and
generalises the family's rule to it: renormalisation, where the family renormalises, runs over the
active slots only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True, eq=False)
class RouterFacts:
    """What a family's rule reads about one router.

    ``renormalise``: divide the chosen weights by their sum (``norm_topk_prob``); ``groups`` /
    ``topk_group``: group-limited selection keeps the best ``topk_group`` of ``groups`` expert groups
    (1 = no grouping); ``routed_scaling``: a factor the router puts on every weight (vLLM scales
    DeepSeek-V3's experts' output instead, and its router's factor is 1); ``correction_bias``: added
    to the scores for selection only (DeepSeek-V3's ``e_score_correction_bias``); ``jitter_eps``:
    PhiMoE's sparsemixer threshold.
    """

    renormalise: bool = False
    groups: int = 1
    topk_group: int = 1
    routed_scaling: float = 1.0
    correction_bias: Tensor | None = None
    jitter_eps: float = 0.0


@dataclass(frozen=True)
class Scoring:
    """Base scorer: top-k over the key, sorted (what ``torch.topk`` does by default)."""

    sorted_topk: bool = True

    @property
    def score_function(self) -> str:
        """The family's scoring in vLLM's terms (its routers' ``scoring_func``)."""
        return "softmax"

    def facts(self, router: nn.Module) -> RouterFacts:
        """The facts of a transformers router module."""
        return RouterFacts(renormalise=bool(getattr(router, "norm_topk_prob", False)))

    def logits(self, router: nn.Module, hidden: Tensor) -> Tensor:
        """The router logits of a transformers router module, computed as the module does."""
        return F.linear(hidden.reshape(-1, router.weight.shape[1]), router.weight)

    def key(self, facts: RouterFacts, logits: Tensor, needed: int) -> Tensor:
        """Score that selection ranks; ``needed`` experts must be selectable."""
        return logits

    def distribution(self, facts: RouterFacts, logits: Tensor) -> Tensor:
        """The router's distribution over all experts ``[T, E]`` (sums to 1): softmax of the logits."""
        return torch.softmax(logits.detach(), dim=-1, dtype=torch.float)

    def weights(
        self, facts: RouterFacts, logits: Tensor, idx: Tensor, active: Tensor, hidden_dtype: torch.dtype
    ) -> Tensor:
        raise NotImplementedError

    def weights_from_key(
        self, facts: RouterFacts, logits: Tensor, key: Tensor, idx: Tensor, active: Tensor, hidden_dtype: torch.dtype
    ) -> Tensor:
        """:meth:`weights`, given ``key`` = :meth:`key` of these ``logits`` (a scorer whose key is
        part of its weights reuses it instead of computing it again)."""
        return self.weights(facts, logits, idx, active, hidden_dtype)


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

    def facts(self, router):
        return RouterFacts(renormalise=self.always_renormalise or bool(router.norm_topk_prob))

    def key(self, facts, logits, needed):
        return torch.softmax(logits, dim=-1, dtype=torch.float)

    def weights(self, facts, logits, idx, active, hidden_dtype):
        return self._chosen(facts, logits, torch.softmax(logits, dim=-1, dtype=torch.float), idx, active)

    def weights_from_key(self, facts, logits, key, idx, active, hidden_dtype):
        return self._chosen(facts, logits, key, idx, active)  # the key is the softmax

    def _chosen(self, facts, logits, probs, idx, active):
        w = probs.gather(-1, idx)
        w = torch.where(active, w, torch.zeros_like(w))
        if facts.renormalise:
            w = _renormalise(w)
        return w.to(logits.dtype) if self.cast_weights else w


def _in_best_groups(choice: Tensor, facts: RouterFacts, needed: int, group_score: Tensor) -> Tensor:
    """Experts in the best groups: ``topk_group`` of them, widened so that ``needed`` fit."""
    groups, experts = facts.groups, choice.shape[-1]
    per_group = experts // groups
    keep = min(groups, max(facts.topk_group, math.ceil(needed / per_group)))
    group_idx = torch.topk(group_score, k=keep, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_score).scatter_(1, group_idx, 1)
    return group_mask.unsqueeze(-1).expand(-1, groups, per_group).reshape(-1, experts).bool()


@dataclass(frozen=True)
class GroupLimited(Scoring):
    """DeepSeek-V2 and V3: fp32 scores ``s`` (V2 softmax, V3 sigmoid), selection on
    ``s + correction_bias`` (V3) within the best expert groups (group score: the max of a group's
    scores without a bias, the sum of its top 2 with one), weights ``s`` of the chosen experts,
    renormalised (+1e-20) when the router renormalises, × ``routed_scaling``.

    transformers' DeepSeek-V2 ignores ``norm_topk_prob`` and groups only under
    ``topk_method="group_limited_greedy"``; its V3 always groups; vLLM groups both, by the config's
    ``n_group`` (the facts record what each backend's router does).
    """

    sigmoid: bool = False
    sorted_topk: bool = False

    @property
    def score_function(self) -> str:
        return "sigmoid" if self.sigmoid else "softmax"

    def facts(self, router):
        if self.sigmoid:
            renormalise, groups, bias = bool(router.norm_topk_prob), router.num_group, router.e_score_correction_bias
        else:
            grouped = router.topk_method == "group_limited_greedy"
            renormalise, groups, bias = False, router.num_group if grouped else 1, None
        return RouterFacts(renormalise, groups, router.topk_group, router.routed_scaling_factor, bias)

    def logits(self, router, hidden):
        return F.linear(hidden.view(-1, router.hidden_dim).type(torch.float32), router.weight.type(torch.float32))

    def _scores(self, logits: Tensor) -> Tensor:
        return logits.float().sigmoid() if self.sigmoid else logits.softmax(dim=-1, dtype=torch.float32)

    def distribution(self, facts, logits):
        scores = self._scores(logits.detach())
        return scores / scores.sum(dim=-1, keepdim=True) if self.sigmoid else scores

    def key(self, facts, logits, needed):
        choice = self._scores(logits)
        if facts.correction_bias is not None:
            choice = choice + facts.correction_bias
        if facts.groups <= 1:
            return choice
        grouped = choice.view(-1, facts.groups, choice.shape[-1] // facts.groups)
        if facts.correction_bias is None:
            group_score = grouped.max(dim=-1).values
        else:
            group_score = grouped.topk(2, dim=-1)[0].sum(dim=-1)
        return choice.masked_fill(~_in_best_groups(choice, facts, needed, group_score), float("-inf"))

    def weights(self, facts, logits, idx, active, hidden_dtype):
        w = self._scores(logits).gather(-1, idx)
        w = torch.where(active, w, torch.zeros_like(w))
        if facts.renormalise:
            w = _renormalise(w, eps=1e-20)
        return w * facts.routed_scaling


@dataclass(frozen=True)
class TopKSoftmax(Scoring):
    """Top-k of the raw logits, then softmax over the chosen logits only (GPT-OSS, GraniteMoE).

    GPT-OSS has a router bias and keeps the logits dtype; Granite scores in fp32 and casts the
    weights to the hidden dtype.
    """

    fp32_logits: bool = False

    def facts(self, router):
        return RouterFacts(renormalise=True)  # a softmax over the chosen logits sums to 1 over them

    def logits(self, router, hidden):
        logits = F.linear(hidden, router.weight, getattr(router, "bias", None))
        return logits.float() if self.fp32_logits else logits

    def weights(self, facts, logits, idx, active, hidden_dtype):
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

    def facts(self, router):
        return RouterFacts(jitter_eps=router.router_jitter_noise)

    def logits(self, router, hidden):
        return F.linear(hidden, router.weight, router.bias)

    def weights(self, facts, logits, idx, active, hidden_dtype):
        eps = facts.jitter_eps
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
