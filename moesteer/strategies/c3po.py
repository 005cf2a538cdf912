"""C3PO: re-mix each problem's routing from its successful neighbours (kernel regression, NGD, mode).

Li, Li and Zhou, "C3PO: Critical-Layer, Core-Expert, Collaborative Pathway Optimization for
Test-Time Expert Re-Mixing" (arXiv 2504.07964). For a test question x with neighbours N(x) in a
reference set (:mod:`moesteer.c3po`: questions the model answers correctly, with their pathways
ω_i = router distributions at the last prompt token), one ω per question replaces the router's
distribution in the critical layers (the last ``layers`` MoE layers; all of them on a model with
fewer) at the re-mixed positions, before top-k: the model's own k experts with the largest ω fire,
weighted by ω, renormalised over them when the family renormalises its top-k (``SetWeights``).
Decoding is the inner strategy's, with a per-prompt ``Scoped(SetWeights(ω), where)`` in front of
each branch; on vLLM the same policy is served there, and what needs forwards of the model alone
(ω⁰, the α search, NGD) runs on the engine's HF copy (``Engine.gradient_engine``).

``surrogate='kernel'`` (eqs. 4-6): ω̂ = Σ_{i∈N(x)} K(x_i, x) ω_i / Σ K(x_i, x), then
ω = α ω⁰ + (1 − α) ω̂ with ω⁰ the question's own pathway. ``alpha`` is fixed, or with
``alpha_search=n`` α* = argmin over n evenly spaced α in [0, 1] of the NGD surrogate below (the
label of x is unknown; the paper names no search method: a grid, n forwards over the neighbours,
ties to the smaller α).

``surrogate='ngd'`` (neighbourhood gradient descent, eq. 3, the paper's best): the question's
pathway variable (initialised at ω⁰) is plugged into **every neighbour's** forward at the
neighbour's re-mixed positions, and ``steps`` Adam steps minimise the kernel-weighted cross-entropy
of the neighbours' own answers, L(ω) = Σ K_i ℓ(f(x_i, ω), y_i) / Σ K_i, with a cosine learning rate
from ``lr`` to ``lr / 1000`` (R2-T2's schedule, the same lab's released NGD). Only the ``core``
experts of each critical layer with the largest ω⁰ are variables (the paper's top 20 of 64; all of
them on a model with fewer); the others stay at ω⁰. After each step the core entries are projected
back (clamped at 0, rescaled to their ω⁰ mass), so ω stays a distribution like the references'.
Gradients reach the variables only — through the experts the top-k selects (hard top-k: a core
expert outside it gets none that step); the model is frozen. ``steps=0`` decodes with ω⁰, the
model's own routing.

``surrogate='mode'`` (mean-shift mode finding in pathway space, eqs. 7-8): from ω⁰, ``steps`` times
ω̄ = Σ_{i∈N(ω)} K(ω_i, ω) ω_i / Σ K over the ``k`` reference pathways nearest to ω (Euclidean, over
the critical layers; K Gaussian with σ = ``bandwidth``), then ω ← α ω + (1 − α) ω̄. The question's
embedding is not used: the neighbourhood is taken among pathways.

Choices the paper leaves open, as parameters: ``where='last_prompt'`` re-mixes the prompt's last
token (the paper's "last token", whose pathway the references store); ``where='last'`` also every
generated token — the last position of every forward, as the released code does
(``parity/c3po_official.py``: ``kernel='linear', max_similarity=None, alpha=0, k=3, layers=5,
where='last'`` gives the released code's ω and tokens). A question without usable neighbours (an
ε-ball that holds none, kernel weights summing to ≤ 0) decodes with the model's own routing —
except under the released code's rule (``surrogate='kernel', kernel='linear', where='last',
max_similarity=None``), whose fallback is kept: when the top-k similarities sum to ≤ 0 the
released code leaves each critical layer's ω at the question's own last-token routing ω⁰ and still
writes it over every last position, so ω = ω⁰ is decoded there (ω⁰ of the prompt moesteer is
given; theirs is of the question without their instruction prefix). ``info['c3po_fallback']``
says which of the two a question got.

``within='arith_ops'`` is the oracle of the issue's upper bound: neighbours only among references
whose question has the test question's operator pattern (``+-*``), a label a real test question
does not carry.

Per completion: ``info`` has ``c3po_neighbours`` (reference ids), ``c3po_losses`` (NGD, per step),
``c3po_alpha`` (the searched α); ``cost`` has ``extra_forward_passes`` and ``backward_passes``
(beyond decoding) and ``seconds:c3po`` — on the first completion of each prompt only, so that the
costs of its n samples (``SamplingParams.n``, ``self_consistency``) sum to what was spent.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from moesteer.c3po.embedding import load_embedder
from moesteer.c3po.references import ReferenceSet, check_compatible, last_token_routing
from moesteer.c3po.retrieval import DUPLICATE_SIMILARITY, GROUPS, KERNELS, KNN, EpsilonBall, Neighbours, neighbours
from moesteer.checks import check_int
from moesteer.routing import Policy, Scoped, SetWeights
from moesteer.sampling import Completion, SamplingParams
from moesteer.strategies.base import Controller
from moesteer.strategies.combinators import WithPolicy, token_inner
from moesteer.strategies.context import CostLedger, RunContext
from moesteer.strategy import Plain, Strategy

if TYPE_CHECKING:
    from moesteer.backends.base import Engine

WHERE = ("last_prompt", "last")
SURROGATES = ("kernel", "ngd", "mode")


@dataclass
class Fit:
    """One question's re-mixing: its policy (``None``: the model's own routing), what it cost, and
    what to report in the completions' ``info``."""

    policy: Policy | None
    ledger: CostLedger = field(default_factory=CostLedger)
    info: dict = field(default_factory=dict)


