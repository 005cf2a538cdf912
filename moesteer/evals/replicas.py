"""Replica data parallelism for evals: one run's problems split over N engine replicas on Ray.

Each replica is a Ray actor holding its own engine (its own copy of the model: HF, or vLLM in the
actor's process) and ``threads`` CPU threads. The problems still to do are cut into the batches a
single process would run (``batch_size`` consecutive problems), and the batches are dealt to the
replicas in turn, so every problem — with all samples and branches of its sequences — is decoded
in the same batch, by one engine, as in a one-process run. Routing never crosses replicas.

Nothing is lost or duplicated when a replica or the driver dies:

* a replica appends each scored problem to its own shard, ``shards/replica-<r>.jsonl`` (flushed
  and fsynced), before it returns the batch;
* the driver appends every returned problem it has not seen to ``samples.jsonl`` (fsynced), keyed
  by problem id;
* a replica killed mid-batch is restarted by Ray, which runs the batch again (``max_restarts``);
* on start, and so on resume after the driver was killed, the driver first folds every shard's
  problems into ``samples.jsonl``; when the run is complete it rewrites ``samples.jsonl`` in
  problem order (what a one-process run writes) and removes the shards.

Ray starts locally with ``replicas × threads`` CPUs unless ``address`` names a running cluster.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from moesteer.evals.rundir import SAMPLES, read_samples

SHARDS = "shards"
MAX_RESTARTS = 2  # times Ray restarts a dead replica (and re-runs its batch in flight)


def batches(todo: list[tuple[int, dict]], batch_size: int) -> list[list[tuple[int, dict]]]:
    return [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]


def fold_shards(out: Path, done: dict[str, dict], sink) -> None:
    """Append to ``sink`` (``samples.jsonl``) the shards' problems that ``done`` lacks."""
    for shard in sorted((out / SHARDS).glob("replica-*.jsonl")):
        for problem_id, record in read_samples(shard).items():
            if problem_id not in done:
                _append(sink, record)
                done[problem_id] = record


def finish(out: Path, records: list[dict]) -> None:
    """Rewrite ``samples.jsonl`` as ``records`` (problem order), atomically, and drop the shards."""
    staged = out / (SAMPLES + ".tmp")
    staged.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    with open(staged, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(staged, out / SAMPLES)
    for shard in (out / SHARDS).glob("replica-*.jsonl"):
        shard.unlink()
    if (out / SHARDS).is_dir():
        (out / SHARDS).rmdir()


def evaluate_on_replicas(
    config,
    strategy,
    todo: list[tuple[int, dict]],
    out: Path,
    *,
    replicas: int,
    threads: int,
    batch_size: int,
    address: str | None = None,
    model: dict | None = None,
) -> Iterator[dict]:
    """Scored records of ``todo``, computed by ``replicas`` Ray actors, as each batch returns;
    ``model`` (when given) is filled with the replicas' model description (``batch.describe``)."""
    ray = _import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        kwargs = {"address": address} if address else {"num_cpus": replicas * threads}
        ray.init(**kwargs, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        (out / SHARDS).mkdir(exist_ok=True)
        actor = ray.remote(num_cpus=threads, max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)(Replica)
        pool = [
            actor.remote(config, strategy, str(out / SHARDS / f"replica-{r}.jsonl"), threads, _core_binding(r, threads))
            for r in range(replicas)
        ]
        pending = [pool[i % replicas].run.remote(batch) for i, batch in enumerate(batches(todo, batch_size))]
        try:
            if model is not None:
                model.update(ray.get(pool[0].describe.remote()))
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                yield from ray.get(ready[0])
        except ray.exceptions.RayError as err:  # a replica kept failing (beyond MAX_RESTARTS)
            raise RuntimeError(f"an eval replica failed: {_cause(err)}; re-run to resume") from None
    finally:
        if started_here:
            ray.shutdown()


class Replica:
    """One engine replica (a Ray actor): loads the model once, evaluates the batches it is given."""

    def __init__(self, config, strategy, shard: str, threads: int, env: dict[str, str]) -> None:
        import torch

        from moesteer.evals.tasks import get_task
        from moesteer.lm import load

        os.environ.update({k: v for k, v in env.items() if k not in os.environ})
        torch.set_num_threads(threads)
        self.task, self.strategy, self.shard = get_task(config.task), strategy, shard
        self.lm = load(config.model, dtype=config.dtype, backend=config.backend)
        self.config = config

    def describe(self) -> dict:
        from moesteer.evals.batch import describe

        return describe(self.lm)

    def run(self, batch: list[tuple[int, dict]]) -> list[dict]:
        from moesteer.evals.batch import evaluate, task_sampling

        config = self.config
        sampling = task_sampling(
            self.task, temperature=config.temperature, max_tokens=config.max_tokens, seed=config.seed, n=config.n
        )
        records = list(evaluate(self.lm, self.task, self.strategy, sampling, batch, len(batch)))
        with open(self.shard, "a", encoding="utf-8") as sink:
            for record in records:
                _append(sink, record)
        return records


def _append(sink, record: dict) -> None:
    sink.write(json.dumps(record) + "\n")
    sink.flush()
    os.fsync(sink.fileno())


def _core_binding(replica: int, threads: int) -> dict[str, str]:
    """vLLM's CPU workers bind their OpenMP threads; each replica gets its own cores (when unset)."""
    first = replica * threads
    return {"VLLM_CPU_OMP_THREADS_BIND": f"{first}-{first + threads - 1}" if threads > 1 else str(first)}


def _cause(err: Exception) -> str:
    """The last line of a Ray error (its cause's own one-line message)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ImportError("--replicas needs Ray: pip install 'moesteer[ray]' (make install does)") from None
    return ray
