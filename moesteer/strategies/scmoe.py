"""SCMoE: self-contrast decoding between strong and weak routing of one MoE model.

Shi et al., "Unchosen Experts Can Contribute Too", NeurIPS 2024 (arXiv 2405.14507); official code
github.com/DavidFanzz/SCMoE. Two branches, each a batch row with its own KV cache prefilled under its
own routing: *strong* (the model's top-k) and *weak* (e.g. only the rank-r expert in every MoE layer).
With ``s``, ``w`` the branches' next-token log-probs::

    d(v) = (1 + β)·s(v) − β·w(v)   if p_strong(v) ≥ α·max_u p_strong(u),   −inf otherwise

Greedy decoding takes ``argmax d``; sampling draws from ``softmax(d / T)`` (the official sampling
variant is ``T = 1``). Log-probs instead of raw logits change ``d`` by a per-row constant only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from moesteer.routing import Policy, RandomExperts, RankAfterTopK, Ranks, TopK
from moesteer.strategy import Strategy, TokenStrategy

WEAK_KINDS = ("rank", "topk", "random")


@dataclass(frozen=True)
class SCMoE(Strategy, TokenStrategy):
    """Contrast the log-probs of strong and weak routing (self-contrast MoE decoding).

    Args:
        beta: contrast strength β ≥ 0 (paper default 0.5; 0 = plain decoding).
        alpha: plausibility cut α ∈ (0, 1] on the strong distribution (paper: 0.1).
        weak: ``"rank"`` — one expert of rank ``rank`` (1-based) in every MoE layer, by default the
            first expert outside the strong top-k (rank k+1, what the official Mixtral example
            runs); ``"topk"`` — the ``weak_k`` best experts (the DeepSeekMoE setting); ``"random"``
            — one uniformly random expert; or any routing policy.
        rank: ``weak="rank"``: the weak branch's expert rank (None: rank k+1).
        weak_k: ``weak="topk"``: how many experts the weak branch keeps.
        ban_eos: exclude EOS as the official code does (it relies on task stop strings); off by
            default so that β = 0 is exactly plain decoding.

    Example: scmoe(beta=0.5, alpha=0.1)
    """

    beta: float = 0.5
    alpha: float = 0.1
    weak: str | Policy = "rank"
    rank: int | None = None
    weak_k: int = 1
    ban_eos: bool = False

    name: ClassVar[str] = "scmoe"
    paper: ClassVar[str] = "Unchosen Experts Can Contribute Too (Shi et al., arXiv 2405.14507)"

    def validate(self) -> None:
        if not isinstance(self.beta, int | float) or not math.isfinite(self.beta) or self.beta < 0:
            raise ValueError(f"scmoe: beta must be a finite number >= 0, got {self.beta!r}")
        if not isinstance(self.alpha, int | float) or not 0 < self.alpha <= 1:
            raise ValueError(f"scmoe: alpha must be in (0, 1], got {self.alpha!r}")
        if not isinstance(self.weak, Policy) and self.weak not in WEAK_KINDS:
            raise ValueError(
                f"scmoe: weak must be one of {', '.join(WEAK_KINDS)} or a routing policy, got {self.weak!r}"
            )
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"scmoe: rank must be an integer >= 1 (1 = the best expert), got {self.rank!r}")
        if not isinstance(self.weak_k, int) or self.weak_k < 1:
            raise ValueError(f"scmoe: weak_k must be an integer >= 1, got {self.weak_k!r}")

    def weak_policy(self) -> Policy:
        if isinstance(self.weak, Policy):
            return self.weak
        if self.weak == "topk":
            return TopK(self.weak_k)
        if self.weak == "random":
            return RandomExperts(1)
        return Ranks(self.rank) if self.rank is not None else RankAfterTopK(1)

    def branches(self) -> tuple[Policy | None, ...]:
        return (None, self.weak_policy())

    def combine(self, logprobs: Tensor) -> Tensor:
        strong, weak = logprobs[:, 0], logprobs[:, 1]
        contrast = (1 + self.beta) * strong - self.beta * weak
        cutoff = math.log(self.alpha) + strong.max(dim=-1, keepdim=True).values
        return contrast.masked_fill(strong < cutoff, float("-inf")).masked_fill(torch.isnan(contrast), float("-inf"))

    def bans_eos(self) -> bool:
        return self.ban_eos
