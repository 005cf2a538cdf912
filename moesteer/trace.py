"""Routing traces: which experts each token went to, per MoE layer, with their weights.

A trace records router calls as the batch saw them: a record's batch row ``b`` is the request and
branch ``rows[b]`` (a :class:`RowId`), and its ``positions [B, S]`` give each token's absolute
position (``-1`` for padding and for rows that were not fed in that forward). :meth:`RoutingTrace.request` takes
one request's routing out of a batch's trace, following it through forks: a sequence forked from
another shares its parent's calls up to the fork (a prefill that stood for every sample of a
prompt, a search step's expansion). Both backends hand each completion its own request's trace.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor


class RowId(NamedTuple):
    """Who a batch row is: a request (the session's sequence id on HF, the engine's sequence id
    on vLLM) and one of its strategy's branches."""

    request: int
    branch: int


@dataclass(frozen=True)
class RouterRecord:
    """One router call: ``experts [B, S, K]`` (``-1`` = inactive slot), ``weights [B, S, K]`` and,
    when the trace asks for it, the router's full distribution ``probs [B, S, E]`` (HF only).
    ``rows`` names each batch row (empty for a forward outside a decode, e.g. ``steer()``'s), and
    ``positions [B, S]`` are absolute positions, ``-1`` where a token is padding (``None``: all
    tokens are real)."""

    layer: int
    experts: Tensor
    weights: Tensor
    probs: Tensor | None = None
    rows: tuple[RowId, ...] = ()
    positions: Tensor | None = None

    def real(self) -> Tensor:
        """``[B, S]``: which tokens were routed for a request (not padding)."""
        if self.positions is None:
            return torch.ones(self.experts.shape[:2], dtype=torch.bool)
        return self.positions >= 0

    def taken(self, take: Callable[[Tensor], Tensor], rows: tuple[RowId, ...]) -> RouterRecord:
        """This call with ``take`` applied to each of its tensors, its rows named ``rows``."""
        fields = [None if t is None else take(t) for t in (self.experts, self.weights, self.probs, self.positions)]
        experts, weights, probs, positions = fields
        return RouterRecord(self.layer, experts, weights, probs, rows, positions)

    def split_rows(self) -> list[RouterRecord]:
        """Each batch row alone, its real tokens only: ``experts [1, n, K]`` (views of this record's
        tensors where a row has no padding)."""
        tensors = (self.experts, self.weights, self.probs, self.positions)
        views = [None if t is None else t.unsqueeze(1).unbind(0) for t in tensors]
        padded = [False] * len(self.rows) if self.positions is None else (self.positions < 0).any(-1).tolist()
        out = []
        for b, row in enumerate(self.rows):
            if padded[b]:
                keep = self.positions[b] >= 0
                out.append(self.taken(lambda t, b=b, keep=keep: t[b, keep][None], (row,)))
            else:
                experts, weights, probs, positions = (None if v is None else v[b] for v in views)
                out.append(RouterRecord(self.layer, experts, weights, probs, (row,), positions))
        return out


