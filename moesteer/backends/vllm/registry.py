"""What travels with each vLLM request, and what a worker keeps of the sequences in flight.

Each vLLM request is one branch row of one sequence. Its ``SamplingParams.extra_args["moesteer"]``
is JSON-safe data (:func:`row_args`): the sequence id and branch, the chunk it was submitted with
(the lock-step scheduler releases a chunk whole), the strategy and sampling as wire text
(:mod:`moesteer.backends.vllm.wire`), the noise keys, the EOS ids and whether to trace. vLLM's msgpack serialiser
carries it to a separate engine core and to every worker; only names and numbers cross.

In each worker process, :data:`REGISTRY` rebuilds a sequence the first time one of its rows is seen
(equal specs share one rebuilt object, so they share routing groups) and keeps what decoding it
produces — combined log-probs, an error, branch 0's routing trace — until the front end collects
it with ``collective_rpc("moesteer_pop")``. The router hook records, per step, the last position
it scheduled for each row, which tells the combiner whether all branches of a sequence sample now.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moesteer.backends.vllm import wire
from moesteer.decoding import NonFiniteScores
from moesteer.routing import Policy
from moesteer.sampling import SamplingParams
from moesteer.strategy import TokenStrategy
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
    error: dict | None = None  # set by the branch rule (:func:`error_data`); the engine raises it when the call returns
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


class SplitBranches(RuntimeError):
    """The branches of a sequence were not scheduled in the same step (vLLM preempted or aborted one,
    or a step budget chunked their prefill): the sequence is ended; a server answers 503 (retry)."""


STEP_ERRORS: dict[str, type[Exception]] = {"non_finite": NonFiniteScores, "split": SplitBranches}


def error_data(error: Exception) -> dict:
    """A sequence's error as JSON-safe data (it crosses from the workers with the results)."""
    kind = next(name for name, cls in STEP_ERRORS.items() if isinstance(error, cls))
    return {"kind": kind, "message": str(error)}


def step_error(data: dict) -> Exception:
    """The exception :func:`error_data` described."""
    return STEP_ERRORS[data["kind"]](data["message"])


_ROW_FIELDS = {
    "seq": int,
    "branch": int,
    "chunk": int,
    "rows": int,
    "strategy": str,
    "sampling": str,
    "prompt_key": int,
    "sample": int,
    "prompt_len": int,
    "offset": int,
    "trace": (bool, int),
    "eos": list,
}


def check_row_data(value: object) -> dict:
    """``value`` if it is moesteer's row data (:func:`row_args`' fields and types), else a one-line
    ``ValueError``: what :class:`~moesteer.backends.vllm.combiner.BranchCombiner` answers (a 400 from
    vLLM's server) to a request whose ``extra_args["moesteer"]`` a client made up."""
    if not isinstance(value, dict):
        raise ValueError(
            f"extra_args[{EXTRA_ARGS_KEY!r}] is moesteer's internal row data, not a {type(value).__name__}: send a "
            "strategy through moesteer's engine or server, which fills it"
        )
    for name, kind in _ROW_FIELDS.items():
        field_value = value.get(name)
        if not isinstance(field_value, kind) or (kind is int and isinstance(field_value, bool)):
            raise ValueError(
                f"extra_args[{EXTRA_ARGS_KEY!r}][{name!r}] is missing or not a {getattr(kind, '__name__', 'bool')}"
            )
    if value["rows"] < 1 or not 0 <= value["branch"] < value["rows"]:
        raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}]: branch {value['branch']} of {value['rows']} rows")
    if not all(isinstance(e, int) for e in value["eos"]):
        raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}]['eos'] must be a list of token ids")
    return value


def row_data(extra_args: dict | None) -> dict | None:
    """A request's moesteer row data, or ``None`` when it has none or the entry is malformed."""
    value = (extra_args or {}).get(EXTRA_ARGS_KEY)
    if value is None:
        return None
    try:
        return check_row_data(value)
    except ValueError:
        return None


class Registry:
    """A worker's sequences in flight (rebuilt from their requests' ``extra_args``) and the rows
    scheduled in the current step."""

    def __init__(self) -> None:
        self.sequences: dict[int, Sequence] = {}
        self.last_position: dict[RowId, int] = {}
        self._specs: dict[str, object] = {}

    def lookup(self, extra_args: dict | None) -> tuple[RowId, Sequence] | None:
        """The row key and sequence of a request (``None``: not one of moesteer's, or an entry that
        is not moesteer's row data, which routes as the model does: nothing a client sends may
        raise inside the engine)."""
        args = row_data(extra_args)
        if args is None:
            return None
        seq_id = args["seq"]
        seq = self.sequences.get(seq_id)
        if seq is None:
            try:
                strategy, branches = self._strategy(args["strategy"])
                sampling = self._spec(args["sampling"])
            except (ValueError, TypeError, KeyError):
                return None
            seq = Sequence(
                strategy,
                branches,
                sampling,
                args["prompt_key"],
                args["sample"],
                args["prompt_len"],
                offset=args["offset"],
                trace=RoutingTrace() if args["trace"] else None,
                eos=tuple(args["eos"]),
            )
            self.sequences[seq_id] = seq
        if not 0 <= args["branch"] < len(seq.branches):
            return None
        return RowId(seq_id, args["branch"]), seq

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
