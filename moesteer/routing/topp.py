"""Top-p routing: a per-token expert count (Huang et al., arXiv 2403.07652)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from moesteer.routing.call import RouterCall, RouterSite
from moesteer.routing.policy import Primitive, RouterEdit


@dataclass(frozen=True)
class TopP(Primitive):
    """Route each token to the fewest experts of mass ≥ ``p``.

    Top-p routing (Huang et al., "Harder Tasks Need More Experts: Dynamic Routing in MoE Models",
    arXiv 2403.07652): per token the fewest experts, most probable first, whose router
    probabilities sum to at least ``p``, at least ``k_min`` and at most ``k_max`` (default: all
    experts), taken among the ``k_max`` best by the family's selection key; the probabilities are
    its router distribution (softmax, or the normalised sigmoid scores). Weights follow the
    family's rule over the chosen set; ``renormalise`` forces them to sum to 1 (``True``) or to be
    the bare probabilities (``False``). The set size varies per token: unused slots up to
    ``k_max`` carry weight 0 (both backends).

    Args:
        p: probability mass the chosen experts must reach, in (0, 1].
        k_min: at least this many experts per token.
        k_max: at most this many experts per token (None: all experts).
        renormalise: True: weights sum to 1; False: the bare probabilities; None: the family's rule.

    Example: topp(p=0.4, k_max=4)
    """

    name: ClassVar[str] = "topp"
    paper: ClassVar[str] = (
        "Harder Tasks Need More Experts: Dynamic Routing in MoE Models (Huang et al., arXiv 2403.07652)"
    )

    p: float
    k_min: int = 1
    k_max: int | None = None
    renormalise: bool | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.p, int | float) and not isinstance(self.p, bool) and 0 < self.p <= 1):
            raise ValueError(f"TopP: p must be in (0, 1], got {self.p!r}")
        if not isinstance(self.k_min, int) or isinstance(self.k_min, bool) or self.k_min < 1:
            raise ValueError(f"TopP: k_min must be an integer >= 1, got {self.k_min!r}")
        if self.k_max is not None and (not isinstance(self.k_max, int) or self.k_max < self.k_min):
            raise ValueError(f"TopP: k_max must be an integer >= k_min ({self.k_min}), got {self.k_max!r}")

    def apply(self, edit: RouterEdit, site: RouterSite) -> bool:
        edit.k, edit.ranks = self.k_max or site.num_experts, None
        edit.stages.append(self)
        return True

    def on_active(self, call: RouterCall) -> None:
        assert call.top is not None
        probs = call.distribution().detach().gather(-1, call.top)
        call.active = top_p_active(probs, float(self.p), self.k_min, len(call.slots))

    def on_weights(self, call: RouterCall) -> None:
        if self.renormalise is None:
            return
        assert call.top is not None and call.active is not None
        chosen = call.distribution().gather(-1, call.top) * call.active
        weights = chosen / chosen.sum(-1, keepdim=True) if self.renormalise else chosen
        call.weights = weights.to(call.weights.dtype)

    def check(self, num_experts: int, moe_layers: tuple[int, ...]) -> None:
        if max(self.k_min, self.k_max or 0) > num_experts:
            raise ValueError(f"TopP: k_min/k_max exceed the number of experts ({num_experts})")


def top_p_active(probs: Tensor, p: float, k_min: int, k_max: int) -> Tensor:
    """``[T, slots]``: among each token's first ``k_max`` slots (router probabilities ``probs``),
    the most probable ones whose probabilities reach ``p``, ``k_min``..``k_max`` of them. The
    slots keep their order (the family's own), so a full set is the model's routing."""
    slots = torch.arange(probs.shape[-1], device=probs.device)
    ranked, order = probs.masked_fill(slots >= k_max, -1.0).sort(dim=-1, descending=True, stable=True)
    count = ((ranked.cumsum(-1) < p).sum(-1) + 1).clamp(k_min, k_max)  # p = 1: all k_max
    return torch.zeros_like(ranked, dtype=torch.bool).scatter(-1, order, slots < count[:, None])
