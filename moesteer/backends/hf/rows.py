"""The batch rows of a decode session: its KV cache, and the forwards that extend it.

Every sequence of a :class:`~moesteer.backends.hf.session.DecodeSession` has one cache row per
branch of its token strategy, or, in clean-cache mode (``TokenStrategy.clean_cache``), one row
whose branches are sibling positions of the current token only. :class:`BatchRows` keeps those rows
in the session's sequence order (with the attention mask, next positions and pending next-token
log-probs), reorders them when sequences fork or go, and runs the forwards: prefills, one token or
a chunk of tokens per sequence, clean-cache siblings. The session decides which sequences advance
and with what tokens.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import DynamicCache

import moesteer.backends.hf.kv as kv
from moesteer.backends.hf.hook import BatchLayout, RouterHandle
from moesteer.routing import Policy
from moesteer.sampling import SamplingParams
from moesteer.strategy import TokenStrategy
from moesteer.trace import RowId


@dataclass
class DecodeSequence:
    """One sequence in flight: a prompt × sample under a token strategy."""

    strategy: TokenStrategy
    branches: tuple[Policy | None, ...]
    prompt_key: int
    sample_key: int
    prompt_len: int
    origin: int  # the position of generated index 0 (sampling keys count from it)
    tokens: list[int]
    logprobs: list[float] = field(default_factory=list)
    finished: str | None = None
    forward_passes: int = 0
    token_rows: int = 0
    cursor: int = 0  # generated index of the next sampling draw

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]


class BatchRows:
    """The cache rows of a session's sequences (module docstring); the base of ``DecodeSession``,
    which sets the attributes annotated here."""

    engine: object
    model: torch.nn.Module
    sampling: SamplingParams
    handle: RouterHandle
    seqs: dict[int, DecodeSequence]  # in row order

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: Tensor | None = None  # [rows, L]
        self.next_position: Tensor | None = None  # [rows]
        self.pending: Tensor | None = None  # [rows, V] next-token log-probs of every row
        self.clean_cache: bool | None = (
            None  # one clean KV cache (TokenStrategy.clean_cache), set by the first strategy
        )
        self._cached: set[int] = set()  # sequences that have cache rows (all but those being prefilled)
        self._clean_pending: dict[int, Tensor] = {}  # clean-cache mode: pending [branches, V] per sequence
        self._layout_rows: tuple | None = None  # the last forward's rows and their key tensors
        self._groups: tuple | None = None  # and their policy groups

    def _rows(self, seq: DecodeSequence) -> int:
        return 1 if self.clean_cache else len(seq.branches)

    def _row_slices(self, ids: Seq[int] | None = None) -> dict[int, slice]:
        out, at = {}, 0
        wanted = None if ids is None else set(ids)
        for sid, seq in self.seqs.items():
            if sid not in self._cached:
                continue
            n = self._rows(seq)
            if wanted is None or sid in wanted:
                out[sid] = slice(at, at + n)
            at += n
        return out

    def _ordered_rows(self) -> list[RowId]:
        return [RowId(sid, b) for sid, s in self.seqs.items() if sid in self._cached for b in range(self._rows(s))]

    def _reorder(self, sources: list[int]) -> None:
        """Rows become those of ``sources`` (sequence ids, repeats allowed), in that order."""
        slices = self._row_slices()
        index = torch.tensor([r for sid in sources for r in range(slices[sid].start, slices[sid].stop)]).long()
        if self.cache is not None:
            if len(index) == 0:
                self.cache = self.mask = self.next_position = self.pending = None
            else:
                device_index = index.to(self.mask.device)
                self.cache.batch_select_indices(device_index)
                self.mask, self.next_position = self.mask[device_index], self.next_position[device_index]
                self.pending = self.pending[device_index]
        self._cached = set(sources)
        self._clean_pending = {sid: p for sid, p in self._clean_pending.items() if sid in self._cached}

    def _merge_new(self, ids, cache: DynamicCache, mask: Tensor, next_position: Tensor, pending: Tensor) -> None:
        """Put freshly prefilled rows (of ``ids``, at the end of the row order) into the session."""
        if self.cache is None:
            self.cache, self.mask, self.next_position, self.pending = cache, mask, next_position, pending
        else:
            kv.check_full_attention(self.model.config, "adding sequences to a running session")
            old, new = self.mask.shape[1], mask.shape[1]
            kv.left_pad(self.cache, new - old)
            kv.left_pad(cache, old - new)
            kv.append(self.cache, cache)
            width = max(old, new)
            pad = lambda m: torch.cat([m.new_zeros(m.shape[0], width - m.shape[1]), m], dim=1)  # noqa: E731
            self.mask = torch.cat([pad(self.mask), pad(mask)])
            self.next_position = torch.cat([self.next_position, next_position])
            self.pending = torch.cat([self.pending, pending])
        self._cached |= set(ids)

    def _left_padded(self, token_lists: list[list[int]], width: int) -> tuple[Tensor, Tensor]:
        pad = self.model.config.pad_token_id or 0
        ids = torch.full((len(token_lists), width), pad, dtype=torch.long)
        mask = torch.zeros((len(token_lists), width), dtype=torch.long)
        for i, tokens in enumerate(token_lists):
            if tokens:
                ids[i, width - len(tokens) :] = torch.tensor(tokens)
                mask[i, width - len(tokens) :] = 1
        device = self.engine.device
        return ids.to(device), mask.to(device)

    def _layout(self, rows: list[RowId], positions: Tensor, real: Tensor, prompt_sample: bool) -> BatchLayout:
        """The routing of one forward over ``rows`` (sequence id, branch), of which ``real [B, S]``
        tokens are not padding; its per-row key tensors are reused while the rows stay the same."""
        seqs = [(self.seqs[sid], b) for sid, b in rows]
        identity = tuple(
            (sid, id(seq.branches[b]), seq.prompt_key, seq.sample_key, seq.prompt_len, b)
            for (sid, _), (seq, b) in zip(rows, seqs, strict=True)
        )
        key = (identity, prompt_sample)
        if self._layout_rows is None or self._layout_rows[0] != key:
            device = positions.device
            self._layout_rows = (
                key,
                [seq.branches[b] for seq, b in seqs],
                torch.tensor([seq.prompt_key for seq, _ in seqs], device=device),
                torch.tensor([0 if prompt_sample else seq.sample_key for seq, _ in seqs], device=device),
                torch.tensor([b for _, b in seqs], device=device),
                torch.tensor([seq.prompt_len for seq, _ in seqs], device=device),
            )
        _, policies, prompt, sample, branch, lengths = self._layout_rows
        # positions never pass a row's cached tokens plus the ones fed now
        bound = max(len(seq.tokens) for seq, _ in seqs) + positions.shape[1]
        layout = BatchLayout(
            policies, prompt, sample, branch, positions, self.sampling.seed, lengths, rows, real, bound=bound
        )
        if self._groups is not None and self._groups[0] == key:
            layout._groups = self._groups[1]
        else:
            self._groups = (key, layout.groups())
        return layout

    def _prefill(self, ids: list[int]) -> None:
        """Separate-cache prefill of new sequences: every branch row on its whole token list."""
        seqs = [self.seqs[sid] for sid in ids]
        rows = [RowId(sid, b) for sid, s in zip(ids, seqs, strict=True) for b in range(len(s.branches))]
        width = max(len(s.tokens) for s in seqs)
        ids_t, mask = self._left_padded([s.tokens for s in seqs], width)
        expand = torch.tensor([len(s.branches) for s in seqs])
        ids_t, mask = ids_t.repeat_interleave(expand, 0), mask.repeat_interleave(expand, 0)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        layout = self._layout(rows, positions, mask.bool(), prompt_sample=True)
        with torch.no_grad(), self.handle.routing(layout):
            out = self.model(
                input_ids=ids_t, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
            )
        for s in seqs:
            s.forward_passes += 1
            s.token_rows += len(s.tokens) * len(s.branches)
        self._merge_new(ids, cache, mask, positions[:, -1] + 1, torch.log_softmax(out.logits[:, -1].float(), dim=-1))

    def _prefill_clean_past(self, ids: list[int]) -> None:
        """The first part of a clean-cache prefill: all but the last token under branch 0's routing
        (the session then forks the samples and feeds the last token as siblings, :meth:`_siblings`)."""
        seqs = [self.seqs[sid] for sid in ids]
        width = max(len(s.tokens) for s in seqs)
        ids_t, mask = self._left_padded([s.tokens for s in seqs], width)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        if width > 1:
            rows = [RowId(sid, 0) for sid in ids]
            layout = self._layout(rows, positions[:, :-1], mask[:, :-1].bool(), prompt_sample=True)
            with torch.no_grad(), self.handle.routing(layout):
                self.model(
                    input_ids=ids_t[:, :-1],
                    attention_mask=mask[:, :-1],
                    position_ids=positions[:, :-1],
                    past_key_values=cache,
                    use_cache=True,
                )
            for s in seqs:
                s.forward_passes += 1
                s.token_rows += len(s.tokens) - 1
        vocab = self.model.config.vocab_size
        placeholder = torch.zeros(len(seqs), vocab)
        self._merge_new(ids, cache, mask[:, :-1], positions[:, -1], placeholder)

    def _feed_one(self, tokens: dict[int, int], charged: set[int]) -> None:
        """Feed one token to the rows of ``tokens`` (all branches), padding with mask 0 for the rest."""
        if self.clean_cache:
            self._siblings(tokens, charged)
            return
        self._feed_many({sid: [t] for sid, t in tokens.items()}, charged)

    def _feed_many(self, chunks: dict[int, list[int]], charged: set[int] | None = None) -> dict[int, Tensor]:
        """Feed token lists to the rows of their sequences in one forward of every cached row;
        returns each fed sequence's logits ``[branches, m, V]``."""
        charged = set(chunks) if charged is None else charged
        slices = self._row_slices()
        rows = self.mask.shape[0]
        width = max(len(c) for c in chunks.values())
        if width == 1 and len(chunks) == len(slices):  # a plain decode step: every row, one token
            counts = [slices[sid].stop - slices[sid].start for sid in chunks]
            ids_t = torch.tensor([c[0] for c in chunks.values()]).repeat_interleave(torch.tensor(counts))[:, None]
            ids_t, chunk_mask = ids_t.to(self.mask.device), torch.ones_like(self.mask[:, :1])
            fed = torch.ones(rows, dtype=torch.bool)
        else:
            fed = torch.zeros(rows, dtype=torch.bool)
            token_lists: list[list[int]] = [[] for _ in range(rows)]
            for sid, chunk in chunks.items():
                for r in range(slices[sid].start, slices[sid].stop):
                    token_lists[r], fed[r] = chunk, True
            ids_t, chunk_mask = self._left_padded(token_lists, width)
        device = self.mask.device
        self.mask = torch.cat([self.mask, chunk_mask], dim=-1)
        positions = self.next_position[:, None] + (chunk_mask.cumsum(-1) - 1).clamp(min=0)
        layout = self._layout(self._ordered_rows(), positions, chunk_mask.bool(), prompt_sample=False)
        with torch.no_grad(), self.handle.routing(layout):
            out = self.model(
                input_ids=ids_t,
                attention_mask=self.mask,
                position_ids=positions,
                past_key_values=self.cache,
                use_cache=True,
            )
        self.next_position = self.next_position + chunk_mask.sum(-1)
        last = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        self.pending = last if bool(fed.all()) else torch.where(fed.to(device)[:, None], last, self.pending)
        for sid in chunks:
            if sid in charged:
                seq = self.seqs[sid]
                seq.forward_passes += 1
                seq.token_rows += len(chunks[sid]) * self._rows(seq)
        return {sid: out.logits[slices[sid], width - len(c) :] for sid, c in chunks.items()}

    def _siblings(self, tokens: dict[int, int], charged: set[int]) -> None:
        """Clean-cache forward: each fed sequence's token once per branch as sibling positions that
        see the clean past and themselves; only sibling 0's K/V is kept."""
        seq_list = [self.seqs[sid] for sid in self.seqs if sid in self._cached]
        order = [sid for sid in self.seqs if sid in self._cached]
        nb = len(seq_list[0].branches)
        if any(len(s.branches) != nb for s in seq_list):
            raise ValueError("clean-cache sequences of one session must have the same number of branches")
        fed = torch.tensor([sid in tokens for sid in order], device=self.mask.device)
        seqs, past, dtype = len(order), self.mask.shape[1], self.model.dtype
        sees = torch.cat(
            [
                self.mask.bool()[:, None, None, :].expand(seqs, 1, nb, past),
                torch.eye(nb, dtype=torch.bool, device=self.mask.device).expand(seqs, 1, nb, nb),
            ],
            dim=-1,
        )
        additive = torch.zeros(sees.shape, dtype=dtype, device=sees.device).masked_fill(~sees, torch.finfo(dtype).min)
        positions = self.next_position[:, None].expand(seqs, nb)
        pad = self.model.config.pad_token_id or 0
        ids = torch.tensor([tokens.get(sid, pad) for sid in order], device=self.mask.device)
        rows = [RowId(sid, b) for sid in order for b in range(nb)]
        real = fed.repeat_interleave(nb)[:, None]
        layout = self._layout(rows, positions.reshape(-1, 1), real, prompt_sample=False)
        with torch.no_grad(), self.handle.routing(layout):
            out = self.model(
                input_ids=ids[:, None].expand(seqs, nb),
                attention_mask=additive,
                position_ids=positions,
                past_key_values=self.cache,
                use_cache=True,
            )
        self.cache.crop(-(nb - 1))
        self.mask = torch.cat([self.mask, fed[:, None].long()], dim=-1)
        self.next_position = self.next_position + fed.long()
        logprobs = torch.log_softmax(out.logits.float(), dim=-1)  # [seqs, nb, V]
        for i, sid in enumerate(order):
            if sid in tokens:
                self._clean_pending[sid] = logprobs[i]
                if sid in charged:
                    self.seqs[sid].forward_passes += 1
                    self.seqs[sid].token_rows += nb

    def _branch_logprobs(self, ids: list[int]) -> Tensor:
        """Pending log-probs ``[len(ids), branches, V]`` of sequences with equal branch counts."""
        if self.clean_cache:
            return torch.stack([self._clean_pending[sid] for sid in ids])
        slices = self._row_slices()
        nb = len(self.seqs[ids[0]].branches)
        if len(ids) == len(self.seqs) and self.pending.shape[0] == len(ids) * nb:
            return self.pending.view(len(ids), nb, -1)
        index = torch.tensor([r for sid in ids for r in range(slices[sid].start, slices[sid].stop)])
        return self.pending[index.to(self.pending.device)].view(len(ids), nb, -1)
