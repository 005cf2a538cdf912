"""Routing traces: which experts each token went to, per MoE layer, with their weights."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class RouterRecord:
    """One router call: ``experts [B, S, K]`` (``-1`` = inactive slot), ``weights [B, S, K]`` and,
    when the trace asks for it, the router's full distribution ``probs [B, S, E]`` (HF only)."""

    layer: int
    experts: Tensor
    weights: Tensor
    probs: Tensor | None = None


@dataclass
class RoutingTrace:
    """Records of every router call while it is attached to a handle, in call order.
    ``distributions=True`` also keeps every token's full router distribution over the experts."""

    records: list[RouterRecord] = field(default_factory=list)
    distributions: bool = False

    def add(self, layer: int, experts: Tensor, weights: Tensor, probs: Tensor | None = None) -> None:
        kept = probs.detach().float().cpu() if probs is not None and self.distributions else None
        self.records.append(RouterRecord(layer, experts.detach().cpu(), weights.detach().float().cpu(), kept))

    def layers(self) -> list[int]:
        return sorted({r.layer for r in self.records})

    def joined(self, row: int = 0) -> dict[int, RouterRecord]:
        """Batch row ``row``'s router calls per layer, joined along positions in call order (one
        decode's calls: the prefill's positions, then one per step): ``experts [1, P, K]``, ``weights``."""
        calls: dict[int, list[RouterRecord]] = {}
        for record in self.records:
            calls.setdefault(record.layer, []).append(record)
        return {
            layer: RouterRecord(
                layer,
                torch.cat([r.experts[row : row + 1] for r in rs], 1),
                torch.cat([r.weights[row : row + 1] for r in rs], 1),
            )
            for layer, rs in calls.items()
        }

    def active_counts(self, layer: int) -> Tensor:
        """Number of active experts for each token of every call at ``layer``, flattened."""
        return torch.cat([(r.experts >= 0).sum(-1).flatten() for r in self.records if r.layer == layer])

    def expert_load(self, num_experts: int) -> Tensor:
        """Counts ``[num_layers, E]`` of active (token, expert) assignments, layers in ``layers()`` order."""
        load = torch.zeros(len(self.layers()), num_experts, dtype=torch.long)
        row = {layer: i for i, layer in enumerate(self.layers())}
        for r in self.records:
            chosen = r.experts[r.experts >= 0]
            load[row[r.layer]] += torch.bincount(chosen, minlength=num_experts)
        return load
