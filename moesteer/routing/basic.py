"""The basic routing rules: how many experts and which ranks, biases, masks, forced experts,
rescaled or given mixing weights, layer subsets and position scopes, and a plain function on the
router logits."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from moesteer.routing.call import RouterCall, RouterSite, per_token
from moesteer.routing.policy import (
    Policy,
    Primitive,
    RouterEdit,
    Stage,
    check_experts,
    check_moe_layers,
    expert_ids,
)


def _flat_ids(values: tuple, named: int | Iterable[int]) -> list[int]:
    return [e for item in (*values, named) for e in ((item,) if isinstance(item, int) else item)]


@dataclass(frozen=True)
class TopK(Primitive):
    """Route each token to its ``k`` best experts (may exceed the trained top-k, up to all experts).

    Args:
        k: experts per token, 1 up to the number of experts.

    Example: topk(k=4)
    """

    name: ClassVar[str] = "topk"

    k: int

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise ValueError(f"TopK: k must be an integer >= 1, got {self.k!r}")

    def apply(self, edit: RouterEdit, site: RouterSite) -> bool:
        edit.k, edit.ranks = self.k, None
        return True

    def check(self, num_experts: int, moe_layers: tuple[int, ...]) -> None:
        if self.k > num_experts:
            raise ValueError(f"TopK: k={self.k} exceeds the number of experts ({num_experts})")


@dataclass(frozen=True)
class Ranks(Primitive):
    """Route each token only to experts of the given ranks (1 = best; e.g. ``Ranks(2)``).

    Args:
        ranks: the ranks to keep, distinct integers >= 1, given positionally.

    Example: ranks(2)
    """

    name: ClassVar[str] = "ranks"
    varargs: ClassVar[bool] = True

    ranks: tuple[int, ...]

    def __init__(self, *values: int | Iterable[int], ranks: int | Iterable[int] = ()) -> None:
        flat = tuple(_flat_ids(values, ranks))
        if not flat or any(not isinstance(r, int) or r < 1 for r in flat) or len(set(flat)) != len(flat):
            raise ValueError(f"Ranks: ranks must be distinct integers >= 1, got {flat}")
        object.__setattr__(self, "ranks", flat)

    def apply(self, edit: RouterEdit, site: RouterSite) -> bool:
        edit.ranks, edit.k = self.ranks, None
        return True

    def check(self, num_experts: int, moe_layers: tuple[int, ...]) -> None:
        if max(self.ranks) > num_experts:
            raise ValueError(f"Ranks: rank {max(self.ranks)} exceeds the number of experts ({num_experts})")


@dataclass(frozen=True)
class RankAfterTopK(Primitive):
    """Route each token only to the expert of rank k + ``offset``.

    With ``offset = 1`` it is the best expert the strong routing leaves out. ``k`` is the one an earlier
    primitive set (``TopK(4) + RankAfterTopK()`` routes to rank 5), else the trained top-k.

    Args:
        offset: how many places after the top-k; 1 = the best expert left out (SCMoE's weak branch).

    Example: rank_after_topk(offset=1)
    """

    name: ClassVar[str] = "rank_after_topk"
    paper: ClassVar[str] = "Unchosen Experts Can Contribute Too (Shi et al., arXiv 2405.14507)"

    offset: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.offset, int) or self.offset < 1:
            raise ValueError(f"RankAfterTopK: offset must be an integer >= 1, got {self.offset!r}")

    def apply(self, edit: RouterEdit, site: RouterSite) -> bool:
        edit.ranks, edit.k = ((edit.k or site.top_k) + self.offset,), None
        return True


@dataclass(frozen=True)
class Mask(Primitive):
    """Remove experts from the pool: logits become ``−inf`` (e.g. ``Mask(0, 3)``).

    Args:
        experts: expert ids never routed to, given positionally.

    Example: mask(0, 3)
    """

    name: ClassVar[str] = "mask"
    varargs: ClassVar[bool] = True

    experts: tuple[int, ...]

    def __init__(self, *values: int | Iterable[int], experts: int | Iterable[int] = ()) -> None:
        object.__setattr__(self, "experts", expert_ids(_flat_ids(values, experts), "Mask"))

    def apply(self, edit: RouterEdit, site: RouterSite) -> bool:
        edit.masked.update(self.experts)
        return True

    def masks(self) -> tuple[int, ...]:
        return self.experts

    def check(self, num_experts: int, moe_layers: tuple[int, ...]) -> None:
        check_experts(self.experts, num_experts, "Mask")
        if len(set(self.experts)) >= num_experts:
            raise ValueError(f"Mask: masking all {num_experts} experts leaves nothing to route to")


@dataclass(frozen=True)
class Force(Primitive):
    """Always select these experts (each keeps the weight the family's rule gives it).

    Args:
        experts: expert ids routed to at every token, given positionally.

    Example: force(5)
    """

    name: ClassVar[str] = "force"
    varargs: ClassVar[bool] = True

    experts: tuple[int, ...]

    def __init__(self, *values: int | Iterable[int], experts: int | Iterable[int] = ()) -> None:
        object.__setattr__(self, "experts", expert_ids(_flat_ids(values, experts), "Force"))

    def apply(self, edit: RouterEdit, site: RouterSite) -> bool:
        edit.forced.update(self.experts)
        return True

    def forces(self) -> tuple[int, ...]:
        return self.experts

    def check(self, num_experts: int, moe_layers: tuple[int, ...]) -> None:
        check_experts(self.experts, num_experts, "Force")


class ExpertValues(Primitive):
    """A primitive holding one tensor over the experts, ``[E]`` or per-row ``[rows, E]``, for every
    layer or as ``{layer: tensor}``; subclasses say what the tensor does at a router call."""

    values: Tensor | Mapping[int, Tensor]

    def __post_init__(self) -> None:
        for layer, vec in self.items():
            if not isinstance(vec, Tensor) or vec.dim() not in (1, 2):
                where = "" if layer is None else f" for layer {layer}"
                raise ValueError(
                    f"{type(self).__name__}: expected a tensor [num_experts] or [rows, num_experts]{where}, got {vec!r}"
                )

    def items(self) -> list[tuple[int | None, Tensor]]:
        if isinstance(self.values, Mapping):
            return [(int(k), v) for k, v in self.values.items()]
        return [(None, self.values)]

    def at(self, site: RouterSite) -> Tensor | None:
        """The tensor for this site's layer (``None``: the primitive does not apply there)."""
        return self.values.get(site.layer) if isinstance(self.values, Mapping) else self.values

    def check(self, num_experts: int, moe_layers: tuple[int, ...]) -> None:
        name = type(self).__name__
        for layer, vec in self.items():
            if vec.shape[-1] != num_experts:
                raise ValueError(f"{name}: length {vec.shape[-1]} does not match the {num_experts} experts")
            if layer is not None and layer not in moe_layers:
                raise ValueError(f"{name}: layer {layer} is not an MoE layer; MoE layers are {list(moe_layers)}")


@dataclass(frozen=True, eq=False)
class AddLogits(Stage):
    """``z ← z + b`` for one layer's ``values`` b, ``[E]`` or per row ``[rows, E]``."""

    values: Tensor

    def on_logits(self, call: RouterCall) -> None:
        call.logits = call.logits + per_token(self.values, call.logits).to(dtype=call.logits.dtype)


@dataclass(frozen=True, eq=False)
class Bias(ExpertValues):
    """Add a vector to the router logits: a tensor ``[E]`` for every layer, or ``{layer: [E]}``.

    A 2-D tensor ``[rows, E]`` holds one bias per batch row of the policy's group (row order, each
    row's tokens contiguous), so many sequences with their own bias share one router call. The
    tensor may be an ``nn.Parameter``: gradients reach it through the mixing weights of the
    selected experts (selection itself is piecewise constant).
    """

    values: Tensor | Mapping[int, Tensor]

    def apply(self, edit: RouterEdit, site: RouterSite) -> bool:
        vec = self.at(site)
        if vec is None:
            return False
        edit.stages.append(AddLogits(vec))
        return True


@dataclass(frozen=True, eq=False)
class MixingWeights(Stage):
    """Select the top-k of ω (``values``, ``[E]`` or ``[rows, E]``) and weigh them by ω there,
    renormalised over the active slots when ``renormalise``."""

    values: Tensor
    renormalise: bool = True

    def on_key(self, call: RouterCall) -> None:
        call.key = per_token(self.values, call.logits).detach().expand_as(call.logits)

    def on_weights(self, call: RouterCall) -> None:
        assert call.top is not None and call.active is not None
        omega = per_token(self.values, call.logits)
        w = omega.expand(call.top.shape[0], -1).gather(-1, call.top)
        w = torch.where(call.active, w, torch.zeros_like(w))
        call.weights = w / w.sum(dim=-1, keepdim=True) if self.renormalise else w


@dataclass(frozen=True, eq=False)
class SetWeights(ExpertValues):
    """Set the mixing weights over experts directly (C3PO's ω, arXiv 2504.07964): ``[E]``, one
    ``[rows, E]`` per batch row, or ``{layer: ...}``. The selected experts are the top-k of ω (k from
    an earlier ``TopK``, else the trained top-k); their weights are ω there, renormalised to sum 1
    when ``renormalise``. The family's own scores are not used at this site. Gradients reach ω.
    """

    values: Tensor | Mapping[int, Tensor]
    renormalise: bool = True

    def apply(self, edit: RouterEdit, site: RouterSite) -> bool:
        vec = self.at(site)
        if vec is None:
            return False
        edit.stages.append(MixingWeights(vec, self.renormalise))
        return True


@dataclass(frozen=True, eq=False)
class ScaleWeights(Stage):
    """Multiply the mixing weight of each selected expert e by ``factors[e]`` (a ``{expert: factor}``
    mapping or a tensor ``[E]``)."""

    factors: Mapping[int, float] | Tensor

    def on_weights(self, call: RouterCall) -> None:
        assert call.top is not None
        weights = call.weights
        if isinstance(self.factors, Tensor):
            scale = torch.ones(call.site.num_experts, device=weights.device) * self.factors.to(weights.device)
        else:
            scale = torch.ones(call.site.num_experts, device=weights.device)
            for expert, factor in self.factors.items():
                scale[expert] = factor
        call.weights = weights * scale.gather(0, call.top.flatten()).view_as(call.top).to(weights.dtype)


@dataclass(frozen=True, eq=False)
class Rescale(Primitive):
    """Multiply the final mixing weight of chosen experts: ``{expert: factor}`` or a tensor ``[E]``."""

    factors: Mapping[int, float] | Tensor

    def __post_init__(self) -> None:
        if isinstance(self.factors, Tensor):
            if self.factors.dim() != 1:
                raise ValueError(f"Rescale: expected a 1-D tensor of factors, got shape {tuple(self.factors.shape)}")
            return
        expert_ids(list(self.factors), "Rescale")
        if any(not math.isfinite(float(f)) for f in self.factors.values()):
            raise ValueError(f"Rescale: factors must be finite, got {dict(self.factors)}")

    def apply(self, edit: RouterEdit, site: RouterSite) -> bool:
        factors = self.factors
        if not isinstance(factors, Tensor):
            factors = {int(e): float(f) for e, f in factors.items()}
        edit.stages.append(ScaleWeights(factors))
        return True

    def check(self, num_experts: int, moe_layers: tuple[int, ...]) -> None:
        if isinstance(self.factors, Tensor):
            if self.factors.numel() != num_experts:
                raise ValueError(f"Rescale: length {self.factors.numel()} does not match the {num_experts} experts")
        else:
            check_experts(tuple(int(e) for e in self.factors), num_experts, "Rescale")


@dataclass(frozen=True)
class RouterLogits(Primitive):
    """A plain function on the router logits: ``z ← fn(z, site)`` at every router call (``z [T, E]``,
    ``site`` a :class:`~moesteer.routing.call.RouterSite`), before selection, so it moves the
    selection and the weights. ``fn`` must be a module-level function for vLLM's workers to import.
    """

    fn: Callable[[Tensor, RouterSite], Tensor]

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise ValueError(f"RouterLogits: fn must be a function (logits, site) -> logits, got {self.fn!r}")

    def on_logits(self, call: RouterCall) -> None:
        call.logits = self.fn(call.logits, call.site)


@dataclass(frozen=True)
class OnLayers(Primitive):
    """Apply ``policy`` only on the given decoder layers (which must be MoE layers)."""

    policy: Policy
    layers: tuple[int, ...]

    def __init__(self, policy: Policy, layers: int | Iterable[int]) -> None:
        ids = (layers,) if isinstance(layers, int) else tuple(int(x) for x in layers)
        if not ids or any(x < 0 for x in ids):
            raise ValueError(f"OnLayers: layers must be a non-empty list of indices >= 0, got {ids}")
        object.__setattr__(self, "policy", policy)
        object.__setattr__(self, "layers", ids)

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.policy.stochastic

    def apply(self, edit: RouterEdit, site: RouterSite) -> bool:
        if site.layer not in self.layers:
            return False
        touched = False
        for step in self.policy.steps:
            touched |= step.apply(edit, site)
        return touched

    def check(self, num_experts: int, moe_layers: tuple[int, ...]) -> None:
        check_moe_layers(self.layers, moe_layers, "OnLayers")
        self.policy.check(num_experts, moe_layers)


SCOPES = ("prompt", "last_prompt", "generated", "last")


@dataclass(frozen=True, eq=False)
class Scoped(Policy):
    """Apply ``policy`` only to tokens at some positions; every other token keeps the model's own
    routing. ``where`` is ``"prompt"``, ``"last_prompt"`` (the last prompt token), ``"generated"``,
    ``"last"`` (the last prompt token and every generated one: the last position of every forward
    of a decode) or a tuple of absolute positions (0 = the first prompt token). A scoped policy is not composed
    with ``+``: scope the composition instead, ``Scoped(TopK(1) + Bias(b), "prompt")``.
    """

    policy: Policy
    where: str | tuple[int, ...] = "prompt"

    def __post_init__(self) -> None:
        if isinstance(self.policy, Scoped):
            raise ValueError("Scoped: the policy is already scoped; scope it once")
        if isinstance(self.where, str):
            if self.where not in SCOPES:
                raise ValueError(f"Scoped: where must be one of {', '.join(SCOPES)} or positions, got {self.where!r}")
        elif not self.where or any(not isinstance(p, int) or p < 0 for p in self.where):
            raise ValueError(f"Scoped: positions must be a non-empty tuple of integers >= 0, got {self.where!r}")

    @property
    def steps(self) -> tuple[Primitive, ...]:
        raise TypeError("a scoped policy cannot be composed; scope the composition instead")

    @property
    def stochastic(self) -> bool:
        return self.policy.stochastic

    def edit(self, site: RouterSite) -> RouterEdit | None:
        return self.policy.edit(site)

    def check(self, num_experts: int, moe_layers: tuple[int, ...]) -> None:
        self.policy.check(num_experts, moe_layers)

    def selects(self, positions: Tensor, prompt_lengths: Tensor) -> Tensor:
        """Which tokens the policy routes: a bool mask like ``positions`` (``prompt_lengths`` broadcast)."""
        if self.where == "prompt":
            return positions < prompt_lengths
        if self.where == "last_prompt":
            return positions == prompt_lengths - 1
        if self.where == "generated":
            return positions >= prompt_lengths
        if self.where == "last":
            return positions >= prompt_lengths - 1
        return torch.isin(positions, torch.tensor(self.where, device=positions.device))