@dataclass
class RoutingTrace:
    """Records of every router call while it is attached to a handle, in call order, and the forks
    between requests (``forks[child] = (parent, number of records before the fork)``).
    ``distributions=True`` also keeps every token's full router distribution over the experts."""

    records: list[RouterRecord] = field(default_factory=list)
    distributions: bool = False
    forks: dict[int, tuple[int, int]] = field(default_factory=dict)
    _split: tuple[int, int, dict[int, RoutingTrace]] | None = field(default=None, repr=False, compare=False)

    def add(
        self,
        layer: int,
        experts: Tensor,
        weights: Tensor,
        probs: Tensor | None = None,
        *,
        rows: tuple[RowId, ...] = (),
        positions: Tensor | None = None,
    ) -> None:
        kept = probs.detach().float().cpu() if probs is not None and self.distributions else None
        where = None if positions is None else positions.detach().to("cpu", torch.long)
        self.records.append(
            RouterRecord(layer, experts.detach().cpu(), weights.detach().float().cpu(), kept, tuple(rows), where)
        )

    def fork(self, parent: int, child: int) -> None:
        """Request ``child`` starts as a copy of ``parent``: it shares every call recorded so far."""
        self.forks[child] = (parent, len(self.records))

    def requests(self) -> list[int]:
        """The requests that have rows in this trace, in order of first appearance."""
        return list(dict.fromkeys(row.request for r in self.records for row in r.rows))

    def request(self, request: int, branch: int | None = None) -> RoutingTrace:
        """Request ``request``'s routing (one branch, or all): its own rows and, before each fork
        that made it, its ancestors' rows, one row per record with its real tokens only."""
        found = self.split().get(request, RoutingTrace(distributions=self.distributions))
        return found if branch is None else found.branch(branch)

    def split(self) -> dict[int, RoutingTrace]:
        """Every request's :meth:`request` trace, from one pass over the records (kept until more
        records or forks arrive; records are only ever appended)."""
        stamp = (len(self.records), len(self.forks))
        if self._split is not None and self._split[:2] == stamp:
            return self._split[2]
        own: dict[int, list[tuple[int, RouterRecord]]] = {}
        for at, record in enumerate(self.records):
            for sliced in record.split_rows():
                if sliced.experts.shape[1]:
                    own.setdefault(sliced.rows[0].request, []).append((at, sliced))
        out = {}
        for request in own.keys() | self.forks.keys():
            spans, owner, end = [], request, len(self.records)
            while True:  # the request's own calls, then each ancestor's before the fork that led here
                parent, at = self.forks.get(owner, (None, 0))
                spans.append((owner, at, end))
                if parent is None:
                    break
                owner, end = parent, at
            records = [
                r if owner == request else _renamed(r, request)
                for owner, first, last in reversed(spans)
                for at, r in own.get(owner, ())
                if first <= at < last
            ]
            out[request] = RoutingTrace(records, self.distributions)
        self._split = (*stamp, out)
        return out

    def branch(self, branch: int) -> RoutingTrace:
        """The calls of the rows of branch ``branch`` (records without row names are kept whole)."""
        out = RoutingTrace(distributions=self.distributions, forks=dict(self.forks))
        for r in self.records:
            keep = [i for i, row in enumerate(r.rows) if row.branch == branch]
            if not r.rows or len(keep) == len(r.rows):
                out.records.append(r)
            elif keep:
                index = torch.tensor(keep)
                out.records.append(r.taken(lambda t, index=index: t[index], tuple(r.rows[i] for i in keep)))
        return out

    def branches(self) -> list[int]:
        return sorted({row.branch for r in self.records for row in r.rows})

    def layers(self) -> list[int]:
        return sorted({r.layer for r in self.records})

    def to_data(self) -> dict:
        """The trace as JSON-safe lists (exact: float32 weights round-trip through Python floats)."""
        return {
            "records": [
                {
                    "layer": r.layer,
                    "experts": r.experts.tolist(),
                    "weights": r.weights.tolist(),
                    "probs": None if r.probs is None else r.probs.tolist(),
                    "rows": [list(row) for row in r.rows],
                    "positions": None if r.positions is None else r.positions.tolist(),
                }
                for r in self.records
            ],
            "forks": [[child, parent, at] for child, (parent, at) in self.forks.items()],
            "distributions": self.distributions,
        }

    @classmethod
    def from_data(cls, data: dict) -> RoutingTrace:
        """The trace :meth:`to_data` wrote."""
        tensor = lambda values, dtype: None if values is None else torch.tensor(values, dtype=dtype)  # noqa: E731
        records = [
            RouterRecord(
                int(r["layer"]),
                tensor(r["experts"], torch.long),
                tensor(r["weights"], torch.float32),
                tensor(r["probs"], torch.float32),
                tuple(RowId(int(request), int(branch)) for request, branch in r["rows"]),
                tensor(r["positions"], torch.long),
            )
            for r in data["records"]
        ]
        forks = {int(child): (int(parent), int(at)) for child, parent, at in data["forks"]}
        return cls(records, bool(data["distributions"]), forks)

    def joined(self, branch: int = 0) -> dict[int, RouterRecord]:
        """One request's routing per layer along positions ``0..P-1``: ``experts [1, P, K]``,
        ``weights``; where a position was routed twice (a rebuilt cache), the later call counts.
        Records without positions (one teacher-forced forward) join in call order. The trace must
        hold one request (slice a batch's with :meth:`request`); its padding is left out."""
        named = self.requests()
        if len(named) > 1:
            raise ValueError(f"the trace holds requests {named}; take one with trace.request(id)")
        calls: dict[int, list[RouterRecord]] = {}
        for record in self.records:
            for row in record.split_rows() if record.rows else [record]:
                if not row.rows or row.rows[0].branch == branch:
                    calls.setdefault(record.layer, []).append(row)
        return {layer: _along_positions(layer, records) for layer, records in calls.items()}

    def active_counts(self, layer: int) -> Tensor:
        """Number of active experts for each real token of every call at ``layer``, flattened."""
        return torch.cat([(r.experts >= 0).sum(-1)[r.real()] for r in self.records if r.layer == layer])

    def expert_load(self, num_experts: int) -> Tensor:
        """Counts ``[num_layers, E]`` of active (token, expert) assignments of real tokens, layers in
        ``layers()`` order."""
        load = torch.zeros(len(self.layers()), num_experts, dtype=torch.long)
        row = {layer: i for i, layer in enumerate(self.layers())}
        for r in self.records:
            chosen = r.experts[r.real()]
            load[row[r.layer]] += torch.bincount(chosen[chosen >= 0], minlength=num_experts)
        return load


def _renamed(record: RouterRecord, request: int) -> RouterRecord:
    return dataclasses.replace(record, rows=tuple(RowId(request, row.branch) for row in record.rows))


def _along_positions(layer: int, records: list[RouterRecord]) -> RouterRecord:
    """One row's calls of one layer as one record over positions 0..P-1 (slots padded to the widest
    call with inactive ``-1`` / weight 0)."""
    width = max(r.experts.shape[-1] for r in records)
    pad = lambda t, fill: torch.nn.functional.pad(t, (0, width - t.shape[-1]), value=fill)  # noqa: E731
    experts = [pad(r.experts[0], -1) for r in records]
    weights = [pad(r.weights[0], 0.0) for r in records]
    if any(r.positions is None for r in records):
        return RouterRecord(layer, torch.cat(experts)[None], torch.cat(weights)[None])
    positions = torch.cat([r.positions[0] for r in records])
    calls = torch.arange(len(positions))
    last = torch.full((int(positions.max()) + 1,), -1).scatter_reduce(0, positions, calls, reduce="amax")
    missing = (last < 0).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"layer {layer}: the trace has no routing for positions {missing[:8]}")
    return RouterRecord(  # the last call at each position counts
        layer, torch.cat(experts)[last][None], torch.cat(weights)[last][None], positions=torch.arange(len(last))[None]
    )
