"""Hyper-parameter search for a strategy on a task's validation split (greedy accuracy).

The test split is never searched by default: :func:`tuning_split` takes the task's validation
split, and a task without one is tuned only on a split the user names.

RoE tunes its τ profile with Optuna's TPE sampler (arXiv 2509.17238, App. A); SCMoE sweeps β
(arXiv 2405.14507, App. D). :func:`tune` does either for any registered strategy: Optuna TPE when
``optuna`` is installed (``pip install moesteer[tune]``), else (or with ``method="grid"``) a grid.
Search dimensions are written ``name=a,b,c`` (choices) or ``name=low:high`` (a range; a grid
takes 5 evenly spaced points of it).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from moesteer.checks import parse_kv
from moesteer.evals.runner import evaluate, task_sampling
from moesteer.evals.tasks import Task
from moesteer.lm import LM
from moesteer.strategies.spec import parse

GRID_POINTS = 5


@dataclass(frozen=True)
class Dimension:
    """One searched parameter: explicit ``choices``, or a continuous range ``[low, high]``."""

    name: str
    choices: tuple[object, ...] = ()
    low: float | None = None
    high: float | None = None

    @classmethod
    def parse(cls, text: str) -> Dimension:
        """``name=a,b,c`` (choices) or ``name=low:high`` (a range)."""
        example = "name=a,b,c or name=low:high"
        ((name, values),) = parse_kv([text], "search dimension", example).items()
        if not values:
            raise ValueError(f"bad search dimension {text!r}: expected KEY=VALUE, e.g. {example}")
        if ":" in values:
            low, _, high = values.partition(":")
            try:
                lo, hi = float(low), float(high)
            except ValueError:
                raise ValueError(f"bad range in {text!r}: expected numbers, e.g. tau=0:0.5") from None
            if not lo < hi:
                raise ValueError(f"bad range in {text!r}: low must be below high")
            return cls(name, low=lo, high=hi)
        return cls(name, choices=tuple(_literal(v.strip()) for v in values.split(",")))

    def grid(self) -> tuple[object, ...]:
        if self.choices:
            return self.choices
        step = (self.high - self.low) / (GRID_POINTS - 1)
        return tuple(round(self.low + i * step, 6) for i in range(GRID_POINTS))


def _literal(text: str) -> object:
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def tuning_split(task: Task, split: str | None = None) -> str:
    """The split to tune on: ``split`` if the task declares it, else its validation split."""
    if split is None:
        if "validation" not in task.splits:
            raise ValueError(
                f"task {task.name} has no validation split (splits: {', '.join(task.splits)}); "
                "name the split to tune on with --split"
            )
        return "validation"
    if task.split(split) == task.test_split and "validation" in task.splits:
        raise ValueError(
            f"tuning {task.name} on its test split would leak it into the reported numbers; use validation"
        )
    return split


@dataclass(frozen=True)
class Trial:
    spec: str
    accuracy: float


@dataclass(frozen=True)
class TuneResult:
    best: Trial
    trials: tuple[Trial, ...]
    method: str


def strategy_spec(name: str, fixed: dict[str, str], values: dict[str, object]) -> str:
    """The spec text of ``name`` with fixed parameters (spec text) and searched values."""
    parts = [f"{k}={v}" for k, v in fixed.items()] + [f"{k}={v!r}" for k, v in values.items()]
    return f"{name}({', '.join(parts)})"


def tune(
    lm: LM,
    task: Task,
    name: str,
    space: Sequence[Dimension],
    *,
    fixed: dict[str, str] | None = None,
    problems: list[dict],
    trials: int = 20,
    method: str = "optuna",
    seed: int = 0,
    max_tokens: int | None = None,
    batch_size: int = 32,
    report: Callable[[Trial], None] = lambda trial: None,
) -> TuneResult:
    """Search ``space`` for strategy ``name`` by greedy accuracy on ``problems``."""
    if method not in ("optuna", "grid"):
        raise ValueError(f"method must be optuna or grid, got {method!r}")
    fixed = fixed or {}
    parse(strategy_spec(name, fixed, {d.name: d.grid()[0] for d in space}))  # fail fast on bad names
    sampling = task_sampling(task, seed=seed, max_tokens=max_tokens)
    indexed = list(enumerate(problems))
    seen: dict[str, Trial] = {}

    def objective(values: dict[str, object]) -> float:
        strategy = parse(strategy_spec(name, fixed, values))
        spec = strategy.spec()
        if spec not in seen:
            records = list(evaluate(lm, task, strategy, sampling, indexed, batch_size))
            seen[spec] = Trial(spec, sum(r["correct"] for r in records) / len(records))
            report(seen[spec])
        return seen[spec].accuracy

    if method == "optuna":
        try:
            import optuna
        except ImportError:
            method = "grid"
    if method == "optuna":
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))

        def suggest(trial) -> float:
            values = {
                d.name: trial.suggest_categorical(d.name, list(d.choices))
                if d.choices
                else trial.suggest_float(d.name, d.low, d.high)
                for d in space
            }
            return objective({k: round(v, 4) if isinstance(v, float) else v for k, v in values.items()})

        study.optimize(suggest, n_trials=trials)
    else:
        for combination in itertools.product(*(d.grid() for d in space)):
            objective(dict(zip((d.name for d in space), combination, strict=True)))
    ordered = tuple(seen.values())
    best = max(ordered, key=lambda t: t.accuracy)  # first of equals: the earliest trial
    return TuneResult(best, ordered, method)
