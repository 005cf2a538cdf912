"""Evals: task registry, offline data, scoring, sandbox, resumable runner, comparison.

``moesteer.evals.run(EvalConfig(task="arith", strategy="scmoe(beta=0.5)"), "runs/x")`` does what
``moesteer eval`` does.
"""

from __future__ import annotations

__all__ = ["EvalConfig", "run"]


def __getattr__(name: str):
    if name in __all__:  # lazy: the verifiers import tasks; the runner imports the strategies that import them
        from moesteer.evals import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'moesteer.evals' has no attribute {name!r}")
