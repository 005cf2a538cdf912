"""Trace files: the routing traces of a ``generate`` call's completions, saved as JSON
(``moesteer generate --trace-out``), read by the ``replay`` routing primitive."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from moesteer.json_files import load_json, save_json
from moesteer.sampling import Completion
from moesteer.trace import RoutingTrace

FORMAT = "moesteer-trace/1"


@dataclass(frozen=True)
class TracedCompletion:
    prompt_index: int
    sample_index: int
    text: str
    trace: RoutingTrace


@dataclass(frozen=True, eq=False)
class TraceFile:
    """The completions of one call on one model, each with its own request's routing trace."""

    model: str
    strategy: str
    num_experts: int
    moe_layers: tuple[int, ...]
    completions: tuple[TracedCompletion, ...]

    @classmethod
    def of(cls, completions: Sequence[Completion], lm, strategy: str) -> TraceFile:
        """The traced ``completions`` of ``lm`` (a :class:`moesteer.LM`) under ``strategy``."""
        traced = tuple(
            TracedCompletion(c.prompt_index, c.sample_index, c.text, c.trace)
            for c in completions
            if c.trace is not None
        )
        return cls(lm.name, strategy, lm.engine.routing_sizes()[0], tuple(lm.moe_layers), traced)

    def to_data(self) -> dict:
        """The file's JSON content."""
        return {
            "format": FORMAT,
            "model": self.model,
            "strategy": self.strategy,
            "num_experts": self.num_experts,
            "moe_layers": list(self.moe_layers),
            "completions": [
                {"prompt_index": c.prompt_index, "sample_index": c.sample_index, "text": c.text, **c.trace.to_data()}
                for c in self.completions
            ],
        }

    def save(self, path: str | Path) -> Path:
        return save_json(path, self.to_data())

    @classmethod
    def load(cls, path: str | Path) -> TraceFile:
        def build(data: dict) -> TraceFile:
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, not {FORMAT!r}")
            completions = tuple(
                TracedCompletion(int(c["prompt_index"]), int(c["sample_index"]), c["text"], RoutingTrace.from_data(c))
                for c in data["completions"]
            )
            layers = tuple(int(layer) for layer in data["moe_layers"])
            return cls(data["model"], data["strategy"], int(data["num_experts"]), layers, completions)

        return load_json(path, "moesteer trace file", "write one with moesteer generate --trace-out", build)

    def check(self, num_experts: int, moe_layers: tuple[int, ...]) -> None:
        """A one-line ``ValueError`` unless the file was recorded on a model of this shape."""
        if (self.num_experts, self.moe_layers) != (num_experts, tuple(moe_layers)):
            raise ValueError(
                f"the trace file was recorded on {self.model} ({self.num_experts} experts in MoE layers "
                f"{list(self.moe_layers)}); this model has {num_experts} in {list(moe_layers)}"
            )

    def trace(self, completion: int) -> RoutingTrace:
        if not 0 <= completion < len(self.completions):
            raise ValueError(f"completion {completion} is out of range: the trace file holds {len(self.completions)}")
        return self.completions[completion].trace
