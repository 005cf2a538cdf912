"""Capacity-aware routing: a limit on the tokens each expert takes in one router call
(He et al., arXiv 2503.05066), by token drop or by expert choice."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from moesteer.routing.call import RouterCall, RouterSite
from moesteer.routing.policy import Primitive, RouterEdit, Stage

CAPACITY_ORDERS = ("score", "random", "first", "last")


@dataclass(frozen=True)
class Capacity(Primitive):
    """Limit the tokens each expert takes in one router call.

    Capacity-aware routing (He et al., arXiv 2503.05066). Each expert takes at most
    C = ⌈γ·N̄⌉ tokens of one router call, N̄ = k·T/E the mean load (T tokens, k experts per token,
    E experts); ties and the excess are ordered by ``drop``: the highest router probability first
    (``'score'``, the paper's default), random (keyed noise), the earliest (``'first'``) or the
    latest (``'last'``) tokens first.

    * Token drop (``expanded=False``): an expert keeps C of the tokens routed to it; the others lose
      it (weight 0). γ = ∞ is the model's routing.
    * Expanded drop (``expanded=True``, the paper's "overselect"): every expert the policy leaves
      selectable (finite selection key: not masked, inside DeepSeek's kept groups) is a candidate
      for every token, and each expert takes its C best tokens among them — expert-choice routing
      with capacity C, so a token gets more or fewer than k experts (k·T in all when C binds). The
      weights are the family's rule over each token's chosen set. The call routes over E slots
      (weight 0 where unused), decode steps included.

    ``renormalise`` makes each token's weights sum to 1 afterwards. Off at decode steps (one token
    per sequence), as in the paper. **Batch-coupled**: a request's routing depends on the other
    tokens of its call (its batch neighbours, on vLLM the whole scheduler step), so results depend
    on the batch layout; opt-in only.

    Args:
        gamma: capacity factor γ > 0 (inf: no limit).
        drop: which tokens an expert keeps first: 'score', 'random', 'first' or 'last'.
        renormalise: make each token's weights sum to 1 after the drop.
        expanded: expert-choice "overselect": every expert takes its C best tokens among all.

    Example: capacity(gamma=1.5)
    """

    name: ClassVar[str] = "capacity"
    paper: ClassVar[str] = (
        "Capacity-Aware Inference: Mitigating the Straggler Effect in Mixture of Experts (He et al., arXiv 2503.05066)"
    )

    gamma: float = 1.0
    drop: str = "score"
    renormalise: bool = False
    expanded: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.gamma, int | float) and not isinstance(self.gamma, bool) and self.gamma > 0):
            raise ValueError(f"Capacity: gamma must be a positive number (inf: no limit), got {self.gamma!r}")
        if self.drop not in CAPACITY_ORDERS:
            raise ValueError(f"Capacity: drop must be one of {', '.join(CAPACITY_ORDERS)}, got {self.drop!r}")

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.drop == "random"

    def apply(self, edit: RouterEdit, site: RouterSite) -> bool:
        k = len(edit.slots(site.top_k))
        edit.stages.append(CapacityLimit(float(self.gamma), self.drop, self.renormalise, k, self.expanded))
        if self.expanded:
            edit.k, edit.ranks, edit.sorted = site.num_experts, None, True
        return True


@dataclass(frozen=True)
class CapacityLimit(Stage):
    """:class:`Capacity` at one router call; ``k``: the experts per token before it applied."""

    coupled: ClassVar[bool] = True

    gamma: float
    drop: str
    renormalise: bool
    k: int
    expanded: bool

    def on_active(self, call: RouterCall) -> None:
        if not self.expanded:
            return
        assert call.top is not None and call.key is not None
        call.active = (torch.arange(call.n_slots, device=call.top.device) < self.k).expand(*call.top.shape)
        if not call.keys.decode:
            selectable = call.key.gather(-1, call.top) > float("-inf")  # not masked, inside the kept groups
            call.active = expert_choice(call.top, selectable, self.priority(call), self.limit(call))

    def on_weights(self, call: RouterCall) -> None:
        assert call.active is not None
        if self.expanded:  # a token no expert took has no weights to renormalise: 0, not 0/0
            call.weights = torch.where(call.active, call.weights, torch.zeros_like(call.weights))
        if call.keys.decode:
            return
        if not self.expanded:
            call.active = capacity_drop(
                call.top, call.active, self.priority(call), self.limit(call), call.site.num_experts
            )
            call.weights = torch.where(call.active, call.weights, torch.zeros_like(call.weights))
        if self.renormalise:
            call.weights = call.weights / call.weights.sum(-1, keepdim=True).clamp(min=1e-20)

    def limit(self, call: RouterCall) -> float:
        """C = ⌈γ·k·T/E⌉ (∞ for γ = ∞)."""
        tokens, experts = call.logits.shape[0], call.site.num_experts
        return math.inf if math.isinf(self.gamma) else math.ceil(self.gamma * self.k * tokens / experts)

    def priority(self, call: RouterCall) -> Tensor:
        """``[T, K]``: which (token, slot) pairs an expert keeps first under the drop order."""
        top = call.top
        assert top is not None
        if self.drop == "score":
            return call.distribution().detach().gather(-1, top)
        if self.drop == "random":
            return call.noise(top.shape[1])
        index = torch.arange(top.shape[0], device=top.device, dtype=torch.float)[:, None].expand_as(top)
        return -index if self.drop == "first" else index


def capacity_drop(top: Tensor, active: Tensor, priority: Tensor, limit: float, num_experts: int) -> Tensor:
    """Token drop (arXiv 2503.05066): each expert keeps at most ``limit`` of the (token, slot) pairs
    routed to it in this call, by ``priority`` (ties: the earlier pair first), and the others
    become inactive. Pairs are ranked within their expert by one sort, on the device."""
    if limit >= top.numel():
        return active
    experts = top.flatten().masked_fill(~active.flatten(), num_experts)  # inactive pairs: one extra "expert"
    best_first = priority.flatten().argsort(descending=True, stable=True)
    order = best_first[experts[best_first].argsort(stable=True)]  # by expert, best first within each
    grouped = experts[order]
    rank = torch.arange(len(order), device=top.device) - torch.searchsorted(grouped, grouped)  # place in its expert
    kept = torch.empty_like(active.flatten()).scatter(0, order, rank < limit)
    return kept.view_as(active) & active


def expert_choice(top: Tensor, selectable: Tensor, priority: Tensor, limit: float) -> Tensor:
    """Expanded drop (arXiv 2503.05066, "overselect"): ``top [T, E]`` lists every expert once per
    token; each expert takes its ``limit`` best tokens by ``priority`` among the tokens for which it
    is ``selectable``. Returns the active mask ``[T, E]``."""
    priority = priority.float().masked_fill(~selectable, float("-inf"))
    by_expert = torch.full_like(priority, float("-inf")).scatter(1, top, priority)  # [T, E], expert columns
    taken = min(int(limit) if math.isfinite(limit) else top.shape[0], top.shape[0])
    best = by_expert.argsort(dim=0, descending=True, stable=True)[:taken]
    chosen = torch.zeros_like(by_expert, dtype=torch.bool).scatter(0, best, True) & (by_expert > float("-inf"))
    return chosen.gather(1, top)
