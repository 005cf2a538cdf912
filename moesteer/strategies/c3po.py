"""C3PO: re-mix each problem's routing from its successful neighbours (kernel regression or NGD).

Li, Li and Zhou, "C3PO: Critical-Layer, Core-Expert, Collaborative Pathway Optimization for
Test-Time Expert Re-Mixing" (arXiv 2504.07964), eqs. 4-5. For a test question x with neighbours
N(x) in a reference set (:mod:`moesteer.c3po`; questions the model answers correctly, with their
pathways ω_i = router distributions at the last prompt token):

    ω̂ = Σ_{i∈N(x)} K(x_i, x) ω_i / Σ_{i∈N(x)} K(x_i, x),        ω = α ω⁰ + (1 − α) ω̂

with ω⁰ the test question's own pathway. ω replaces the router's distribution in the critical
layers (the last ``layers`` MoE layers; all of them on a model with fewer) at the re-mixed
positions, before top-k: the model's own k experts with the largest ω fire, weighted by ω,
renormalised over them when the family renormalises its top-k (``SetWeights``). Decoding is the
inner strategy's, with a per-prompt ``Scoped(SetWeights(ω), where)`` in front of each branch.

``surrogate='ngd'`` (neighbourhood gradient descent, eq. 3, the paper's best): the test question's
pathway variable ω (critical layers, initialised at its own ω⁰) is plugged into **every
neighbour's** forward at the neighbour's re-mixed positions, and ``steps`` Adam steps minimise the
kernel-weighted cross-entropy of the neighbours' own answers, Σ K_i ℓ(f(x_i, ω), y_i) / Σ K_i, with
a cosine learning rate from ``lr`` to ``lr / 1000`` (R2-T2's schedule, the same lab's released NGD);
after each step ω is projected back onto the simplex of each layer (clamped at 0, renormalised), so
it stays a router distribution like the references'. Gradients reach ω only; the model is frozen.
``steps=0`` decodes with ω⁰, which is the model's own routing. The NGD losses of each problem are in
``info['c3po_losses']``; backward passes and time in ``cost``.

``surrogate='mode'`` (mean-shift mode finding in pathway space, eqs. 7-8): from ω⁰, ``steps`` times
ω̄ = Σ_{i∈N(ω)} K(ω_i, ω) ω_i / Σ K over the ``k`` reference pathways nearest to ω (Euclidean, over
the critical layers; K Gaussian with σ = ``bandwidth``), then ω ← α ω + (1 − α) ω̄. The question's
embedding is not used: the neighbourhood is taken among pathways.

Choices the paper leaves open, as parameters: ``where='last_prompt'`` re-mixes the prompt's last
token (the paper's "last token", whose pathway the references store); ``where='last'`` also every
generated token — the last position of every forward, as the released code does, which makes the
embedded model's chains collapse into digit noise (users of the released code report collapse on
GSM8K and MATH too). ``alpha`` is fixed (the paper's α search runs on the NGD surrogate, not built
yet). ``kernel='linear', max_similarity=None, alpha=0, k=3, layers=5, where='last'`` is the released
code's rule. A question without neighbours (an ε-ball that holds none) decodes with the model's own
routing.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from moesteer.c3po.embedding import load_embedder
from moesteer.c3po.references import ReferenceSet, last_token_routing
from moesteer.c3po.retrieval import DUPLICATE_SIMILARITY, KERNELS, KNN, EpsilonBall, neighbours
from moesteer.checks import check_int
from moesteer.models.adapters import find_routers
from moesteer.routing import Policy, Scoped, SetWeights
from moesteer.sampling import Completion, SamplingParams
from moesteer.strategies.base import Controller, Plain, Strategy
from moesteer.strategies.combinators import WithPolicy, token_inner
from moesteer.strategies.context import CostLedger, RunContext

WHERE = ("last_prompt", "last")
SURROGATES = ("kernel", "ngd", "mode")


@dataclass(frozen=True)
class C3PO(Controller):
    """Kernel-regression C3PO over the reference set in folder ``refs`` (see the module docstring)."""

    refs: str
    inner: Strategy | Policy = dataclasses.field(default_factory=Plain)
    k: int = 3
    eps: float | None = None  # an ε-ball (cosine distance) instead of the k nearest
    kernel: str = "gaussian"
    bandwidth: float = 1.0  # the Gaussian kernel's σ
    alpha: float = 0.0
    layers: int = 5
    where: str = "last_prompt"
    max_similarity: float | None = DUPLICATE_SIMILARITY
    embedding: str | None = None  # default: the reference set's own embedding model
    surrogate: str = "kernel"
    steps: int = 10  # NGD's gradient steps, mode finding's mean-shift iterations
    lr: float = 1e-2  # NGD, the cosine schedule's start

    name: ClassVar[str] = "c3po"
    paper: ClassVar[str] = "C3PO: Collaborative Pathway Optimization (Li et al., arXiv 2504.07964)"
    positional: ClassVar[tuple[str, ...]] = ("refs",)

    def validate(self) -> None:
        if not isinstance(self.refs, str) or not self.refs:
            raise ValueError(f"c3po: refs must be the folder of a reference set, got {self.refs!r}")
        token_inner(self.inner, self.name)
        check_int("c3po: k", self.k, 1, 4096)
        check_int("c3po: layers", self.layers, 1, 4096)
        if self.kernel not in KERNELS:
            raise ValueError(f"c3po: kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        if not (isinstance(self.alpha, int | float) and 0 <= self.alpha <= 1):
            raise ValueError(f"c3po: alpha must be in [0, 1], got {self.alpha!r}")
        if self.where not in WHERE:
            raise ValueError(f"c3po: where must be one of {', '.join(WHERE)}, got {self.where!r}")
        if self.surrogate not in SURROGATES:
            raise ValueError(f"c3po: surrogate must be one of {', '.join(SURROGATES)}, got {self.surrogate!r}")
        check_int("c3po: steps", self.steps, 0, 1000)
        if not (isinstance(self.lr, int | float) and 0 < self.lr < math.inf):
            raise ValueError(f"c3po: lr must be a positive number, got {self.lr!r}")
        self.neighbourhood()
        self.weigh()

    def neighbourhood(self) -> KNN | EpsilonBall:
        return KNN(self.k) if self.eps is None else EpsilonBall(self.eps)

    def weigh(self):
        kernel = KERNELS[self.kernel]
        return kernel(self.bandwidth) if self.kernel == "gaussian" else kernel()

    def run(self, engine, prompts: list, sampling: SamplingParams, context: RunContext, **options) -> list[Completion]:
        if not engine.capabilities.scoped_routing:
            raise ValueError(
                f"c3po re-mixes position-scoped routing, which the {engine.backend} backend cannot; use hf"
            )
        refs = context.resources.get(f"c3po:refs:{self.refs}", lambda: ReferenceSet.load(self.refs))
        experts, _ = engine.routing_sizes()
        held = (refs.manifest.num_experts, tuple(refs.manifest.moe_layers))
        if held != (experts, tuple(engine.moe_layers)):
            raise ValueError(
                f"c3po: {self.refs} holds routing over {held[0]} experts in MoE layers {list(held[1])}; "
                f"the model has {experts} experts in {list(engine.moe_layers)}"
            )
        name = self.embedding or refs.manifest.embedding_model
        embedder = context.resources.get(f"c3po:embedding:{name}", lambda: load_embedder(name))
        questions = [engine.prompt_text(p) for p in prompts]
        queries = embedder.encode(questions)
        inner = token_inner(self.inner, self.name)
        ledgers = [CostLedger() for _ in questions]
        losses: list[list[float]] = [[] for _ in questions]
        policies = self.policies(engine, refs, questions, queries, ledgers, losses)
        strategies = [WithPolicy(inner, p) if p is not None else inner for p in policies]
        completions = engine.generate(prompts, strategies, sampling, **options)
        per_prompt = len(completions) // len(questions)
        return [
            dataclasses.replace(
                c,
                info={**c.info, "c3po_losses": losses[i // per_prompt]},
                cost={**c.cost, **ledgers[i // per_prompt].as_dict()},
            )
            for i, c in enumerate(completions)
        ]

    def pathway(self, engine, refs: ReferenceSet, question: str, query: torch.Tensor) -> torch.Tensor | None:
        """ω ``[L, E]`` for one question (``None``: no neighbours)."""
        found = neighbours(query, refs.embeddings, self.neighbourhood(), self.max_similarity)
        if not len(found):
            return None
        weights = self.weigh()(found.similarity)
        if not math.isfinite(float(weights.sum())) or float(weights.sum()) == 0.0:
            return None
        remixed = (weights[:, None, None] * refs.routing[found.index]).sum(0) / weights.sum()
        if self.alpha:
            remixed = self.alpha * last_token_routing(engine, question).float() + (1 - self.alpha) * remixed
        return remixed

    def policies(
        self,
        engine,
        refs: ReferenceSet,
        questions: list[str],
        queries: torch.Tensor,
        ledgers: list[CostLedger] | None = None,
        losses: list[list[float]] | None = None,
    ) -> list[Policy | None]:
        """One re-mixing policy per question (``None``: no neighbours, the model's own routing)."""
        layers = refs.manifest.moe_layers
        critical = layers[-self.layers :]
        renormalise = _renormalises(engine)
        out: list[Policy | None] = []
        for q, (question, query) in enumerate(zip(questions, queries, strict=True)):
            if self.surrogate == "ngd":
                omega = self.descend(engine, refs, question, query, critical, renormalise, ledgers, losses, q)
            elif self.surrogate == "mode":
                omega = self.seek_mode(engine, refs, question, [layers.index(layer) for layer in critical])
            else:
                omega = self.pathway(engine, refs, question, query)
            if omega is None:
                out.append(None)
                continue
            values = {layer: omega[layers.index(layer)].detach() for layer in critical}
            out.append(Scoped(SetWeights(values, renormalise=renormalise), self.where))
        return out

    def seek_mode(self, engine, refs: ReferenceSet, question: str, rows: list[int]) -> torch.Tensor:
        """Mean shift (eqs. 7-8) of ω⁰ among the reference pathways, in the critical layers ``rows``."""
        omega = last_token_routing(engine, question).float()
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

    def descend(self, engine, refs, question, query, critical, renormalise, ledgers, losses, q):
        """NGD (eq. 3): ω over the critical layers, from ω⁰, fitted on the neighbours' answers."""
        found = neighbours(query, refs.embeddings, self.neighbourhood(), self.max_similarity)
        omega = last_token_routing(engine, question).float()
        if not len(found) or self.steps == 0:
            return omega
        kernel = self.weigh()(found.similarity)
        rows = [refs.manifest.moe_layers.index(layer) for layer in critical]
        variable = torch.nn.Parameter(omega[rows].clone())
        optimiser = torch.optim.Adam([variable], lr=self.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, self.steps, eta_min=self.lr / 1000)
        chosen = [refs.references[int(i)] for i in found.index]
        ledger = ledgers[q] if ledgers is not None else CostLedger()
        with ledger.phase("ngd"):
            for _ in range(self.steps):
                policy = Scoped(SetWeights(dict(zip(critical, variable, strict=True)), renormalise), self.where)
                loss = engine.loss([r.question for r in chosen], [r.answer for r in chosen], policy, weights=kernel)
                (variable.grad,) = torch.autograd.grad(loss, [variable])  # nothing accumulates in the model
                optimiser.step()
                schedule.step()
                with torch.no_grad():  # back onto each layer's simplex
                    variable.clamp_(min=0)
                    variable /= variable.sum(-1, keepdim=True).clamp(min=1e-12)
                ledger.add("backward_passes")
                if losses is not None:
                    losses[q].append(float(loss.detach()))
        omega[rows] = variable.detach()
        return omega


def _renormalises(engine) -> bool:
    """Whether the family renormalises its top-k weights (Mixtral, Qwen3-MoE; not OLMoE or the
    embedded model), read from its first router."""
    router = next(iter(find_routers(engine.model, engine.adapter).values()))
    return bool(
        getattr(engine.adapter.scoring, "always_renormalise", False) or getattr(router, "norm_topk_prob", False)
    )
