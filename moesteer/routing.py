"""Routing policies: which experts one MoE router call selects, and with what weights.

A policy is an ordered tuple of primitives (``TopK(1) + Bias(b)``). For one router call (one MoE
layer, one group of batch rows) the primitives write into a :class:`RouterEdit`; the family's scorer
(:mod:`moesteer.models`) then turns the model's own router logits plus that edit into expert ids and
mixing weights, keeping the family's normalisation (softmax or sigmoid, correction bias,
group-limited top-k, renormalisation, routed scaling). Whatever order the primitives come in, one call
applies them in this order:

1. ``logits ← router_logits + bias``; masked experts get ``−inf`` (this moves selection *and* weights);
2. ``key ← score(logits + τ·G)`` with ``G`` standard Gumbel noise (selection only), forced experts ``+inf``;
3. selection: the first ``k`` experts of ``key`` (``k`` defaults to the trained top-k, may exceed it up
   to all experts), or the given ranks (counted from 1) — forced experts come first, ranks and ``k``
   then count the remaining experts;
4. weights: the family's rule on the selected experts from the noise-free ``logits``, times the
   rescale factors.

Later primitives override earlier ones for ``k``, ranks and ``τ``; biases add up; masks, forces and
rescale factors accumulate. Shapes: ``T`` token rows, ``E`` experts, ``K`` selection slots.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from moesteer.expert_table import ExpertTable
from moesteer.json_files import read_cached
from moesteer.keys import gumbel_noise
from moesteer.trace import RoutingTrace
from moesteer.trace_file import TraceFile

__all__ = [
    "RICE",
    "Bias",
    "Capacity",
    "EditCache",
    "ExpertValues",
    "Force",
    "Gumbel",
    "Mask",
    "OnLayers",
    "Policy",
    "RandomExperts",
    "RankAfterTopK",
    "Ranks",
    "Replay",
    "ReplayFile",
    "Rescale",
    "RouterEdit",
    "RouterSite",
    "RoutingPolicy",
    "Scoped",
    "SetWeights",
    "SteerMoE",
    "TopK",
    "TopP",
    "gumbel_noise",
    "policy_fingerprint",
]


@dataclass(frozen=True)
class RouterSite:
    """Where a router call happens: decoder layer, its index among the model's MoE layers, sizes."""

    layer: int
    moe_index: int
    num_moe_layers: int
    num_experts: int
    top_k: int


class CapacityEdit(NamedTuple):
    """What :class:`Capacity` asks of a router call; ``k``: the experts per token before it applied."""

    gamma: float
    drop: str
    renormalise: bool
    k: int
    expanded: bool


@dataclass
class RouterEdit:
    """What the policy asks of one router call. Holds tensors by reference (never sums them), so a
    cached edit stays valid when a learnable bias is updated in place."""

    biases: list[Tensor] = field(default_factory=list)
    masked: set[int] = field(default_factory=set)
    forced: set[int] = field(default_factory=set)
    tau: float = 0.0
    noisy_weights: bool = False
    random: bool = False
    k: int | None = None
    ranks: tuple[int, ...] | None = None
    scale: dict[int, float] = field(default_factory=dict)
    scale_tensors: list[Tensor] = field(default_factory=list)
    weights: Tensor | None = None  # mixing weights over all experts, [E] or [rows, E] (SetWeights)
    renormalise_weights: bool = True
    steer_on: set[int] = field(default_factory=set)  # SteerMoE: activated / deactivated experts
    steer_off: set[int] = field(default_factory=set)
    steer_mode: str = "hard"  # SteerMoE: 'hard' (the paper's rule), 'soft' (± amount·std z), 'add' (± amount)
    steer_amount: float = 0.01
    replay: tuple[Tensor, Tensor] | None = None  # Replay: experts and weights [positions, K]
    capacity: CapacityEdit | None = None
    top_p: float | None = None  # TopP: a per-token set within the first k slots
    k_min: int = 1
    renormalise_top_p: bool | None = None

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
        forced = {e for s in self.steps if isinstance(s, Force) for e in s.experts}
        masked = {e for s in self.steps if isinstance(s, Mask) for e in s.experts}
        if forced & masked:
            raise ValueError(f"experts {sorted(forced & masked)} are both forced and masked")


