"""Task registry: each task declares its data, prompt, answer extraction and scoring."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

from moesteer.evals.tasks import arith


@dataclass(frozen=True)
class Task:
    """Declaration of an eval task.

    ``load(split)`` returns problems as dicts with at least ``id``, ``prompt`` and ``answer``;
    ``prompt_template`` is formatted with a problem's fields to give the model input.
    """

    name: str
    splits: tuple[str, ...]
    load: Callable[[str], list[dict[str, str]]]
    prompt_template: str
    extract: Callable[[str], str | None]
    score: Callable[[str, str], bool]
    max_tokens: int
    stop: tuple[str, ...]

    def prompt(self, problem: dict[str, str]) -> str:
        """The model input for one problem."""
        return self.prompt_template.format(**problem)


ARITH = Task(
    name="arith",
    splits=("validation", "test"),
    load=arith.load_split,
    prompt_template="{prompt}",
    extract=arith.extract_answer,
    score=arith.score,
    max_tokens=128,
    stop=("Q:",),
)

TASKS: dict[str, Task] = {"arith": ARITH}


def get_task(name: str) -> Task:
    """The registered task called ``name``; unknown names get a "did you mean" error."""
    if name in TASKS:
        return TASKS[name]
    close = difflib.get_close_matches(name, TASKS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown task {name!r}.{hint} Known tasks: {', '.join(sorted(TASKS))}")
