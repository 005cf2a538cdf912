"""The HF engine: our own decode loop over transformers models, with branched decoding.

Every sequence (prompt × sample) has one row per branch of its token strategy; all rows of all
sequences run in **one** forward per step, each under its branch's routing policy and with its own
KV cache, whatever mix of strategies the prompts have. After each step each strategy's ``combine``
turns its sequences' branch log-probs into one next-token distribution, one token is chosen, and
every branch appends it. ``generate`` is a loop over a :class:`DecodeSession`
(:mod:`.session`); controllers open sessions themselves (``engine.session(sampling)``).
Clean-cache strategies (RoE ``cache='clean'``) run in a session of their own in the same call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from moesteer.backends.base import Capabilities, Engine, Request, eos_ids
from moesteer.backends.hf.hook import BatchLayout, router_handle
from moesteer.backends.hf.kv import check_full_attention
from moesteer.backends.hf.session import DecodeSession
from moesteer.models.adapters import FamilyAdapter, find_routers
from moesteer.routing import Policy
from moesteer.sampling import Completion, SamplingParams
from moesteer.strategy import TokenStrategy, as_strategy
from moesteer.trace import RouterRecord, RoutingTrace


class HFEngine(Engine):
    """Generation, steered scoring, differentiable loss and decode sessions for one transformers model."""

    backend_name = "hf"
    capabilities = Capabilities(
        gradients=True,
        routing_traces=True,
        router_distributions=True,
        clean_cache=True,
        per_row_strategies=True,
        sessions=True,
        search_sessions=True,
        scoped_routing=True,
    )

    def __init__(self, model, tokenizer, adapter: FamilyAdapter, name: str = "model") -> None:
        self.model, self.tokenizer, self.adapter, self.name = model, tokenizer, adapter, name
        self.device = next(model.parameters()).device
        self.eos_ids = eos_ids(model.generation_config, tokenizer)

    # ---- the protocol ---------------------------------------------------------------------------

    def session(self, sampling: SamplingParams | None = None, *, trace: bool | RoutingTrace = False) -> DecodeSession:
        """A decode session (a context manager that restores the routers on exit)."""
        recorder = trace if isinstance(trace, RoutingTrace) else RoutingTrace() if trace else None
        return DecodeSession(self, sampling or SamplingParams(), trace=recorder)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(find_routers(self.model, self.adapter))

    @property
    def config(self):
        return self.model.config

    def routing_sizes(self) -> tuple[int, int]:
        router = next(iter(find_routers(self.model, self.adapter).values()))
        return int(router.num_experts), int(router.top_k)

    def router_weights(self) -> dict[int, Tensor]:
        return {layer: r.weight.detach().cpu() for layer, r in find_routers(self.model, self.adapter).items()}

    def check_strategy(self, strategy: TokenStrategy) -> None:
        super().check_strategy(strategy)
        if strategy.clean_cache:
            check_full_attention(self.model.config, f"{strategy}: a shared (clean) KV cache")

    def _generate(self, request: Request, trace: bool) -> list[Completion]:
        sampling, n = request.sampling, request.sampling.n
        by_cache: dict[bool, list[int]] = {}
        for p, strategy in enumerate(request.strategies):
            by_cache.setdefault(strategy.clean_cache, []).append(p)
        out: list[Completion | None] = [None] * (len(request.prompt_ids) * n)
        for prompts in by_cache.values():
            with self.session(sampling, trace=trace) as session:  # a trace per session: its ids
                ids = session.add(
                    [request.prompt_ids[p] for p in prompts],
                    [request.strategies[p] for p in prompts],
                    [request.keys[p] for p in prompts],
                    copies=n,
                )
                session.run()
                for j, sid in enumerate(ids):
                    p, sample = prompts[j // n], j % n
                    out[p * n + sample] = session.completion(sid, prompt_index=p, sample_index=sample)
        return out  # type: ignore[return-value]

    def score(
        self,
        prompts: Sequence[str],
        continuations: Sequence[str],
        strategy: TokenStrategy | Policy | None = None,
        *,
        with_greedy: bool = False,
    ) -> list[Tensor] | list[tuple[Tensor, bool]]:
        """Per-token log-probs of each continuation given its prompt, teacher-forced, under the
        strategy's combined distribution (the same ``combine`` as decoding). ``with_greedy`` also
        says whether every continuation token is that distribution's argmax."""
        strategy = as_strategy(strategy)
        if not isinstance(strategy, TokenStrategy):
            raise TypeError(f"score() needs a token strategy, got {strategy}")
        prompt_ids = [self.encode(p) for p in prompts]
        cont_ids = [self.encode(c, special=False) for c in continuations]
        full = [p + c for p, c in zip(prompt_ids, cont_ids, strict=True)]
        branches = strategy.branches()
        logits = self._forward(full, branches, [len(p) for p in prompt_ids], grad=False)
        nb = len(branches)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        seq, length, vocab = len(full), logprobs.shape[1], logprobs.shape[2]
        grouped = logprobs.view(seq, nb, length, vocab).transpose(1, 2).reshape(seq * length, nb, vocab)
        combined = torch.log_softmax(strategy.combine(grouped).view(seq, length, vocab), dim=-1)
        out = []
        for s, c in enumerate(cont_ids):
            start = length - len(c) - 1  # the position predicting the first continuation token
            targets = torch.tensor(c, device=combined.device)
            window = combined[s, start : start + len(c)]
            scored = window.gather(-1, targets[:, None]).squeeze(-1).cpu()
            out.append((scored, bool((window.argmax(-1) == targets).all())) if with_greedy else scored)
        return out

    @torch.no_grad()
    def routing(
        self, tokens: Sequence[int], policy: Policy | None = None, *, distributions: bool = False
    ) -> dict[int, RouterRecord]:
        """Each MoE layer's router call on ``tokens`` (one teacher-forced forward, nothing cached)
        under ``policy``: ``experts [1, T, K]``, ``weights`` and, with ``distributions``, the router's
        full distribution ``probs [1, T, E]``."""
        trace = RoutingTrace(distributions=distributions)
        ids = torch.tensor([list(tokens)], device=self.device)
        positions = torch.arange(ids.shape[1], device=self.device)[None]
        with router_handle(self.model, trace=trace) as handle:
            handle.check(policy)
            layout = BatchLayout.uniform(policy, positions)
            layout.prompt_lengths = torch.tensor([ids.shape[1]], device=self.device)
            with handle.routing(layout):
                self.model(input_ids=ids, position_ids=positions)
        return {r.layer: r for r in trace.records}

    def loss(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        continuations: str | Sequence[int] | Sequence[str | Sequence[int]],
        policy: Policy | Sequence[Policy | None] | None,
        *,
        weights: Tensor | None = None,
        reduction: str = "mean",
    ) -> Tensor:
        """Next-token cross-entropy of continuation(s) given prompt(s) under ``policy`` (one for
        every pair, or a list with one per pair), differentiable (gradients reach learnable
        tensors inside the policy, e.g. a ``Bias`` parameter, ``SetWeights`` ω, or a per-row
        ``[rows, E]`` tensor for a batch of pairs).

        One pair gives the mean over its tokens. A batch gives each pair's mean, then
        ``reduction="mean"`` (``weights``-weighted if given, e.g. kernel weights of neighbours) or
        ``"none"`` (one loss per pair)."""
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))
        pairs = [(prompts, continuations)] if single else list(zip(prompts, continuations, strict=True))
        p_ids = [self.encode(p) if isinstance(p, str) else list(p) for p, _ in pairs]
        c_ids = [self.encode(c, special=False) if isinstance(c, str) else list(c) for _, c in pairs]
        full = [p + c for p, c in zip(p_ids, c_ids, strict=True)]
        per_pair = list(policy) if isinstance(policy, list | tuple) else None
        logits = self._forward(full, (None,) if per_pair else (policy,), [len(p) for p in p_ids], True, per_pair)
        width = logits.shape[1]
        losses = []
        for s, c in enumerate(c_ids):
            start = width - len(c) - 1
            predicted = logits[s, start : start + len(c)].float()
            losses.append(torch.nn.functional.cross_entropy(predicted, torch.tensor(c, device=logits.device)))
        per_pair = torch.stack(losses)
        if reduction == "none":
            return per_pair
        if reduction != "mean":
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        if weights is None:
            return per_pair.mean()
        weights = weights.to(per_pair.device, per_pair.dtype)
        return (weights * per_pair).sum() / weights.sum()

    # ---- helpers --------------------------------------------------------------------------------

    def _forward(
        self,
        sequences: list[list[int]],
        branches: tuple[Policy | None, ...],
        prompt_lengths: list[int],
        grad: bool,
        per_sequence: list[Policy | None] | None = None,
    ) -> Tensor:
        """Logits ``[sequences × branches, L, V]`` of left-padded token lists, one row per branch
        (``per_sequence``: one policy for each sequence's single row instead)."""
        length, nb = max(len(s) for s in sequences), len(branches)
        pad = self.model.config.pad_token_id or 0
        ids = torch.full((len(sequences), length), pad, dtype=torch.long)
        mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for i, s in enumerate(sequences):
            ids[i, length - len(s) :], mask[i, length - len(s) :] = torch.tensor(s), 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions = (t.repeat_interleave(nb, 0).to(self.device) for t in (ids, mask, positions))
        rows = len(sequences) * nb
        with router_handle(self.model) as handle:
            policies = per_sequence if per_sequence is not None else [b for _ in sequences for b in branches]
            for policy in {id(p): p for p in policies if p is not None}.values():
                handle.check(policy)
            prompt = torch.arange(len(sequences)).repeat_interleave(nb).to(self.device)
            layout = BatchLayout(
                policies,
                prompt,
                torch.zeros(rows, dtype=torch.long, device=self.device),
                torch.arange(nb).repeat(len(sequences)).to(self.device),
                positions,
                0,
                torch.tensor(prompt_lengths).repeat_interleave(nb).to(self.device),
            )
            with torch.set_grad_enabled(grad), handle.routing(layout):
                return self.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