class Primitive(Policy):
    """One routing change. ``apply`` writes into the edit and says whether it applied."""

    stochastic: ClassVar[bool] = False  # type: ignore[assignment]  # draws routing noise
    paper: ClassVar[str] = ""  # the paper it comes from, "Title (Authors, arXiv id)"
    varargs: ClassVar[bool] = False  # its spec prints the first field positionally: ranks(2), mask(0, 3)
    files: ClassVar[tuple[str, ...]] = ()  # fields naming a file it reads (its fingerprint covers the file's date)

    @property
    def steps(self) -> tuple[Primitive, ...]:
        return (self,)

    def apply(self, edit: RouterEdit, site: RouterSite) -> bool:
        raise NotImplementedError

    def check(self, num_experts: int, moe_layers: tuple[int, ...]) -> None:
        """Model-dependent validation; construction already checked what needs no model."""


@dataclass(frozen=True)
class RoutingPolicy(Policy):
    """A composition of primitives, applied as the module docstring describes."""

    parts: tuple[Primitive, ...] = ()

    @property
    def steps(self) -> tuple[Primitive, ...]:
        return self.parts


def _expert_ids(experts: int | Iterable[int], name: str) -> tuple[int, ...]:
    ids = (experts,) if isinstance(experts, int) else tuple(int(e) for e in experts)
    if not ids or any(e < 0 for e in ids):
        raise ValueError(f"{name}: expert ids must be a non-empty list of integers >= 0, got {ids}")
    return ids


def _check_experts(ids: tuple[int, ...], num_experts: int, name: str) -> None:
    bad = [e for e in ids if e >= num_experts]
    if bad:
        raise ValueError(f"{name}: expert ids {bad} out of range; this model has experts 0..{num_experts - 1}")


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
class TopP(Primitive):
    """Route each token to the fewest experts of mass ≥ ``p``.

    Top-p routing (Huang et al., "Harder Tasks Need More Experts: Dynamic Routing in MoE Models",
    arXiv 2403.07652): per token the fewest experts, most probable first, whose router
    probabilities sum to at least ``p``, at least ``k_min`` and at most ``k_max`` (default: all
    experts), taken among the ``k_max`` best by the family's selection key; the probabilities are
    its router distribution (softmax, or the normalised sigmoid scores). Weights follow the
    family's rule over the chosen set; ``renormalise`` forces them to sum to 1 (``True``) or to be
    the bare probabilities (``False``). The set size varies per token: unused slots up to
    ``k_max`` carry weight 0 (both backends).

    Args:
        p: probability mass the chosen experts must reach, in (0, 1].
        k_min: at least this many experts per token.
        k_max: at most this many experts per token (None: all experts).
        renormalise: True: weights sum to 1; False: the bare probabilities; None: the family's rule.

    Example: topp(p=0.4, k_max=4)
    """

    name: ClassVar[str] = "topp"
    paper: ClassVar[str] = (
        "Harder Tasks Need More Experts: Dynamic Routing in MoE Models (Huang et al., arXiv 2403.07652)"
    )

    p: float
    k_min: int = 1
    k_max: int | None = None
    renormalise: bool | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.p, int | float) and not isinstance(self.p, bool) and 0 < self.p <= 1):
            raise ValueError(f"TopP: p must be in (0, 1], got {self.p!r}")
        if not isinstance(self.k_min, int) or isinstance(self.k_min, bool) or self.k_min < 1:
            raise ValueError(f"TopP: k_min must be an integer >= 1, got {self.k_min!r}")
        if self.k_max is not None and (not isinstance(self.k_max, int) or self.k_max < self.k_min):
            raise ValueError(f"TopP: k_max must be an integer >= k_min ({self.k_min}), got {self.k_max!r}")

    def apply(self, edit: RouterEdit, site: RouterSite) -> bool:
        edit.k, edit.ranks = self.k_max or site.num_experts, None
        edit.top_p, edit.k_min, edit.renormalise_top_p = float(self.p), self.k_min, self.renormalise
        return True

    def check(self, num_experts: int, moe_layers: tuple[int, ...]) -> None:
        if max(self.k_min, self.k_max or 0) > num_experts:
            raise ValueError(f"TopP: k_min/k_max exceed the number of experts ({num_experts})")


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
        flat = tuple(r for item in (*values, ranks) for r in ((item,) if isinstance(item, int) else item))
        if not flat or any(not isinstance(r, int) or r < 1 for r in flat) or len(set(flat)) != len(flat):
            raise ValueError(f"Ranks: ranks must be distinct integers >= 1, got {flat}")
        object.__setattr__(self, "ranks", flat)

    def apply(self, edit: RouterEdit, site: RouterSite) -> bool:
        edit.ranks, edit.k = self.ranks, None
        return True

    def check(self, num_experts: int, moe_layers: tuple[int, ...]) -> None:
        if max(self.ranks) > num_experts:
            raise ValueError(f"Ranks: rank {max(self.ranks)} exceeds the number of experts ({num_experts})")