@dataclass
class Problem:
    """One test question while its ω is fitted: the engine, the critical ``rows`` of ω, the
    neighbours once found, and the :class:`Fit` it fills."""

    engine: Engine
    refs: ReferenceSet
    question: str
    rows: list[int]
    renormalise: bool
    where: str
    fit: Fit = field(default_factory=lambda: Fit(None))
    found: Neighbours | None = None
    kernel: Tensor | None = None
    pending: str | None = None  # 'descend' (NGD) or 'alpha' (the α search): run for all such problems at once
    mix: tuple[Tensor, Tensor] | None = None  # the α search's ω⁰ and ω̂

    def policy(self, critical: Tensor) -> Scoped:
        """ω's critical rows ``[len(rows), E]`` as the re-mixing policy."""
        layers = self.refs.manifest.moe_layers
        values = {layers[r]: critical[j] for j, r in enumerate(self.rows)}
        return Scoped(SetWeights(values, renormalise=self.renormalise), self.where)

    def own_pathway(self) -> Tensor:
        """ω⁰ ``[L, E]``: the question's own router distributions at its last token (one forward)."""
        self.fit.ledger.add("extra_forward_passes")
        return last_token_routing(self.engine.gradient_engine(), self.question).float()


def surrogate_losses(problems: list[Problem], critical: Tensor) -> Tensor:
    """Each problem's surrogate (eq. 3), Σ K_i ℓ(f(x_i, ω), y_i) / Σ K_i, with its ω's critical rows
    ``critical [P, rows, E]`` plugged into every neighbour's re-mixed positions:
    every problem's neighbours in one batched forward (one policy per problem, one routing call
    for all of them), then each problem's kernel-weighted mean ``[P]``."""
    questions, answers, policies, owner = [], [], [], []
    for p, problem in enumerate(problems):
        policy = problem.policy(critical[p])
        for i in problem.found.index:
            reference = problem.refs.references[int(i)]
            questions.append(reference.question)
            answers.append(reference.answer)
            policies.append(policy)
            owner.append(p)
        problem.fit.ledger.add("extra_forward_passes")
    engine = problems[0].engine.gradient_engine()
    per_pair = engine.loss(questions, answers, policies, reduction="none")
    kernel = torch.cat([problem.kernel for problem in problems]).to(per_pair.device, per_pair.dtype)
    owner_t = torch.tensor(owner, device=per_pair.device)
    weighted = torch.zeros(len(problems), device=per_pair.device, dtype=per_pair.dtype).index_add(
        0, owner_t, kernel * per_pair
    )
    mass = torch.zeros_like(weighted).index_add(0, owner_t, kernel)
    return weighted / mass


