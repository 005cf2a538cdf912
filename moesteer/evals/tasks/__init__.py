"""Task registry: one small declaration per task (see :class:`~moesteer.evals.tasks.base.Task`).

``get_task`` takes a registered name, or the path of a YAML/JSON task file
(:mod:`moesteer.evals.tasks.custom`); ``register_task`` adds tasks from Python.
"""

from __future__ import annotations

from pathlib import Path

from moesteer.evals.scoring import extract_gsm8k
from moesteer.evals.tasks import arith, mix
from moesteer.evals.tasks.base import Task
from moesteer.evals.tasks.benchmarks import BENCHMARKS
from moesteer.registry import Registry

__all__ = ["ARITH", "TASKS", "Task", "get_task", "register_task"]

ARITH = Task(
    name="arith",
    splits=("train", "validation", "test"),
    load=arith.load_split,
    prompt=lambda problem: problem["prompt"],
    gold=lambda problem: problem["answer"],
    extract=extract_gsm8k,
    score=lambda text, problem: arith.score(text, problem["answer"]),
    max_tokens=128,
    stop=("Q:",),
    source="synthetic multi-step arithmetic (moesteer.evals.tasks.arith), fixed seed",
)

TASKS: Registry[Task] = Registry("task", {task.name: task for task in (ARITH, *mix.TASKS, *BENCHMARKS)})


def register_task(task: Task, *, replace: bool = False) -> None:
    """Make ``task`` available by name to ``get_task``, ``moesteer eval`` and ``moesteer tune``."""
    TASKS.register(task.name, task, replace=replace)


def get_task(name: str) -> Task:
    """The task called ``name``, or loaded from a ``.yaml``/``.yml``/``.json`` file; "did you mean" errors."""
    if name in TASKS:
        return TASKS.get(name)
    if Path(name).suffix in (".yaml", ".yml", ".json"):
        from moesteer.evals.tasks.custom import load_task_file

        if not Path(name).is_file():
            raise FileNotFoundError(f"task file {name} does not exist")
        return load_task_file(name)
    raise ValueError(f"{TASKS.unknown(name)}, or a task .yaml/.json file")
