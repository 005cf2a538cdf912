"""``SamplingParams`` (names as in vLLM) and ``Completion``, shared by every backend."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from moesteer.checks import check_int, int_in
from moesteer.trace import RoutingTrace

MAX_SEED = 2**32 - 1
"""Seeds are 32-bit: 0..MAX_SEED (the noise hash takes 32 bits; larger seeds are refused, not wrapped)."""
MAX_TOKENS = 2**20
"""Most tokens one completion may ask for."""
MAX_N = 1024
"""Most samples per prompt."""


def check_seed(seed: object, name: str = "seed") -> None:
    """``ValueError`` unless ``seed`` is an integer in ``0..MAX_SEED``."""
    check_int(name, seed, 0, MAX_SEED)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature=0`` is greedy; ``n`` independent samples per prompt.

    Randomness is keyed by (seed, prompt key, sample key, generated-token index), never by batch
    row or by call, so a batch gives the same samples as its prompts one by one, and a paused,
    resumed or forked decode the same as an uninterrupted one. Bounds: ``1 <= max_tokens <=
    MAX_TOKENS``, ``1 <= n <= MAX_N``, ``0 <= seed <= MAX_SEED`` (2**32 - 1); stop strings are non-empty.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 128
    stop: tuple[str, ...] = ()
    seed: int = 0
    n: int = 1
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        checks = [
            ("temperature", self.temperature >= 0 and math.isfinite(self.temperature), ">= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", int_in(self.top_k, 0), "an integer >= 0 (0 = off)"),
            ("max_tokens", int_in(self.max_tokens, 1, MAX_TOKENS), f"an integer in 1..{MAX_TOKENS}"),
            ("n", int_in(self.n, 1, MAX_N), f"an integer in 1..{MAX_N}"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r} must be {allowed}")
        check_seed(self.seed, "SamplingParams.seed")


@dataclass
class Completion:
    """One generated sequence with its cost.

    ``logprobs[i]`` is the log-probability of ``token_ids[i]`` under the strategy's combined
    next-token distribution (before temperature). ``forward_passes`` counts model forward calls
    this sequence took part in (one batched step = 1); ``token_rows`` counts rows × tokens
    processed for it (all its branches); ``seconds`` is the wall time of the call that made it;
    ``cost`` holds a controller's further counters (:class:`moesteer.strategies.context.CostLedger`).
    """

    prompt_index: int
    sample_index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    forward_passes: int = 0
    token_rows: int = 0
    seconds: float = 0.0
    trace: RoutingTrace | None = None
    samples: list[Completion] = field(default_factory=list)  # filled by controllers that vote
    info: dict = field(default_factory=dict)
    cost: dict[str, float] = field(default_factory=dict)  # beyond passes and rows: backward_passes, ...

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)