class ExpertValues(Primitive):
    """A primitive holding one tensor over the experts, ``[E]`` or per-row ``[rows, E]``, for every
    layer or as ``{layer: tensor}``; subclasses say what the tensor does to the edit."""

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
        edit.biases.append(vec)
        return True


@dataclass(frozen=True)
class Gumbel(Primitive):
    """Gumbel noise τ·G on router logits before top-k (RoE).

    Gumbel-top-k selection ``TopK(logits + τ_i·G, k)`` (RoE, arXiv 2509.17238, Eq. 1).

    ``tau`` is one τ for every MoE layer or a profile with one τ per MoE layer; ``skip = L`` keeps
    the first and last L MoE layers deterministic. Weights come from the clean logits unless
    ``noisy_weights`` (the paper does not say; clean is our default). ``τ = 0`` is the identity.
    Noise is a pure function of (seed, prompt, sample, branch, layer, position).

    Args:
        tau: noise temperature τ >= 0 for every MoE layer, or a tuple with one τ per MoE layer.
        skip: keep the first and last ``skip`` MoE layers deterministic (the paper's L).
        noisy_weights: weigh the chosen experts by the noisy logits instead of the clean ones.

    Example: gumbel(tau=0.3, skip=1)
    """

    name: ClassVar[str] = "gumbel"
    paper: ClassVar[str] = (
        "MoEs Are Stronger than You Think: Hyper-Parallel Inference Scaling with RoE (arXiv 2509.17238)"
    )
    stochastic: ClassVar[bool] = True

    tau: float | tuple[float, ...]
    skip: int = 0
    noisy_weights: bool = False

    def __post_init__(self) -> None:
        taus = self.tau if isinstance(self.tau, tuple) else (self.tau,)
        if not taus or any(not isinstance(t, int | float) or not math.isfinite(t) or t < 0 for t in taus):
            raise ValueError(f"Gumbel: tau must be a finite number >= 0 or a tuple of them, got {self.tau!r}")
        if not isinstance(self.skip, int) or self.skip < 0:
            raise ValueError(f"Gumbel: skip must be an integer >= 0, got {self.skip!r}")

    def tau_at(self, site: RouterSite) -> float:
        if site.moe_index < self.skip or site.moe_index >= site.num_moe_layers - self.skip:
            return 0.0
        return float(self.tau[site.moe_index] if isinstance(self.tau, tuple) else self.tau)

    def apply(self, edit: RouterEdit, site: RouterSite) -> bool:
        edit.tau, edit.noisy_weights = self.tau_at(site), self.noisy_weights
        return edit.tau > 0

    def check(self, num_experts: int, moe_layers: tuple[int, ...]) -> None:
        if isinstance(self.tau, tuple) and len(self.tau) != len(moe_layers):
            raise ValueError(f"Gumbel: tau profile has {len(self.tau)} values for {len(moe_layers)} MoE layers")
        if 2 * self.skip > len(moe_layers):
            raise ValueError(
                f"Gumbel: skip={self.skip} exceeds half of the {len(moe_layers)} MoE layers; "
                f"skip must be at most {len(moe_layers) // 2} for this model"
            )


@dataclass(frozen=True)
class RandomExperts(Primitive):
    """Route each token to ``k`` uniformly random experts (default: the trained top-k); the family's
    rule weighs them (SCMoE's "random-1" weak branch is ``RandomExperts(1)``).

    Args:
        k: experts per token (None: the trained top-k).

    Example: random_experts(k=1)
    """

    name: ClassVar[str] = "random_experts"
    stochastic: ClassVar[bool] = True

    k: int | None = None

    def __post_init__(self) -> None:
        if self.k is not None and (not isinstance(self.k, int) or self.k < 1):
            raise ValueError(f"RandomExperts: k must be an integer >= 1, got {self.k!r}")

    def apply(self, edit: RouterEdit, site: RouterSite) -> bool:
        edit.random, edit.ranks = True, None
        if self.k is not None:
            edit.k = self.k
        return True

    def check(self, num_experts: int, moe_layers: tuple[int, ...]) -> None:
        if self.k is not None and self.k > num_experts:
            raise ValueError(f"RandomExperts: k={self.k} exceeds the number of experts ({num_experts})")


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
        flat = [e for item in (*values, experts) for e in ((item,) if isinstance(item, int) else item)]
        object.__setattr__(self, "experts", _expert_ids(flat, "Mask"))

    def apply(self, edit: RouterEdit, site: RouterSite) -> bool:
        edit.masked.update(self.experts)
        return True

    def check(self, num_experts: int, moe_layers: tuple[int, ...]) -> None:
        _check_experts(self.experts, num_experts, "Mask")
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
        flat = [e for item in (*values, experts) for e in ((item,) if isinstance(item, int) else item)]
        object.__setattr__(self, "experts", _expert_ids(flat, "Force"))

    def apply(self, edit: RouterEdit, site: RouterSite) -> bool:
        edit.forced.update(self.experts)
        return True

    def check(self, num_experts: int, moe_layers: tuple[int, ...]) -> None:
        _check_experts(self.experts, num_experts, "Force")


