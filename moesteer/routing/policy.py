"""Policies and the stage contract every routing rule implements.

A policy is an ordered tuple of primitives (``TopK(1) + Bias(b)``). For one router call a
primitive writes into a :class:`RouterEdit`: the slot algebra (how many experts, which ranks,
which experts are forced or masked) and the :class:`Stage` objects that carry its math. The
pipeline (:mod:`moesteer.routing.pipeline`) runs every stage of the edit at each of its fixed
points, in the policy's order:

1. ``on_logits``: edit the router logits (they set the selection key and the weights: a bias,
   SteerMoE); masked experts then get ``−inf``;
2. ``on_noise``: perturb what the family's key scores, not the weights (Gumbel noise);
3. ``on_key``: replace the selection key (random experts, C3PO's ω); forced experts get ``+inf``
   and the slots are taken in key order;
4. ``on_active``: choose which selected slots carry weight (top-p, expert-choice capacity);
5. ``on_weights``: edit the mixing weights (rescaling, capacity drops, ω).

A stage may instead decide the whole selection (``route``, a replayed routing). A rule that needs
nothing per layer is its own stage: subclass :class:`Primitive`, override the hooks it needs.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, is_dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from moesteer.routing.call import RouterSite

if TYPE_CHECKING:
    from moesteer.routing.call import RouterCall, Selection


class Stage:
    """One rule's work inside a router call; each hook reads and sets fields of the
    :class:`~moesteer.routing.call.RouterCall` (module docstring: the order)."""

    coupled: ClassVar[bool] = False  # a token's routing depends on the other tokens of its group

    def route(self, call: RouterCall) -> Selection | None:
        """The whole selection ``(ids, weights, active)``, or ``None`` to run the stages."""
        return None

    def on_logits(self, call: RouterCall) -> None:
        """Edit ``call.logits``."""

    def on_noise(self, call: RouterCall) -> None:
        """Edit ``call.key_logits`` (and ``call.logits`` if the weights should see it too)."""

    def on_key(self, call: RouterCall) -> None:
        """Set ``call.key`` to select by another key than the family's."""

    def on_active(self, call: RouterCall) -> None:
        """Edit ``call.active`` (``call.top``, ``call.key`` are set)."""

    def on_weights(self, call: RouterCall) -> None:
        """Edit ``call.weights`` (and ``call.active``)."""


@dataclass
class RouterEdit:
    """What a policy asks of one router call: the slot algebra and the stages that carry the math.
    Stages hold tensors by reference, so a cached edit stays valid when a learnable bias is
    updated in place."""

    k: int | None = None
    ranks: tuple[int, ...] | None = None
    forced: set[int] = field(default_factory=set)
    masked: set[int] = field(default_factory=set)
    sorted: bool = False  # slots in key order even where the family's top-k is unsorted
    stages: list[Stage] = field(default_factory=list)

    def slots(self, top_k: int) -> list[int]:
        """Positions in the key's descending order that are selected (forced experts first)."""
        forced = len(self.forced)
        if self.ranks is not None:
            return list(range(forced)) + [forced + r - 1 for r in self.ranks]
        return list(range(max(self.k if self.k is not None else top_k, forced)))


class Policy:
    """Base of everything that can route: primitives and their compositions."""

    @property
    def steps(self) -> tuple[Primitive, ...]:
        raise NotImplementedError

    def __add__(self, other: Policy) -> RoutingPolicy:
        if not isinstance(other, Policy):
            return NotImplemented
        return RoutingPolicy(self.steps + other.steps)

    @property
    def stochastic(self) -> bool:
        """Whether the routing draws noise (its result depends on the noise keys, not only the input)."""
        return any(step.stochastic for step in self.steps)

    def edit(self, site: RouterSite) -> RouterEdit | None:
        """The edit for one router call, or ``None`` when no primitive applies at this site."""
        edit, touched = RouterEdit(), False
        for step in self.steps:
            touched |= step.apply(edit, site)
        return edit if touched else None

    def check(self, num_experts: int, moe_layers: tuple[int, ...]) -> None:
        """Raise ``ValueError`` if this policy cannot run on a model with these experts / MoE layers."""
        for step in self.steps:
            step.check(num_experts, moe_layers)
        forced = {e for s in self.steps for e in s.forces()}
        masked = {e for s in self.steps for e in s.masks()}
        if forced & masked:
            raise ValueError(f"experts {sorted(forced & masked)} are both forced and masked")


