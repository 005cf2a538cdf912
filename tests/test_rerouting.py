"""Online test-time rerouting: δ on the router logits, optimised on the model's own context."""

from __future__ import annotations

import hashlib

import pytest
import torch

import moesteer
from moesteer.sampling import SamplingParams
from moesteer.strategies.context import CostLedger
from moesteer.strategies.rerouting import Rerouting, layer_scores
from moesteer.strategies.spec import parse
from moesteer.testing import char_tokenizer, tiny_model

PROMPTS = ["abcde fgh", "hello world", "zyxw"]
GREEDY = SamplingParams(max_tokens=12)


@pytest.fixture(scope="module", params=["olmoe", "qwen3_moe"])
def lm(request):
    return moesteer.load(tiny_model(request.param), tokenizer=char_tokenizer())


@pytest.fixture(scope="module")
def embedded():
    return moesteer.load()


def _checksum(model) -> str:
    digest = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        digest.update(name.encode() + p.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _run(lm, strategy, prompts=PROMPTS):
    return lm.generate(prompts, strategy, GREEDY)


def test_zero_steps_is_plain_decoding_exactly(lm):
    plain = _run(lm, None)
    for strategy in (Rerouting(steps=0), Rerouting(steps=0, every=3)):
        out = _run(lm, strategy)
        assert [c.token_ids for c in out] == [c.token_ids for c in plain]
        assert [c.logprobs for c in out] == [c.logprobs for c in plain]


def test_gradients_reach_exactly_the_chosen_layers_and_the_model_is_unchanged(lm):
    before = _checksum(lm.model)
    strategy = Rerouting(steps=3, lr=0.5, layers=0.5)
    contexts = [lm.engine.encode(p) for p in PROMPTS]
    layers, (experts, _) = lm.engine.moe_layers, lm.engine.routing_sizes()
    start = torch.zeros(len(contexts), len(layers), experts)
    delta = strategy.optimise(lm.engine, contexts, start, [CostLedger() for _ in contexts], [[] for _ in contexts])
    chosen = strategy.layer_weights(lm.engine, contexts)
    assert chosen.sum(1).tolist() == [max(1, len(layers) // 2)] * len(contexts)
    moved = delta.abs().sum(-1) > 0  # [rows, L]
    assert moved.any() and torch.equal(moved, moved & chosen.bool())  # δ moved in chosen layers only
    assert _checksum(lm.model) == before
    assert all(p.grad is None for p in lm.model.parameters())


def test_layers_are_chosen_by_the_confidence_score_as_written_or_inverted(lm):
    context = lm.engine.encode(PROMPTS[0])
    scores = layer_scores(lm.engine, context)
    top = Rerouting(layers=0.5).layer_weights(lm.engine, [context])[0]
    low = Rerouting(layers=0.5, confidence="inverted").layer_weights(lm.engine, [context])[0]
    assert scores[top.bool()].min() >= scores[~top.bool()].max()
    assert scores[low.bool()].max() <= scores[~low.bool()].min()


def test_soft_selection_moves_every_layer_by_its_weight(lm):
    contexts = [lm.engine.encode(p) for p in PROMPTS]
    strategy = Rerouting(steps=2, lr=0.5, selection="soft")
    weights = strategy.layer_weights(lm.engine, contexts)
    assert torch.allclose(weights.mean(1), torch.ones(len(contexts))) and (weights > 0).all()
    layers, (experts, _) = lm.engine.moe_layers, lm.engine.routing_sizes()
    start = torch.zeros(len(contexts), len(layers), experts)
    delta = strategy.optimise(lm.engine, contexts, start, [CostLedger() for _ in contexts], [[] for _ in contexts])
    assert (delta.abs().sum(-1) > 0).all()


def test_the_context_loss_decreases_over_the_steps(lm):
    out = _run(lm, Rerouting(steps=5, lr=0.1, every=None))
    for c in out:
        (losses,) = c.info["rerouting_losses"]
        assert len(losses) == 5 and losses[-1] < losses[0]
        assert c.cost["backward_passes"] == 5 and c.cost["extra_forward_passes"] == 6  # + the layer scores


def test_rebuild_and_keep_agree_until_the_first_update_and_count_their_passes(lm):
    every = 4
    rebuild = _run(lm, Rerouting(steps=3, lr=1.0, every=every))
    keep = _run(lm, Rerouting(steps=3, lr=1.0, every=every, kv="keep"))
    for r, k in zip(rebuild, keep, strict=True):
        assert r.token_ids[:every] == k.token_ids[:every]
        assert r.cost["updates"] == k.cost["updates"] >= 1
        assert r.cost["rebuild_passes"] == r.cost["updates"] and "rebuild_passes" not in k.cost


def test_a_kept_cache_differs_from_a_rebuilt_one_after_the_first_update(embedded):
    prompts, every = ["Q: 37 + 48 - 12 = ?\n", "Q: 5 * 6 - 4 + 17 = ?\n", "Q: 90 - 45 + 3 = ?\n"], 16
    sampling = SamplingParams(max_tokens=48)
    rebuild = embedded.generate(prompts, Rerouting(lr=0.5, every=every), sampling)
    keep = embedded.generate(prompts, Rerouting(lr=0.5, every=every, kv="keep"), sampling)
    assert all(r.token_ids[:every] == k.token_ids[:every] for r, k in zip(rebuild, keep, strict=True))
    assert [c.token_ids for c in rebuild] != [c.token_ids for c in keep]


def test_no_state_leaks_between_prompts_or_rows(lm):
    strategy = Rerouting(steps=3, lr=0.5, every=4)
    first = _run(lm, strategy, [PROMPTS[0]])[0].token_ids
    _run(lm, strategy, [PROMPTS[1]])
    assert _run(lm, strategy, [PROMPTS[0]])[0].token_ids == first
    batch = [c.token_ids for c in _run(lm, strategy)]
    assert batch == [_run(lm, strategy, [p])[0].token_ids for p in PROMPTS]


def test_spec_and_bad_parameters():
    strategy = parse("rerouting(scmoe(beta=0.5), steps=2, every=16, kv='keep')")
    assert parse(strategy.spec()) == strategy
    for spec, message in [
        ("rerouting(steps=-1)", "steps must be"),
        ("rerouting(lr=-0.1)", "lr must be a positive"),
        ("rerouting(every=0)", "every must be"),
        ("rerouting(layers=0)", "fraction in"),
        ("rerouting(kv='stale')", "kv must be one of"),
        ("rerouting(confidence='low')", "confidence must be one of"),
        ("rerouting(selection='top')", "selection must be one of"),
        ("rerouting(rerouting())", "inner must be a token strategy"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse(spec)


def test_composes_with_self_consistency(lm):
    strategy = parse("self_consistency(rerouting(steps=2, every=4), n=3)")
    out = lm.generate(PROMPTS[:2], strategy, SamplingParams(max_tokens=12, temperature=0.8, seed=3))
    assert len(out) == 2 and all(len(c.info["answers"]) == 3 for c in out)
