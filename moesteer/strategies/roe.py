"""RoE: a roster of noisily routed copies of the model, aggregated per token.

Zibakhsh et al., "MoEs Are Stronger than You Think: Hyper-Parallel Inference Scaling with RoE"
(arXiv 2509.17238). Each of N samples routes every token by Gumbel-top-k,
``TopK(R + τ_i·G, k)`` with a per-MoE-layer τ profile (τ = 0 on the first and last ``skip`` MoE
layers), and the N next-token distributions are averaged: ``p(v) = (1/N) Σ_j p_j(v)``.

Cache modes (Sec. 2.3): ``"standard"`` — N rows with their own KV caches and noisy histories;
``"clean"`` — one clean KV cache per sequence, noise only on the current token, whose N copies
include the clean one (so N = 1 is plain decoding). Choices the paper leaves open, as parameters:
mixing weights from the clean logits (``noisy_weights=False``), probability averaging by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from moesteer.checks import check_int
from moesteer.routing import Gumbel, Policy
from moesteer.strategy import Strategy, TokenStrategy

AGGREGATES = ("prob_mean", "logprob_mean")
MAX_SAMPLES = 256
"""Most routing samples per token (each is a batch row with its own KV cache)."""
CACHES = ("standard", "clean")


@dataclass(frozen=True)
class RoE(Strategy, TokenStrategy):
    """Roster of Experts: N noisy routings a token, averaged.

    Args:
        samples: N routing samples per token, 1 ≤ N ≤ ``MAX_SAMPLES`` (256), run as N rows of one forward.
        tau: τ for every MoE layer, or a tuple with one τ per MoE layer (each ≥ 0).
        skip: keep the first and last ``skip`` MoE layers deterministic (the paper's L); at most half
            the model's MoE layers (checked against the model).
        aggregate: ``"prob_mean"`` (the paper) or ``"logprob_mean"`` (= softmax of the mean logits).
        cache: ``"standard"`` or ``"clean"`` (see the module docstring).
        noisy_weights: weigh the sampled experts by the noisy logits instead of the clean ones.

    Example: roe(samples=4, tau=0.25)
    """

    samples: int = 4
    tau: float | tuple[float, ...] = 0.25
    skip: int = 0
    aggregate: str = "prob_mean"
    cache: str = "standard"
    noisy_weights: bool = False

    name: ClassVar[str] = "roe"
    paper: ClassVar[str] = (
        "MoEs Are Stronger than You Think: Hyper-Parallel Inference Scaling with RoE (arXiv 2509.17238)"
    )

    def validate(self) -> None:
        check_int("roe: samples", self.samples, 1, MAX_SAMPLES)
        taus = self.tau if isinstance(self.tau, tuple) else (self.tau,)
        if any(not isinstance(t, int | float) or not math.isfinite(t) or t < 0 for t in taus):
            raise ValueError(f"roe: tau must be >= 0 (a number or one per MoE layer), got {self.tau!r}")
        if not isinstance(self.skip, int) or self.skip < 0:
            raise ValueError(f"roe: skip must be an integer >= 0, got {self.skip!r}")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"roe: aggregate must be one of {', '.join(AGGREGATES)}, got {self.aggregate!r}")
        if self.cache not in CACHES:
            raise ValueError(f"roe: cache must be one of {', '.join(CACHES)}, got {self.cache!r}")

    @property
    def clean_cache(self) -> bool:  # type: ignore[override]
        return self.cache == "clean"

    def branches(self) -> tuple[Policy | None, ...]:
        noisy = Gumbel(self.tau, self.skip, self.noisy_weights)
        if self.cache == "clean":
            return (None,) + (noisy,) * (self.samples - 1)
        return (noisy,) * self.samples

    def combine(self, logprobs: Tensor) -> Tensor:
        if self.aggregate == "logprob_mean":
            return logprobs.mean(dim=1)
        return torch.logsumexp(logprobs, dim=1) - math.log(logprobs.shape[1])
