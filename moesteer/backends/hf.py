"""The HF engine: our own decode loop over transformers models, with branched decoding.

Every sequence (prompt × sample) has one row per branch of its token strategy; all rows of all
sequences run in **one** forward per step, each under its branch's routing policy and with its own
KV cache. After each step the strategy's ``combine`` turns the branches' log-probs into one
next-token distribution per sequence, one token is chosen, and every branch appends it.

Randomness (sampling and routing noise) is keyed by (seed, prompt index, sample index, step or
position), never by batch row, so a batch decodes exactly like its prompts one by one (up to the
float differences of a different batch layout).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache

from moesteer.decoding import choose, completion_text, next_token_scores
from moesteer.intercept import BatchLayout, RouterHandle
from moesteer.lm import LM
from moesteer.prompts import encode_prompt
from moesteer.routing import Policy
from moesteer.sampling import Completion, SamplingParams
from moesteer.strategies.base import Controller, Strategy, TokenStrategy, as_strategy
from moesteer.trace import RoutingTrace


@dataclass
class _Batch:
    """Rows of one decode call: sequence ``s``, branch ``j`` is row ``s * branches + j``."""

    prompt_ids: list[list[int]]
    prompt_index: Tensor  # [S]
    sample_index: Tensor  # [S]
    branches: tuple[Policy | None, ...]

    @property
    def sequences(self) -> int:
        return len(self.prompt_ids)

    def row_policies(self) -> list[Policy | None]:
        return [p for _ in range(self.sequences) for p in self.branches]

    def rows(self, per_sequence: Tensor) -> Tensor:
        return per_sequence.repeat_interleave(len(self.branches), dim=0)

    def first_samples(self) -> tuple[_Batch, Tensor]:
        """The batch of each prompt's first sample, and for every sequence the index of its first
        sample there: samples of one prompt share one prefill."""
        firsts, source = [], []
        for s, prompt in enumerate(self.prompt_index.tolist()):
            if not firsts or self.prompt_index[firsts[-1]] != prompt:
                firsts.append(s)
            source.append(len(firsts) - 1)
        index = torch.tensor(firsts)
        sub = _Batch(
            [self.prompt_ids[i] for i in firsts], self.prompt_index[index], torch.zeros_like(index), self.branches
        )
        return sub, torch.tensor(source)


class HFEngine:
    """Generation, steered scoring and differentiable loss for one loaded model."""

    def __init__(self, lm: LM) -> None:
        self.lm = lm
        self.model = lm.model
        self.device = next(self.model.parameters()).device

    # ---- public API -------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        strategy: Strategy | Policy | None = None,
        sampling: SamplingParams | None = None,
        *,
        chat: bool = False,
        trace: bool = False,
        prompt_keys: Sequence[int] | None = None,
    ) -> list[Completion]:
        """Completions for ``prompts`` (``sampling.n`` per prompt, prompt-major order).

        ``prompt_keys`` (default ``0..P-1``) key each prompt's randomness; pass a prompt's index in
        its dataset so that its samples do not depend on the batch it ran in.
        """
        strategy = as_strategy(strategy)
        sampling = sampling or SamplingParams()
        if isinstance(strategy, Controller):
            return strategy.run(self, list(prompts), sampling, chat=chat, trace=trace, prompt_keys=prompt_keys)
        if not isinstance(strategy, TokenStrategy):
            raise TypeError(f"{strategy} is neither a token strategy nor a controller")
        ids = [self.encode(p, chat=chat) for p in prompts]
        empty = [i for i, p in enumerate(ids) if not p]
        if empty:
            raise ValueError(f"prompt {empty[0]} is empty after tokenization; give at least one token")
        keys = torch.tensor(list(prompt_keys) if prompt_keys is not None else range(len(ids)), dtype=torch.long)
        if len(keys) != len(ids):
            raise ValueError(f"prompt_keys has {len(keys)} entries for {len(ids)} prompts")
        batch = _Batch(
            [p for p in ids for _ in range(sampling.n)],
            keys.repeat_interleave(sampling.n),
            torch.arange(sampling.n).repeat(len(ids)),
            strategy.branches(),
        )
        return self._decode(batch, strategy, sampling, trace)

    def score(
        self,
        prompts: Sequence[str],
        continuations: Sequence[str],
        strategy: Strategy | Policy | None = None,
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
        batch = _Batch(full, torch.arange(len(full)), torch.zeros(len(full), dtype=torch.long), strategy.branches())
        input_ids, mask, positions = self._left_pad(batch)
        with torch.no_grad(), self._routing(batch) as handle:
            handle.layout = self._layout(batch, positions, seed=0)
            logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits
        nb = len(batch.branches)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        seq, length, vocab = len(full), logprobs.shape[1], logprobs.shape[2]
        grouped = logprobs.view(seq, nb, length, vocab).transpose(1, 2).reshape(seq * length, nb, vocab)
        combined = torch.log_softmax(strategy.combine(grouped).view(seq, length, vocab), dim=-1)
        out = []
        for s, c in enumerate(cont_ids):
            start = length - len(c) - 1  # the position predicting the first continuation token
            targets = torch.tensor(c, device=combined.device)
            window = combined[s, start : start + len(c)]
            logprobs = window.gather(-1, targets[:, None]).squeeze(-1).cpu()
            out.append((logprobs, bool((window.argmax(-1) == targets).all())) if with_greedy else logprobs)
        return out

    def loss(self, prompt: str | Sequence[int], continuation: str | Sequence[int], policy: Policy | None) -> Tensor:
        """Mean next-token cross-entropy of ``continuation`` under ``policy``, differentiable
        (gradients reach learnable tensors inside the policy, e.g. a ``Bias`` parameter)."""
        p = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        c = self.encode(continuation, special=False) if isinstance(continuation, str) else list(continuation)
        ids = torch.tensor([p + c], device=self.device)
        positions = torch.arange(ids.shape[1], device=self.device)[None]
        batch = _Batch([p + c], torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), (policy,))
        with self._routing(batch) as handle:
            handle.layout = self._layout(batch, positions, seed=0)
            logits = self.model(input_ids=ids).logits
        predicted = logits[0, len(p) - 1 : -1].float()
        return torch.nn.functional.cross_entropy(predicted, ids[0, len(p) :])

    # ---- helpers ----------------------------------------------------------------------------

    def encode(self, text: str | Sequence[int], *, chat: bool = False, special: bool = True) -> list[int]:
        return encode_prompt(self.lm.tokenizer, text, chat=chat, special=special, model_name=self.lm.name)

    def _left_pad(self, batch: _Batch, *, per_branch: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """Ids, attention mask and positions ``[rows, L]`` (real tokens count from 0), one row per
        branch of each sequence, or one per sequence."""
        pad = self.model.config.pad_token_id or 0
        length = max(len(p) for p in batch.prompt_ids)
        ids = torch.full((batch.sequences, length), pad, dtype=torch.long)
        mask = torch.zeros((batch.sequences, length), dtype=torch.long)
        for s, p in enumerate(batch.prompt_ids):
            ids[s, length - len(p) :] = torch.tensor(p)
            mask[s, length - len(p) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        expand = batch.rows if per_branch else (lambda t: t)
        return tuple(expand(t).to(self.device) for t in (ids, mask, positions))  # type: ignore[return-value]

    def _layout(self, batch: _Batch, positions: Tensor, seed: int) -> BatchLayout:
        return BatchLayout(
            batch.row_policies(),
            batch.rows(batch.prompt_index).to(self.device),
            batch.rows(batch.sample_index).to(self.device),
            torch.arange(len(batch.branches)).repeat(batch.sequences).to(self.device),
            positions,
            seed,
        )

    @contextmanager
    def _routing(self, batch: _Batch, trace: RoutingTrace | None = None) -> Iterator[RouterHandle]:
        """Patch the routers for one call; the model is restored on exit, also on exceptions."""
        handle = RouterHandle(self.model, trace=trace)
        try:
            for policy in set(batch.branches) - {None}:
                handle.check(policy)
            yield handle
        finally:
            handle.remove()

    def _decode(
        self, batch: _Batch, strategy: TokenStrategy, sampling: SamplingParams, trace: bool
    ) -> list[Completion]:
        start = time.perf_counter()
        shared = strategy.cache_mode == "shared"
        if shared:
            self._check_shared_cache()
        state = _DecodeState.empty(batch)
        eos = sorted(self._eos_ids())
        traces = RoutingTrace() if trace else None
        with torch.no_grad(), self._routing(batch, traces) as handle:
            run = (
                _SharedCacheRun(self, handle, batch, sampling)
                if shared
                else _BranchRowsRun(self, handle, batch, sampling)
            )
            branch_logprobs = run.prefill(state)
            for step in range(sampling.max_tokens):
                scores = next_token_scores(strategy, branch_logprobs, eos)
                step_index = torch.full_like(batch.prompt_index, step)
                tokens = choose(scores, sampling, batch.prompt_index, batch.sample_index, step_index)
                for s in state.alive():
                    token = int(tokens[s])
                    state.generated[s].append(token)
                    state.logprobs[s].append(float(scores[s, token]))
                    state.finished[s] = self._finish_reason(state.generated[s], token, set(eos), sampling)
                if not state.alive():
                    break
                branch_logprobs = run.step(tokens, state)
        seconds = time.perf_counter() - start
        return [self._completion(batch, s, state, sampling, seconds, traces) for s in range(batch.sequences)]

    def _check_shared_cache(self) -> None:
        kinds = set(getattr(self.model.config, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"}:
            raise ValueError(
                f"a shared (clean) KV cache needs full attention in every layer; {self.lm.name} has "
                f"{sorted(kinds)} layers: use the standard cache mode"
            )

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None and self.lm.tokenizer is not None:
            eos = self.lm.tokenizer.eos_token_id
        return set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def _finish_reason(self, tokens: list[int], token: int, eos: set[int], sampling: SamplingParams) -> str | None:
        if token in eos and not sampling.ignore_eos:
            return "stop"
        if sampling.stop and self.lm.tokenizer is not None:
            text = self.lm.tokenizer.decode(tokens, skip_special_tokens=True)
            if any(s in text for s in sampling.stop):
                return "stop"
        return "length" if len(tokens) >= sampling.max_tokens else None

    def _completion(self, batch, s, state, sampling, seconds, traces) -> Completion:
        tokens = state.generated[s]
        text = completion_text(self.lm.tokenizer, tokens, self._eos_ids(), sampling)
        return Completion(
            prompt_index=s // sampling.n,
            sample_index=int(batch.sample_index[s]),
            text=text,
            token_ids=tokens,
            logprobs=state.logprobs[s],
            finish_reason=state.finished[s] or "length",
            forward_passes=int(state.passes[s]),
            token_rows=int(state.token_rows[s]),
            seconds=seconds,
            trace=traces,
        )


@dataclass
class _DecodeState:
    """Per-sequence progress and cost counters of one decode call."""

    generated: list[list[int]]
    logprobs: list[list[float]]
    finished: list[str | None]
    passes: Tensor
    token_rows: Tensor

    @classmethod
    def empty(cls, batch: _Batch) -> _DecodeState:
        n = batch.sequences
        zeros = torch.zeros(n, dtype=torch.long)
        return cls([[] for _ in range(n)], [[] for _ in range(n)], [None] * n, zeros, zeros.clone())

    def alive(self) -> list[int]:
        return [s for s, f in enumerate(self.finished) if f is None]

    def charge(self, rows_per_sequence: Tensor | int) -> None:
        """One forward pass for every live sequence, with this many token rows each."""
        alive = torch.tensor([f is None for f in self.finished])
        self.passes += alive
        self.token_rows += alive * rows_per_sequence


class _BranchRowsRun:
    """Standard cache mode: every branch of every sequence is a batch row with its own KV cache.

    The samples of one prompt share one prefill (run once, then the cache is fanned out); its
    token rows are charged to the prompt's first sample.
    """

    def __init__(self, engine: HFEngine, handle: RouterHandle, batch: _Batch, sampling: SamplingParams) -> None:
        self.engine, self.handle, self.batch, self.sampling = engine, handle, batch, sampling
        self.branches = len(batch.branches)

    def prefill(self, state: _DecodeState) -> Tensor:
        firsts, source = self.batch.first_samples()
        ids, mask, positions = self.engine._left_pad(firsts)
        self.handle.layout = self.engine._layout(firsts, positions, self.sampling.seed)
        self.cache = DynamicCache(config=self.engine.model.config)
        out = self.engine.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self.cache, use_cache=True
        )
        lengths = torch.tensor([len(p) for p in self.batch.prompt_ids])
        is_first = torch.ones(len(source), dtype=torch.bool)
        is_first[1:] = source[1:] != source[:-1]
        state.charge(lengths * self.branches * is_first)
        rows = firsts.rows(source)
        if len(source) > firsts.sequences:
            row_index = (rows * self.branches + torch.arange(self.branches).repeat(len(source))).to(self.engine.device)
            self.cache.batch_select_indices(row_index)
            mask, positions = mask[row_index], positions[row_index]
            logits = out.logits[row_index, -1]
        else:
            logits = out.logits[:, -1]
        self.mask, self.positions = mask, positions[:, -1:]
        return torch.log_softmax(logits.float(), dim=-1).view(self.batch.sequences, self.branches, -1)

    def step(self, tokens: Tensor, state: _DecodeState) -> Tensor:
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=-1)
        self.positions = self.positions + 1
        self.handle.layout = self.engine._layout(self.batch, self.positions, self.sampling.seed)
        out = self.engine.model(
            input_ids=self.batch.rows(tokens[:, None]).to(self.engine.device),
            attention_mask=self.mask,
            position_ids=self.positions,
            past_key_values=self.cache,
            use_cache=True,
        )
        state.charge(self.branches)
        return torch.log_softmax(out.logits[:, -1].float(), dim=-1).view(self.batch.sequences, self.branches, -1)


class _SharedCacheRun:
    """Clean-cache mode (RoE): one KV cache per sequence, from its branch-0 (clean) history.

    Each step feeds the current token once per branch as sibling positions (same position id; a
    4-D mask lets each sibling see the clean past and itself only), then keeps only sibling 0's
    K/V. Memory stays one cache plus ``branches`` tokens. The prompt, but for its last token, is
    prefilled with branch 0's routing.
    """

    def __init__(self, engine: HFEngine, handle: RouterHandle, batch: _Batch, sampling: SamplingParams) -> None:
        self.engine, self.handle, self.batch, self.sampling = engine, handle, batch, sampling
        self.branches = len(batch.branches)

    def prefill(self, state: _DecodeState) -> Tensor:
        firsts, source = self.batch.first_samples()
        ids, mask, positions = self.engine._left_pad(firsts, per_branch=False)
        self.cache = DynamicCache(config=self.engine.model.config)
        if ids.shape[1] > 1:
            clean = [firsts.branches[0]] * firsts.sequences
            zeros = torch.zeros(firsts.sequences, dtype=torch.long, device=ids.device)
            self.handle.layout = BatchLayout(
                clean, firsts.prompt_index.to(ids.device), zeros, zeros, positions[:, :-1], self.sampling.seed
            )
            self.engine.model(
                input_ids=ids[:, :-1],
                attention_mask=mask[:, :-1],
                position_ids=positions[:, :-1],
                past_key_values=self.cache,
                use_cache=True,
            )
            lengths = torch.tensor([len(p) - 1 for p in self.batch.prompt_ids])
            is_first = torch.ones(len(source), dtype=torch.bool)
            is_first[1:] = source[1:] != source[:-1]
            state.charge(lengths * is_first)
        index = source.to(ids.device)
        if len(source) > firsts.sequences:
            self.cache.batch_select_indices(index)
        self.mask, self.positions = mask[index, :-1], positions[index, -1]
        return self._siblings(ids[index, -1], state)

    def step(self, tokens: Tensor, state: _DecodeState) -> Tensor:
        return self._siblings(tokens.to(self.engine.device), state)

    def _siblings(self, tokens: Tensor, state: _DecodeState) -> Tensor:
        seqs, nb, past = self.batch.sequences, self.branches, self.mask.shape[1]
        dtype = self.engine.model.dtype
        sees = torch.cat(
            [
                self.mask.bool()[:, None, None, :].expand(seqs, 1, nb, past),
                torch.eye(nb, dtype=torch.bool, device=self.mask.device).expand(seqs, 1, nb, nb),
            ],
            dim=-1,
        )
        additive = torch.zeros(sees.shape, dtype=dtype, device=sees.device).masked_fill(~sees, torch.finfo(dtype).min)
        positions = self.positions[:, None].expand(seqs, nb)
        self.handle.layout = self.engine._layout(self.batch, positions.reshape(-1, 1), self.sampling.seed)
        out = self.engine.model(
            input_ids=tokens[:, None].expand(seqs, nb),
            attention_mask=additive,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache.crop(-(nb - 1))
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=-1)
        self.positions = self.positions + 1
        state.charge(nb)
        return torch.log_softmax(out.logits.float(), dim=-1)
