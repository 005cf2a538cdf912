"""The engine protocol every backend implements, and the front half they share.

An engine serves one model: ``generate`` (completions under a token strategy or routing policy
per prompt), ``score`` (teacher-forced steered log-probs), ``loss`` (differentiable, where the
backend has gradients), ``encode`` and, where it can, ``session`` (a :class:`Session`: resumable,
forkable decoding). What a backend can do is declared in :class:`Capabilities`, which callers check
instead of the engine's type. :class:`Engine` does everything that does not depend on the backend:
validating and encoding prompts, prompt keys, per-prompt strategies, EOS ids and building
``Completion``s. Engines never run controllers: :func:`moesteer.strategies.run` does, through them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from torch import Tensor

from moesteer.decoding import completion_text
from moesteer.models.adapters import FamilyAdapter
from moesteer.prompts import encode_prompt
from moesteer.routing import Policy
from moesteer.sampling import Completion, SamplingParams
from moesteer.strategy import TokenStrategy, as_strategy

StrategyArg = TokenStrategy | Policy | None | Sequence[TokenStrategy | Policy | None]


@dataclass(frozen=True)
class Capabilities:
    """What an engine supports; each ``False`` is refused with a one-line error naming the way out."""

    gradients: bool = False  # loss() backpropagates into tensors held by policies
    routing_traces: bool = False  # generate(trace=True)
    router_distributions: bool = False  # traces hold each token's full router distribution
    clean_cache: bool = False  # TokenStrategy.clean_cache (sibling positions over one clean cache)
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


class SessionSequence(Protocol):
    """One sequence of a :class:`Session`: its tokens (prompt, then generated), log-probs and cost."""

    strategy: TokenStrategy
    prompt_key: int
    sample_key: int
    prompt_len: int
    tokens: list[int]
    logprobs: list[float]
    finished: str | None
    forward_passes: int
    token_rows: int

    @property
    def generated(self) -> list[int]: ...


class Session(Protocol):
    """Sequences in flight on one engine, which controllers add, fork, run and drop.

    ``Capabilities.search_sessions`` promises ``add``, ``fork``, ``fork_many``, ``drop``, ``live``,
    ``run`` (with ``until=`` and ``max_steps=``), ``rebuild`` and ``completion``;
    ``Capabilities.sessions`` adds ``step``, ``extend`` and ``restrategise`` (elsewhere they raise a
    one-line ``ValueError`` naming the backend that has them)."""

    seqs: Mapping[int, SessionSequence]

    def __enter__(self) -> Session: ...

    def __exit__(self, *exc) -> None: ...

    def close(self) -> None: ...

    def add(
        self,
        prompts: Sequence[Sequence[int]],
        strategies: Sequence[TokenStrategy],
        prompt_keys: Sequence[int],
        *,
        copies: int = 1,
    ) -> list[int]:
        """Sequences for ``prompts`` (``copies`` each, sample keys ``0..copies-1``), prompt-major ids."""
        ...

    def fork(self, seq_id: int, copies: int, sample_keys: Sequence[int] | None = None) -> list[int]: ...

    def fork_many(self, forks: Sequence[tuple[int, Sequence[int]]], *, replace: bool = False) -> list[list[int]]:
        """Each ``(sequence, sample keys)`` forked once per key, in one call (``replace``: parents dropped)."""
        ...

    def drop(self, seq_ids: Sequence[int]) -> None: ...

    def live(self) -> list[int]:
        """The unfinished sequences."""
        ...

    def run(self, max_steps: int | None = None, until: str | None = None) -> list[int]:
        """Decode every live sequence until it finishes, ``max_steps`` tokens or text ``until``."""
        ...

    def rebuild(self, seq_ids: Sequence[int], strategy: TokenStrategy | None = None) -> None:
        """Continue ``seq_ids`` (under ``strategy``) with their KV cache recomputed."""
        ...

    def restrategise(self, seq_ids: Sequence[int], strategy: TokenStrategy) -> None:
        """Continue ``seq_ids`` under ``strategy`` over their current KV cache."""
        ...

    def step(self, seq_ids: Sequence[int] | None = None) -> dict[int, int]: ...

    def extend(self, seq_id: int, token_ids: Sequence[int]) -> None: ...

    def completion(self, seq_id: int, prompt_index: int = 0, sample_index: int | None = None) -> Completion: ...


class Engine:
    """Base of the backends' engines. Subclasses set ``capabilities`` and implement ``_generate``
    and ``score``; they hold ``name``, ``tokenizer``, ``adapter``, ``eos_ids`` and ``moe_layers``."""

    capabilities: ClassVar[Capabilities]
    name: str
    tokenizer: object
    adapter: FamilyAdapter
    eos_ids: frozenset[int]
    moe_layers: tuple[int, ...]

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
    ) -> list[Completion]:
        """``sampling.n`` completions per prompt, prompt-major.

        ``strategy`` is one token strategy or routing policy for every prompt, or a list with one
        per prompt (a controller runs through :func:`moesteer.strategies.run`). ``prompt_keys``
        (default ``0..P-1``) key each prompt's randomness: pass a prompt's index in its dataset so
        that its samples do not depend on the batch it ran in.
        """
        sampling = sampling or SamplingParams()
        if trace and not self.capabilities.routing_traces:
            raise ValueError(f"routing traces are not recorded by the {self.backend} backend; use backend hf")
        if isinstance(strategy, list | tuple) and not self.capabilities.per_row_strategies:
            raise ValueError(f"the {self.backend} backend takes one strategy per call")
        return self._generate(self.request(prompts, strategy, sampling, chat=chat, prompt_keys=prompt_keys), trace)

    def score(
        self,
        prompts: Sequence[str],
        continuations: Sequence[str],
        strategy: TokenStrategy | Policy | None = None,
        *,
        with_greedy: bool = False,
    ) -> list[Tensor] | list[tuple[Tensor, bool]]:
        raise NotImplementedError

    def loss(self, prompt, continuation, policy: Policy | None) -> Tensor:
        raise ValueError(
            f"the {self.backend} backend computes no gradients: optimise routing with backend hf, then serve the policy"
        )

    def session(self, sampling: SamplingParams | None = None, *, trace: bool = False) -> Session:
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
                raise ValueError(
                    f"{s} cannot be one of several per-prompt strategies; pass it alone"
                    if per_prompt
                    else f"{s} is a controller, which engines do not run: use moesteer.strategies.run or LM.generate"
                )
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
        if strategy.clean_cache and not self.capabilities.clean_cache:
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
        self, seq: SessionSequence, sampling: SamplingParams, prompt_index: int, sample_index: int | None, **details
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