@dataclass(frozen=True, eq=False)
class Rescale(Primitive):
    """Multiply the final mixing weight of chosen experts: ``{expert: factor}`` or a tensor ``[E]``."""

    factors: Mapping[int, float] | Tensor

    def __post_init__(self) -> None:
        if isinstance(self.factors, Tensor):
            if self.factors.dim() != 1:
                raise ValueError(f"Rescale: expected a 1-D tensor of factors, got shape {tuple(self.factors.shape)}")
            return
        _expert_ids(list(self.factors), "Rescale")
        if any(not math.isfinite(float(f)) for f in self.factors.values()):
            raise ValueError(f"Rescale: factors must be finite, got {dict(self.factors)}")

    def apply(self, edit: RouterEdit, site: RouterSite) -> bool:
        if isinstance(self.factors, Tensor):
            edit.scale_tensors.append(self.factors)
        else:
            for e, f in self.factors.items():
                edit.scale[int(e)] = edit.scale.get(int(e), 1.0) * float(f)
        return True

    def check(self, num_experts: int, moe_layers: tuple[int, ...]) -> None:
        if isinstance(self.factors, Tensor):
            if self.factors.numel() != num_experts:
                raise ValueError(f"Rescale: length {self.factors.numel()} does not match the {num_experts} experts")
        else:
            _check_experts(tuple(int(e) for e in self.factors), num_experts, "Rescale")


CAPACITY_ORDERS = ("score", "random", "first", "last")


@dataclass(frozen=True)
class Capacity(Primitive):
    """Limit the tokens each expert takes in one router call.

    Capacity-aware routing (He et al., arXiv 2503.05066). Each expert takes at most
    C = ⌈γ·N̄⌉ tokens of one router call, N̄ = k·T/E the mean load (T tokens, k experts per token,
    E experts); ties and the excess are ordered by ``drop``: the highest router probability first
    (``'score'``, the paper's default), random (keyed noise), the earliest (``'first'``) or the
    latest (``'last'``) tokens first.

    * Token drop (``expanded=False``): an expert keeps C of the tokens routed to it; the others lose
      it (weight 0). γ = ∞ is the model's routing.
    * Expanded drop (``expanded=True``, the paper's "overselect"): every expert the policy leaves
      selectable (finite selection key: not masked, inside DeepSeek's kept groups) is a candidate
      for every token, and each expert takes its C best tokens among them — expert-choice routing
      with capacity C, so a token gets more or fewer than k experts (k·T in all when C binds). The
      weights are the family's rule over each token's chosen set. The call routes over E slots
      (weight 0 where unused), decode steps included.

    ``renormalise`` makes each token's weights sum to 1 afterwards. Off at decode steps (one token
    per sequence), as in the paper. **Batch-coupled**: a request's routing depends on the other
    tokens of its call (its batch neighbours, on vLLM the whole scheduler step), so results depend
    on the batch layout; opt-in only.

    Args:
        gamma: capacity factor γ > 0 (inf: no limit).
        drop: which tokens an expert keeps first: 'score', 'random', 'first' or 'last'.
        renormalise: make each token's weights sum to 1 after the drop.
        expanded: expert-choice "overselect": every expert takes its C best tokens among all.

    Example: capacity(gamma=1.5)
    """

    name: ClassVar[str] = "capacity"
    paper: ClassVar[str] = (
        "Capacity-Aware Inference: Mitigating the Straggler Effect in Mixture of Experts (He et al., arXiv 2503.05066)"
    )

    gamma: float = 1.0
    drop: str = "score"
    renormalise: bool = False
    expanded: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.gamma, int | float) and not isinstance(self.gamma, bool) and self.gamma > 0):
            raise ValueError(f"Capacity: gamma must be a positive number (inf: no limit), got {self.gamma!r}")
        if self.drop not in CAPACITY_ORDERS:
            raise ValueError(f"Capacity: drop must be one of {', '.join(CAPACITY_ORDERS)}, got {self.drop!r}")

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.drop == "random"

    def apply(self, edit: RouterEdit, site: RouterSite) -> bool:
        k = len(edit.slots(site.top_k))
        edit.capacity = CapacityEdit(float(self.gamma), self.drop, self.renormalise, k, self.expanded)
        if self.expanded:
            edit.k, edit.ranks = site.num_experts, None
        return True


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
        edit.replay = (ids, self.weights[site.layer])
        return True

    def check(self, num_experts: int, moe_layers: tuple[int, ...]) -> None:
        bad = sorted(set(self.experts) - set(moe_layers))
        if bad:
            raise ValueError(f"Replay: layers {bad} are not MoE layers; MoE layers are {list(moe_layers)}")
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