@dataclass(frozen=True)
class C3PO(Controller):
    """Routing re-mixed from successful neighbours' pathways.

    Each question's routing in the critical layers, from its neighbours in the reference set
    ``refs``; the module ``moesteer.strategies.c3po`` documents the surrogates and the choices the
    paper leaves open.

    Args:
        refs: the reference set's folder (``moesteer references build``).
        inner: the strategy decoding runs with, the re-mixing in front of each branch.
        surrogate: 'kernel' (kernel regression), 'ngd' (neighbourhood gradient descent) or 'mode'.
        k: neighbours (the k most similar references).
        eps: an ε-ball of this cosine distance instead of the k nearest (None: k nearest).
        kernel: neighbour weights: 'gaussian', 'linear', 'polynomial' or 'matern'.
        bandwidth: the Gaussian kernel's σ.
        alpha: ω = α ω⁰ + (1 − α) ω̂: the share of the question's own pathway.
        alpha_search: 'kernel': search α* over this many α in [0, 1] (0: the fixed alpha).
        layers: critical layers: the last this many MoE layers.
        core: 'ngd': variables per critical layer, the experts with the largest ω⁰.
        where: re-mix at 'last_prompt' (the prompt's last token) or 'last' (every forward's last position).
        max_similarity: drop references more similar than this to the question (None: keep all).
        embedding: the question embedding model (None: the reference set's own).
        steps: 'ngd': gradient steps; 'mode': mean-shift iterations.
        lr: 'ngd': the cosine schedule's starting learning rate.
        within: oracle: neighbours only among references of the question's group ('arith_ops').

    Example: c3po('refs/arith', surrogate='ngd', steps=10)
    """

    refs: str
    inner: Strategy | Policy = dataclasses.field(default_factory=Plain)
    surrogate: str = "kernel"
    k: int = 3
    eps: float | None = None
    kernel: str = "gaussian"
    bandwidth: float = 1.0
    alpha: float = 0.0
    alpha_search: int = 0
    layers: int = 5
    core: int = 20
    where: str = "last_prompt"
    max_similarity: float | None = DUPLICATE_SIMILARITY
    embedding: str | None = None
    steps: int = 10
    lr: float = 1e-2
    within: str | None = None

    name: ClassVar[str] = "c3po"
    paper: ClassVar[str] = (
        "C3PO: Critical-Layer, Core-Expert, Collaborative Pathway Optimization for Test-Time Expert Re-Mixing "
        "(Li, Li and Zhou, arXiv 2504.07964)"
    )
    positional: ClassVar[tuple[str, ...]] = ("refs",)

    def validate(self) -> None:
        if not isinstance(self.refs, str) or not self.refs:
            raise ValueError(f"c3po: refs must be the folder of a reference set, got {self.refs!r}")
        token_inner(self.inner, self.name)
        if self.surrogate not in SURROGATES:
            raise ValueError(f"c3po: surrogate must be one of {', '.join(SURROGATES)}, got {self.surrogate!r}")
        check_int("c3po: k", self.k, 1, 4096)
        check_int("c3po: layers", self.layers, 1, 4096)
        check_int("c3po: core", self.core, 1, 1 << 20)
        if self.kernel not in KERNELS:
            raise ValueError(f"c3po: kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        if not (isinstance(self.alpha, int | float) and 0 <= self.alpha <= 1):
            raise ValueError(f"c3po: alpha must be in [0, 1], got {self.alpha!r}")
        check_int("c3po: alpha_search", self.alpha_search, 0, 1001)
        if self.alpha_search == 1:
            raise ValueError("c3po: alpha_search must be 0 (fixed alpha) or at least 2 grid points, got 1")
        if self.where not in WHERE:
            raise ValueError(f"c3po: where must be one of {', '.join(WHERE)}, got {self.where!r}")
        if self.within is not None and self.within not in GROUPS:
            raise ValueError(f"c3po: within must be one of {', '.join(GROUPS)}, got {self.within!r}")
        if self.within is not None and self.surrogate == "mode":
            raise ValueError("c3po: within restricts the question's neighbours, which surrogate='mode' does not use")
        check_int("c3po: steps", self.steps, 0, 1000)
        if not (isinstance(self.lr, int | float) and 0 < self.lr < math.inf):
            raise ValueError(f"c3po: lr must be a positive number, got {self.lr!r}")
        self.neighbourhood()
        self.weigh()

    def released_rule(self) -> bool:
        """Whether this is the released code's rule: kernel regression on the raw cosine weights of
        the k nearest, at every last position, without the near-duplicate guard."""
        rule = (self.surrogate, self.kernel, self.where, self.max_similarity, self.eps)
        return rule == ("kernel", "linear", "last", None, None)

    def neighbourhood(self) -> KNN | EpsilonBall:
        return KNN(self.k) if self.eps is None else EpsilonBall(self.eps)

    def weigh(self):
        kernel = KERNELS[self.kernel]
        return kernel(self.bandwidth) if self.kernel == "gaussian" else kernel()

    def run(
        self, engine: Engine, prompts: list, sampling: SamplingParams, context: RunContext, **options
    ) -> list[Completion]:
        if not engine.capabilities.scoped_routing:
            raise ValueError(
                f"c3po re-mixes position-scoped routing, which the {engine.backend} backend cannot; use hf or vllm"
            )
        refs = context.resources.get(f"c3po:refs:{self.refs}", lambda: ReferenceSet.load(self.refs))
        check_compatible(refs, engine, f"c3po: {self.refs}")
        questions = [engine.prompt_text(p) for p in prompts]
        fits = self.fits(engine, refs, questions, self.embed(refs, questions, context))
        inner = token_inner(self.inner, self.name)
        strategies = [inner if f.policy is None else WithPolicy(inner, f.policy) for f in fits]
        completions = engine.generate(prompts, strategies, sampling, **options)
        per_prompt = len(completions) // len(fits)
        out = []
        for i, c in enumerate(completions):  # a prompt's fit is paid once: on its first completion
            fit, first = fits[i // per_prompt], i % per_prompt == 0
            cost = {**c.cost, **fit.ledger.as_dict()} if first else c.cost
            out.append(dataclasses.replace(c, info={**c.info, **fit.info}, cost=cost))
        return out

    def embed(self, refs: ReferenceSet, questions: list[str], context: RunContext | None = None) -> Tensor:
        """The questions' embeddings ``[Q, D]``, with the reference set's embedding model by default."""
        name = self.embedding or refs.manifest.embedding_model
        load = lambda: load_embedder(name)  # noqa: E731
        embedder = context.resources.get(f"c3po:embedding:{name}", load) if context is not None else load()
        return embedder.encode(questions)

    def policies(
        self, engine: Engine, refs: ReferenceSet, questions: list[str], queries: Tensor
    ) -> list[Policy | None]:
        """One re-mixing policy per question (``None``: the model's own routing)."""
        return [f.policy for f in self.fits(engine, refs, questions, queries)]

    def fits(self, engine: Engine, refs: ReferenceSet, questions: list[str], queries: Tensor) -> list[Fit]:
        """Each question's fit; the NGD descents of all questions run as one (:meth:`descend`)."""
        problems, omegas = [], []
        for question, query in zip(questions, queries, strict=True):
            problem = self.problem(engine, refs, question)
            with problem.fit.ledger.phase("c3po"):
                omegas.append(self.optimise(problem, query))
            problems.append(problem)
        for step, run in (("descend", self.descend), ("alpha", self.search_alphas)):
            waiting = [i for i, problem in enumerate(problems) if problem.pending == step]
            if not waiting:
                continue
            start = time.perf_counter()
            done = run([problems[i] for i in waiting])
            share = (time.perf_counter() - start) / len(waiting)  # the batched run's time, shared alike
            for i, omega in zip(waiting, done, strict=True):
                omegas[i] = omega
                problems[i].fit.ledger.counts["seconds:c3po"] += share
        for problem, omega in zip(problems, omegas, strict=True):
            if omega is not None:
                problem.fit.policy = problem.policy(omega[problem.rows].detach())
        return [problem.fit for problem in problems]

    def pathway(self, engine: Engine, refs: ReferenceSet, question: str, query: Tensor) -> Tensor | None:
        """ω ``[L, E]`` of one question, embedded as ``query [D]`` (``None``: no usable neighbours)."""
        problem = self.problem(engine, refs, question)
        omega = self.optimise(problem, query)
        if problem.pending == "descend":
            return self.descend([problem])[0]
        return self.search_alphas([problem])[0] if problem.pending == "alpha" else omega

    def problem(self, engine: Engine, refs: ReferenceSet, question: str) -> Problem:
        rows = list(range(len(refs.manifest.moe_layers)))[-self.layers :]  # the critical layers, as rows of ω
        return Problem(engine, refs, question, rows, _renormalises(engine), self.where)

    def optimise(self, problem: Problem, query: Tensor) -> Tensor | None:
        """ω ``[L, E]`` of one question under the surrogate (``None``: no usable neighbours)."""
        refs = problem.refs
        if self.surrogate == "mode":
            return self.seek_mode(problem.own_pathway(), refs, problem.rows)
        found = neighbours(query, refs.embeddings, self.neighbourhood(), self.max_similarity, self.candidates(problem))
        problem.fit.info["c3po_neighbours"] = [refs.references[int(i)].id for i in found.index]
        kernel = self.weigh()(found.similarity)
        total = float(kernel.sum())
        if not len(found) or not math.isfinite(total) or total <= 0:
            if self.released_rule():  # the released code writes the question's own routing instead
                problem.fit.info["c3po_fallback"] = "own_pathway"
                return problem.own_pathway()
            problem.fit.info["c3po_fallback"] = "model_routing"
            return None
        problem.found, problem.kernel = found, kernel
        if self.surrogate == "ngd":
            problem.pending = "descend"  # with the other questions' problems
            return None
        remixed = (kernel[:, None, None] * refs.routing[found.index]).sum(0) / total
        if not (self.alpha_search or self.alpha):
            return remixed
        own = problem.own_pathway()
        if self.alpha_search:
            problem.pending, problem.mix = "alpha", (own, remixed)  # with the other questions' problems
            return None
        return self.alpha * own + (1 - self.alpha) * remixed

    def candidates(self, problem: Problem) -> Tensor | None:
        """The rows of the references in the question's ``within`` group (``None``: all)."""
        if self.within is None:
            return None
        key = GROUPS[self.within]
        group = key(problem.question)
        return torch.tensor(
            [i for i, r in enumerate(problem.refs.references) if key(r.question) == group], dtype=torch.long
        )

    def search_alphas(self, problems: list[Problem]) -> list[Tensor]:
        """α* = argmin_α L(α ω⁰ + (1 − α) ω̂) over the grid (eq. 6), ties to the smaller α, for each
        problem; one batched forward of every problem's neighbours per α."""
        grid = torch.linspace(0.0, 1.0, self.alpha_search).tolist()
        rows = problems[0].rows
        mixes = [problem.mix for problem in problems]
        with torch.no_grad():
            per_alpha = [
                surrogate_losses(problems, torch.stack([(a * own + (1 - a) * remixed)[rows] for own, remixed in mixes]))
                for a in grid
            ]
        losses = torch.stack(per_alpha, dim=1).tolist()  # [P, grid]
        out = []
        for problem, problem_losses in zip(problems, losses, strict=True):
            best = min(range(len(grid)), key=lambda i, ls=problem_losses: (ls[i], i))
            problem.fit.info.update(c3po_alpha=grid[best], c3po_alpha_losses=problem_losses)
            own, remixed = problem.mix
            out.append(grid[best] * own + (1 - grid[best]) * remixed)
        return out

    def descend(self, problems: list[Problem]) -> list[Tensor]:
        """NGD (eq. 3) over the critical layers' core experts, from each problem's ω⁰: every
        problem's own parameters and losses, all problems' neighbours in one forward and backward a
        step (Adam and the cosine schedule act element-wise, so this is each problem descending alone,
        up to the float rounding of a larger batch)."""
        owns = [problem.own_pathway() for problem in problems]
        if self.steps == 0:
            return owns
        rows = problems[0].rows
        start = torch.stack([own[rows] for own in owns])  # [P, critical, E]
        core = start.topk(min(self.core, start.shape[-1]), dim=-1).indices
        variable = torch.nn.Parameter(start.gather(-1, core))
        mass = variable.detach().sum(-1, keepdim=True)
        optimiser = torch.optim.Adam([variable], lr=self.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, self.steps, eta_min=self.lr / 1000)
        trajectories = [problem.fit.info.setdefault("c3po_losses", []) for problem in problems]
        for _ in range(self.steps):
            losses = surrogate_losses(problems, start.scatter(-1, core, variable))
            (variable.grad,) = torch.autograd.grad(losses.sum(), [variable])  # nothing accumulates in the model
            optimiser.step()
            schedule.step()
            with torch.no_grad():  # back onto the core experts' share of each layer's simplex
                variable.clamp_(min=0)
                variable.mul_(mass / variable.sum(-1, keepdim=True).clamp(min=1e-12))
            for problem, trajectory, loss in zip(problems, trajectories, losses.tolist(), strict=True):
                problem.fit.ledger.add("backward_passes")
                trajectory.append(loss)
        critical = start.scatter(-1, core, variable.detach())
        out = []
        for p, own in enumerate(owns):
            omega = own.clone()
            omega[rows] = critical[p]
            out.append(omega)
        return out

    def seek_mode(self, own: Tensor, refs: ReferenceSet, rows: list[int]) -> Tensor:
        """Mean shift (eqs. 7-8) of ω⁰ ``own`` among the reference pathways, in the critical layers ``rows``."""
        omega = own.clone()
        pathways = refs.routing[:, rows].flatten(1).float()  # [N, critical × E]
        current = omega[rows].flatten()
        for _ in range(self.steps):
            distance2 = ((pathways - current) ** 2).sum(-1)
            nearest = distance2.topk(min(self.k, len(distance2)), largest=False).indices
            kernel = torch.exp(-distance2[nearest] / (2 * self.bandwidth**2))
            mean = (kernel[:, None] * pathways[nearest]).sum(0) / kernel.sum()
            current = self.alpha * current + (1 - self.alpha) * mean
        omega[rows] = current.view(len(rows), -1)
        return omega


def _renormalises(engine: Engine) -> bool:
    """Whether the family renormalises its top-k weights (Mixtral, Qwen3-MoE; not OLMoE or the
    embedded model), from the adapter and the model's config (both backends hold them)."""
    return bool(
        getattr(engine.adapter.scoring, "always_renormalise", False) or getattr(engine.config, "norm_topk_prob", False)
    )
