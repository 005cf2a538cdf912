"""Expert discovery (risk difference, nPMI) and steering (steermoe, rice) on a planted expert."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import moesteer
from moesteer.analysis.experts import npmi, risk_difference
from moesteer.cli import main
from moesteer.expert_table import ExpertTable
from moesteer.models.adapters import find_routers
from moesteer.routing import RICE, Bias, SteerMoE
from moesteer.sampling import SamplingParams
from moesteer.testing import char_tokenizer, save_tiny, tiny_model

MARKER, LAYER, EXPERT = "#", 0, 6
POSITIVE = [{"prompt": "ab", "span": s} for s in ("#c#d#", "x#y#z", "##e#f", "g#h##")]
NEGATIVE = [{"prompt": "ab", "span": s} for s in ("cxdye", "xkyoz", "mnefq", "ghrst")]
PROMPTS = ["abc#de#f", "hello #world"]


def planted(model):
    """Expert 6 of the first MoE layer fires on the marker: the marker's embedding points along u,
    every other embedding and router row is orthogonal to u, and that router row is a multiple of u."""
    tokenizer = char_tokenizer(model.config.vocab_size)
    marker = tokenizer.convert_tokens_to_ids(MARKER)
    with torch.no_grad():
        u = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
        u = u / u.norm()
        embed = model.model.embed_tokens.weight
        embed -= (embed @ u)[:, None] * u
        embed[marker] = 4.0 * embed.norm(dim=1).mean() * u
        adapter = moesteer.models.adapters.get_adapter(model.config)
        router = find_routers(model, adapter)[LAYER].weight
        router -= (router @ u)[:, None] * u  # no other expert sees u
        router[EXPERT] = 30.0 * u
    return moesteer.load(model, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def lm():
    return planted(tiny_model("olmoe", num_experts_per_tok=1))  # top-1: the marker has one expert


@pytest.fixture(scope="module")
def tables(lm, tmp_path_factory):
    folder = tmp_path_factory.mktemp("experts")
    rd = risk_difference(lm.engine, POSITIVE, NEGATIVE).save(folder / "rd.json")
    pmi = npmi(lm.engine, POSITIVE + NEGATIVE, MARKER).save(folder / "npmi.json")
    return str(rd), str(pmi)


def _share_with_expert(lm, policy) -> float:
    out = lm.engine.generate(PROMPTS, policy, SamplingParams(max_tokens=8), trace=True)
    chosen = torch.cat([r.experts.flatten(0, 1) for r in out[0].trace.records if r.layer == LAYER])
    return float((chosen == EXPERT).any(-1).float().mean())


def test_both_detectors_rank_the_planted_expert_first(tables):
    rd, pmi = (ExpertTable.load(t) for t in tables)
    assert (rd.experts[0].layer, rd.experts[0].expert) == (LAYER, EXPERT) and rd.experts[0].score > 0.4
    assert (pmi.experts[0].layer, pmi.experts[0].expert) == (LAYER, EXPERT) and pmi.experts[0].score > 0.5
    assert rd.experts[0].counts["N+"] == sum(len(r["span"]) for r in POSITIVE)


def test_steermoe_switches_the_expert_on_and_off(lm, tables):
    rd, _ = tables
    plain = _share_with_expert(lm, None)
    assert 0 < plain < 1
    assert _share_with_expert(lm, SteerMoE(rd, activate=1)) == 1.0
    assert _share_with_expert(lm, SteerMoE(rd, deactivate=1, reverse=True)) == 0.0
    base = lm.engine.generate(PROMPTS, None, SamplingParams(max_tokens=8))
    empty = lm.engine.generate(PROMPTS, SteerMoE(rd), SamplingParams(max_tokens=8))
    assert [c.logprobs for c in empty] == [c.logprobs for c in base]  # nothing chosen: the model


def test_steermoe_soft_modes(lm, tables):
    """EasySteer's soft router mode (± λ·std z) and a plain logit step (± λ): λ = 0 is the model bit
    for bit, 'add' is a bias on the discovered expert, and a large λ switches it on or off."""
    rd, _ = tables
    sampling = SamplingParams(max_tokens=8)
    base = [c.logprobs for c in lm.engine.generate(PROMPTS, None, sampling)]
    for mode, large in (("soft", 50.0), ("add", 1e3)):  # off the marker z_6 can lie far below
        assert [
            c.logprobs for c in lm.engine.generate(PROMPTS, SteerMoE(rd, 1, 1, mode=mode, strength=0), sampling)
        ] == base
        assert _share_with_expert(lm, SteerMoE(rd, activate=1, mode=mode, strength=large)) == 1.0
        assert _share_with_expert(lm, SteerMoE(rd, deactivate=1, reverse=True, mode=mode, strength=large)) == 0.0
    bias = torch.zeros(lm.engine.routing_sizes()[0])
    bias[EXPERT] = 2.5
    added = lm.engine.generate(PROMPTS, SteerMoE(rd, activate=1, mode="add", strength=2.5), sampling)
    biased = lm.engine.generate(PROMPTS, Bias({LAYER: bias}), sampling)
    assert [c.logprobs for c in added] == [c.logprobs for c in biased]
    assert [c.logprobs for c in added] != base


def test_rice_with_beta_one_is_the_model_bit_for_bit_and_amplifies_above(lm, tables):
    _, pmi = tables
    base = lm.engine.generate(PROMPTS, None, SamplingParams(max_tokens=8))
    for variant in ("logit", "weight"):
        same = lm.engine.generate(PROMPTS, RICE(pmi, beta=1.0, count=1, variant=variant), SamplingParams(max_tokens=8))
        assert [c.logprobs for c in same] == [c.logprobs for c in base]
    assert _share_with_expert(lm, RICE(pmi, beta=1e60, count=1)) == 1.0  # log β = 138 beats any logit here


def test_bad_tables_and_parameters(lm, tables, tmp_path):
    rd, _ = tables
    with pytest.raises(FileNotFoundError, match="no expert table"):
        lm.engine.generate(PROMPTS, SteerMoE(str(tmp_path / "none.json"), activate=1))
    other = json.loads(Path(rd).read_text())
    other["num_experts"] = 64
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="covers 64 experts"):
        lm.engine.generate(PROMPTS, SteerMoE(str(tmp_path / "other.json"), activate=1))
    for make, message in [
        (lambda: SteerMoE(rd, activate=-1), "activate must be"),
        (lambda: RICE(rd, beta=0), "beta must be a positive"),
        (lambda: RICE(rd, variant="prob"), "variant must be"),
        (lambda: SteerMoE(rd, mode="scale"), "mode must be one of hard, soft, add"),
        (lambda: SteerMoE(rd, mode="soft", strength=-1), "strength must be"),
    ]:
        with pytest.raises(ValueError, match=message):
            make()
    with pytest.raises(ValueError, match="single token"):
        npmi(lm.engine, POSITIVE, "##")


def test_cli_experts_then_steer(tmp_path):
    model = save_tiny(tmp_path / "model", "olmoe", num_experts_per_tok=1)
    lm = planted(moesteer.load(str(model)).model)
    lm.model.save_pretrained(model)
    for name, records in (("pos", POSITIVE), ("neg", NEGATIVE)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    runner = CliRunner()
    out = tmp_path / "experts.json"
    args = ["experts", "--model", str(model), "--positive", str(tmp_path / "pos.jsonl")]
    result = runner.invoke(main, [*args, "--negative", str(tmp_path / "neg.jsonl"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1].split()[:2] == [str(LAYER), str(EXPERT)]
    result = runner.invoke(main, [*args, "--marker", MARKER, "--out", str(tmp_path / "pmi.json")])
    assert result.exit_code == 0, result.output
    spec = f"steermoe({str(out)!r}, activate=1)"
    result = runner.invoke(main, ["generate", "--model", str(model), "--strategy", spec, "--max-tokens", "4", "ab#c"])
    assert result.exit_code == 0, result.output
    bad = runner.invoke(main, [*args, "--out", str(out)])
    assert bad.exit_code == 2 and "--negative or --marker" in bad.output
