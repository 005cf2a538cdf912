"""Eval runner: files, resume after kill -9, refusal of a changed configuration, compare."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

import moesteer
from moesteer.cli import main
from moesteer.evals.runner import EvalConfig, run
from moesteer.evals.stats import holm, mcnemar_p, pass_at_k, wilson_interval
from moesteer.testing import save_tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(save_tiny(tmp_path_factory.mktemp("tiny-olmoe"), "olmoe"))


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_writes_samples_and_results(model_dir, tmp_path):
    config = EvalConfig(task="arith", strategy="scmoe(beta=0.5)", model=model_dir, limit=5, max_tokens=8)
    results = run(config, tmp_path / "out", progress=False)
    samples = _lines(tmp_path / "out" / "samples.jsonl")
    assert [s["index"] for s in samples] == list(range(5)) and len({s["id"] for s in samples}) == 5
    for key in ("prompt", "outputs", "answers", "rules", "gold", "correct", "tokens", "forward_passes", "token_rows"):
        assert key in samples[0]
    assert results["num_samples"] == 5 and results["strategy"] == "scmoe(beta=0.5)"
    assert results["cost"]["token_rows_per_sample"] > results["cost"]["forward_passes_per_sample"] > 0
    assert set(results["versions"]) >= {"moesteer", "torch", "transformers"}


def test_n_samples_report_pass_at_k(model_dir, tmp_path):
    config = EvalConfig(task="arith", model=model_dir, limit=3, n=4, temperature=1.0, max_tokens=6)
    results = run(config, tmp_path, progress=False)
    assert set(results["metrics"]["pass@k"]) == {"1", "2", "4"} and "maj@4" in results["metrics"]
    assert all(len(s["outputs"]) == 4 for s in _lines(tmp_path / "samples.jsonl"))


def _cli(*args):
    return [sys.executable, "-m", "moesteer", "eval", "--task", "arith", *args]


def test_resume_after_kill_keeps_every_sample_once(model_dir, tmp_path):
    args = ["--model", model_dir, "--limit", "12", "--max-tokens", "12", "--batch-size", "1", "--output", str(tmp_path)]
    reference = tmp_path / "reference"
    subprocess.run(_cli(*args[:-1], str(reference)), check=True, capture_output=True)
    proc = subprocess.Popen(_cli(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples = tmp_path / "arith" / "plain" / "samples.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not samples.exists() or len(samples.read_text().splitlines()) < 3):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with samples.open("a") as f:
        f.write('{"id": "torn')  # a write cut short by the crash
    done_before = len(samples.read_text().splitlines()) - 1
    assert 3 <= done_before < 12
    subprocess.run(_cli(*args), check=True, capture_output=True)
    resumed = _lines(samples)
    assert sorted(s["id"] for s in resumed) == sorted({s["id"] for s in resumed}) and len(resumed) == 12
    expected = {s["id"]: s["outputs"] for s in _lines(reference / "arith" / "plain" / "samples.jsonl")}
    assert {s["id"]: s["outputs"] for s in resumed} == expected


def test_changed_configuration_is_refused(model_dir, tmp_path):
    base = [
        "eval",
        "--task",
        "arith",
        "--model",
        model_dir,
        "--limit",
        "2",
        "--max-tokens",
        "4",
        "--output",
        str(tmp_path),
    ]
    assert CliRunner().invoke(main, base).exit_code == 0
    changed = CliRunner().invoke(main, [*base, "--seed", "1"])
    assert changed.exit_code == 2 and "another configuration" in changed.output and "seed" in changed.output
    assert "Traceback" not in changed.output


def test_eval_several_strategies_then_compare(model_dir, tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "eval",
            "--task",
            "arith",
            "--model",
            model_dir,
            "--limit",
            "4",
            "--max-tokens",
            "6",
            "--output",
            str(tmp_path),
            "--strategy",
            "plain",
            "--strategy",
            "topk(k=1)",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "topk(k=1)" in result.stdout and "McNemar" in result.stdout
    plot = tmp_path / "acc.png"
    compared = CliRunner().invoke(main, ["compare", str(tmp_path / "arith"), "--plot", str(plot)])
    assert compared.exit_code == 0 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = CliRunner().invoke(main, ["compare", str(tmp_path / "nothing-here")])
    assert missing.exit_code == 2


def test_statistics():
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 2) == 1.0 and abs(pass_at_k(4, 1, 1) - 0.25) < 1e-12
    assert abs(pass_at_k(5, 2, 2) - 0.7) < 1e-12  # 1 - C(3,2)/C(5,2)
    low, high = wilson_interval(50, 100)
    assert 0.40 < low < 0.41 and 0.59 < high < 0.60
    assert mcnemar_p([True] * 10, [True] * 10) == 1.0
    assert mcnemar_p([True] * 10 + [False] * 10, [False] * 10 + [True] * 10) == 1.0
    assert mcnemar_p([True] * 12, [False] * 12) < 0.001


def test_holm_adjusts_by_rank_and_keeps_the_order():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1, monotone in rank
    assert holm([]) == []


def test_embedded_model_loads_by_default():
    pytest.importorskip("moesteer.assets")
    from moesteer.assets import DEFAULT_MODEL_DIR

    if not (DEFAULT_MODEL_DIR / "model.safetensors").exists():
        pytest.fail("the embedded model is not shipped")
    assert moesteer.load().adapter.model_type == "olmoe"
