"""What a server request may ask for: its strategy (a spec string or a model alias), its sampling.

Every check here runs in the API process before anything reaches vLLM's engine core; a refusal is
a ``ValueError`` whose one line is what ``moesteer generate`` prints after ``error:`` for the same
spec (the server answers it with a 400).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from moesteer.routing import Capacity, Policy
from moesteer.sampling import SamplingParams
from moesteer.strategies import spec
from moesteer.strategies.base import Controller
from moesteer.strategies.c3po import C3PO
from moesteer.strategies.rerouting import Rerouting
from moesteer.strategy import Strategy, TokenStrategy

STRATEGY_KEY = "moesteer"
"""The ``vllm_xargs`` entry naming a request's strategy: a spec string, e.g. ``scmoe(beta=0.5)``."""
TRACE_KEY = "moesteer_trace"
"""The ``vllm_xargs`` entry asking for branch 0's routed experts in each choice's ``routed_experts``."""
ALLOWABLE = ("capacity", "gradients")
"""What ``moesteer serve --allow`` can switch on: ``capacity`` couples co-scheduled requests,
``gradients`` runs C3PO and rerouting on an HF copy of the model in the API process."""

# vLLM sampling fields moesteer's decoding rule does not apply, with their neutral values: a steered
# request that sets one is refused rather than silently decoded without it
_UNSTEERABLE = {
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_p": 0.0,
    "min_tokens": 0,
    "logit_bias": None,
    "allowed_token_ids": None,
    "bad_words": None,
    "structured_outputs": None,
    "prompt_logprobs": None,
}


@dataclass(frozen=True)
class ServeOptions:
    """What a server serves beyond token strategies.

    Args:
        aliases: alias → spec text; ``model="<served>+<alias>"`` runs that spec.
        data_dir: the folder whose files strategies may read (``steermoe``, ``rice``, ``replay``,
            ``c3po``'s references); ``None``: no file-reading strategy is served.
        allow: opt-ins from :data:`ALLOWABLE`.
    """

    aliases: dict[str, str] = field(default_factory=dict)
    data_dir: Path | None = None
    allow: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        unknown = sorted(set(self.allow) - set(ALLOWABLE))
        if unknown:
            raise ValueError(f"--allow {unknown[0]!r} is not one of {', '.join(ALLOWABLE)}")
        for alias, text in self.aliases.items():
            if not alias or not all(c.isalnum() or c in "-_." for c in alias):
                raise ValueError(f"alias {alias!r}: use letters, digits, '-', '_' or '.'")
            check_served(spec.parse(text), self)


def parse_aliases(items: tuple[str, ...]) -> dict[str, str]:
    """``--alias NAME=SPEC`` options as a dict (each name once)."""
    aliases: dict[str, str] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name or not text.strip():
            raise ValueError(f"bad --alias {item!r}: expected NAME=SPEC, e.g. --alias scmoe='scmoe(beta=0.5)'")
        if name in aliases:
            raise ValueError(f"alias {name!r} is given twice")
        aliases[name] = text.strip()
    return aliases


def request_strategy(value: object, options: ServeOptions) -> Strategy:
    """The strategy a request's ``vllm_xargs["moesteer"]`` names, once it is served here."""
    if not isinstance(value, str):
        raise ValueError(
            f"vllm_xargs[{STRATEGY_KEY!r}] must be a strategy spec string, e.g. 'scmoe(beta=0.5)', "
            f"not a {type(value).__name__}"
        )
    strategy = spec.parse(value)
    check_served(strategy, options)
    return strategy


def check_served(strategy: Strategy, options: ServeOptions) -> None:
    """Refuse what this server does not serve: gradient controllers and capacity unless allowed,
    files outside the data folder."""
    for part in parts(strategy):
        name = getattr(part, "name", type(part).__name__)
        if isinstance(part, C3PO | Rerouting) and "gradients" not in options.allow:
            raise ValueError(
                f"{name} optimises routing with gradients on an HF copy of the model in the server process; "
                "start the server with --allow gradients"
            )
        if isinstance(part, Capacity) and "capacity" not in options.allow:
            raise ValueError(
                "capacity couples the requests scheduled together (their tokens share expert slots); "
                "start the server with --allow capacity"
            )
        if getattr(part, "verifier", None) == "prm":
            raise ValueError(
                f"{name}: verifier='prm' loads a reward model into the server process, which this server does not "
                "serve; use verifier='confidence' or a rule verifier"
            )
        for path in _file_fields(part):
            check_data_file(path, options.data_dir)


def check_data_file(path: str, data_dir: Path | None) -> None:
    """``path`` (as the CLI reads it) must lie inside ``data_dir``, symbolic links resolved."""
    if data_dir is None:
        raise ValueError(f"this server reads no files ({path!r}); start it with --data-dir DIR and put the file there")
    resolved = Path(os.path.realpath(path))
    if not resolved.is_relative_to(Path(os.path.realpath(data_dir))):
        raise ValueError(f"{path!r} is outside the server's --data-dir; name a file inside it")


def _file_fields(part: object) -> list[str]:
    names = getattr(type(part), "files", ())
    if isinstance(part, C3PO):
        names = ("refs",)
    return [value for name in names if isinstance(value := getattr(part, name, None), str)]


def parts(obj: object, seen: set[int] | None = None) -> Iterator[object]:
    """Every strategy and routing primitive inside ``obj`` (fields, nested strategies, branch policies)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, tuple | list):
        for item in obj:
            yield from parts(item, seen)
        return
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return
    yield obj
    for f in dataclasses.fields(obj):
        yield from parts(getattr(obj, f.name), seen)
    if isinstance(obj, Policy):
        yield from parts(obj.steps, seen)
    if isinstance(obj, TokenStrategy):
        yield from parts(obj.branches(), seen)


def check_request(strategy: Strategy, params, *, stream: bool) -> None:
    """Refuse vLLM sampling fields a steered request cannot honour (``params``: vLLM's ``SamplingParams``)."""
    for name, neutral in _UNSTEERABLE.items():
        value = getattr(params, name, neutral)
        unset = value is None or value == neutral or (neutral is None and not value)
        if not unset and not (name == "prompt_logprobs" and value == 0):
            hint = "echo with logprobs" if name == "prompt_logprobs" else name
            raise ValueError(f"{hint} is not applied by moesteer's decoding rule; drop it from a steered request")
    if isinstance(strategy, Controller):
        if stream:
            raise ValueError(f"{strategy.spec()} runs as a whole (a search or a vote); drop stream")
        if params.logprobs is not None:
            raise ValueError(f"{strategy.spec()} returns no per-token log-probs; drop logprobs")
    elif params.logprobs is not None and len(strategy.branches()) > 1:
        raise ValueError(
            f"logprobs with {strategy.spec()}: vLLM's log-probs would be one branch's, not the combined "
            "distribution; drop logprobs or use a one-branch strategy"
        )


def sampling_of(params) -> SamplingParams:
    """moesteer's sampling for vLLM's ``params``: the fields of ``moesteer generate``, whose seed
    defaults to 0 (sampling and routing noise alike), so a request without one repeats."""
    seed = 0 if params.seed is None else params.seed
    stop = params.stop if isinstance(params.stop, list) else [params.stop] if params.stop else []
    return SamplingParams(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=max(params.top_k, 0),
        max_tokens=params.max_tokens,
        stop=tuple(stop),
        seed=seed,
        n=params.n,
        ignore_eos=params.ignore_eos,
    )