class Primitive(Policy, Stage):
    """One routing rule. ``apply`` writes its slot algebra and stages into the edit and says
    whether it applied at this site; by default the primitive is itself the one stage it adds."""

    stochastic: ClassVar[bool] = False  # type: ignore[assignment]  # draws routing noise
    paper: ClassVar[str] = ""  # the paper it comes from, "Title (Authors, arXiv id)"
    varargs: ClassVar[bool] = False  # its spec prints the first field positionally: ranks(2), mask(0, 3)
    files: ClassVar[tuple[str, ...]] = ()  # fields naming a file it reads (its fingerprint covers the file's date)

    @property
    def steps(self) -> tuple[Primitive, ...]:
        return (self,)

    def apply(self, edit: RouterEdit, site: RouterSite) -> bool:
        edit.stages.append(self)
        return True

    def check(self, num_experts: int, moe_layers: tuple[int, ...]) -> None:
        """Model-dependent validation; construction already checked what needs no model."""

    def forces(self) -> tuple[int, ...]:
        """Experts this primitive always selects."""
        return ()

    def masks(self) -> tuple[int, ...]:
        """Experts this primitive never selects."""
        return ()


@dataclass(frozen=True)
class RoutingPolicy(Policy):
    """A composition of primitives, applied as the module docstring describes."""

    parts: tuple[Primitive, ...] = ()

    @property
    def steps(self) -> tuple[Primitive, ...]:
        return self.parts


def expert_ids(experts: int | Iterable[int], name: str) -> tuple[int, ...]:
    """Expert ids as a non-empty tuple of integers >= 0 (``ValueError`` naming ``name`` otherwise)."""
    ids = (experts,) if isinstance(experts, int) else tuple(int(e) for e in experts)
    if not ids or any(e < 0 for e in ids):
        raise ValueError(f"{name}: expert ids must be a non-empty list of integers >= 0, got {ids}")
    return ids


def check_experts(ids: tuple[int, ...], num_experts: int, name: str) -> None:
    """``ValueError`` naming the ids of ``ids`` beyond the model's experts."""
    bad = [e for e in ids if e >= num_experts]
    if bad:
        raise ValueError(f"{name}: expert ids {bad} out of range; this model has experts 0..{num_experts - 1}")


def check_moe_layers(layers: Iterable[int], moe_layers: tuple[int, ...], name: str) -> None:
    """``ValueError`` naming the layers of ``layers`` that are not MoE layers."""
    bad = [x for x in layers if x not in moe_layers]
    if bad:
        raise ValueError(f"{name}: layers {bad} are not MoE layers; MoE layers are {list(moe_layers)}")


def policy_fingerprint(policy: Policy) -> str:
    """A stable hash of a policy's parameters, tensor contents included (e.g. a prefix-cache salt)."""
    digest = hashlib.sha256()

    def feed(value) -> None:
        if isinstance(value, Tensor):
            t = value.detach().to("cpu", torch.float64).contiguous()
            digest.update(repr(tuple(t.shape)).encode() + t.numpy().tobytes())
        elif is_dataclass(value):
            digest.update(type(value).__name__.encode())
            for f in fields(value):
                feed(getattr(value, f.name))
            for name in getattr(value, "files", ()):  # a rewritten file is another routing
                path = getattr(value, name)
                feed(os.path.getmtime(path) if os.path.isfile(path) else None)
        elif isinstance(value, dict):
            for k in sorted(value, key=repr):
                feed(k)
                feed(value[k])
        elif isinstance(value, list | tuple):
            digest.update(b"[")
            for v in value:
                feed(v)
            digest.update(b"]")
        elif callable(value):
            digest.update(f"{getattr(value, '__module__', '')}:{getattr(value, '__qualname__', repr(value))}".encode())
        else:
            digest.update(repr(value).encode())

    feed(policy)
    return digest.hexdigest()[:16]
