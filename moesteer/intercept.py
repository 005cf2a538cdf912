"""Router interception: patch every router's instance ``forward``, route through policies, restore.

Only the router instances' ``forward`` attribute changes (module classes, parameters, output-capture
hooks and expert kernels stay as transformers built them). Each forward of the model carries a
:class:`BatchLayout` saying which policy and which noise keys each batch row has; rows that share a
policy object are routed together, rows without one take the model's own router (bit-identical).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from types import MethodType

import torch
from torch import Tensor, nn

from moesteer.models.adapters import FamilyAdapter, find_routers, get_adapter
from moesteer.routing import Policy, RouterEdit, RouterSite, gumbel_noise
from moesteer.trace import RoutingTrace

_HANDLE_ATTR = "_moesteer_router_handle"


@dataclass
class BatchLayout:
    """Per-row routing for the next forward: ``policies[b]`` (``None`` = the model's own routing),
    noise keys ``prompt[b]``, ``sample[b]``, ``branch[b]`` and the absolute ``positions [B, S]``."""

    policies: Sequence[Policy | None]
    prompt: Tensor
    sample: Tensor
    branch: Tensor
    positions: Tensor
    seed: int = 0
    _groups: list[tuple[Policy | None, Tensor | None]] | None = field(default=None, repr=False)

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
        self.layout: BatchLayout | None = None
        self.trace = trace
        self._edits: dict[tuple[int, int], tuple[Policy, RouterEdit | None]] = {}
        for layer, router in self.routers.items():
            if "forward" in vars(router):
                raise ValueError(
                    f"the router of layer {layer} already has a patched forward; refusing to stack patches"
                )
            router.forward = MethodType(_make_forward(self, layer), router)
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

    def remove(self) -> None:
        for router in self.routers.values():
            vars(router).pop("forward", None)
        if getattr(self.model, _HANDLE_ATTR, None) is self:
            delattr(self.model, _HANDLE_ATTR)
        self.layout = None

    def edit(self, policy: Policy | None, layer: int) -> RouterEdit | None:
        if policy is None:
            return None
        key = (id(policy), layer)
        cached = self._edits.get(key)
        if cached is None or cached[0] is not policy:
            cached = (policy, policy.edit(self.sites[layer]))
            self._edits[key] = cached
        return cached[1]

    def route(self, layer: int, router: nn.Module, original, hidden: Tensor) -> tuple:
        layout = self.layout
        groups = layout.groups() if layout is not None else [(None, None)]
        edits = [(self.edit(policy, layer), rows) for policy, rows in groups]
        if all(edit is None for edit, _ in edits):
            outputs = original(hidden)
            if self.trace is not None:
                _, weights, index = self.adapter.unpack(outputs)
                self._record(layer, index, weights, torch.ones_like(index, dtype=torch.bool))
            return outputs
        assert layout is not None  # edits exist only under a layout
        site, scoring = self.sites[layer], self.adapter.scoring
        logits = scoring.logits(router, hidden)
        tokens_per_row = logits.shape[0] // len(layout.policies)
        if tokens_per_row * len(layout.policies) != logits.shape[0]:
            raise RuntimeError(f"router saw {logits.shape[0]} tokens for {len(layout.policies)} rows")
        n_slots = max(len(edit.slots(site.top_k)) if edit else site.top_k for edit, _ in edits)
        index = weights = active = None
        for edit, rows in edits:
            tok = (
                None
                if rows is None
                else (rows[:, None] * tokens_per_row + torch.arange(tokens_per_row, device=rows.device)).flatten()
            )
            part = self._select(router, site, layout, tokens_per_row, logits, tok, edit, n_slots, hidden.dtype)
            if tok is None:
                index, weights, active = part
                break
            if index is None:
                index = torch.empty(logits.shape[0], n_slots, dtype=torch.long, device=logits.device)
                weights = torch.zeros(logits.shape[0], n_slots, dtype=part[1].dtype, device=logits.device)
                active = torch.zeros(logits.shape[0], n_slots, dtype=torch.bool, device=logits.device)
            index = index.index_copy(0, tok, part[0])
            weights = weights.index_copy(0, tok, part[1])
            active = active.index_copy(0, tok, part[2])
        if self.trace is not None:
            self._record(layer, index, weights, active)
        return self.adapter.pack(logits, weights, index)

    def _select(self, router, site, layout, tokens_per_row, logits, tok, edit, n_slots, hidden_dtype):
        """Expert ids, weights and active mask ``[t, n_slots]`` for the tokens ``tok`` of one group."""
        scoring = self.adapter.scoring
        logits = logits if tok is None else logits[tok]
        edit = edit or RouterEdit()
        slots = edit.slots(site.top_k)
        needed = max(slots) + 1
        if needed > site.num_experts:
            raise ValueError(f"the policy selects rank {needed}, but layer {site.layer} has {site.num_experts} experts")
        for bias in edit.biases:
            logits = logits + bias.to(device=logits.device, dtype=logits.dtype)
        if edit.masked:
            logits = logits.masked_fill(self._expert_mask(edit.masked, logits), float("-inf"))
        noisy = logits
        if edit.tau > 0 and not edit.random:
            noisy = logits + edit.tau * self._noise(layout, tokens_per_row, tok, site)
            if edit.noisy_weights:
                logits = noisy
        with torch.no_grad():
            # top-k of pure Gumbel noise = uniform sampling without replacement
            random = edit.random
            key = self._noise(layout, tokens_per_row, tok, site) if random else scoring.key(router, noisy, needed)
            if edit.masked:  # sigmoid families score -inf logits as 0, still selectable
                key = key.masked_fill(self._expert_mask(edit.masked, key), float("-inf"))
            if edit.forced:
                key = key.masked_fill(self._expert_mask(edit.forced, key), float("inf"))
            n_top = max(needed, n_slots)
            in_order = slots == list(range(n_top))
            top = key.topk(n_top, dim=-1, sorted=scoring.sorted_topk or not in_order).indices
            if not in_order:
                rest = [p for p in range(n_top) if p not in set(slots)]
                top = top[:, (slots + rest)[:n_slots]]
        active = (torch.arange(n_slots, device=top.device) < len(slots)).expand(top.shape[0], n_slots)
        weights = scoring.weights(router, logits, top, active, hidden_dtype)
        scale = self._scale(edit, site.num_experts, logits.device)
        if scale is not None:
            weights = weights * scale.gather(0, top.flatten()).view_as(top).to(weights.dtype)
        return top, weights, active

    @staticmethod
    def _expert_mask(experts: set[int], like: Tensor) -> Tensor:
        mask = torch.zeros(like.shape[-1], dtype=torch.bool, device=like.device)
        mask[list(experts)] = True
        return mask

    @staticmethod
    def _scale(edit: RouterEdit, num_experts: int, device: torch.device) -> Tensor | None:
        if not edit.scale and not edit.scale_tensors:
            return None
        scale = torch.ones(num_experts, device=device)
        for expert, factor in edit.scale.items():
            scale[expert] = factor
        for factors in edit.scale_tensors:
            scale = scale * factors.to(device)
        return scale

    @staticmethod
    def _noise(layout: BatchLayout, tokens_per_row: int, tok: Tensor | None, site: RouterSite) -> Tensor:
        rows = torch.arange(len(layout.policies), device=layout.positions.device).repeat_interleave(tokens_per_row)
        positions = layout.positions[:, -tokens_per_row:].flatten()
        if tok is not None:
            rows, positions = rows[tok], positions[tok]
        keys = (layout.prompt[rows], layout.sample[rows], layout.branch[rows], site.layer, positions)
        return gumbel_noise(layout.seed, keys, site.num_experts)

    def _record(self, layer: int, index: Tensor, weights: Tensor, active: Tensor) -> None:
        rows = len(self.layout.policies) if self.layout is not None else 1
        shape = (rows, index.shape[0] // rows, index.shape[1])
        self.trace.add(layer, index.masked_fill(~active, -1).view(shape), weights.view(shape))


def _make_forward(handle: RouterHandle, layer: int):
    def forward(router: nn.Module, hidden: Tensor):
        original = type(router).forward.__get__(router)
        return handle.route(layer, router, original, hidden)

    return forward
