"""What an engine runs: a strategy as a printable spec, and the token-strategy protocol.

One type for users, three levels inside:

* **routing** — a routing policy (:mod:`moesteer.routing`) on one branch; :class:`Routed` wraps one;
* **token** — :class:`TokenStrategy`: ``branches()`` gives one routing policy per branch (each a
  batch row with its own KV cache, or one clean cache when ``clean_cache``); ``combine(logprobs
  [B, n_branches, V]) -> scores [B, V]`` gives the next-token scores every branch of a sequence
  then appends from (the engine log-softmaxes them, applies temperature / top-k / top-p and samples);
* **sequence** — a controller (:class:`moesteer.strategies.base.Controller`), which orchestrates
  generations of an inner strategy through an engine; engines never run one themselves
  (:func:`moesteer.strategies.run` does).

Strategies are frozen dataclasses (specs): printable, comparable, rebuilt from their text spec.
Everything that changes while generating lives in the engine's per-call state. This module sits
below the engines, which take a token strategy, a routing policy (:class:`Routed`) or ``None``
(:class:`Plain`) for each prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

from torch import Tensor

from moesteer.printer import to_spec
from moesteer.routing import Policy


class Strategy:
    """Base of all strategies. Subclasses are frozen dataclasses and set the class variables."""

    name: ClassVar[str]
    level: ClassVar[str] = "token"  # "routing" (Routed) and "sequence" (controllers) set their own
    paper: ClassVar[str] = ""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad parameter; called after construction."""

    def __post_init__(self) -> None:
        self.validate()

    def spec(self) -> str:
        """The text spec that rebuilds this strategy, e.g. ``scmoe(beta=0.5)``."""
        return to_spec(self)

    def __str__(self) -> str:
        try:
            return self.spec()
        except ValueError:  # Python-only (tensor-valued or composed) routing
            return repr(self)


@runtime_checkable
class TokenStrategy(Protocol):
    """Branched decoding: several routings of one sequence, one combined next-token distribution.

    What an engine needs of a strategy. A token strategy subclasses :class:`Strategy` and this
    protocol, which gives the defaults: separate KV caches, EOS allowed."""

    clean_cache: bool = False  # one clean KV cache: branches only for the current token (RoE cache='clean')

    def branches(self) -> tuple[Policy | None, ...]:
        """One routing policy per branch (``None``: the model's own routing)."""
        ...

    def combine(self, logprobs: Tensor) -> Tensor:
        """Next-token scores ``[B, V]`` from the branches' log-probs ``[B, n_branches, V]``."""
        ...

    def bans_eos(self) -> bool:
        """Whether EOS is excluded from the combined distribution (stop strings end the text)."""
        return False


@dataclass(frozen=True)
class Plain(Strategy, TokenStrategy):
    """The model's own routing, one branch: plain decoding."""

    name: ClassVar[str] = "plain"
    paper: ClassVar[str] = "—"

    def branches(self) -> tuple[Policy | None, ...]:
        return (None,)

    def combine(self, logprobs: Tensor) -> Tensor:
        return logprobs[:, 0]


@dataclass(frozen=True)
class Routed(Strategy, TokenStrategy):
    """One branch under a fixed routing policy; its spec is the policy's (e.g. ``topk(k=1)``)."""

    policy: Policy
    name: ClassVar[str] = "routed"
    level: ClassVar[str] = "routing"
    paper: ClassVar[str] = "—"
    printed_as: ClassVar[str] = "policy"

    def branches(self) -> tuple[Policy | None, ...]:
        return (self.policy,)

    def combine(self, logprobs: Tensor) -> Tensor:
        return logprobs[:, 0]

    def chooser(self) -> Plain:
        """Tokens are chosen as plain decoding chooses them, from the one routed branch."""
        return Plain()


def as_strategy(obj: Strategy | TokenStrategy | Policy | None) -> Strategy | TokenStrategy:
    """Accept a strategy (or any token strategy), a routing policy (one routed branch) or ``None``
    (plain decoding)."""
    if obj is None:
        return Plain()
    if isinstance(obj, Strategy | TokenStrategy):
        return obj
    if isinstance(obj, Policy):
        return Routed(obj)
    raise TypeError(f"expected a Strategy, a routing policy or None, got {type(obj).__name__}")
