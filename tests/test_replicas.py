"""Replica data parallelism for evals (``--replicas N`` on a local Ray): the same samples as one
process, and nothing lost or duplicated when a replica or the driver is killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from moesteer.evals.replicas import SHARDS, batches
from moesteer.evals.runner import EvalConfig, run

pytest.importorskip("ray", reason="replica evals need ray: run `make test`, which installs it")

LIMIT, BATCH = 96, 8
CONFIG = EvalConfig(task="arith", limit=LIMIT)
EVAL = [sys.executable, "-m", "moesteer", "eval", "--task", "arith", "--limit", str(LIMIT), "--batch-size", str(BATCH)]


def _samples(run_dir: Path) -> list[dict]:
    """The run's records without their wall time (the one field that differs between runs)."""
    lines = (run_dir / "samples.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[list[dict], dict]:
    out = tmp_path_factory.mktemp("one") / "run"
    results = run(CONFIG, out, batch_size=BATCH, progress=False)
    return _samples(out), results


def test_batches_are_the_ones_a_single_process_runs():
    todo = [(i, {"id": str(i)}) for i in range(20)]
    assert [[i for i, _ in b] for b in batches(todo, 8)] == [list(range(8)), list(range(8, 16)), list(range(16, 20))]


def test_two_replicas_give_the_samples_and_results_of_one_process(tmp_path, one_process):
    samples, results = one_process
    out = tmp_path / "run"
    ours = run(CONFIG, out, batch_size=BATCH, progress=False, replicas=2)
    assert _samples(out) == samples  # every field of every problem, in problem order
    for key in ("metrics", "num_samples", "config", "model", "model_revision", "data_sha256"):
        assert ours[key] == results[key], key
    assert not (out / SHARDS).exists()


def _eval(out: Path, *extra: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [*EVAL, "--output", str(out), "--replicas", "2", *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def _wait_for_shard_lines(out: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    shards = out / "arith" / "plain" / SHARDS
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        if any(f.read_text().count("\n") >= 1 for f in shards.glob("replica-*.jsonl")):
            return
        time.sleep(0.05)
    raise AssertionError("no replica wrote a problem in time")


def _replica_processes() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any("Replica" in part for part in proc.info["cmdline"] or []):
            found.append(proc)
    return found


def test_a_replica_killed_mid_run_loses_and_duplicates_nothing(tmp_path, one_process):
    """SIGKILL one replica while both are decoding: Ray restarts it and re-runs its batch; the
    run completes with every problem exactly once, as one process writes it."""
    samples, _ = one_process
    proc = _eval(tmp_path)
    _wait_for_shard_lines(tmp_path, proc)
    victims = _replica_processes()
    assert victims, "no replica process found"
    victims[0].send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert _samples(tmp_path / "arith" / "plain") == samples


def test_a_killed_driver_resumes_without_losing_or_duplicating(tmp_path, one_process):
    """SIGKILL the driver and its replicas mid-run, then run the same command again: the shards'
    problems are folded in, the rest is evaluated, and the result is the one-process run."""
    samples, _ = one_process
    proc = _eval(tmp_path, start_new_session=True)
    _wait_for_shard_lines(tmp_path, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    run_dir = tmp_path / "arith" / "plain"
    partial = len(list((run_dir / SHARDS).glob("replica-*.jsonl")))
    assert partial >= 1 and (run_dir / SHARDS).is_dir()
    again = _eval(tmp_path)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert _samples(run_dir) == samples
    assert not (run_dir / SHARDS).exists()
