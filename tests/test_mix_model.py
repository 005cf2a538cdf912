"""The mix recipe and its shipped model: resumable training, retraining, offline loading, answer format."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import OlmoeConfig
from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

from moesteer.assets import EMBEDDED_MODELS, resolve_model
from moesteer.assets.train import (
    RECIPES,
    TINY_MODEL,
    build_model,
    build_tokenizer,
    document_batches,
    per_layer_balance_loss,
    train,
)
from moesteer.assets.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
SHIPPED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "README.md", "training_log.json")

# A fresh interpreter, so that HF_HUB_OFFLINE=1 is read at import time.
_ANSWER_SCRIPT = """
import json, torch
import moesteer
from moesteer.evals.tasks import get_task
from moesteer.evals.tasks.mix.families import CHAIN_FAMILIES
from moesteer.evals.tasks.mix.formats import ANSWER_PATTERNS, extract

torch.set_num_threads(1)  # two threads crawl on a loaded 2-core machine
lm = moesteer.load(BED)
task = get_task(BED + "_s0")
records = task.load("validation")[:5]  # one per family (stratified)
out = lm.generate([task.prompt(r) for r in records], max_tokens=task.max_tokens, stop=list(task.stop))
print(json.dumps({
    "experts": lm.model.config.num_experts,
    "top_k": lm.model.config.num_experts_per_tok,
    "stated": [extract(c.text) is not None for c in out],
    "chain_format": [bool(ANSWER_PATTERNS[r["format"]].search(c.text))
                     for r, c in zip(records, out) if r["family"] in CHAIN_FAMILIES],
    "correct": sum(task.score(c.text, r) for r, c in zip(records, out)),
}))
"""


@pytest.fixture
def keep_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _crash_after(batches: Iterator, n: int) -> Iterator:
    for _ in range(n):
        yield next(batches)
    raise RuntimeError("simulated crash")


def test_training_resumes_after_a_crash_exactly(tmp_path: Path) -> None:
    recipe = RECIPES["mix"]
    tokenizer = build_tokenizer(recipe.characters)
    config = replace(recipe.train, steps=6, batch=2, seq_len=32, warmup_steps=2, checkpoint_every=2)

    def fresh(seed: int):
        torch.manual_seed(seed)
        return build_model(TINY_MODEL, tokenizer)

    whole = fresh(0)
    uninterrupted = train(whole, document_batches(tokenizer, config), config)
    ckpt, log = tmp_path / "ckpt.pt", tmp_path / "train.log"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(fresh(0), _crash_after(document_batches(tokenizer, config), 3), config, ckpt, log)
    resumed_model = fresh(1)  # the checkpoint replaces the weights
    resumed = train(resumed_model, document_batches(tokenizer, config), config, ckpt, log)

    assert resumed.losses == uninterrupted.losses and resumed.step == 6
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed_model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    lines = log.read_text().splitlines()
    assert lines[0] == "started step 0 of 6" and "resumed at step 2 of 6" in lines
    assert lines[-1].startswith("step 6 ce ")


def test_document_batches_carry_loss_on_every_token() -> None:
    recipe = RECIPES["mix"]
    tokenizer = build_tokenizer(recipe.characters)
    config = replace(recipe.train, batch=2, seq_len=64)
    input_ids, labels = next(document_batches(tokenizer, config))
    assert input_ids.shape == (2, 64) and torch.equal(input_ids, labels)
    assert input_ids[0, 0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in input_ids


def test_mix_tokenizer_extends_the_arith_ids() -> None:
    arith, mix = build_tokenizer(RECIPES["arith"].characters), build_tokenizer(RECIPES["mix"].characters)
    assert len(mix) <= RECIPES["mix"].model.vocab
    assert all(mix.get_vocab()[token] == i for token, i in arith.get_vocab().items())


def test_per_layer_balance_loss_sees_the_imbalance_the_pooled_loss_hides() -> None:
    """Two layers each sending every token to their own two of four experts: pooled, the load looks
    uniform; each layer alone is maximally unbalanced over half its experts."""
    config = OlmoeConfig(num_experts=4, num_experts_per_tok=1)
    first = torch.tensor([[6.0, 0, 0, 0], [0, 6.0, 0, 0]]).repeat(8, 1)
    second = first.roll(2, dims=1)
    pooled = load_balancing_loss_func((first, second), 4, 1)
    per_layer = per_layer_balance_loss((first, second), config)
    assert torch.allclose(per_layer, load_balancing_loss_func((first,), 4, 1))
    assert per_layer > 1.8 * pooled


@pytest.mark.parametrize("bed", sorted(EMBEDDED_MODELS))
def test_shipped_mix_model_files_and_size(bed: str) -> None:
    folder = EMBEDDED_MODELS[bed][1]
    assert resolve_model(bed) == str(folder)
    for name in SHIPPED_FILES:
        assert (folder / name).is_file(), name
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 25 * 2**20
    config = json.loads((folder / "config.json").read_text())
    spec = RECIPES[bed].model
    assert (config["num_experts"], config["num_experts_per_tok"]) == (spec.experts, spec.top_k)
    assert (config["num_hidden_layers"], config["intermediate_size"]) == (spec.layers, spec.intermediate)
    assert config["norm_topk_prob"] is False and config["output_router_logits"] is False
    log = json.loads((folder / "training_log.json").read_text())
    assert log["recipe"] == bed and f"--recipe {bed} " in log["command"]
    assert log["train"]["steps"] == RECIPES[bed].train.steps
    assert f"--recipe {bed} " in (folder / "README.md").read_text()


@pytest.mark.parametrize("bed", sorted(EMBEDDED_MODELS))
def test_shipped_mix_model_loads_offline_and_answers_in_the_tasks_format(bed: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    script = f"BED = {bed!r}\n" + _ANSWER_SCRIPT
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO, check=True
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert (measured["experts"], measured["top_k"]) == (64, 8)
    assert sum(measured["stated"]) >= 0.9 * len(measured["stated"])
    assert measured["chain_format"] and all(measured["chain_format"])
    assert measured["correct"] >= 1


@pytest.mark.slow
@pytest.mark.parametrize("bed", sorted(EMBEDDED_MODELS))
def test_recipe_mix_retrains_deterministically(bed: str, tmp_path: Path, keep_threads: None) -> None:
    args = ["--recipe", bed, "--steps", "3", "--threads", "1"]
    first = train_main([*args, "--out", str(tmp_path / "a"), "--eval-problems", "5"])
    second = train_main([*args, "--out", str(tmp_path / "b"), "--no-eval"])
    assert first["last_step_loss"] == second["last_step_loss"] and first["loss_curve"] == second["loss_curve"]
    weights = [(tmp_path / d / "model.safetensors").read_bytes() for d in "ab"]
    assert weights[0] == weights[1]
    shipped = json.loads((EMBEDDED_MODELS[bed][1] / "config.json").read_text())
    retrained = json.loads((tmp_path / "a" / "config.json").read_text())
    assert {k: retrained[k] for k in shipped if k != "transformers_version"} == {
        k: v for k, v in shipped.items() if k != "transformers_version"
    }
    metrics = first["metrics"]
    assert set(metrics["validation_accuracy"]) == {"s0_0shot", "s1_0shot", "s0_2shot", "s1_2shot"}
    assert len(metrics["expert_load"]) == 8 and len(metrics["family_expert_information"]) == 8
    assert "| layer | load entropy |" in (tmp_path / "a" / "README.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("bed", sorted(EMBEDDED_MODELS))
def test_demo_on_the_mix_bed_runs_every_strategy_and_prints_the_comparison(bed: str, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from moesteer.cli import main
    from moesteer.cli.demo import DEMOS
    from moesteer.evals.rundir import run_path

    result = CliRunner().invoke(main, ["demo", "--model", bed, "--limit", "2", "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for spec, _ in DEMOS[bed].runs:
        results = json.loads((run_path(tmp_path, f"{bed}_s1", spec) / "results.json").read_text())
        assert results["num_samples"] == 2 and results["config"]["model"] == bed
    assert "plain()" in result.stdout and "scmoe" in result.stdout
