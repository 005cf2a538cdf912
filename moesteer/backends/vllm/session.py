"""Prefix sessions on vLLM: the part of a decode session that search controllers drive.

vLLM keeps no sequence between calls, so a sequence here is its token list, keys and cost. Each
``run(until=)`` submits every live sequence as a request whose prompt is its tokens so far (all
branches as lock-step requests, as ``generate`` does), stops it at ``until``, EOS or its remaining
``max_tokens``, and appends what it decoded. Sampling stays keyed by the generated-token index
(``Sequence.offset`` carries it across requests) and the prefix cache — salted by routing — gives
forks back their parent's KV blocks, so a search decodes the same tokens as on the HF engine's
session (see :mod:`moesteer.backends.hf.session`). Routing noise of earlier generated tokens would be
drawn with the prompt's key when re-read as a prompt, so stochastic routing is refused here.
Available: ``add``, ``fork``, ``fork_many``, ``drop``, ``live``, ``run`` (also pausing after
``max_steps`` tokens), ``rebuild`` (a new strategy for the next run) and ``completion``; ``step``,
``extend`` and ``restrategise`` need backend hf. It satisfies :class:`moesteer.backends.base.Session`.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from moesteer.backends.vllm.registry import Sequence
from moesteer.keys import fork_keys
from moesteer.sampling import Completion, SamplingParams
from moesteer.strategy import TokenStrategy


@dataclass
class PrefixSequence:
    """One sequence of a prefix session (the fields the HF session's sequences also have)."""

    strategy: TokenStrategy
    prompt_key: int
    sample_key: int
    prompt_len: int
    tokens: list[int]
    logprobs: list[float] = field(default_factory=list)
    finished: str | None = None
    forward_passes: int = 0
    token_rows: int = 0

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]


class PrefixSession:
    """Sequences in flight on a :class:`~moesteer.backends.vllm.engine.VLLMEngine` (module docstring)."""

    def __init__(self, engine, sampling: SamplingParams) -> None:
        self.engine, self.sampling = engine, sampling
        self.seqs: dict[int, PrefixSequence] = {}
        self.started = time.perf_counter()
        self._ids = itertools.count()

    def __enter__(self) -> PrefixSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to restore: vLLM holds no state of a session between calls."""

    def add(
        self, prompts: Seq[Seq[int]], strategies: Seq[TokenStrategy], prompt_keys: Seq[int], *, copies: int = 1
    ) -> list[int]:
        """``copies`` sequences per prompt (sample keys ``0..copies-1``), prompt-major; nothing runs yet."""
        for strategy in {id(s): s for s in strategies}.values():
            if any(p is not None and p.stochastic for p in strategy.branches()):
                raise ValueError(f"{strategy}: searches on backend vllm need deterministic routing; use backend hf")
        ids = []
        for prompt, strategy, key in zip(prompts, strategies, prompt_keys, strict=True):
            for sample in range(copies):
                ids.append(next(self._ids))
                self.seqs[ids[-1]] = PrefixSequence(strategy, int(key), sample, len(prompt), list(prompt))
        return ids

    def fork(self, seq_id: int, copies: int, sample_keys: Seq[int] | None = None) -> list[int]:
        """``copies`` children of a sequence with their own sample keys (default: hashes of its key)."""
        parent = self.seqs[seq_id]
        ids = []
        for key in fork_keys(parent.sample_key, copies, sample_keys):
            ids.append(next(self._ids))
            child = dataclasses.replace(parent, tokens=list(parent.tokens), logprobs=list(parent.logprobs))
            child.sample_key, child.token_rows = key, 0
            self.seqs[ids[-1]] = child
        return ids

    def fork_many(self, forks: Seq[tuple[int, Seq[int]]], *, replace: bool = False) -> list[list[int]]:
        """Fork several sequences (one child per sample key); ``replace`` drops the parents."""
        made = [self.fork(seq_id, len(keys), keys) for seq_id, keys in forks]
        if replace:
            self.drop([seq_id for seq_id, _ in forks])
        return made

    def drop(self, seq_ids: Seq[int]) -> None:
        unknown = set(seq_ids) - set(self.seqs)
        if unknown:
            raise KeyError(f"no sequences {sorted(unknown)} in this session")
        for sid in seq_ids:
            del self.seqs[sid]

    def live(self) -> list[int]:
        return [sid for sid, s in self.seqs.items() if s.finished is None]

    def run(self, max_steps: int | None = None, until: str | None = None) -> list[int]:
        """Decode every live sequence to ``until`` (pausing it), EOS, a stop string or ``max_tokens``,
        at most ``max_steps`` tokens (pausing it); returns the ids paused at ``until``."""
        if max_steps is not None and not (isinstance(max_steps, int) and max_steps >= 1):
            raise ValueError(f"max_steps must be an integer >= 1, got {max_steps!r}")
        if until is not None and not isinstance(until, str):
            raise ValueError("vLLM sessions pause at one string (until=...)")
        live = self.live()
        if not live:
            return []
        sequences, prompts, budgets = [], [], []
        for sid in live:
            seq = self.seqs[sid]
            done = len(seq.tokens) - seq.prompt_len
            branches = seq.strategy.branches()
            sequences.append(
                Sequence(
                    seq.strategy, branches, self.sampling, seq.prompt_key, seq.sample_key, len(seq.tokens), [], done
                )
            )
            prompts.append(seq.tokens)
            budgets.append(
                self.sampling.max_tokens - done
                if max_steps is None
                else min(max_steps, self.sampling.max_tokens - done)
            )
        stop = () if until is None else (until,)
        decoded = self.engine.decode(sequences, prompts, self.sampling, max_tokens=budgets, stop=stop)
        paused = []
        for sid, d in zip(live, decoded, strict=True):
            seq = self.seqs[sid]
            seq.tokens += d.tokens
            seq.logprobs += d.logprobs
            seq.forward_passes += len(d.tokens)
            seq.token_rows += d.token_rows
            if len(seq.tokens) - seq.prompt_len >= self.sampling.max_tokens:
                seq.finished = "length" if d.finish_reason == "length" or d.stop_reason == until else "stop"
            elif until is not None and d.stop_reason == until and until not in self.sampling.stop:
                paused.append(sid)
            elif d.finish_reason == "length":  # its max_steps ran out: paused, not finished
                pass
            else:
                seq.finished = d.finish_reason
        return paused

    def completion(self, seq_id: int, prompt_index: int = 0, sample_index: int | None = None) -> Completion:
        seconds = time.perf_counter() - self.started
        return self.engine.sequence_completion(
            self.seqs[seq_id], self.sampling, prompt_index, sample_index, seconds=seconds
        )

    def step(self, *args, **kwargs):
        raise ValueError("session.step() needs backend hf (vLLM sessions run whole segments)")

    def extend(self, *args, **kwargs):
        raise ValueError("session.extend() needs backend hf")

    def restrategise(self, *args, **kwargs):
        raise ValueError("session.restrategise() needs backend hf (here rebuild() continues under a new strategy)")

    def rebuild(self, seq_ids: Seq[int], strategy: TokenStrategy | None = None) -> None:
        """Continue ``seq_ids`` under ``strategy``: the next ``run`` re-reads their tokens as a prompt,
        so vLLM recomputes their KV blocks under the new routing (its prefix cache is salted by it)."""
        if strategy is not None:
            for sid in seq_ids:
                self.seqs[sid].strategy = strategy
