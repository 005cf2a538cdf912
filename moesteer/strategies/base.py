"""The ``Strategy`` interface: one type for users, three levels inside.

* **routing** — a routing policy (:mod:`moesteer.routing`) on one branch; ``Routed`` wraps one;
* **token** — :class:`TokenStrategy`: ``branches()`` gives one routing policy per branch (each a
  batch row with its own KV cache); ``combine(logprobs [B, n_branches, V]) -> scores [B, V]`` gives
  the next-token scores every branch of a sequence then appends from (the engine log-softmaxes
  them, applies temperature / top-k / top-p and samples);
* **sequence** — :class:`Controller`: ``run(engine, prompts, sampling, context)`` orchestrates
  generations of an inner strategy (a token strategy or another controller) through the engine.

Strategies are frozen dataclasses (specs): printable, comparable, rebuilt from their text spec.
Everything that changes while generating lives in the engine's per-call state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

from moesteer.routing import Policy
from moesteer.strategies.printer import to_spec

if TYPE_CHECKING:
    from moesteer.backends.base import Engine
    from moesteer.sampling import Completion, SamplingParams
    from moesteer.strategies.context import RunContext


class Strategy:
    """Base of all strategies. Subclasses are frozen dataclasses and set the class variables."""

    name: ClassVar[str]
    level: ClassVar[str]
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


class TokenStrategy(Strategy):
    """Branched decoding: several routings of one sequence, one combined next-token distribution."""

    level: ClassVar[str] = "token"
    cache_mode: ClassVar[str] = "separate"  # "shared": one clean KV cache, branches only for the current token

    def branches(self) -> tuple[Policy | None, ...]:
        raise NotImplementedError

    def bans_eos(self) -> bool:
        """Whether EOS is excluded from the combined distribution (stop strings end the text)."""
        return False

    def combine(self, logprobs: Tensor) -> Tensor:
        raise NotImplementedError


class Controller(Strategy):
    """Sequence level: runs an inner strategy through an engine."""

    level: ClassVar[str] = "sequence"

    def run(
        self, engine: Engine, prompts: list, sampling: SamplingParams, context: RunContext, **options
    ) -> list[Completion]:
        """``sampling.n`` completions per prompt (prompt-major); ``options`` (``chat``, ``trace``,
        ``prompt_keys``) are passed on to every ``engine.generate`` call."""
        raise NotImplementedError


@dataclass(frozen=True)
class Plain(TokenStrategy):
    """The model's own routing, one branch: plain decoding."""

    name: ClassVar[str] = "plain"
    paper: ClassVar[str] = "—"

    def branches(self) -> tuple[Policy | None, ...]:
        return (None,)

    def combine(self, logprobs: Tensor) -> Tensor:
        return logprobs[:, 0]


@dataclass(frozen=True)
class Routed(TokenStrategy):
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


def as_strategy(obj: Strategy | Policy | None) -> Strategy:
    """Accept a strategy, a routing policy (one routed branch) or ``None`` (plain decoding)."""
    if obj is None:
        return Plain()
    if isinstance(obj, Strategy):
        return obj
    if isinstance(obj, Policy):
        return Routed(obj)
    raise TypeError(f"expected a Strategy, a routing policy or None, got {type(obj).__name__}")