def expert_table(path: str) -> ExpertTable:
    """The :class:`moesteer.experts.ExpertTable` at ``path`` (read once while the file is unchanged)."""
    return read_cached(ExpertTable.load, path)


STEER_MODES = ("hard", "soft", "add")


@dataclass(frozen=True)
class SteerMoE(Primitive):
    """SteerMoE (Fayyaz et al., arXiv 2509.09660): switch discovered experts on or off. From the
    expert table ``experts`` (``moesteer experts``), the first ``activate`` rows with a positive
    score are activated and the first ``deactivate`` with a negative score deactivated
    (``reverse`` swaps the signs), at every token of their layers, by ``mode``:

    * ``'hard'``, the paper's rule: on s = log_softmax(z), s_i ← max_j s_j + ``margin`` (activate;
      at most the trained top-k a layer, the rest skipped, as the released code) or
      s_i ← min_j s_j − ``margin`` (deactivate); then the family's rule on s;
    * ``'soft'``, EasySteer's soft router mode: z_i ← z_i ± ``strength``·std_j(z_j) (the step scales
      with the token's spread of router logits);
    * ``'add'``: z_i ← z_i ± ``strength`` (for softmax routers, p_i scaled by e^±strength and
      renormalised: "scale an expert's probability"; a raw logit is not scaled, as its sign would
      flip the direction).

    The soft modes move every chosen expert (no top-k cap); ``strength=0`` is the model's routing.

    Args:
        experts: the expert table file (``moesteer experts``).
        activate: how many of the table's positive-score experts to switch on.
        deactivate: how many of the table's negative-score experts to switch off.
        reverse: swap the signs (steer towards the other behaviour).
        mode: 'hard' (the paper's rule), 'soft' or 'add'.
        margin: 'hard': how far above the best (below the worst) score a steered expert goes.
        strength: 'soft' / 'add': the size of the logit step.

    Example: steermoe('experts.json', activate=2)
    """

    name: ClassVar[str] = "steermoe"
    paper: ClassVar[str] = "Steering MoE LLMs via Expert (De)Activation (Fayyaz et al., arXiv 2509.09660)"
    files: ClassVar[tuple[str, ...]] = ("experts",)

    experts: str
    activate: int = 0
    deactivate: int = 0
    reverse: bool = False
    mode: str = "hard"
    margin: float = 0.01
    strength: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in STEER_MODES:
            raise ValueError(f"SteerMoE: mode must be one of {', '.join(STEER_MODES)}, got {self.mode!r}")
        for field_name in ("activate", "deactivate"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"SteerMoE: {field_name} must be an integer >= 0, got {value!r}")
        for field_name in ("margin", "strength"):
            value = getattr(self, field_name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"SteerMoE: {field_name} must be a finite number >= 0, got {value!r}")

    def sets(self) -> tuple[dict[int, tuple[int, ...]], dict[int, tuple[int, ...]]]:
        table, sign = expert_table(self.experts), -1 if self.reverse else 1
        return table.top(self.activate, sign), table.top(self.deactivate, -sign)

    def apply(self, edit: RouterEdit, site: RouterSite) -> bool:
        on, off = self.sets()
        hard = self.mode == "hard"
        chosen_on, chosen_off = on.get(site.layer, ())[: site.top_k if hard else None], off.get(site.layer, ())
        if not chosen_on and not chosen_off:
            return False
        edit.steer_on.update(chosen_on)
        edit.steer_off.update(chosen_off)
        edit.steer_mode, edit.steer_amount = self.mode, float(self.margin if hard else self.strength)
        return True

    def check(self, num_experts: int, moe_layers: tuple[int, ...]) -> None:
        _check_table(expert_table(self.experts), num_experts, moe_layers, "SteerMoE")


