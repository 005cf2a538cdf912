"""The ``mix`` test bed: five problem families in three formats, held-out cells, four buckets.

:mod:`.families` draws format-free problems, :mod:`.formats` renders them as text and extracts
answers, :mod:`.splits` fixes the evaluation splits and streams training documents.
"""

from __future__ import annotations

from functools import partial

from moesteer.evals.scoring import Extraction
from moesteer.evals.tasks.base import Task
from moesteer.evals.tasks.mix.formats import STOP, extract
from moesteer.evals.tasks.mix.splits import BEDS, BUCKETS, MixConfig, load_split, train_documents

MAX_TOKENS = 160
"""Enough for the longest chain (S2: eight logic operators in the sentence format)."""


def score(text: str, record: dict[str, str]) -> bool:
    """Exact match of the completion's stated answer (:func:`extract`) with the record's answer."""
    return extract(text) == record["answer"]


def extraction(text: str) -> Extraction:
    """:func:`extract` in the harness's form (``None`` when nothing was stated)."""
    answer = extract(text)
    return Extraction(answer, "strict" if answer is not None else None)


def prompt(record: dict[str, str], shots: int) -> str:
    """The 0-shot prompt, or the record's two solved demos of its cell followed by the prompt."""
    return (record["shots"] if shots else "") + record["prompt"]


def task(bucket: str, shots: int, bed: str = "mix") -> Task:
    """The registered task ``<bed>_<bucket>`` (0-shot) or ``<bed>_<bucket>_2shot`` of a revision
    of the bed (:data:`BEDS`: ``mix`` or ``mix3``)."""
    return Task(
        name=f"{bed}_{bucket}" + ("_2shot" if shots else ""),
        splits=("train", "validation", "test"),
        load=partial(load_split, bucket, config=BEDS[bed]),
        prompt=partial(prompt, shots=shots),
        gold=lambda record: record["answer"],
        extract=extraction,
        score=score,
        max_tokens=MAX_TOKENS,
        stop=STOP,
        source=f"synthetic {bed} test bed, bucket {bucket.upper()}, {shots}-shot (moesteer.evals.tasks.mix), seed 0",
    )


TASKS = tuple(task(bucket, shots, bed) for bed in BEDS for bucket in BUCKETS for shots in (0, 2))


__all__ = [
    "BEDS",
    "BUCKETS",
    "STOP",
    "TASKS",
    "MixConfig",
    "extract",
    "extraction",
    "load_split",
    "prompt",
    "score",
    "task",
    "train_documents",
]
