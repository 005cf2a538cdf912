"""Dynamic Experts Search and its baselines: verifier-guided search with the expert count as a dimension.

Han et al., "Dynamic Experts Search: Enhancing Reasoning in Mixture-of-Experts LLMs at Test Time"
(arXiv 2509.22572). The number of routed experts k becomes a search dimension: step 1 spreads the
``n`` rollouts over the expert counts ``ks``, every later step expands the ``m`` best beams (by a
process verifier) with **their own k** (expert configuration inheritance), and the answer is the
best-verified finished beam or the majority vote (:mod:`moesteer.strategies.search` has the loop).
k is one global top-k for every MoE layer and token of a beam (``with_k``); models that do not
renormalise their top-k weights (OLMoE, the embedded model) get more gate mass as k grows.

The paper's baselines, with the same budget and verifier: ``beam_search`` (the inner strategy at the
model's own routing; ``des(ks=(k,))`` at the trained k gives exactly its tokens) and ``best_of_n``
(``n`` independent samples, scored once). Defaults not fixed by the paper are choices documented on
the parameters: ``ks`` = the trained k and its neighbours ``{k-1, k, k+1, k+2, 2k}`` within
``1..experts``; ``m = n // 4`` (search-and-learn's beam width 4); ``aggregate='last'``;
``temperature=0.8`` (the paper's; the call's own temperature is not used, since search needs
diverse rollouts and evals default to greedy); ``verifier='confidence'`` (it needs no extra model;
the paper uses Qwen2.5-Math-PRM-7B: ``verifier='prm'``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from moesteer import verifiers
from moesteer.answers import TASK, resolve_extractor
from moesteer.checks import check_int
from moesteer.routing import Policy
from moesteer.sampling import Completion, SamplingParams
from moesteer.strategies.base import Controller
from moesteer.strategies.combinators import WithK, token_inner
from moesteer.strategies.context import RunContext
from moesteer.strategies.search import SELECTIONS, SearchPlan, Slot, run_search
from moesteer.strategy import Plain, Strategy

if TYPE_CHECKING:
    from moesteer.backends.base import Engine

MAX_ROLLOUTS = 1024  # n: rollouts per step (all beams of a batch are rows of one forward)
MAX_STEPS = 256


@dataclass(frozen=True)
class _VerifiedSearch(Controller):
    """Shared parameters of the search controllers (``moesteer.strategies.des`` documents the search).

    Args:
        inner: the strategy each rollout decodes with (a token strategy or routing policy).
        n: rollouts per step.
        verifier: the process verifier scoring steps: 'confidence', 'prm', 'arith_steps' or 'none'.
        verifier_model: ``verifier='prm'``: the reward model's hub id or path (None: its default).
        aggregate: how a chain's step scores become one score: 'last', 'min' or 'prod'.
        select: the answer: 'verifier' (best-scored finished chain) or 'vote' (majority answer).
        separator: the text that ends a reasoning step.
        temperature: the rollouts' sampling temperature (the call's own is not used).
        extract: answer extractor for voting: 'task' (the running task's) or a callable.
    """

    inner: Strategy | Policy = dataclasses.field(default_factory=Plain)
    n: int = 16
    verifier: str = "confidence"
    verifier_model: str | None = None
    aggregate: str = "last"
    select: str = "verifier"
    separator: str = "\n\n"
    temperature: float = 0.8
    extract: str | Callable[[str], str | None] = TASK

    positional: ClassVar[tuple[str, ...]] = ("inner",)

    def validate(self) -> None:
        name = self.name
        token_inner(self.inner, name)
        check_int(f"{name}: n", self.n, 1, MAX_ROLLOUTS)
        verifiers.check_name(self.verifier)
        if self.verifier_model is not None and self.verifier != "prm":
            raise ValueError(f"{name}: verifier_model is for verifier='prm', not {self.verifier!r}")
        if self.aggregate not in verifiers.AGGREGATES:
            raise ValueError(
                f"{name}: aggregate must be one of {', '.join(verifiers.AGGREGATES)}, got {self.aggregate!r}"
            )
        if self.select not in SELECTIONS:
            raise ValueError(f"{name}: select must be one of {', '.join(SELECTIONS)}, got {self.select!r}")
        if self.verifier == "none" and self.select == "verifier":
            raise ValueError(f"{name}: verifier='none' gives no scores; use select='vote'")
        if not isinstance(self.separator, str) or not self.separator:
            raise ValueError(f"{name}: separator must be a non-empty string, got {self.separator!r}")
        if not isinstance(self.temperature, int | float) or not (0 <= self.temperature < math.inf):
            raise ValueError(f"{name}: temperature must be a finite number >= 0, got {self.temperature!r}")
        resolve_extractor(self.extract)

    def plan(self) -> SearchPlan:
        raise NotImplementedError

    def slots(self, engine: Engine) -> list[Slot]:
        """The routing configurations of the roots (default: the inner strategy as it is)."""
        return [Slot(token_inner(self.inner, self.name), engine.routing_sizes()[1])]

    def run(
        self, engine: Engine, prompts: list, sampling: SamplingParams, context: RunContext, **options
    ) -> list[Completion]:
        verifier = context.resources.get(
            f"verifier:{self.verifier}:{self.verifier_model}",
            lambda: verifiers.load(self.verifier, self.verifier_model),
        )
        extract = resolve_extractor(self.extract, context.extract)
        return run_search(
            engine, prompts, sampling, context, self.plan(), self.slots(engine), verifier, extract, **options
        )


@dataclass(frozen=True)
class BestOfN(_VerifiedSearch):
    """``n`` samples of ``inner``, the verifier's best one wins.

    Each chain is scored once by the verifier; the best (or the majority answer) wins.
    Search-and-learn's Best-of-N.

    Example: best_of_n(n=8, verifier='arith_steps')
    """

    name: ClassVar[str] = "best_of_n"
    paper: ClassVar[str] = (
        "Scaling LLM Test-Time Compute Optimally can be More Effective than Scaling Model Parameters "
        "(Snell et al., arXiv 2408.03314); a baseline of DES"
    )

    def plan(self) -> SearchPlan:
        return SearchPlan(self.n, None, 1, self.separator, self.aggregate, self.select, self.temperature)


@dataclass(frozen=True)
class BeamSearch(_VerifiedSearch):
    """Verifier-guided step-wise beam search over rollouts.

    ``n`` rollouts a step, the ``m`` best (default ``n // 4``) expanded, at most ``max_steps``
    steps (the last runs to the end).

    Args:
        m: beams kept and expanded each step (None: ``n // 4``).
        max_steps: at most this many steps (the last runs to the end).

    Example: beam_search(n=16, verifier='arith_steps')
    """

    m: int | None = None
    max_steps: int = 10

    name: ClassVar[str] = "beam_search"
    paper: ClassVar[str] = (
        "Scaling LLM Test-Time Compute Optimally can be More Effective than Scaling Model Parameters "
        "(Snell et al., arXiv 2408.03314); a baseline of DES"
    )

    def validate(self) -> None:
        super().validate()
        if self.m is not None:
            check_int(f"{self.name}: m", self.m, 1, self.n)
        check_int(f"{self.name}: max_steps", self.max_steps, 1, MAX_STEPS)

    @property
    def beams(self) -> int:
        return self.m if self.m is not None else max(1, self.n // 4)

    def plan(self) -> SearchPlan:
        return SearchPlan(
            self.n, self.beams, self.max_steps, self.separator, self.aggregate, self.select, self.temperature
        )


@dataclass(frozen=True)
class DES(BeamSearch):
    """Beam search over expert counts k; children inherit their parent's k.

    Dynamic Experts Search: beam search whose roots run at the expert counts ``ks`` (default: the
    trained k and its neighbours), children inheriting their parent's k. ``inner``'s every branch
    routes to k experts (``with_k``: SCMoE's strong branch takes k, its weak rank follows).

    Args:
        ks: the expert counts the roots run at (None: the trained k and its neighbours).

    Example: des(n=16, verifier='arith_steps')
    """

    ks: tuple[int, ...] | None = None

    name: ClassVar[str] = "des"
    paper: ClassVar[str] = "Dynamic Experts Search (Han et al., arXiv 2509.22572)"

    def validate(self) -> None:
        super().validate()
        if self.ks is None:
            return
        if not isinstance(self.ks, tuple) or not self.ks:
            raise ValueError(f"des: ks must be a non-empty tuple of expert counts, got {self.ks!r}")
        for k in self.ks:
            check_int(f"{self.name}: every k in ks", k, 1, 1 << 16)
        if len(set(self.ks)) != len(self.ks):
            raise ValueError(f"des: ks has repeated values: {self.ks!r}")
        if len(self.ks) > self.n:
            raise ValueError(f"des: n={self.n} rollouts cannot cover {len(self.ks)} expert counts (ks); raise n")

    def slots(self, engine: Engine) -> list[Slot]:
        experts, top_k = engine.routing_sizes()
        ks = self.ks if self.ks is not None else default_ks(top_k, experts)
        bad = [k for k in ks if k > experts]
        if bad:
            raise ValueError(
                f"des: ks has {bad[0]}, but the model has {experts} experts per layer (allowed 1..{experts})"
            )
        if len(ks) > self.n:
            raise ValueError(
                f"des: n={self.n} rollouts cannot cover the {len(ks)} expert counts {ks}; raise n or give ks"
            )
        inner = token_inner(self.inner, self.name)
        return [Slot(WithK(inner, k), k) for k in ks]


def default_ks(top_k: int, experts: int) -> tuple[int, ...]:
    """The trained k and its neighbours ``{k-1, k, k+1, k+2, 2k}``, within ``1..experts``."""
    return tuple(sorted({k for k in (top_k - 1, top_k, top_k + 1, top_k + 2, 2 * top_k) if 1 <= k <= experts}))
