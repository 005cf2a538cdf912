"""Online test-time rerouting: a router-logit bias δ optimised on the model's own context.

"Rewiring Experts on the Fly" (arXiv 2510.14853). Each sequence carries a per-layer bias
δ^(l) ∈ R^E added to its router logits, z̃ = z + δ (selection and weights both from z̃), shared by
all its tokens, zero at the start of every call (never shared between prompts or rows). Before
decoding, ``steps`` Adam steps at ``lr`` minimise the mean next-token cross-entropy of the prompt,
in the layers chosen by router confidence; then, every ``every`` generated tokens, the same on
prompt + generated text so far, warm-started from the sequence's current δ. The model is frozen:
gradients reach δ only, through the mixing weights of the selected experts.

Layer choice (the top ``layers`` fraction of MoE layers, at least one): the score
C_l = −(1/k) Σ_{j≤k} log p_{l,j}, p the router's distribution at its k selected experts, averaged
over the context's tokens, under the model's own routing — the formula as written; the paper
calls these layers "confident" although a high C means uncertain routing, so
``confidence='inverted'`` takes the lowest C instead. The choice is redone at every update; a
layer left out keeps its δ. ``selection='soft'`` updates every layer with a step scaled by
L · softmax(±C) (see :meth:`Rerouting.layer_weights`).

After an update, ``kv='rebuild'`` (default) recomputes the sequence's KV cache and next-token
distribution under the new δ (one more forward over the context); ``kv='keep'`` continues from
the cache computed under the old δ (cheaper; its routing then matches no single δ). ``every=None``
optimises at prefill only. The paper gives no optimiser (Adam here), no δ reset rule within a
sequence (warm start here) and no penalty (none here).

Many prompts at once: the δ of all rows are one tensor ``[rows, L, E]``, optimised in one batched
backward per step (the loss is a sum of per-row means, and Adam is elementwise, so a batch equals
its prompts one by one). ``info['rerouting_losses']``: the context loss at each step, one list
per optimisation (prefill first). Costs per completion: ``extra_forward_passes`` (the optimisation's, the
layer scores', the rebuilds'), ``backward_passes``, ``rebuild_passes``, ``updates``; a prompt's
prefill optimisation is counted on its first sample.

On vLLM, δ is optimised on the engine's HF copy (``Engine.gradient_engine``) and decoding runs in
vLLM: each segment of ``every`` tokens is one batch of requests under the sequences' ``Bias``, and
after an update the next segment re-reads the tokens as a prompt under the new δ (its prefix cache
is salted by routing), which is ``kv='rebuild'``; ``kv='keep'`` needs backend hf.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from moesteer.checks import check_int
from moesteer.routing import Bias, Policy
from moesteer.sampling import Completion, SamplingParams
from moesteer.strategies.base import Controller
from moesteer.strategies.combinators import WithPolicy, token_inner
from moesteer.strategies.context import CostLedger, RunContext
from moesteer.strategy import Plain, Strategy

if TYPE_CHECKING:
    from moesteer.backends.base import Engine, Session

KV = ("rebuild", "keep")
CONFIDENCE = ("as_written", "inverted")
SELECTION = ("hard", "soft")


@dataclass(frozen=True)
class Rerouting(Controller):
    """Router-logit bias δ optimised on the model's context.

    Refreshed every ``every`` tokens; the module ``moesteer.strategies.rerouting`` documents the method.

    Args:
        inner: the strategy decoding runs with (a token strategy or routing policy).
        steps: Adam steps per optimisation.
        lr: Adam's learning rate.
        every: re-optimise every this many generated tokens (None: at prefill only).
        layers: the fraction of MoE layers optimised, chosen by router confidence.
        confidence: 'as_written' (the highest score C) or 'inverted' (the lowest).
        selection: 'hard' (the chosen layers) or 'soft' (every layer, its step scaled by its confidence).
        kv: after an update, 'rebuild' the KV cache under the new δ or 'keep' the old one.

    Example: rerouting(every=None, lr=0.02)
    """

    inner: Strategy | Policy = dataclasses.field(default_factory=Plain)
    steps: int = 5
    lr: float = 0.05
    every: int | None = 128
    layers: float = 0.5
    confidence: str = "as_written"
    selection: str = "hard"
    kv: str = "rebuild"

    name: ClassVar[str] = "rerouting"
    paper: ClassVar[str] = "Rewiring Experts on the Fly (arXiv 2510.14853)"
    positional: ClassVar[tuple[str, ...]] = ("inner",)

    def validate(self) -> None:
        token_inner(self.inner, self.name)
        check_int("rerouting: steps", self.steps, 0, 1000)
        if not (isinstance(self.lr, int | float) and 0 < self.lr < math.inf):
            raise ValueError(f"rerouting: lr must be a positive number, got {self.lr!r}")
        if self.every is not None:
            check_int("rerouting: every", self.every, 1, 1 << 20)
        if not (isinstance(self.layers, int | float) and 0 < self.layers <= 1):
            raise ValueError(f"rerouting: layers must be a fraction in (0, 1], got {self.layers!r}")
        if self.confidence not in CONFIDENCE:
            raise ValueError(f"rerouting: confidence must be one of {', '.join(CONFIDENCE)}, got {self.confidence!r}")
        if self.selection not in SELECTION:
            raise ValueError(f"rerouting: selection must be one of {', '.join(SELECTION)}, got {self.selection!r}")
        if self.kv not in KV:
            raise ValueError(f"rerouting: kv must be one of {', '.join(KV)}, got {self.kv!r}")

    def run(
        self, engine: Engine, prompts: list, sampling: SamplingParams, context: RunContext, **options
    ) -> list[Completion]:
        if not engine.capabilities.sessions:
            if not engine.capabilities.search_sessions:
                raise ValueError(f"rerouting pauses decoding, which the {engine.backend} backend cannot: use hf")
            if self.kv == "keep":
                raise ValueError(f"rerouting: kv='keep' needs backend hf (the {engine.backend} backend rebuilds)")
        inner = token_inner(self.inner, self.name)
        optimiser = engine.gradient_engine()  # on vLLM an HF copy: optimise there, decode here
        prompt_ids = [engine.encode(p, chat=options.get("chat", False)) for p in prompts]
        keys = list(options.get("prompt_keys") or range(len(prompts)))
        layers = engine.moe_layers
        experts, _ = engine.routing_sizes()
        prompt_ledgers, prompt_losses = [CostLedger() for _ in prompts], [[] for _ in prompts]
        start = torch.zeros(len(prompts), len(layers), experts, device=optimiser.device)
        delta = self.optimise(optimiser, prompt_ids, start, prompt_ledgers, prompt_losses)
        strategies = [self.steered(inner, layers, d) for d in delta]
        with engine.session(sampling, trace=options.get("trace", False)) as session:
            ids = session.add(prompt_ids, strategies, keys, copies=sampling.n)
            ledgers = {sid: CostLedger() for sid in ids}
            for j, sid in enumerate(ids):
                if j % sampling.n == 0:
                    ledgers[sid].counts.update(prompt_ledgers[j // sampling.n].counts)
            current = {sid: delta[j // sampling.n] for j, sid in enumerate(ids)}
            losses = {sid: [list(prompt_losses[j // sampling.n])] for j, sid in enumerate(ids)}
            while session.live():
                session.run(max_steps=self.every)
                live = session.live()
                if self.every is None or not live:
                    break
                self.update(optimiser, session, inner, live, current, ledgers, losses)
            out = [
                session.completion(sid, prompt_index=j // sampling.n, sample_index=j % sampling.n)
                for j, sid in enumerate(ids)
            ]
        return [
            dataclasses.replace(
                c, info={**c.info, "rerouting_losses": losses[sid]}, cost={**c.cost, **ledgers[sid].as_dict()}
            )
            for c, sid in zip(out, ids, strict=True)
        ]

    def update(
        self, engine: Engine, session: Session, inner, live: list[int], current: dict, ledgers: dict, losses: dict
    ) -> None:
        """Re-optimise the δ of the ``live`` sequences on their tokens so far, then serve it."""
        contexts = [session.seqs[sid].tokens for sid in live]
        start = torch.stack([current[sid] for sid in live])
        for sid in live:
            losses[sid].append([])
        delta = self.optimise(engine, contexts, start, [ledgers[s] for s in live], [losses[s][-1] for s in live])
        for sid, d in zip(live, delta, strict=True):
            if torch.equal(d, current[sid]):  # nothing moved (steps=0, a context too short): nothing to serve
                continue
            current[sid] = d
            strategy = self.steered(inner, engine.moe_layers, d)
            ledgers[sid].add("updates")
            if self.kv == "rebuild":
                session.rebuild([sid], strategy)
                ledgers[sid].add("rebuild_passes")
                ledgers[sid].add("extra_forward_passes")
            else:
                session.restrategise([sid], strategy)

    @staticmethod
    def steered(inner, layers: tuple[int, ...], delta: Tensor):
        """``inner`` with the bias ``delta [L, E]`` on every MoE layer (no policy while it is zero)."""
        if not delta.any():
            return inner
        return WithPolicy(inner, Bias({layer: delta[i] for i, layer in enumerate(layers)}))

    def optimise(
        self,
        engine: Engine,
        contexts: list[list[int]],
        start: Tensor,
        ledgers: list[CostLedger],
        trajectories: list[list],
    ) -> Tensor:
        """``steps`` Adam steps on every row's δ ``[rows, L, E]`` from ``start``, in its chosen layers;
        each row's losses are appended to its ``trajectories`` list."""
        usable = [i for i, c in enumerate(contexts) if len(c) >= 2]  # a context needs a next token
        if self.steps == 0 or not usable:
            return start
        weight = self.layer_weights(engine, [contexts[i] for i in usable])[:, :, None].to(start.device)  # [rows, L, 1]
        base = start[usable]
        for i in usable:
            ledgers[i].add("extra_forward_passes")
        delta = torch.nn.Parameter(start[usable].clone())
        optimiser = torch.optim.Adam([delta], lr=self.lr)
        layers = engine.moe_layers
        firsts, rests = [contexts[i][:1] for i in usable], [contexts[i][1:] for i in usable]
        for _ in range(self.steps):
            served = base + weight * (delta - base)  # weight 0: the layer's δ stays, no gradient
            policy = Bias({layer: served[:, j] for j, layer in enumerate(layers)})
            losses = engine.loss(firsts, rests, policy, reduction="none")
            (delta.grad,) = torch.autograd.grad(losses.sum(), [delta])  # nothing accumulates in the model
            optimiser.step()
            for i, loss in zip(usable, losses.tolist(), strict=True):
                ledgers[i].add("extra_forward_passes")
                ledgers[i].add("backward_passes")
                trajectories[i].append(loss)
        out = start.clone()
        out[usable] = (base + weight * (delta - base)).detach()
        return out

    @torch.no_grad()
    def layer_weights(self, engine: Engine, contexts: list[list[int]]) -> Tensor:
        """``[rows, L]``: how much of each layer's δ update is served. Hard: 1 at the row's top
        ``layers`` fraction of MoE layers by the confidence score C_l (highest first as written;
        lowest with ``confidence='inverted'``), 0 elsewhere. Soft: L · softmax(±C) over the layers
        (mean 1), a per-layer step size — Adam normalises gradients, so scaling them would not do."""
        scores = torch.stack([layer_scores(engine, c) for c in contexts])
        sign = 1.0 if self.confidence == "as_written" else -1.0
        if self.selection == "soft":
            return scores.shape[1] * torch.softmax(sign * scores, dim=1)
        count = max(1, math.floor(self.layers * scores.shape[1] + 1e-9))
        ranked = (sign * scores).topk(count, dim=1).indices
        return torch.zeros_like(scores).scatter_(1, ranked, 1.0)


def layer_scores(engine: Engine, tokens: list[int]) -> Tensor:
    """C_l = −(1/k) Σ_j log p_{l,j} at the k selected experts, averaged over ``tokens``, per MoE
    layer in layer order (one unsteered forward)."""
    records = engine.routing(tokens, distributions=True)
    picked = (records[layer].probs.gather(-1, records[layer].experts.clamp(min=0)) for layer in sorted(records))
    return torch.stack([-(p.clamp(min=1e-12).log()).mean() for p in picked])  # p: [1, T, k]
