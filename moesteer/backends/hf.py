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

from moesteer.intercept import BatchLayout, RouterHandle
from moesteer.lm import LM
from moesteer.routing import Policy, gumbel_noise
from moesteer.sampling import Completion, SamplingParams
from moesteer.strategies.base import Controller, Strategy, TokenStrategy, as_strategy
from moesteer.trace import RoutingTrace

_SAMPLING_LAYER = -1  # noise-key "layer" for token sampling, distinct from every router layer


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
        prompt_offset: int = 0,
    ) -> list[Completion]:
        """Completions for ``prompts`` (``sampling.n`` per prompt, prompt-major order)."""
        strategy = as_strategy(strategy)
        sampling = sampling or SamplingParams()
        if isinstance(strategy, Controller):
            return strategy.run(self, list(prompts), sampling)
        if not isinstance(strategy, TokenStrategy):
            raise TypeError(f"{strategy} is neither a token strategy nor a controller")
        ids = [self.encode(p, chat=chat) for p in prompts]
        index = torch.arange(len(ids)).repeat_interleave(sampling.n) + prompt_offset
        batch = _Batch(
            [ids[i - prompt_offset] for i in index.tolist()],
            index,
            torch.arange(sampling.n).repeat(len(ids)),
            strategy.branches(),
        )
        return self._decode(batch, strategy, sampling, trace)

    def score(
        self,
        prompts: Sequence[str],
        continuations: Sequence[str],
        strategy: Strategy | Policy | None = None,
    ) -> list[Tensor]:
        """Per-token log-probs of each continuation given its prompt, teacher-forced, under the
        strategy's combined distribution (the same ``combine`` as decoding)."""
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
            out.append(combined[s, start : start + len(c)].gather(-1, targets[:, None]).squeeze(-1).cpu())
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
        if not isinstance(text, str):
            return [int(t) for t in text]
        tok = self.lm.tokenizer
        if tok is None:
            raise ValueError("this model has no tokenizer; pass token ids instead of strings")
        if chat:
            if not getattr(tok, "chat_template", None):
                raise ValueError(f"the tokenizer of {self.lm.name} has no chat template; drop --chat")
            text = tok.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            special = False
        return tok(text, add_special_tokens=special)["input_ids"]

    def _left_pad(self, batch: _Batch) -> tuple[Tensor, Tensor, Tensor]:
        """Row tensors ``[R, L]``: ids, attention mask and positions (real tokens count from 0)."""
        pad = self.model.config.pad_token_id or 0
        length = max(len(p) for p in batch.prompt_ids)
        ids = torch.full((batch.sequences, length), pad, dtype=torch.long)
        mask = torch.zeros((batch.sequences, length), dtype=torch.long)
        for s, p in enumerate(batch.prompt_ids):
            ids[s, length - len(p) :] = torch.tensor(p)
            mask[s, length - len(p) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return tuple(batch.rows(t).to(self.device) for t in (ids, mask, positions))  # type: ignore[return-value]

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
        nb, seqs = len(batch.branches), batch.sequences
        input_ids, mask, positions = self._left_pad(batch)
        eos = self._eos_ids()
        generated = [[] for _ in range(seqs)]
        logprobs = [[] for _ in range(seqs)]
        finished = [None] * seqs
        passes = torch.zeros(seqs, dtype=torch.long)
        rows = batch.rows(torch.tensor([len(p) for p in batch.prompt_ids])).view(seqs, nb).sum(-1)
        traces = RoutingTrace() if trace else None
        cache = DynamicCache(config=self.model.config)
        with torch.no_grad(), self._routing(batch, traces) as handle:
            for step in range(sampling.max_tokens):
                handle.layout = self._layout(batch, positions, sampling.seed)
                out = self.model(
                    input_ids=input_ids,
                    attention_mask=mask,
                    position_ids=positions,
                    past_key_values=cache,
                    use_cache=True,
                )
                cache = out.past_key_values
                alive = torch.tensor([f is None for f in finished])
                passes += alive
                if step > 0:
                    rows += alive * nb
                branch_logprobs = torch.log_softmax(out.logits[:, -1].float(), dim=-1).view(seqs, nb, -1)
                scores = torch.log_softmax(strategy.combine(branch_logprobs), dim=-1)
                tokens = self._choose(scores, batch, sampling, step)
                for s in range(seqs):
                    if finished[s] is not None:
                        continue
                    token = int(tokens[s])
                    generated[s].append(token)
                    logprobs[s].append(float(scores[s, token]))
                    finished[s] = self._finish_reason(generated[s], token, eos, sampling)
                if all(f is not None for f in finished):
                    break
                input_ids = batch.rows(tokens[:, None]).to(self.device)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
                positions = positions[:, -1:] + 1
        seconds = time.perf_counter() - start
        return [
            self._completion(
                batch, s, generated[s], logprobs[s], finished[s] or "length", sampling, passes, rows, seconds, traces
            )
            for s in range(seqs)
        ]

    def _choose(self, scores: Tensor, batch: _Batch, sampling: SamplingParams, step: int) -> Tensor:
        """Greedy, or Gumbel-max sampling from ``softmax(scores / T)`` after top-k / top-p."""
        if sampling.temperature == 0:
            return scores.argmax(-1)
        logits = scores / sampling.temperature
        if sampling.top_k > 0:
            kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if sampling.top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_logits.softmax(-1) >= sampling.top_p  # keep the token crossing top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        step_key = torch.full_like(batch.prompt_index, step)
        keys = (batch.prompt_index, batch.sample_index, _SAMPLING_LAYER, step_key)
        noise = gumbel_noise(sampling.seed, keys, logits.shape[-1]).to(logits.device)
        return (logits + noise).argmax(-1)

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

    def _completion(self, batch, s, tokens, logprobs, reason, sampling, passes, rows, seconds, traces) -> Completion:
        eos = self._eos_ids()
        shown = tokens[:-1] if tokens and tokens[-1] in eos and not sampling.ignore_eos else tokens
        text = self.lm.tokenizer.decode(shown, skip_special_tokens=True) if self.lm.tokenizer is not None else ""
        for stop in sampling.stop:
            if stop in text:
                text = text[: text.index(stop)]
        return Completion(
            prompt_index=int(batch.prompt_index[s]),
            sample_index=int(batch.sample_index[s]),
            text=text,
            token_ids=tokens,
            logprobs=logprobs,
            finish_reason=reason,
            forward_passes=int(passes[s]),
            token_rows=int(rows[s]),
            seconds=seconds,
            trace=traces,
        )
