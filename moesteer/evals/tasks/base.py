"""The ``Task`` declaration: data, prompt, gold answer, extraction and scoring of one benchmark."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from moesteer.evals.scoring import Extraction


@dataclass(frozen=True)
class Task:
    """One eval task.

    Generative tasks score the completion text (``score(text, record)``); multiple-choice tasks set
    ``choices`` and are scored by the steered log-likelihood of each choice after the prompt (the
    highest wins; ``gold`` is then the index of the right choice, as a string).
    """

    name: str
    splits: tuple[str, ...]  # the last one is the test split, evaluated by default
    load: Callable[[str], list[dict]]
    prompt: Callable[[dict], str]
    gold: Callable[[dict], str]
    extract: Callable[[str], Extraction] | None = None  # generative tasks
    score: Callable[[str, dict], bool] | None = None  # generative tasks
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    choices: Callable[[dict], list[str]] | None = None
    source: str = ""  # where the data comes from, and its license
    executes_code: bool = False  # scoring runs generated programs (needs the sandbox, or --unsafe-exec)

    @property
    def multiple_choice(self) -> bool:
        return self.choices is not None

    @property
    def test_split(self) -> str:
        return self.splits[-1]

    def split(self, name: str | None) -> str:
        """``name`` if this task declares it, the test split for ``None``; else a ``ValueError``."""
        if name is None:
            return self.test_split
        if name not in self.splits:
            raise ValueError(f"task {self.name} has no split {name!r}; its splits: {', '.join(self.splits)}")
        return name

    def __post_init__(self) -> None:
        if (self.choices is None) == (self.score is None):
            raise ValueError(f"task {self.name}: give either score (generative) or choices (multiple choice)")
        if not self.splits:
            raise ValueError(f"task {self.name}: declare at least one split")
