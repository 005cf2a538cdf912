"""C3PO (arXiv 2504.07964): per-sample routing re-mixing from successful neighbours.

This package holds its foundation: reference sets (:mod:`.references`; building one is an eval,
:func:`moesteer.evals.references.build`), question embeddings (:mod:`.embedding`), neighbour
retrieval with kernels (:mod:`.retrieval`) and question groups (:mod:`.groups`).
"""

from moesteer.c3po.embedding import DEFAULT_EMBEDDING, Embedder, load_embedder
from moesteer.c3po.references import Manifest, Reference, ReferenceSet, last_token_routing
from moesteer.c3po.retrieval import (
    KERNELS,
    KNN,
    EpsilonBall,
    Gaussian,
    Linear,
    Matern,
    Neighbours,
    Polynomial,
    cosine_similarity,
    neighbours,
)

__all__ = [
    "DEFAULT_EMBEDDING",
    "KERNELS",
    "KNN",
    "Embedder",
    "EpsilonBall",
    "Gaussian",
    "Linear",
    "Manifest",
    "Matern",
    "Neighbours",
    "Polynomial",
    "Reference",
    "ReferenceSet",
    "cosine_similarity",
    "last_token_routing",
    "load_embedder",
    "neighbours",
]
