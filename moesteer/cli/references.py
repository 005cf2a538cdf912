"""``moesteer references build|info|neighbours``: C3PO reference sets (see :mod:`moesteer.c3po`)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from moesteer.cli.common import load_lm, model_options, positive
from moesteer.cli.table import TABLE_WIDTH, format_table, wide_option


@click.group()
def references() -> None:
    """C3PO reference sets: problems the model answers correctly, with their routing."""


@references.command()
@click.option("--task", required=True, help="Task name, e.g. arith (any task the eval runner supports).")
@click.option("--split", default=None, help="Data split, one the task declares (default: its test split).")
@click.option("--limit", type=positive(), default=None, help="Run the first N problems only.")
@click.option("--data", type=click.Path(dir_okay=False), default=None, help="Local JSONL file with the task's records.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder of the reference set.")
@model_options
@click.option(
    "--backend",
    type=click.Choice(["hf"]),
    default="hf",
    show_default=True,
    help="Engine (hf only: it records router distributions).",
)
@click.option(
    "--embedding", default=None, help="Sentence-transformers id or folder (default: all-MiniLM-L6-v2, packaged)."
)
@click.option("--batch-size", type=positive(), default=32, show_default=True, help="Problems per engine call.")
def build(task, split, limit, data, out, model, dtype, device, backend, embedding, batch_size) -> None:
    """Run the model greedily on a task split; keep what it answers correctly, with routing and embeddings."""
    from moesteer.c3po import load_embedder
    from moesteer.evals.references import build as build_set
    from moesteer.evals.tasks import get_task

    chosen = get_task(task)
    if data is None:
        chosen.split(split)  # a bad split fails before any model loads
    embedder = load_embedder(embedding)
    lm = load_lm(model, dtype, device, backend)
    start = time.perf_counter()
    built = build_set(lm, chosen, embedder, split=split, limit=limit, data=data, batch_size=batch_size, progress=True)
    built.save(out)
    click.echo(f"built in {time.perf_counter() - start:.1f}s", err=True)
    click.echo(f"{out}\n{built.summary()}")


@references.command()
@click.argument("folder", type=click.Path(path_type=Path))
def info(folder: Path) -> None:
    """Print what a reference set holds."""
    from moesteer.c3po import ReferenceSet

    click.echo(ReferenceSet.load(folder).summary())


@references.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.argument("question")
@click.option("--k", type=positive(), default=3, show_default=True, help="Neighbours (kNN).")
@click.option("--eps", type=click.FloatRange(0, 2), default=None, help="Use an ε-ball of this cosine distance instead.")
@click.option(
    "--max-similarity",
    type=click.FloatRange(-1, 1),
    default=0.95,
    show_default=True,
    help="Drop near-duplicates above this similarity.",
)
@wide_option
def neighbours(folder: Path, question: str, k: int, eps: float | None, max_similarity: float, wide: bool) -> None:
    """Print the references nearest to QUESTION: similarity, Gaussian kernel weight, id, question."""
    from moesteer.c3po import KNN, EpsilonBall, Gaussian, ReferenceSet, load_embedder
    from moesteer.c3po import neighbours as find

    refs = ReferenceSet.load(folder)
    query = load_embedder(refs.manifest.embedding_model).encode([question])[0]
    found = find(query, refs.embeddings, EpsilonBall(eps) if eps is not None else KNN(k), max_similarity)
    weights = Gaussian()(found.similarity)
    rows = [
        [f"{s:.4f}", f"{w:.4f}", refs.references[i].id, " ".join(refs.references[i].question.split())]
        for i, s, w in zip(found.index.tolist(), found.similarity.tolist(), weights.tolist(), strict=True)
    ]
    header = ["cosine", "weight", "id", "question"]
    click.echo(format_table(header, rows, width=None if wide else TABLE_WIDTH, wrap=("question",)))
