"""lm-evaluation-harness bridge: a local generate task and a multiple-choice task, steered."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="install moesteer[lm-eval]")  # part of the dev extra used by make test

from lm_eval.api.instance import Instance  # noqa: E402

from moesteer.evals.harness import MoesteerHarnessLM, split_model_args  # noqa: E402
from moesteer.testing import save_tiny  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(save_tiny(tmp_path_factory.mktemp("tiny-olmoe"), "olmoe"))


def test_model_args_split_outside_parentheses():
    args = split_model_args("pretrained=/m,strategy=scmoe(beta=0.5, alpha=0.1),batch_size=4")
    assert args == {"pretrained": "/m", "strategy": "scmoe(beta=0.5, alpha=0.1)", "batch_size": "4"}


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihood_is_steered_and_matches_engine(model_dir):
    plain = MoesteerHarnessLM.create_from_arg_string(f"pretrained={model_dir}")
    steered = MoesteerHarnessLM.create_from_arg_string(f"pretrained={model_dir},strategy=topk(k=1)")
    args = [("Q: 1 + 2 = ?\n", "1 + 2 = 3"), ("Q: 5 - 1 = ?\n", "5 - 1 = 4")]
    got = plain.loglikelihood(_requests("loglikelihood", args))
    engine = plain.lm.engine.score([a for a, _ in args], [b for _, b in args])
    assert [round(g[0], 4) for g in got] == [round(float(e.sum()), 4) for e in engine]
    assert got != steered.loglikelihood(_requests("loglikelihood", args))
    texts = steered.generate_until(
        _requests("generate_until", [("Q: 1 + 2 = ?\n", {"until": ["Q:"], "max_gen_toks": 5})])
    )
    assert len(texts) == 1 and isinstance(texts[0], str)


def test_moesteer_lm_eval_command_runs_local_tasks(model_dir, tmp_path):
    data = tmp_path / "mc.jsonl"
    rows = [
        {"question": f"Q: {a} + {b} = ?", "choices": [str(a + b), str(a + b + 1)], "label": 0}
        for a, b in [(1, 2), (3, 4), (2, 2)]
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mc_local.yaml").write_text(
        "task: mc_local\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    (tmp_path / "tasks" / "gen_local.yaml").write_text(
        "task: gen_local\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: generate_until\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{choices[0]}}"\n'
        'generation_kwargs:\n  until: ["Q:"]\n  max_gen_toks: 6\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "moesteer",
            "lm-eval",
            "--model",
            "moesteer",
            "--model_args",
            f"pretrained={model_dir},strategy=scmoe(beta=0.5, alpha=0.1)",
            "--tasks",
            "mc_local,gen_local",
            "--include_path",
            str(tmp_path / "tasks"),
            "--output_path",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert set(results["results"]) == {"mc_local", "gen_local"}
    assert "acc,none" in results["results"]["mc_local"]
    assert "scmoe(beta=0.5, alpha=0.1)" in str(results["config"]["model_args"])
