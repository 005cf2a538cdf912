"""Strategy tuning on a validation split: search dimensions, grid and Optuna, the CLI."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import moesteer
from moesteer.cli import main
from moesteer.evals.tasks import get_task
from moesteer.evals.tuning import Dimension, tune
from moesteer.strategies.spec import parse
from moesteer.testing import save_tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(save_tiny(tmp_path_factory.mktemp("tiny-olmoe"), "olmoe"))


def test_dimensions_parse():
    assert Dimension.parse("beta=0.1,0.5").choices == (0.1, 0.5)
    assert Dimension.parse("skip=0,1").choices == (0, 1)
    assert Dimension.parse("tau=0:0.5").grid() == (0.0, 0.125, 0.25, 0.375, 0.5)
    for bad in ("tau", "tau=", "tau=1:0", "tau=a:b", "1x=2"):
        with pytest.raises(ValueError, match=r"search dimension|range"):
            Dimension.parse(bad)


@pytest.mark.parametrize("method", ["grid", "optuna"])
def test_tune_returns_a_parseable_best_spec(model_dir, method):
    lm, task = moesteer.load(model_dir), get_task("arith")
    seen = []
    result = tune(
        lm,
        task,
        "roe",
        [Dimension.parse("tau=0:0.5"), Dimension.parse("skip=0,1")],
        fixed={"samples": "2"},
        problems=task.load("validation")[:3],
        trials=3,
        method=method,
        report=seen.append,
    )
    assert result.method == method and result.trials and list(result.trials) == seen
    assert len(result.trials) == (10 if method == "grid" else len({t.spec for t in seen}))
    best = parse(result.best.spec)
    assert best.samples == 2 and result.best.accuracy == max(t.accuracy for t in result.trials)


def test_tune_cli_refuses_the_test_split(model_dir):
    result = CliRunner().invoke(
        main,
        ["tune", "--task", "arith", "--model", model_dir, "--strategy", "scmoe", "-s", "beta=0,0.5", "--split", "test"],
    )
    assert result.exit_code == 2 and "validation" in result.output


def test_tune_cli_prints_best_spec(model_dir):
    result = CliRunner().invoke(
        main,
        [
            "tune",
            "--task",
            "arith",
            "--model",
            model_dir,
            "--strategy",
            "scmoe",
            "-s",
            "beta=0,0.5",
            "--method",
            "grid",
            "--limit",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert parse(result.stdout.strip().splitlines()[-1]).name == "scmoe"
