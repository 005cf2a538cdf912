"""Router interception: patch every router's instance ``forward``, route through policies, restore.

Only the router instances' ``forward`` attribute changes (module classes, parameters, output-capture
hooks and expert kernels stay as transformers built them). Each forward of the model carries a
:class:`BatchLayout` saying which policy and which noise keys each batch row has; rows that share a
policy object are routed together, rows without one take the model's own router (bit-identical).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MethodType

import torch
from torch import Tensor, nn

from moesteer.models.adapters import FamilyAdapter, find_routers, get_adapter
from moesteer.routing import EditCache, Policy, RouterSite, Scoped
from moesteer.routing.call import TokenKeys
from moesteer.routing.pipeline import route_tokens
from moesteer.trace import RoutingTrace, RowId

_HANDLE_ATTR = "_moesteer_router_handle"


@dataclass
class BatchLayout:
    """Per-row routing for the next forward: ``policies[b]`` (``None`` = the model's own routing),
    noise keys ``prompt[b]``, ``sample[b]``, ``branch[b]``, the absolute ``positions [B, S]`` and,
    for position-scoped policies, each row's ``prompt_lengths [B]``. For the routing trace, a
    session also says who each row is (``rows``) and which tokens are real (``real [B, S]``; the
    others are padding or rows not fed in this forward)."""

    policies: Sequence[Policy | None]
    prompt: Tensor
    sample: Tensor
    branch: Tensor
    positions: Tensor
    seed: int = 0
    prompt_lengths: Tensor | None = None
    rows: Sequence[RowId] = ()
    real: Tensor | None = None
    bound: int | None = None  # every position is below it, known on the host (saves Replay a device read)
    _groups: list[tuple[Policy | None, Tensor | None]] | None = field(default=None, repr=False)
    _by_width: dict[int, tuple[list, TokenKeys]] = field(default_factory=dict, repr=False)

    @classmethod
    def uniform(cls, policy: Policy | None, positions: Tensor, seed: int = 0) -> BatchLayout:
        rows = positions.shape[0]
        ids = torch.arange(rows, device=positions.device)
        return cls([policy] * rows, ids, torch.zeros_like(ids), torch.zeros_like(ids), positions, seed)

    def groups(self) -> list[tuple[Policy | None, Tensor | None]]:
        """``(policy, rows)`` for each distinct policy object; ``rows`` is ``None`` for all rows."""
        if self._groups is None:
            by_id: dict[int, tuple[Policy | None, list[int]]] = {}
            for row, policy in enumerate(self.policies):
                by_id.setdefault(id(policy), (policy, []))[1].append(row)
            if len(by_id) == 1:
                self._groups = [(self.policies[0], None)]
            else:
                device = self.positions.device
                self._groups = [(p, torch.tensor(r, device=device)) for p, r in by_id.values()]
        return self._groups

    @staticmethod
    def row_tokens(rows: Tensor, tokens_per_row: int) -> Tensor:
        """Flat token indices of ``rows`` when every row routes ``tokens_per_row`` tokens."""
        return (rows[:, None] * tokens_per_row + torch.arange(tokens_per_row, device=rows.device)).flatten()

    def tokens(self, tokens_per_row: int) -> tuple[list[tuple[Policy | None, Tensor | None]], TokenKeys]:
        """:meth:`token_groups` and :meth:`token_keys` of a forward, computed once for all its layers
        (a :class:`Scoped` policy's split reads the device once per forward, not once per layer)."""
        if tokens_per_row not in self._by_width:
            self._by_width[tokens_per_row] = (self.token_groups(tokens_per_row), self.token_keys(tokens_per_row))
        return self._by_width[tokens_per_row]

    def token_groups(self, tokens_per_row: int) -> list[tuple[Policy | None, Tensor | None]]:
        """``(policy, flat token indices)`` groups (``None`` = all tokens); a :class:`Scoped` policy
        routes the tokens it selects and leaves the others to the model's own routing."""
        groups: list[tuple[Policy | None, Tensor | None]] = []
        for policy, rows in self.groups():
            if not isinstance(policy, Scoped):
                groups.append((policy, None if rows is None else self.row_tokens(rows, tokens_per_row)))
                continue
            if self.prompt_lengths is None:
                raise ValueError(f"{policy} is scoped to positions, but this forward has no prompt lengths")
            if rows is None:
                rows = torch.arange(len(self.policies), device=self.positions.device)
            positions = self.positions[rows, -tokens_per_row:]
            inside = policy.selects(positions, self.prompt_lengths.to(positions.device)[rows, None]).flatten()
            tokens = self.row_tokens(rows, tokens_per_row)
            groups += [(policy, tokens[inside]), (None, tokens[~inside])]
        return [(p, t) for p, t in groups if t is None or len(t)]

    def token_keys(self, tokens_per_row: int) -> TokenKeys:
        """Noise keys of the last ``tokens_per_row`` positions of every row, flattened row-major."""
        rows = torch.arange(len(self.policies), device=self.positions.device).repeat_interleave(tokens_per_row)
        positions = self.positions[:, -tokens_per_row:].flatten()
        return TokenKeys(
            self.prompt[rows],
            self.sample[rows],
            self.branch[rows],
            positions,
            self.seed,
            decode=tokens_per_row == 1,
            bound=self.bound,
        )


class RouterHandle:
    """Owns the patched routers of one model until :meth:`remove` (always call it; see ``steer``)."""

    def __init__(self, model: nn.Module, *, trace: RoutingTrace | None = None) -> None:
        if getattr(model, _HANDLE_ATTR, None) is not None:
            raise ValueError("this model is already steered; exit the active steer() block first (no nesting)")
        self.model = model
        self.adapter: FamilyAdapter = get_adapter(model.config)
        self.routers = find_routers(model, self.adapter)
        self.sites = {
            layer: RouterSite(layer, i, len(self.routers), int(r.num_experts), int(r.top_k))
            for i, (layer, r) in enumerate(self.routers.items())
        }
        self.facts = {layer: self.adapter.scoring.facts(router) for layer, router in self.routers.items()}
        self.layout: BatchLayout | None = None
        self.trace = trace
        self.edits = EditCache(self.sites)
        self.patched: list[nn.Module] = []
        try:
            for layer, router in self.routers.items():
                if "forward" in vars(router):
                    raise ValueError(
                        f"the router of layer {layer} already has a patched forward; refusing to stack patches"
                    )
                router.forward = MethodType(_make_forward(self, layer), router)
                self.patched.append(router)
        except BaseException:
            self.remove()  # no partial patch outlives a failed install
            raise
        setattr(model, _HANDLE_ATTR, self)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(self.sites)

    @property
    def num_experts(self) -> int:
        return next(iter(self.sites.values())).num_experts

    def check(self, policy: Policy | None) -> None:
        """Validate a policy against this model (``ValueError`` naming the bad value)."""
        if policy is not None:
            policy.check(self.num_experts, self.moe_layers)

    @contextmanager
    def routing(self, layout: BatchLayout | None) -> Iterator[None]:
        """Route the forwards inside the block under ``layout``; the previous layout comes back on exit."""
        saved, self.layout = self.layout, layout
        try:
            yield
        finally:
            self.layout = saved

    def remove(self) -> None:
        """Restore every router this handle patched (and only those)."""
        while self.patched:
            vars(self.patched.pop()).pop("forward", None)
        if getattr(self.model, _HANDLE_ATTR, None) is self:
            delattr(self.model, _HANDLE_ATTR)
        self.layout = None

    def route(self, layer: int, router: nn.Module, original, hidden: Tensor) -> tuple:
        layout = self.layout
        groups = layout.groups() if layout is not None else [(None, None)]
        scoring = self.adapter.scoring
        if all(self.edits.get(policy, layer) is None for policy, _ in groups):
            outputs = original(hidden)
            if self.trace is not None:
                _, weights, index = self.adapter.unpack(outputs)
                logits = scoring.logits(router, hidden) if self.trace.distributions else None
                self._record(layer, index, weights, torch.ones_like(index, dtype=torch.bool), logits)
            return outputs
        assert layout is not None  # edits exist only under a layout
        logits = scoring.logits(router, hidden)
        tokens_per_row = logits.shape[0] // len(layout.policies)
        if tokens_per_row * len(layout.policies) != logits.shape[0]:
            raise RuntimeError(f"router saw {logits.shape[0]} tokens for {len(layout.policies)} rows")
        policy_groups, keys = layout.tokens(tokens_per_row)
        token_groups = [(self.edits.get(p, layer), tokens) for p, tokens in policy_groups]
        index, weights, active = route_tokens(
            scoring, self.facts[layer], self.sites[layer], logits, token_groups, keys, hidden.dtype
        )
        if self.trace is not None:
            self._record(layer, index, weights, active, logits)
        return self.adapter.pack(logits, weights, index)

    def _record(self, layer: int, index: Tensor, weights: Tensor, active: Tensor, logits: Tensor | None) -> None:
        layout = self.layout
        rows = len(layout.policies) if layout is not None else 1
        shape = (rows, index.shape[0] // rows, index.shape[1])
        probs = None
        if logits is not None and self.trace.distributions:
            probs = self.adapter.scoring.distribution(self.facts[layer], logits).view(*shape[:2], -1)
        names, positions = (), None
        if layout is not None and layout.rows:
            names, positions = tuple(layout.rows), layout.positions[:, -shape[1] :]
            if layout.real is not None:
                positions = positions.masked_fill(~layout.real[:, -shape[1] :], -1)
        experts = index.masked_fill(~active, -1).view(shape)
        self.trace.add(layer, experts, weights.view(shape), probs, rows=names, positions=positions)


@contextmanager
def router_handle(model: nn.Module, *, trace: RoutingTrace | None = None) -> Iterator[RouterHandle]:
    """A handle for one forward of ``model``: a new one, removed on exit, or — inside a decode
    session that already steers the model — the session's, lent with its layout and trace set
    aside and restored on exit (e.g. a controller's loss between decode steps)."""
    active = getattr(model, _HANDLE_ATTR, None)
    if active is None:
        handle = RouterHandle(model, trace=trace)
        try:
            yield handle
        finally:
            handle.remove()
        return
    saved, active.trace = active.trace, trace
    try:
        with active.routing(None):
            yield active
    finally:
        active.trace = saved


def _make_forward(handle: RouterHandle, layer: int):
    def forward(router: nn.Module, hidden: Tensor):
        original = type(router).forward.__get__(router)
        return handle.route(layer, router, original, hidden)

    return forward