@dataclass(frozen=True)
class RICE(Primitive):
    """Reinforce an expert table's ``count`` best experts by β.

    RICE (Wang et al., arXiv 2505.14681): reinforce the ``count`` experts with the highest
    score in the expert table ``experts`` (nPMI with a marker, ``moesteer experts --marker``) by
    β = ``beta`` at every token. ``variant='logit'``: z_i ← z_i + log β before selection (= β·p_i
    renormalised over all experts for softmax routers; it can pull the expert into the top-k);
    ``'weight'``: its mixing weight × β when selected. β = 1 is the model's routing.

    Args:
        experts: the expert table file (``moesteer experts --marker``).
        beta: reinforcement factor β > 0 (1 = the model's routing).
        count: how many of the table's best experts to reinforce.
        variant: 'logit' (z + log β before selection) or 'weight' (weight × β when selected).

    Example: rice('experts.json', beta=8.0)
    """

    name: ClassVar[str] = "rice"
    paper: ClassVar[str] = (
        "Two Experts Are All You Need for Steering Thinking: Reinforcing Cognitive Effort in MoE Reasoning Models "
        "Without Additional Training (Wang et al., arXiv 2505.14681)"
    )
    files: ClassVar[tuple[str, ...]] = ("experts",)

    experts: str
    beta: float = 64.0
    count: int = 2
    variant: str = "logit"

    def __post_init__(self) -> None:
        if not (isinstance(self.beta, int | float) and math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"RICE: beta must be a positive number, got {self.beta!r}")
        if not isinstance(self.count, int) or isinstance(self.count, bool) or self.count < 1:
            raise ValueError(f"RICE: count must be an integer >= 1, got {self.count!r}")
        if self.variant not in ("logit", "weight"):
            raise ValueError(f"RICE: variant must be 'logit' or 'weight', got {self.variant!r}")

    def apply(self, edit: RouterEdit, site: RouterSite) -> bool:
        chosen = expert_table(self.experts).top(self.count, 1).get(site.layer, ())
        if not chosen:
            return False
        if self.variant == "weight":
            for e in chosen:
                edit.scale[e] = edit.scale.get(e, 1.0) * float(self.beta)
        else:
            bias = torch.zeros(site.num_experts)
            bias[list(chosen)] = math.log(self.beta)
            edit.biases.append(bias)
        return True

    def check(self, num_experts: int, moe_layers: tuple[int, ...]) -> None:
        _check_table(expert_table(self.experts), num_experts, moe_layers, "RICE")


def _check_table(table, num_experts: int, moe_layers: tuple[int, ...], name: str) -> None:
    if (table.num_experts, tuple(table.moe_layers)) != (num_experts, tuple(moe_layers)):
        raise ValueError(
            f"{name}: the expert table covers {table.num_experts} experts in MoE layers {list(table.moe_layers)}; "
            f"the model has {num_experts} in {list(moe_layers)}"
        )


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
        bad = [x for x in self.layers if x not in moe_layers]
        if bad:
            raise ValueError(f"OnLayers: layers {bad} are not MoE layers; MoE layers are {list(moe_layers)}")
        self.policy.check(num_experts, moe_layers)


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
        edit.weights, edit.renormalise_weights = vec, self.renormalise
        return True


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


class EditCache:
    """The edit of each (policy, layer), computed once per policy object and call; both backends'
    router hooks keep one. Edits hold tensors by reference, so in-place updates stay visible."""

    def __init__(self, sites: Mapping[int, RouterSite]) -> None:
        self.sites = sites
        self._edits: dict[tuple[int, int], tuple[Policy, RouterEdit | None]] = {}

    def get(self, policy: Policy | None, layer: int) -> RouterEdit | None:
        if policy is None:
            return None
        key = (id(policy), layer)
        cached = self._edits.get(key)
        if cached is None or cached[0] is not policy:
            cached = (policy, policy.edit(self.sites[layer]))
            self._edits[key] = cached
        return cached[1]


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
        else:
            digest.update(repr(value).encode())

    feed(policy)
    return digest.hexdigest()[:16]
