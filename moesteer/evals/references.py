"""Building C3PO reference sets: an eval of the task's problems, the correct answers kept.

The set's format, loading and compatibility checks are :mod:`moesteer.c3po.references`; building
one runs the eval runner's batches under plain greedy decoding, then records each kept question's
routing and embedding.
"""

from __future__ import annotations

import datetime

import torch

from moesteer.c3po.embedding import Embedder
from moesteer.c3po.references import Manifest, Reference, ReferenceSet, last_token_routing, router_sha256
from moesteer.evals.runner import evaluate, load_problems, task_sampling
from moesteer.evals.tasks import Task
from moesteer.lm import LM
from moesteer.progress import progress as progress_bar
from moesteer.strategy import Plain

__all__ = ["build", "correct_records"]


def correct_records(
    lm: LM,
    task: Task,
    split: str | None = None,
    limit: int | None = None,
    data: str | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> tuple[list[dict], int]:
    """The eval runner's scored records of the problems the model answers correctly greedily, and
    how many problems were run."""
    problems = load_problems(task, split, data, limit)
    records = evaluate(lm, task, Plain(), task_sampling(task), list(enumerate(problems)), batch_size)
    bar = progress_bar(records, total=len(problems), desc="references", unit="problem", disable=not progress)
    return [r for r in bar if r["correct"]], len(problems)


def build(
    lm: LM,
    task: Task,
    embedder: Embedder,
    *,
    split: str | None = None,
    limit: int | None = None,
    data: str | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> ReferenceSet:
    """The reference set of ``task``'s ``split`` (or the JSONL file ``data``) for ``lm``: greedy
    answers scored by the task, the correct ones kept (``ValueError`` if none is); ``progress``
    shows bars on stderr."""
    if lm.model is None:
        raise ValueError("references are built with backend hf (router distributions); got backend vllm")
    kept, attempted = correct_records(lm, task, split, limit, data, batch_size, progress)
    source = f"--data file {data}" if data is not None else f"the {task.split(split)} split of {task.name}"
    if not kept:
        raise ValueError(f"{lm.name} answered none of the {attempted} problems of {source} correctly: no references")
    references = tuple(Reference(r["id"], r["prompt"], r["outputs"][0]) for r in kept)
    routed = progress_bar(references, desc="routing", unit="reference", disable=not progress)
    routing = torch.stack([last_token_routing(lm.engine, r.question) for r in routed]).float()
    embeddings = embedder.encode([r.question for r in references])
    manifest = Manifest(
        model=lm.name,
        model_type=lm.adapter.model_type,
        moe_layers=tuple(lm.moe_layers),
        num_experts=int(routing.shape[-1]),
        embedding_model=embedder.name,
        embedding_dim=int(embeddings.shape[-1]),
        task=task.name,
        split=task.split(split) if data is None else f"file:{data}",
        count=len(references),
        attempted=attempted,
        router_sha256=router_sha256(lm.engine.router_weights()),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    return ReferenceSet(manifest, references, embeddings, routing)
