"""Routing noise: Gumbel-perturbed selection (RoE) and uniformly random experts. Every draw is keyed
by (seed, prompt, sample, branch, layer, position) (:mod:`moesteer.keys`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from moesteer.routing.call import RouterCall, RouterSite
from moesteer.routing.policy import Primitive, RouterEdit, Stage


@dataclass(frozen=True)
class GumbelKey(Stage):
    """Select by the family's key of ``z + τ·G``; weigh by ``z`` (or by the noisy logits)."""

    tau: float
    noisy_weights: bool = False

    def on_noise(self, call: RouterCall) -> None:
        assert call.key_logits is not None
        call.key_logits = call.key_logits + self.tau * call.noise()
        if self.noisy_weights:
            call.logits = call.key_logits


@dataclass(frozen=True)
class Gumbel(Primitive):
    """Gumbel noise τ·G on router logits before top-k (RoE).

    Gumbel-top-k selection ``TopK(logits + τ_i·G, k)`` (RoE, arXiv 2509.17238, Eq. 1).

    ``tau`` is one τ for every MoE layer or a profile with one τ per MoE layer; ``skip = L`` keeps
    the first and last L MoE layers deterministic. Weights come from the clean logits unless
    ``noisy_weights`` (the paper does not say; clean is our default). ``τ = 0`` is the identity.
    Noise is a pure function of (seed, prompt, sample, branch, layer, position).

    Args:
        tau: noise temperature τ >= 0 for every MoE layer, or a tuple with one τ per MoE layer.
        skip: keep the first and last ``skip`` MoE layers deterministic (the paper's L).
        noisy_weights: weigh the chosen experts by the noisy logits instead of the clean ones.

    Example: gumbel(tau=0.3, skip=1)
    """

    name: ClassVar[str] = "gumbel"
    paper: ClassVar[str] = (
        "MoEs Are Stronger than You Think: Hyper-Parallel Inference Scaling with RoE (arXiv 2509.17238)"
    )
    stochastic: ClassVar[bool] = True

    tau: float | tuple[float, ...]
    skip: int = 0
    noisy_weights: bool = False

    def __post_init__(self) -> None:
        taus = self.tau if isinstance(self.tau, tuple) else (self.tau,)
        if not taus or any(not isinstance(t, int | float) or not math.isfinite(t) or t < 0 for t in taus):
            raise ValueError(f"Gumbel: tau must be a finite number >= 0 or a tuple of them, got {self.tau!r}")
        if not isinstance(self.skip, int) or self.skip < 0:
            raise ValueError(f"Gumbel: skip must be an integer >= 0, got {self.skip!r}")

    def tau_at(self, site: RouterSite) -> float:
        if site.moe_index < self.skip or site.moe_index >= site.num_moe_layers - self.skip:
            return 0.0
        return float(self.tau[site.moe_index] if isinstance(self.tau, tuple) else self.tau)

    def apply(self, edit: RouterEdit, site: RouterSite) -> bool:
        tau = self.tau_at(site)
        if tau > 0:
            edit.stages.append(GumbelKey(tau, self.noisy_weights))
        return tau > 0

    def check(self, num_experts: int, moe_layers: tuple[int, ...]) -> None:
        if isinstance(self.tau, tuple) and len(self.tau) != len(moe_layers):
            raise ValueError(f"Gumbel: tau profile has {len(self.tau)} values for {len(moe_layers)} MoE layers")
        if 2 * self.skip > len(moe_layers):
            raise ValueError(
                f"Gumbel: skip={self.skip} exceeds half of the {len(moe_layers)} MoE layers; "
                f"skip must be at most {len(moe_layers) // 2} for this model"
            )


@dataclass(frozen=True)
class RandomExperts(Primitive):
    """Route each token to ``k`` uniformly random experts (default: the trained top-k); the family's
    rule weighs them (SCMoE's "random-1" weak branch is ``RandomExperts(1)``). The top-k of pure
    Gumbel noise is uniform sampling without replacement.

    Args:
        k: experts per token (None: the trained top-k).

    Example: random_experts(k=1)
    """

    name: ClassVar[str] = "random_experts"
    stochastic: ClassVar[bool] = True

    k: int | None = None

    def __post_init__(self) -> None:
        if self.k is not None and (not isinstance(self.k, int) or self.k < 1):
            raise ValueError(f"RandomExperts: k must be an integer >= 1, got {self.k!r}")

    def apply(self, edit: RouterEdit, site: RouterSite) -> bool:
        edit.ranks = None
        if self.k is not None:
            edit.k = self.k
        edit.stages.append(self)
        return True

    def on_key(self, call: RouterCall) -> None:
        call.key = call.noise()

    def check(self, num_experts: int, moe_layers: tuple[int, ...]) -> None:
        if self.k is not None and self.k > num_experts:
            raise ValueError(f"RandomExperts: k={self.k} exceeds the number of experts ({num_experts})")
