"""Verifiers for search controllers (DES, beam search, Best-of-N): per-step scores of chains.

``load(name, model=None)`` builds one by name: ``prm`` (a process reward model, ``model`` = hub id
or local path), ``arith_steps`` (exact rule verifier of the ``arith`` task), ``mix_steps`` (of the
``mix`` test bed's chain families), ``confidence`` (the policy's own mean token log-prob) or ``none``
(no scores: majority vote only).
"""

from __future__ import annotations

from moesteer.registry import Registry
from moesteer.verifiers.arith import ArithSteps
from moesteer.verifiers.base import AGGREGATES, NoScores, Verifier, aggregate, score_outputs, split_steps
from moesteer.verifiers.confidence import Confidence
from moesteer.verifiers.mix import MixSteps

VERIFIERS: Registry[type[Verifier]] = Registry(
    "verifier",
    {
        "prm": "moesteer.verifiers.prm:ProcessRewardModel",
        "arith_steps": ArithSteps,
        "mix_steps": MixSteps,
        "confidence": Confidence,
        "none": NoScores,
    },
)
"""Verifier classes by name (the PRM, which needs a model, loads on first use)."""


def check_name(name: str) -> None:
    """A one-line "did you mean" ``ValueError`` for an unknown verifier name."""
    if name not in VERIFIERS:
        raise ValueError(VERIFIERS.unknown(name))


def load(name: str, model: str | None = None) -> Verifier:
    """The verifier called ``name``; ``model`` is the PRM's hub id or path (``prm`` only)."""
    check_name(name)
    if model is not None and name != "prm":
        raise ValueError(f"verifier_model is for verifier='prm', not {name!r}")
    verifier = VERIFIERS.get(name)
    return verifier(model) if model else verifier()


__all__ = ["AGGREGATES", "VERIFIERS", "Verifier", "aggregate", "check_name", "load", "score_outputs", "split_steps"]
