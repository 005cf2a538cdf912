"""The embedded tiny MoE: training script, shipped files, offline loading, accuracy, packaging."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import moesteer.assets
from moesteer.assets import DEFAULT_MODEL_DIR, default_model_path
from moesteer.assets.train import main as train_main
from moesteer.evals.tasks.arith import load_split

REPO = Path(__file__).resolve().parents[1]
SHIPPED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "README.md",
    "training_log.json",
)

# Runs in a fresh interpreter so that HF_HUB_OFFLINE=1 is read at import time.
_EVAL_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from moesteer.assets import default_model_path
from moesteer.evals.tasks.arith import load_split, score

torch.set_num_threads(2)
path = default_model_path()
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # as the card measured
problems = load_split("test")[: int(sys.argv[1])]
correct = 0
with torch.no_grad():
    for start in range(0, len(problems), 100):
        chunk = problems[start : start + 100]
        enc = tok([p["prompt"] for p in chunk], padding=True, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=128, do_sample=False)
        texts = tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
        correct += sum(score(t, p["answer"]) for t, p in zip(texts, chunk))
print(json.dumps({
    "model_type": model.config.model_type,
    "num_experts": model.config.num_experts,
    "dtype": str(model.dtype),
    "accuracy": correct / len(problems),
}))
"""


@pytest.fixture
def keep_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _card_accuracy(split: str) -> float:
    card = (DEFAULT_MODEL_DIR / "README.md").read_text()
    match = re.search(rf"Greedy accuracy on {split} \((\d+) problems\): ([0-9.]+)", card)
    assert match, f"no {split} accuracy line in the model card"
    return float(match.group(2))


def test_short_training_run_is_deterministic(tmp_path: Path, keep_threads: None) -> None:
    args = ["--tiny", "--steps", "3", "--eval-problems", "4"]
    first = train_main(["--out", str(tmp_path / "a"), "--seed", "1", *args])
    second = train_main(["--out", str(tmp_path / "b"), "--seed", "1", *args])
    assert first["last_step_loss"] == second["last_step_loss"]
    assert first["final_loss"] == second["final_loss"]
    weights = [(tmp_path / d / "model.safetensors").read_bytes() for d in "ab"]
    assert weights[0] == weights[1]
    third = train_main(["--out", str(tmp_path / "c"), "--seed", "2", *args])
    assert third["last_step_loss"] != first["last_step_loss"]

    out = tmp_path / "a"
    assert {p.name for p in out.iterdir()} >= set(SHIPPED_FILES)
    config = json.loads((out / "config.json").read_text())
    assert config["output_router_logits"] is False and config["model_type"] == "olmoe"
    log = json.loads((out / "training_log.json").read_text())
    assert log["metrics"]["test_problems"] == 4 and len(log["metrics"]["expert_load"]) == 2
    assert "--tiny" in log["command"] and "Apache-2.0" in (out / "README.md").read_text()


def test_shipped_files_and_size() -> None:
    assert default_model_path() == str(DEFAULT_MODEL_DIR)
    for name in SHIPPED_FILES:
        assert (DEFAULT_MODEL_DIR / name).is_file(), name
    size = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir())
    assert size <= 25 * 2**20
    config = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    assert config["output_router_logits"] is False
    card = (DEFAULT_MODEL_DIR / "README.md").read_text()
    assert "license: apache-2.0" in card and "python -m moesteer.assets.train" in card
    log = json.loads((DEFAULT_MODEL_DIR / "training_log.json").read_text())
    assert log["metrics"]["test_problems"] >= 500 and log["metrics"]["validation_problems"] >= 200
    assert log["metrics"]["test_accuracy"] == pytest.approx(_card_accuracy("test"), abs=1e-4)


def test_missing_weights_give_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(moesteer.assets, "DEFAULT_MODEL_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors.*python -m moesteer\.assets\.train"):
        default_model_path()


def test_shipped_tokenizer_round_trip() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_path())
    for p in load_split("validation")[:50]:
        text = p["prompt"] + p["target"]
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1
        assert tok.decode(ids, skip_special_tokens=True) == text
    batch = tok(["Q: 1 + 2 = ?\n", "Q: 10 + 20 = ?\n"], padding=True)
    assert batch.input_ids[0][:2] == [tok.pad_token_id] * 2 and batch.attention_mask[0][:2] == [0, 0]


def test_shipped_model_offline_accuracy_matches_card() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    n = json.loads((DEFAULT_MODEL_DIR / "training_log.json").read_text())["metrics"]["test_problems"]
    result = subprocess.run(
        [sys.executable, "-c", _EVAL_SCRIPT, str(n)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        check=True,
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["model_type"] == "olmoe" and measured["num_experts"] > 1
    card = _card_accuracy("test")
    assert abs(measured["accuracy"] - card) <= 0.05
    assert 0.3 <= measured["accuracy"] <= 0.7


@pytest.mark.slow
def test_retraining_reproduces_final_loss(tmp_path: Path, keep_threads: None) -> None:
    shipped = json.loads((DEFAULT_MODEL_DIR / "training_log.json").read_text())
    cfg = shipped["train"]
    log = train_main(
        [
            *("--out", str(tmp_path / "model")),
            *("--seed", str(cfg["seed"]), "--steps", str(cfg["steps"])),
            *("--threads", str(cfg["threads"]), "--eval-problems", "20"),
        ]
    )
    assert log["final_loss"] == pytest.approx(shipped["final_loss"], rel=1e-3)


@pytest.mark.slow
def test_wheel_contains_the_models(tmp_path: Path) -> None:
    """Every shipped model (the arith default and both revisions of the mix test bed) and their trainer."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "-w", str(tmp_path), "--no-deps", "-q"],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("moesteer-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("tiny-arith-moe", "tiny-mix-moe", "tiny-mix3-moe"):
        for name in SHIPPED_FILES:
            assert f"moesteer/assets/{folder}/{name}" in names, (folder, name)
    assert "moesteer/assets/__init__.py" in names and "moesteer/assets/train.py" in names
