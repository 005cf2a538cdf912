"""Replayed routing: force the experts and weights a trace recorded, from a routing trace or a
trace file (``moesteer generate --trace-out``)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from moesteer.json_files import read_cached
from moesteer.routing.call import RouterCall, RouterSite, Selection, pad_selection
from moesteer.routing.policy import Primitive, RouterEdit, Stage, check_moe_layers
from moesteer.trace import RoutingTrace
from moesteer.trace_file import TraceFile


@dataclass(frozen=True, eq=False)
class Replay(Primitive):
    """Force a recorded routing: at absolute position t of MoE layer l, exactly the experts and
    mixing weights of ``experts[l][t]`` / ``weights[l][t]`` (``[positions, K]``, expert ``-1`` =
    an inactive slot). :meth:`from_trace` reads them from the routing trace of a one-prompt run, so
    a run replayed under its own trace reproduces its tokens (weights are replayed in float32: bit
    for bit on float32 models). Positions outside the recording are an error."""

    experts: Mapping[int, Tensor]
    weights: Mapping[int, Tensor]

    @classmethod
    def from_trace(cls, trace: RoutingTrace, branch: int = 0) -> Replay:
        """Branch ``branch``'s routing in ``trace``, one request's (a completion's ``trace``, or
        ``batch_trace.request(id)``), at every position from the first prompt token."""
        joined = trace.joined(branch)
        if not joined:
            raise ValueError("Replay: the trace holds no router calls")
        return cls({k: r.experts[0] for k, r in joined.items()}, {k: r.weights[0] for k, r in joined.items()})

    def apply(self, edit: RouterEdit, site: RouterSite) -> bool:
        if site.layer not in self.experts:
            return False
        ids = self.experts[site.layer]
        edit.k, edit.ranks = ids.shape[-1], None
        edit.stages.append(Recorded(ids, self.weights[site.layer]))
        return True

    def check(self, num_experts: int, moe_layers: tuple[int, ...]) -> None:
        check_moe_layers(sorted(self.experts), moe_layers, "Replay")
        if any(int(ids.max()) >= num_experts for ids in self.experts.values()):
            raise ValueError(f"Replay: the recording routes to experts beyond the model's {num_experts}")


@dataclass(frozen=True)
class ReplayFile(Primitive):
    """Force the routing recorded in a trace file.

    ``replay('trace.json', completion=0)``: :class:`Replay` of one completion's routing (branch
    ``branch``) from a trace file (``moesteer generate --trace-out``), so that a recorded run can
    be forced from the command line; on a Ray cluster the file must be readable by every worker.

    Args:
        path: the trace file (``moesteer generate --trace-out``).
        completion: which completion of the file to replay (0 = the first).
        branch: which branch of that completion (0 = the first).

    Example: replay('run.json', completion=0)
    """

    name: ClassVar[str] = "replay"
    files: ClassVar[tuple[str, ...]] = ("path",)

    path: str
    completion: int = 0
    branch: int = 0

    def __post_init__(self) -> None:
        for field_name in ("completion", "branch"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"replay: {field_name} must be an integer >= 0, got {value!r}")

    def recorded(self) -> Replay:
        return _replay(read_cached(TraceFile.load, self.path), self.completion, self.branch)

    def apply(self, edit: RouterEdit, site: RouterSite) -> bool:
        return self.recorded().apply(edit, site)

    def check(self, num_experts: int, moe_layers: tuple[int, ...]) -> None:
        read_cached(TraceFile.load, self.path).check(num_experts, moe_layers)
        self.recorded().check(num_experts, moe_layers)


@functools.lru_cache(maxsize=16)
def _replay(trace_file: TraceFile, completion: int, branch: int) -> Replay:
    return Replay.from_trace(trace_file.trace(completion), branch)


@dataclass(frozen=True, eq=False)
class Recorded(Stage):
    """One layer's recorded routing: ``experts`` and ``weights`` ``[positions, K]`` (expert ``-1``:
    an inactive slot), taken at the tokens' positions and padded to the call's slots at weight 0.
    Positions beyond the recording are refused; the check reads the device (a host sync) only when
    the keys' host-side ``bound`` does not already rule them out."""

    experts: Tensor
    weights: Tensor

    def route(self, call: RouterCall) -> Selection:
        keys, recorded_ids = call.keys, self.experts
        if keys.bound is None or keys.bound > len(recorded_ids):
            last = int(keys.position.max()) if len(keys.position) else -1
            if last >= len(recorded_ids):
                raise ValueError(
                    f"Replay: layer {call.site.layer} is recorded for positions < {len(recorded_ids)}, not {last}"
                )
        device = call.logits.device
        ids, weights = recorded_ids.to(device)[keys.position], self.weights.to(device)[keys.position]
        recorded = ids >= 0
        index, padded, active = pad_selection(
            call.logits, ids.clamp(min=0), torch.where(recorded, weights, 0.0), call.n_slots
        )
        return index, padded, torch.cat([recorded, active[:, ids.shape[1] :]], dim=1)
