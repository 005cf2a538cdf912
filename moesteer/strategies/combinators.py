"""Strategies built from strategies: a routing change applied to every branch of an inner one.

``WithPolicy(inner, policy)`` puts ``policy`` in front of each branch's own routing (``None``
branches get ``policy`` alone), so the branch's primitives still override it where they set the
same thing; ``WithK(inner, k)`` is ``WithPolicy(inner, TopK(k))``, e.g. ``with_k(scmoe(beta=0.5),
k=4)``: the strong branch routes to the top 4, and SCMoE's default weak rank follows k (rank 5).
DES runs its k search over any token strategy this way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from moesteer.decoding import chooser
from moesteer.routing import Policy, TopK
from moesteer.strategies.base import Controller
from moesteer.strategy import Strategy, TokenStrategy, as_strategy


def token_inner(inner: Strategy | Policy, name: str) -> TokenStrategy:
    strategy = as_strategy(inner)
    if not isinstance(strategy, TokenStrategy) or isinstance(strategy, Controller):
        raise ValueError(f"{name}: inner must be a token strategy or routing policy, got {strategy}")
    return strategy


class _Prefixed(Strategy, TokenStrategy):
    """Shared behaviour: the inner strategy's combine rule and cache mode, routing prefixed.
    ``validate`` checked that ``inner`` is a token strategy, so the per-step methods take it as one."""

    inner: Strategy | Policy

    def prefix(self) -> Policy:
        raise NotImplementedError

    def _inner(self) -> TokenStrategy:
        return as_strategy(self.inner)  # type: ignore[return-value]

    def branches(self) -> tuple[Policy | None, ...]:
        prefix = self.prefix()
        return tuple(prefix if b is None else prefix + b for b in self._inner().branches())

    def combine(self, logprobs: Tensor) -> Tensor:
        return self._inner().combine(logprobs)

    def bans_eos(self) -> bool:
        return self._inner().bans_eos()

    def chooser(self) -> TokenStrategy:
        """The inner strategy's: the prefix changes routing, not how tokens are chosen."""
        return chooser(self._inner())

    @property
    def clean_cache(self) -> bool:  # type: ignore[override]
        return self._inner().clean_cache


@dataclass(frozen=True)
class WithPolicy(_Prefixed):
    """``policy`` applied in front of every branch of ``inner`` (Python only when ``policy`` holds tensors)."""

    inner: Strategy | Policy
    policy: Policy

    name: ClassVar[str] = "with_policy"
    paper: ClassVar[str] = "—"
    positional: ClassVar[tuple[str, ...]] = ("inner",)

    def validate(self) -> None:
        token_inner(self.inner, self.name)
        if not isinstance(self.policy, Policy):
            raise ValueError(f"with_policy: policy must be a routing policy, got {self.policy!r}")

    def prefix(self) -> Policy:
        return self.policy


@dataclass(frozen=True)
class WithK(_Prefixed):
    """Every branch of ``inner`` routes to its ``k`` best experts.

    Unless the branch picks its own experts; weak branches defined relative to k follow it.

    Args:
        inner: the strategy whose branches get k (a token strategy or routing policy).
        k: experts per token.

    Example: with_k(scmoe(beta=0.5), k=4)
    """

    inner: Strategy | Policy
    k: int = 2

    name: ClassVar[str] = "with_k"
    paper: ClassVar[str] = "—"
    positional: ClassVar[tuple[str, ...]] = ("inner",)

    def validate(self) -> None:
        token_inner(self.inner, self.name)
        TopK(self.k)  # raises a one-line error for a bad k

    def prefix(self) -> Policy:
        return TopK(self.k)
