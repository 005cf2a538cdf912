"""What travels with each vLLM request, and what a worker keeps of the sequences in flight.

Each vLLM request is one branch row of one sequence. Its ``SamplingParams.extra_args["moesteer"]``
is JSON-safe data (:func:`row_args`): the sequence id and branch, the chunk it was submitted with
(the lock-step scheduler releases a chunk whole), the strategy and sampling as wire text
(:mod:`moesteer.wire`), the noise keys, the EOS ids and whether to trace. vLLM's msgpack serialiser
carries it to a separate engine core and to every worker; only names and numbers cross.

In each worker process, :data:`REGISTRY` rebuilds a sequence the first time one of its rows is seen
(equal specs share one rebuilt object, so they share routing groups) and keeps what decoding it
produces — combined log-probs, an error, branch 0's routing trace — until the front end collects
it with ``collective_rpc("moesteer_pop")``. The router hook records, per step, the last position
it scheduled for each row, which tells the combiner whether all branches of a sequence sample now.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moesteer import wire
from moesteer.routing import Policy
from moesteer.sampling import SamplingParams
from moesteer.strategies.base import TokenStrategy
from moesteer.trace import RoutingTrace, RowId

EXTRA_ARGS_KEY = "moesteer"


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
    error: str | None = None  # set by the combiner; the engine raises it when the call returns
    trace: RoutingTrace | None = None  # filled by the router hook with every branch's routing, when asked
    eos: tuple[int, ...] = ()


def row_args(seq: Sequence, seq_id: int, branch: int, chunk: int, rows: int, eos: tuple[int, ...]) -> dict:
    """The ``extra_args`` entry of one branch request (module docstring)."""
    return {
        "seq": seq_id,
        "branch": branch,
        "chunk": chunk,
        "rows": rows,
        "strategy": wire.dumps(seq.strategy),
        "sampling": wire.dumps(seq.sampling),
        "prompt_key": seq.prompt_key,
        "sample": seq.sample,
        "prompt_len": seq.prompt_len,
        "offset": seq.offset,
        "trace": seq.trace is not None,
        "eos": list(eos),
    }


class Registry:
    """A worker's sequences in flight (rebuilt from their requests' ``extra_args``) and the rows
    scheduled in the current step."""

    def __init__(self) -> None:
        self.sequences: dict[int, Sequence] = {}
        self.last_position: dict[RowId, int] = {}
        self._specs: dict[str, object] = {}

    def lookup(self, extra_args: dict | None) -> tuple[RowId, Sequence] | None:
        """The row key and sequence of a request (``None``: not one of moesteer's)."""
        args = (extra_args or {}).get(EXTRA_ARGS_KEY)
        if args is None:
            return None
        seq_id = int(args["seq"])
        seq = self.sequences.get(seq_id)
        if seq is None:
            strategy, branches = self._strategy(args["strategy"])
            seq = Sequence(
                strategy,
                branches,
                self._spec(args["sampling"]),
                int(args["prompt_key"]),
                int(args["sample"]),
                int(args["prompt_len"]),
                offset=int(args["offset"]),
                trace=RoutingTrace() if args["trace"] else None,
                eos=tuple(args["eos"]),
            )
            self.sequences[seq_id] = seq
        return RowId(seq_id, int(args["branch"])), seq

    def pop(self, seq_ids: list[int]) -> list[dict]:
        """What each sequence produced (log-probs, error, trace as data); forgets them."""
        out = []
        for seq_id in seq_ids:
            seq = self.sequences.pop(seq_id, None)
            trace = None if seq is None or seq.trace is None else seq.trace.to_data()
            out.append(
                {
                    "logprobs": [] if seq is None else seq.logprobs,
                    "error": None if seq is None else seq.error,
                    "trace": trace,
                }
            )
        gone = set(seq_ids)
        self.last_position = {k: v for k, v in self.last_position.items() if k[0] not in gone}
        if not self.sequences:  # rebuilt specs live as long as some sequence uses them
            self._specs.clear()
        return out

    def _spec(self, text: str):
        if text not in self._specs:
            self._specs[text] = wire.loads(text)
        return self._specs[text]

    def _strategy(self, text: str) -> tuple[TokenStrategy, tuple[Policy | None, ...]]:
        """A strategy and its branch policies, built once per spec (policy objects key routing groups)."""
        key = "branches:" + text
        if key not in self._specs:
            strategy = self._spec(text)
            self._specs[key] = (strategy, strategy.branches())
        return self._specs[key]


REGISTRY = Registry()
"""This process's sequences: shared by the router hooks and combiners of every in-process worker
(sequence ids are unique per front-end process, so engines in one process never collide)."""
