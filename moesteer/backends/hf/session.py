"""Decode sessions on the HF engine: sequences in flight that pause, resume, fork, extend, rebuild, drop.

A session owns the patched routers (until :meth:`DecodeSession.close`; use it as a context
manager), one KV cache whose rows are the branches of every sequence, the attention mask, and for
each sequence its strategy, noise keys, tokens, log-probs and cost. ``engine.generate`` is
``add`` + ``fork`` + ``run``; controllers drive the same calls:

* ``add(prompts, strategies, keys, copies=n)`` — prefill new sequences (``copies`` samples of a
  prompt share one prefill);
* ``step()`` / ``run(max_steps=, until=)`` — choose a token for every live sequence from its
  pending next-token distribution, append it to all its branches, forward once; ``run`` stops
  when all are finished, after ``max_steps``, or pauses each sequence whose text since the call
  began contains ``until`` (e.g. DES's step separator);
* ``fork(seq, copies)`` — children share the parent's cached rows (a copy, no re-prefill) and
  get their own sample keys; ``extend(seq, ids)`` — append given tokens (teacher-forced,
  their log-probs recorded); ``rebuild(seqs, strategy)`` — recompute a sequence's KV cache under
  a new routing; ``drop(seqs)``.

Randomness is keyed, never by batch row or by call: token sampling by (seed, prompt key, sample
key, generated index = position − origin), routing noise by (seed, prompt key, sample key, branch,
layer, absolute position), prompt positions with sample key 0 (the samples of a prompt share its
prefill; clean-cache siblings of the last prompt token draw with their own key). So pausing and
resuming gives an uninterrupted run, and a child decodes like a fresh session on its prefix with
its keys. Rows that do not take part in a forward (paused, or outside ``step(seqs)``) are fed a
padding token whose attention-mask entry is 0: they do not change, at the price of their compute.

The session satisfies :class:`moesteer.backends.base.Session`; its KV-cache rows and the forwards
that extend them are :class:`~moesteer.backends.hf.rows.BatchRows`.

A session opened with ``trace=True`` records every router call with its rows named
``RowId(sequence id, branch)`` and its tokens' positions (``-1``: padding, rows not fed); forks
are recorded too, so ``session.trace.request(seq)`` is one sequence's routing from its first
prompt token, and ``completion(seq)`` carries it.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Sequence as Seq

import torch

import moesteer.backends.hf.kv as kv
from moesteer.backends.base import identity_key
from moesteer.backends.hf.hook import RouterHandle
from moesteer.backends.hf.rows import BatchRows, DecodeSequence
from moesteer.decoding import chooser, next_token_scores, next_tokens, non_finite, read_step
from moesteer.keys import fork_keys
from moesteer.routing import Policy
from moesteer.sampling import Completion, SamplingParams
from moesteer.strategy import TokenStrategy
from moesteer.trace import RoutingTrace

STOP_WINDOW_SLACK = 8  # tokens decoded beyond 4 per character of the longest stop string


class DecodeSession(BatchRows):
    """Sequences in flight on one HF model (see the module docstring)."""

    def __init__(self, engine, sampling: SamplingParams, *, trace: RoutingTrace | None = None) -> None:
        self.engine, self.model, self.sampling = engine, engine.model, sampling
        self.eos = tuple(sorted(engine.eos_ids))
        self.seqs: dict[int, DecodeSequence] = {}  # in row order
        self.trace = trace
        self.handle = RouterHandle(self.model, trace=trace)
        self.started = time.perf_counter()
        self._ids = itertools.count()
        self._branches: dict[object, tuple[Policy | None, ...]] = {}
        super().__init__()

    # ---- life cycle ---------------------------------------------------------------------------

    def __enter__(self) -> DecodeSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Restore the model's routers (idempotent)."""
        self.handle.remove()

    # ---- adding and removing sequences --------------------------------------------------------

    def add(
        self,
        prompts: Seq[Seq[int]],
        strategies: Seq[TokenStrategy],
        prompt_keys: Seq[int],
        *,
        copies: int = 1,
        origins: Seq[int] | None = None,
    ) -> list[int]:
        """Prefill ``prompts`` (one strategy and key each) as ``copies`` sequences per prompt with
        sample keys ``0..copies-1``, sharing one prefill; returns their ids, prompt-major.
        ``origins`` (default: the prompt lengths) set where each sequence's sampling keys count from."""
        if not (len(prompts) == len(strategies) == len(prompt_keys)):
            raise ValueError(f"{len(prompts)} prompts, {len(strategies)} strategies, {len(prompt_keys)} keys")
        origins = list(origins) if origins is not None else [len(p) for p in prompts]
        firsts = [
            self._new_sequence(list(p), s, k, 0, o)
            for p, s, k, o in zip(prompts, strategies, prompt_keys, origins, strict=True)
        ]
        if self.clean_cache:
            children = self._prefill_clean(firsts, copies)
        else:
            self._prefill(firsts)
            children = self._fan_out(firsts, copies)
        return [i for first in firsts for i in [first, *children[first]]]

    def fork(self, seq_id: int, copies: int, sample_keys: Seq[int] | None = None) -> list[int]:
        """``copies`` children of ``seq_id`` placed after it, sharing its cached rows (copied, nothing
        recomputed) and its pending distribution; their sample keys default to hashes of the parent's."""
        return self.fork_many([(seq_id, fork_keys(self.seqs[seq_id].sample_key, copies, sample_keys))])[0]

    def fork_many(self, forks: Seq[tuple[int, Seq[int]]], *, replace: bool = False) -> list[list[int]]:
        """Fork several sequences in one cache reorder: each ``(seq_id, sample_keys)`` gets one child
        per key, placed after it; ``replace`` drops the parents (a search step's expansion)."""
        children: dict[int, list[DecodeSequence]] = {}
        for seq_id, keys in forks:
            parent = self.seqs[seq_id]
            for key in keys:
                child = dataclasses.replace(parent, tokens=list(parent.tokens), logprobs=list(parent.logprobs))
                child.sample_key, child.token_rows = int(key), 0
                children.setdefault(seq_id, []).append(child)
        order: list[tuple[int, int, DecodeSequence]] = []  # (new id, source id, sequence)
        for sid, seq in self.seqs.items():
            if not (replace and sid in children):
                order.append((sid, sid, seq))
            order += [(next(self._ids), sid, child) for child in children.get(sid, [])]
        cached = set(self._cached)
        clean = {new: self._clean_pending[src] for new, src, _ in order if src in self._clean_pending}
        self._reorder([src for _, src, _ in order if src in cached])
        self.seqs = {new: seq for new, _, seq in order}
        self._cached = {new for new, src, _ in order if src in cached}
        self._clean_pending = clean
        made: dict[int, list[int]] = {}
        for new, src, _ in order:
            if new != src:
                made.setdefault(src, []).append(new)
                if self.trace is not None:
                    self.trace.fork(src, new)
        return [made.get(seq_id, []) for seq_id, _ in forks]

    def drop(self, seq_ids: Seq[int]) -> None:
        """Remove sequences and their cache rows."""
        gone = set(seq_ids)
        unknown = gone - set(self.seqs)
        if unknown:
            raise KeyError(f"no sequences {sorted(unknown)} in this session")
        keep = [sid for sid in self.seqs if sid not in gone]
        self._reorder(keep)
        self.seqs = {sid: self.seqs[sid] for sid in keep}

    def rebuild(self, seq_ids: Seq[int], strategy: TokenStrategy | None = None) -> None:
        """Recompute the KV cache (and pending distribution) of ``seq_ids`` from all their tokens,
        under ``strategy`` (default: their own); tokens, log-probs, keys and cost carry over. The
        rebuilt rows move to the end of the batch. Like a prefill, the rebuild draws routing noise
        with sample key 0 at every position (exact for deterministic routing such as a ``Bias``)."""
        kv.check_full_attention(self.model.config, "rebuilding part of a session")
        olds = [self.seqs[sid] for sid in seq_ids]
        self.drop(seq_ids)
        for sid, old in zip(seq_ids, olds, strict=True):  # the caller's ids, now at the end
            self._new_sequence(
                old.tokens, strategy or old.strategy, old.prompt_key, old.sample_key, old.origin, seq_id=sid
            )
            seq = self.seqs[sid]
            seq.prompt_len, seq.logprobs, seq.finished = old.prompt_len, old.logprobs, old.finished
            seq.forward_passes, seq.token_rows, seq.cursor = old.forward_passes, old.token_rows, old.cursor
        if self.clean_cache:
            self._prefill_clean(list(seq_ids), 1)
        else:
            self._prefill(list(seq_ids))

    def restrategise(self, seq_ids: Seq[int], strategy: TokenStrategy) -> None:
        """Continue ``seq_ids`` under ``strategy`` from their cache as it is (computed under their old
        routing, and so is their pending distribution; :meth:`rebuild` recomputes both instead). The
        new strategy must have as many branches as the old."""
        branches = self._branches_of(strategy)
        for policy in set(branches) - {None}:
            self.handle.check(policy)
        for sid in seq_ids:
            seq = self.seqs[sid]
            if len(branches) != len(seq.branches):
                raise ValueError(
                    f"restrategise: {strategy} has {len(branches)} branches, the sequence {len(seq.branches)}"
                )
            seq.strategy, seq.branches = strategy, branches

    # ---- decoding -----------------------------------------------------------------------------

    def live(self) -> list[int]:
        return [sid for sid, s in self.seqs.items() if s.finished is None]

    def step(self, seq_ids: Seq[int] | None = None) -> dict[int, int]:
        """One token for every live sequence of ``seq_ids`` (default: all), then one forward.

        Finished sequences among ``seq_ids`` keep being fed (as padding that costs them nothing),
        so the batch layout — and with it every float — is that of an uninterrupted call."""
        ids = list(self.seqs) if seq_ids is None else list(seq_ids)
        tokens, logprobs = self._choose(ids)
        chosen: dict[int, int] = {}
        for sid in ids:
            seq = self.seqs[sid]
            seq.cursor += 1
            if seq.finished is not None:
                continue
            token = tokens[sid]
            seq.tokens.append(token)
            seq.logprobs.append(logprobs[sid])
            seq.finished = self._finish_reason(seq, token)
            chosen[sid] = token
        if any(self.seqs[sid].finished is None for sid in ids):
            still_live = {sid for sid in chosen if self.seqs[sid].finished is None}
            self._feed_one({sid: tokens[sid] for sid in ids}, charged=still_live)
        return chosen

    def run(self, max_steps: int | None = None, until: str | Seq[str] | None = None) -> list[int]:
        """Step until every sequence is finished or ``max_steps`` steps ran; with ``until``, a sequence
        pauses as soon as its text since this call contains one of the strings. Returns the ids of
        the sequences paused by ``until``."""
        separators = (until,) if isinstance(until, str) else tuple(until or ())
        start = {sid: len(s.tokens) for sid, s in self.seqs.items()}
        active = [sid for sid in self.seqs if self.seqs[sid].finished is None]
        paused: list[int] = []
        for _ in itertools.count() if max_steps is None else range(max_steps):
            if not active:
                break
            everyone = len(active) == len(self.live()) and not paused
            self.step(None if everyone else active)
            if separators:
                hit = [sid for sid in active if self._tail_contains(self.seqs[sid], start[sid], separators)]
                paused += [sid for sid in hit if self.seqs[sid].finished is None]
                active = [sid for sid in active if sid not in hit]
            active = [sid for sid in active if self.seqs[sid].finished is None]
        return paused

    def extend(self, seq_id: int, token_ids: Seq[int]) -> None:
        """Append ``token_ids`` to a sequence (e.g. a verifier's pick), teacher-forced: their
        log-probs under its strategy are recorded, and its pending distribution follows them."""
        token_ids = [int(t) for t in token_ids]
        if not token_ids:
            return
        if self.clean_cache:
            raise ValueError("extend() is not available in clean-cache mode; use cache='standard'")
        kv.check_full_attention(self.model.config, "extending part of a session")
        seq = self.seqs[seq_id]
        first = self._token_logprob(seq_id, token_ids[0])
        logits = self._feed_many({seq_id: token_ids})[seq_id]  # [branches, m, V]
        branch_logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1).transpose(0, 1)
        rest = next_token_scores(seq.strategy, branch_logprobs, self.eos)
        seq.tokens += token_ids
        seq.logprobs += [first] + [float(rest[j, t]) for j, t in enumerate(token_ids[1:])]
        seq.cursor += len(token_ids)
        seq.finished = None

    def completion(self, seq_id: int, prompt_index: int = 0, sample_index: int | None = None) -> Completion:
        seconds = time.perf_counter() - self.started
        trace = None if self.trace is None else self.trace.request(seq_id)
        return self.engine.sequence_completion(
            self.seqs[seq_id], self.sampling, prompt_index, sample_index, seconds=seconds, trace=trace
        )

    # ---- internals: sequences and rows ----------------------------------------------------------

    def _new_sequence(
        self,
        tokens,
        strategy: TokenStrategy,
        prompt_key: int,
        sample_key: int,
        origin: int,
        *,
        seq_id: int | None = None,
    ) -> int:
        if self.clean_cache is None:
            self.clean_cache = strategy.clean_cache
            if strategy.clean_cache:
                kv.check_full_attention(self.model.config, "a shared (clean) KV cache")
        elif strategy.clean_cache != self.clean_cache:
            raise ValueError("a session holds either clean-cache or separate-cache strategies; open another session")
        branches = self._branches_of(strategy)
        for policy in set(branches) - {None}:
            self.handle.check(policy)
        if not tokens:
            raise ValueError("a sequence needs at least one token")
        sid = next(self._ids) if seq_id is None else seq_id
        self.seqs[sid] = DecodeSequence(
            strategy, branches, prompt_key, sample_key, len(tokens), origin, list(tokens), cursor=len(tokens) - origin
        )
        return sid

    def _branches_of(self, strategy: TokenStrategy) -> tuple[Policy | None, ...]:
        """One branch tuple per strategy, so equal strategies share policy objects (one router group)."""
        try:
            return self._branches.setdefault(strategy, strategy.branches())
        except TypeError:  # unhashable spec
            return strategy.branches()

    # ---- internals: prefills --------------------------------------------------------------------

    def _prefill_clean(self, ids: list[int], copies: int) -> dict[int, list[int]]:
        """Clean-cache prefill: all but the last token under branch 0's routing, then ``copies``
        samples per sequence, then the last token's siblings (the samples' own draws); returns the
        samples forked from each sequence."""
        self._prefill_clean_past(ids)
        children = self._fan_out(ids, copies)
        fed = [sid for first in ids for sid in [first, *children[first]]]
        self._siblings({sid: self.seqs[sid].tokens[-1] for sid in fed}, charged=set(fed))
        return children

    def _fan_out(self, firsts: list[int], copies: int) -> dict[int, list[int]]:
        """Fork ``copies - 1`` samples (sample keys 1, 2, ...) from each first sequence."""
        if copies == 1:
            return {first: [] for first in firsts}
        return {first: self.fork(first, copies - 1, sample_keys=range(1, copies)) for first in firsts}

    # ---- internals: choosing tokens -------------------------------------------------------------

    def _choose(self, ids: list[int]) -> tuple[dict[int, int], dict[int, float]]:
        """The next token of every sequence in ``ids`` and its combined log-prob, one
        :func:`next_tokens` per group of equal :func:`chooser` (sequences routed differently, e.g.
        under per-sequence biases, choose together), read back in one host transfer."""
        groups: dict[object, tuple[TokenStrategy, list[int]]] = {}
        for sid in ids:
            rule = chooser(self.seqs[sid].strategy)
            groups.setdefault(identity_key(rule), (rule, []))[1].append(sid)
        steps = []
        for rule, group in groups.values():
            seqs = [self.seqs[sid] for sid in group]
            branch_logprobs = self._branch_logprobs(group)
            keys = [[s.prompt_key for s in seqs], [s.sample_key for s in seqs], [s.cursor for s in seqs]]
            keys_t = torch.tensor(keys, device=branch_logprobs.device)
            steps.append(next_tokens(rule, branch_logprobs, self.eos, self.sampling, keys_t))
        chosen = read_step(torch.cat(steps))
        order = [sid for _, group in groups.values() for sid in group]
        for sid, (_, _, finite) in zip(order, chosen, strict=True):
            if not finite:
                raise non_finite(self.seqs[sid].strategy, self.seqs[sid].cursor)
        tokens = {sid: int(token) for sid, (token, _, _) in zip(order, chosen, strict=True)}
        logprobs = {sid: logprob for sid, (_, logprob, _) in zip(order, chosen, strict=True)}
        return tokens, logprobs

    def _token_logprob(self, sid: int, token: int) -> float:
        """The log-prob of ``token`` under a sequence's pending combined distribution."""
        seq = self.seqs[sid]
        return float(next_token_scores(seq.strategy, self._branch_logprobs([sid]), self.eos)[0, token])

    # ---- internals: stopping --------------------------------------------------------------------

    def _finish_reason(self, seq: DecodeSequence, token: int) -> str | None:
        if token in self.eos and not self.sampling.ignore_eos:
            return "stop"
        if self.sampling.stop and self._tail_contains(seq, seq.prompt_len, self.sampling.stop):
            return "stop"
        return "length" if len(seq.tokens) - seq.origin >= self.sampling.max_tokens else None

    def _tail_contains(self, seq: DecodeSequence, start: int, needles: Seq[str]) -> bool:
        """Whether the text of ``seq.tokens[start:]`` ends in a way that contains one of ``needles``:
        only the last few tokens are decoded (enough for the longest needle), never the whole text."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            return False
        window = 4 * max(len(n) for n in needles) + STOP_WINDOW_SLACK
        tail = seq.tokens[max(start, len(seq.tokens) - window) :]
        text = tokenizer.decode(tail, skip_special_tokens=True)
        return any(n in text for n in needles)


__all__ = ["DecodeSequence", "DecodeSession"]
