"""The engine protocol every backend implements, and the front half they share.

An engine serves one model: ``generate`` (completions under a strategy per prompt, or one
controller), ``score`` (teacher-forced steered log-probs), ``loss`` (differentiable, where the
backend has gradients), ``encode`` and, where it can, ``session`` (a resumable, forkable decode
session). What a backend can do is declared in :class:`Capabilities`, which callers check instead
of the engine's type. :class:`Engine` does everything that does not depend on the backend:
validating and encoding prompts, prompt keys, per-prompt strategies, dispatching controllers with
their :class:`~moesteer.strategies.context.RunContext`, EOS ids and building ``Completion``s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from moesteer.decoding import completion_text
from moesteer.models.adapters import FamilyAdapter
from moesteer.prompts import encode_prompt
from moesteer.routing import Policy
from moesteer.sampling import Completion, SamplingParams
from moesteer.strategies.base import Controller, Strategy, TokenStrategy, as_strategy
from moesteer.strategies.context import RunContext

StrategyArg = Strategy | Policy | None | Sequence[Strategy | Policy | None]


@dataclass(frozen=True)
class Capabilities:
    """What an engine supports; each ``False`` is refused with a one-line error naming the way out."""

    gradients: bool = False  # loss() backpropagates into tensors held by policies
    routing_traces: bool = False  # generate(trace=True)
    router_distributions: bool = False  # traces hold each token's full router distribution
    clean_cache: bool = False  # RoE cache='clean' (sibling positions over one clean cache)
    per_row_strategies: bool = True  # generate(prompts, [s1, s2, ...])
    sessions: bool = False  # session(): pause, resume, fork, extend, rebuild, drop, step
    search_sessions: bool = False  # session(): add, fork, drop, run(until=) — what search controllers drive
    scoped_routing: bool = False  # position-scoped policies (Scoped)
    processes: bool = False  # steering inside separate worker processes


@dataclass
class Request:
    """A validated generate call: token ids, strategy and key of each prompt."""

    prompt_ids: list[list[int]]
    strategies: list[TokenStrategy]
    keys: list[int]
    sampling: SamplingParams


class Engine:
    """Base of the backends' engines. Subclasses set ``capabilities`` and implement ``_generate``
    and ``score``; they hold ``name``, ``tokenizer``, ``adapter`` and ``eos_ids``."""

    capabilities: ClassVar[Capabilities]
    name: str
    tokenizer: object
    adapter: FamilyAdapter
    eos_ids: frozenset[int]

    # ---- the protocol ---------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        strategy: StrategyArg = None,
        sampling: SamplingParams | None = None,
        *,
        chat: bool = False,
        trace: bool = False,
        prompt_keys: Sequence[int] | None = None,
        context: RunContext | None = None,
    ) -> list[Completion]:
        """``sampling.n`` completions per prompt, prompt-major.

        ``strategy`` is one strategy, routing policy or controller for every prompt, or a list with
        one token strategy or policy per prompt. ``prompt_keys`` (default ``0..P-1``) key each
        prompt's randomness: pass a prompt's index in its dataset so that its samples do not depend
        on the batch it ran in. ``context`` reaches controllers (the task's extractor, shared
        resources).
        """
        sampling = sampling or SamplingParams()
        if trace and not self.capabilities.routing_traces:
            raise ValueError(f"routing traces are not recorded by the {self.backend} backend; use backend hf")
        if not isinstance(strategy, list | tuple):
            single = as_strategy(strategy)
            if isinstance(single, Controller):
                options = {"chat": chat, "trace": trace, "prompt_keys": prompt_keys}
                return single.run(self, list(prompts), sampling, context or RunContext(), **options)
        elif not self.capabilities.per_row_strategies:
            raise ValueError(f"the {self.backend} backend takes one strategy per call")
        return self._generate(self.request(prompts, strategy, sampling, chat=chat, prompt_keys=prompt_keys), trace)

    def score(
        self,
        prompts: Sequence[str],
        continuations: Sequence[str],
        strategy: Strategy | Policy | None = None,
        *,
        with_greedy: bool = False,
    ) -> list[Tensor] | list[tuple[Tensor, bool]]:
        raise NotImplementedError

    def loss(self, prompt, continuation, policy: Policy | None) -> Tensor:
        raise ValueError(
            f"the {self.backend} backend computes no gradients: optimise routing with backend hf, then serve the policy"
        )

    def session(self, sampling: SamplingParams | None = None, *, trace: bool = False):
        raise ValueError(f"the {self.backend} backend has no decode sessions (pause/fork/rebuild); use backend hf")

    def routing_sizes(self) -> tuple[int, int]:
        """``(experts per MoE layer, the trained top-k)`` of the served model."""
        raise NotImplementedError

    def router_weights(self) -> dict[int, Tensor]:
        """Each MoE layer's router (gate) weight ``[E, hidden]``, on the CPU: what identifies the
        routing of a model whatever its name (e.g. a reference set's ``router_sha256``)."""
        raise NotImplementedError

    def gradient_engine(self) -> Engine:
        """The engine that optimises routing for this one (losses, gradients, router distributions):
        itself where it has gradients; otherwise an HF copy of the same model, loaded on first use."""
        return self

    def prompt_text(self, prompt: str | Sequence[int]) -> str:
        """A prompt as text (token-id prompts decoded), e.g. for a verifier or an embedding model."""
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt, skip_special_tokens=True)

    def encode(self, text: str | Sequence[int], *, chat: bool = False, special: bool = True) -> list[int]:
        return encode_prompt(self.tokenizer, text, chat=chat, special=special, model_name=self.name)

    @property
    def backend(self) -> str:
        return type(self).backend_name  # type: ignore[attr-defined]

    # ---- the shared front half ------------------------------------------------------------------

    def request(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        strategy: StrategyArg,
        sampling: SamplingParams,
        *,
        chat: bool = False,
        prompt_keys: Sequence[int] | None = None,
    ) -> Request:
        """Validate and encode a generate call (one-line ``ValueError``s naming the bad value)."""
        per_prompt = isinstance(strategy, list | tuple)
        strategies = [as_strategy(s) for s in strategy] if per_prompt else [as_strategy(strategy)] * len(prompts)
        if len(strategies) != len(prompts):
            raise ValueError(f"got {len(strategies)} strategies for {len(prompts)} prompts")
        for s in strategies:
            if not isinstance(s, TokenStrategy):
                raise ValueError(f"{s} cannot be one of several per-prompt strategies; pass it alone")
        checked: set[object] = set()
        for s in strategies:
            if identity_key(s) not in checked:
                checked.add(identity_key(s))
                self.check_strategy(s)
        ids = [self.encode(p, chat=chat) for p in prompts]
        empty = [i for i, p in enumerate(ids) if not p]
        if empty:
            raise ValueError(f"prompt {empty[0]} is empty after tokenization; give at least one token")
        keys = [int(k) for k in prompt_keys] if prompt_keys is not None else list(range(len(ids)))
        if len(keys) != len(ids):
            raise ValueError(f"prompt_keys has {len(keys)} entries for {len(ids)} prompts")
        return Request(ids, strategies, keys, sampling)

    def check_strategy(self, strategy: TokenStrategy) -> None:
        """Refuse what this backend cannot run (the base checks capabilities)."""
        if strategy.cache_mode == "shared" and not self.capabilities.clean_cache:
            raise ValueError(
                f"{strategy}: the clean (shared) KV cache is not available on the {self.backend} backend; "
                "use cache='standard' or backend hf"
            )

    def completion(
        self,
        prompt_index: int,
        sample_index: int,
        tokens: list[int],
        logprobs: list[float],
        finish_reason: str,
        sampling: SamplingParams,
        **details,
    ) -> Completion:
        """A ``Completion`` of generated ``tokens``, its text cut as ``sampling`` says (a final EOS
        dropped, stop strings); ``details`` are its other fields (cost counters, seconds, trace)."""
        text = completion_text(self.tokenizer, tokens, set(self.eos_ids), sampling)
        return Completion(prompt_index, sample_index, text, tokens, logprobs, finish_reason, **details)

    def sequence_completion(
        self, seq, sampling: SamplingParams, prompt_index: int, sample_index: int | None, **details
    ) -> Completion:
        """The ``Completion`` of a session's sequence (its generated tokens, log-probs, finish and
        cost; ``sample_index`` defaults to its sample key)."""
        sample = seq.sample_key if sample_index is None else sample_index
        return self.completion(
            prompt_index,
            sample,
            seq.generated,
            seq.logprobs,
            seq.finished or "length",
            sampling,
            forward_passes=seq.forward_passes,
            token_rows=seq.token_rows,
            **details,
        )

    def _generate(self, request: Request, trace: bool) -> list[Completion]:
        raise NotImplementedError


def identity_key(strategy: object) -> object:
    """A strategy itself where it is hashable (equal specs group together), else its id."""
    try:
        hash(strategy)
    except TypeError:
        return id(strategy)
    return strategy


def eos_ids(generation_config, tokenizer) -> frozenset[int]:
    """EOS ids from a generation config, else the tokenizer's."""
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    return frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])
