"""Neighbours of a test question among the references, and the kernels that weight them.

Embeddings are unit vectors (:mod:`.embedding`), so the cosine similarity is ``s = ⟨e_i, e⟩`` and
the squared Euclidean distance is ``‖e_i − e‖² = 2 − 2s``. The paper [§3.4, eqs. 9–10]:

* kNN: ``N(x) = argmin_{|A| ≤ k} Σ_{i∈A} d(x_i, x)`` — the ``k`` most similar references (k = 3 is
  the paper's best and the released code's choice);
* ε-ball: ``N(x) = {i : d(x_i, x) ≤ ε}``; the paper leaves ``d`` open: here the cosine distance
  ``d = 1 − s`` (the paper tries ε = 0.3, 0.5, 0.7);
* leakage guard: references with similarity above 0.95 to the test question are dropped before
  either [§4.1] (the released code has no guard: ``max_similarity=None``).

Kernels ``K(x_i, x)`` [Table 6] are functions of ``s`` alone (unit embeddings); their parameters
are not given in the paper, so they are fields here:

* Gaussian ``exp(−‖e_i − e‖² / 2σ²)``, σ = ``bandwidth`` (the paper's best kernel);
* linear ``⟨e_i, e⟩`` (the released code's raw cosine weights);
* polynomial ``(⟨e_i, e⟩ + c)^p``;
* Matérn ν = 3/2 ``(1 + √3 r/ℓ) exp(−√3 r/ℓ)`` with ``r = ‖e_i − e‖``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from moesteer.c3po.groups import operator_pattern
from moesteer.checks import check_int
from moesteer.registry import Registry

DUPLICATE_SIMILARITY = 0.95


def cosine_similarity(query: Tensor, keys: Tensor) -> Tensor:
    """Cosine similarity ``[N]`` of one query ``[D]`` to each row of ``keys [N, D]``."""
    q = torch.nn.functional.normalize(query.float(), dim=-1)
    k = torch.nn.functional.normalize(keys.float(), dim=-1)
    return k @ q


@dataclass(frozen=True)
class KNN:
    """The ``k`` most similar references (fewer when fewer remain after the guard)."""

    k: int = 3

    def __post_init__(self) -> None:
        check_int("k", self.k)

    def select(self, similarity: Tensor) -> Tensor:
        return similarity.topk(min(self.k, len(similarity))).indices


@dataclass(frozen=True)
class EpsilonBall:
    """Every reference within cosine distance ``eps`` (``1 − s ≤ eps``), most similar first."""

    eps: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.eps <= 2.0:
            raise ValueError(f"eps must be a cosine distance in 0..2, got {self.eps!r}")

    def select(self, similarity: Tensor) -> Tensor:
        inside = (1.0 - similarity <= self.eps).nonzero().flatten()
        return inside[similarity[inside].argsort(descending=True)]


Neighbourhood = KNN | EpsilonBall


@dataclass(frozen=True)
class Neighbours:
    """Chosen references: their row ``index [n]`` in the reference set and ``similarity [n]``."""

    index: Tensor
    similarity: Tensor

    def __len__(self) -> int:
        return len(self.index)


def neighbours(
    query: Tensor,
    embeddings: Tensor,
    neighbourhood: Neighbourhood = KNN(),
    max_similarity: float | None = DUPLICATE_SIMILARITY,
    candidates: Tensor | None = None,
) -> Neighbours:
    """The neighbourhood of ``query [D]`` among ``embeddings [N, D]`` (only the rows ``candidates``
    if given), after dropping references more similar than ``max_similarity`` (``None``: keep all).
    May be empty."""
    similarity = cosine_similarity(query, embeddings)
    allowed = torch.arange(len(similarity)) if candidates is None else candidates
    if max_similarity is not None:
        allowed = allowed[similarity[allowed] <= max_similarity]
    chosen = allowed[neighbourhood.select(similarity[allowed])]
    return Neighbours(chosen, similarity[chosen])


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class Gaussian:
    """``K = exp(−‖e_i − e‖² / 2σ²)``, σ = ``bandwidth`` (unit embeddings: ‖·‖² ∈ [0, 4])."""

    bandwidth: float = 1.0

    def __post_init__(self) -> None:
        _positive("bandwidth", self.bandwidth)

    def __call__(self, similarity: Tensor) -> Tensor:
        return torch.exp(-(2.0 - 2.0 * similarity) / (2.0 * self.bandwidth**2))


@dataclass(frozen=True)
class Linear:
    """``K = ⟨e_i, e⟩``: the raw cosine similarity (the released code's weights; may be negative)."""

    def __call__(self, similarity: Tensor) -> Tensor:
        return similarity.clone()


@dataclass(frozen=True)
class Polynomial:
    """``K = (⟨e_i, e⟩ + offset)^degree``."""

    degree: int = 2
    offset: float = 1.0

    def __post_init__(self) -> None:
        check_int("degree", self.degree)
        if not (isinstance(self.offset, int | float) and math.isfinite(self.offset) and self.offset >= 0):
            raise ValueError(f"offset must be a number >= 0, got {self.offset!r}")

    def __call__(self, similarity: Tensor) -> Tensor:
        return (similarity + self.offset) ** self.degree


@dataclass(frozen=True)
class Matern:
    """Matérn ν = 3/2: ``K = (1 + √3 r/ℓ) exp(−√3 r/ℓ)``, ``r = ‖e_i − e‖``, ℓ = ``length_scale``."""

    length_scale: float = 1.0

    def __post_init__(self) -> None:
        _positive("length_scale", self.length_scale)

    def __call__(self, similarity: Tensor) -> Tensor:
        scaled = math.sqrt(3.0) * (2.0 - 2.0 * similarity).clamp(min=0).sqrt() / self.length_scale
        return (1.0 + scaled) * torch.exp(-scaled)


Kernel = Gaussian | Linear | Polynomial | Matern
KERNELS: Registry[type] = Registry(
    "kernel", {"gaussian": Gaussian, "linear": Linear, "polynomial": Polynomial, "matern": Matern}
)


GROUPS: Registry[Callable[[str], str]] = Registry("group", {"arith_ops": operator_pattern})
"""Keys that restrict neighbours to references of the test question's group (C3PO's ``within``):
an oracle, since a real test question comes with no such label."""
