"""Every registered benchmark runs end to end on fixture records in its real schema (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moesteer.evals.data import read_jsonl
from moesteer.evals.runner import EvalConfig, run
from moesteer.evals.tasks import get_task
from moesteer.evals.tasks.benchmarks import BENCHMARKS
from moesteer.testing import save_tiny

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_OF = {"aime24": "aime", "aime25": "aime"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(save_tiny(tmp_path_factory.mktemp("tiny-olmoe"), "olmoe"))


def _fixture(name: str) -> Path:
    return FIXTURES / f"{FIXTURE_OF.get(name, name)}.jsonl"


@pytest.mark.parametrize("name", sorted(task.name for task in BENCHMARKS))
def test_benchmark_runs_end_to_end_on_fixture(model_dir, tmp_path, name):
    task = get_task(name)
    config = EvalConfig(task=name, model=model_dir, data=str(_fixture(name)), limit=3, max_tokens=6)
    results = run(config, tmp_path, progress=False)
    samples = read_jsonl(tmp_path / "samples.jsonl")
    assert results["num_samples"] == 3 and len(samples) == 3
    for record, sample in zip(read_jsonl(_fixture(name)), samples, strict=False):
        assert sample["gold"] == task.gold(record)
        if task.multiple_choice:
            assert len(sample["loglikelihoods"]) == len(task.choices(record)) and sample["rules"] == ["loglikelihood"]
        else:
            assert sample["tokens"] > 0


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("gsm8k", lambda r: r["answer"]),
        ("math500", lambda r: r["solution"]),
        ("humaneval", lambda r: r["canonical_solution"]),
        ("mbpp", lambda r: r["code"]),
        ("aime24", lambda r: f"so the answer is \\boxed{{{r['answer']}}}"),
        ("strategyqa", lambda r: "So the answer is " + ("yes" if r["answer"] else "no")),
    ],
)
def test_reference_solutions_score_correct(name, reference):
    task = get_task(name)
    for record in read_jsonl(_fixture(name))[:3]:
        assert task.score(reference(record), record)
        assert not task.score("I do not know.", record)


def test_multiple_choice_gold_indices_are_valid():
    for name in ("mmlu", "arc_challenge", "gpqa_diamond"):
        task = get_task(name)
        for record in read_jsonl(_fixture(name)):
            assert 0 <= int(task.gold(record)) < len(task.choices(record))
    gpqa = read_jsonl(_fixture("gpqa_diamond"))[0]
    assert "The photon" in get_task("gpqa_diamond").prompt(gpqa)


def test_offline_tasks_without_data_say_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("MOESTEER_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="moesteer data fetch gsm8k"):
        get_task("gsm8k").load("test")
    with pytest.raises(FileNotFoundError, match="--data"):
        get_task("strategyqa").load("test")


def test_yaml_task_runs(model_dir, tmp_path):
    data = tmp_path / "capitals.jsonl"
    data.write_text('{"id": "1", "country": "France", "capital": "Paris", "options": ["Paris", "Rome"], "gold": 0}\n')
    (tmp_path / "gen.yaml").write_text(
        'name: capitals\ndata: capitals.jsonl\nprompt: "Q: capital of {country}?\\nA:"\nanswer: capital\n'
        "scorer: exact\nmax_tokens: 4\n"
    )
    (tmp_path / "mc.json").write_text(
        '{"name": "capitals_mc", "data": "capitals.jsonl", "prompt": "Capital of {country}:", "answer": "gold",'
        ' "scorer": "choice", "choices": "options"}'
    )
    for task_file in ("gen.yaml", "mc.json"):
        config = EvalConfig(task=str(tmp_path / task_file), model=model_dir, max_tokens=4)
        assert run(config, tmp_path / task_file.split(".")[0], progress=False)["num_samples"] == 1
    assert get_task(str(tmp_path / "gen.yaml")).score("Paris\nmore", {"capital": "Paris"})
    (tmp_path / "bad.yaml").write_text("name: x\ndata: d.jsonl\nprompt: p\nanswer: a\nscorer: fuzzy\n")
    with pytest.raises(ValueError, match="scorer 'fuzzy' is not one of"):
        get_task(str(tmp_path / "bad.yaml"))
