"""What the engine, the router hook and the branch combiner share: the sequences in flight.

Each vLLM request is one branch row of one sequence; it carries ``extra_args={"moesteer": (seq,
branch)}`` and everything else about it lives here, keyed by the sequence id. The router hook
records, per step, the last position it scheduled for each row, which tells the combiner whether
all branches of a sequence sample in this step.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from moesteer.routing import Policy
from moesteer.sampling import SamplingParams
from moesteer.strategies.base import TokenStrategy
from moesteer.trace import RoutingTrace

EXTRA_ARGS_KEY = "moesteer"
RowKey = tuple[int, int]  # (sequence id, branch)


@dataclass
class Sequence:
    """One prompt × sample under a token strategy; its branches are requests that decode together."""

    strategy: TokenStrategy
    branches: tuple[Policy | None, ...]
    sampling: SamplingParams
    prompt_key: int
    sample: int
    prompt_len: int
    logprobs: list[float] = field(default_factory=list)
    offset: int = 0  # tokens generated before this request (a continued sequence): sampling keys count on
    error: ValueError | None = None  # set by the combiner; the engine raises it when the call returns
    trace: RoutingTrace | None = None  # filled by the router hook with branch 0's routing, when asked


class Registry:
    """Sequences in flight, the EOS ids, the call's seed, and the rows scheduled in the current step."""

    def __init__(self, eos: tuple[int, ...]) -> None:
        self.eos = eos
        self.seed = 0  # routing-noise seed of the call in flight (calls do not overlap)
        self.sequences: dict[int, Sequence] = {}
        self.last_position: dict[RowKey, int] = {}
        self._ids = itertools.count()

    def add(self, sequence: Sequence) -> int:
        seq_id = next(self._ids)
        self.sequences[seq_id] = sequence
        return seq_id

    def remove(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            self.sequences.pop(seq_id, None)

    @staticmethod
    def row_key(extra_args: dict | None) -> RowKey | None:
        return (extra_args or {}).get(EXTRA_ARGS_KEY)
