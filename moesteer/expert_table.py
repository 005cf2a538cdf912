"""The expert table: ranked (layer, expert, score, counts) rows of a detector (:mod:`moesteer.analysis.experts`),
saved as JSON, loaded by the ``steermoe`` and ``rice`` routing primitives."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from moesteer.json_files import load_json, save_json


@dataclass(frozen=True)
class ExpertScore:
    layer: int
    expert: int
    score: float
    counts: dict[str, int]


@dataclass(frozen=True)
class ExpertTable:
    """Ranked (layer, expert, score, counts) of one detector on one model."""

    method: str
    model: str
    moe_layers: tuple[int, ...]
    num_experts: int
    experts: tuple[ExpertScore, ...]

    def save(self, path: str | Path) -> Path:
        return save_json(path, asdict(self), indent=1)

    @classmethod
    def load(cls, path: str | Path) -> ExpertTable:
        def build(data: dict) -> ExpertTable:
            rows = tuple(ExpertScore(**row) for row in data.pop("experts"))
            return cls(**{**data, "moe_layers": tuple(data["moe_layers"]), "experts": rows})

        return load_json(path, "expert table", "make one with moesteer experts", build)

    def top(self, count: int, sign: int = 1) -> dict[int, tuple[int, ...]]:
        """The first ``count`` rows with a score of that sign (``+1``/``-1``), as ``{layer: experts}``."""
        chosen = [row for row in self.experts if row.score * sign > 0][:count]
        by_layer: dict[int, list[int]] = {}
        for row in chosen:
            by_layer.setdefault(row.layer, []).append(row.expert)
        return {layer: tuple(sorted(experts)) for layer, experts in sorted(by_layer.items())}
