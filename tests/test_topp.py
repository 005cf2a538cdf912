"""Top-p routing (arXiv 2403.07652): a per-token expert count from the router's probabilities."""

from __future__ import annotations

import pytest
import torch

import moesteer
from moesteer.analysis.usage import k_histogram, usage_summary
from moesteer.routing import TopK, TopP
from moesteer.sampling import SamplingParams
from moesteer.strategies.spec import parse
from moesteer.testing import char_tokenizer, tiny_model

PROMPTS = ["abcde fgh", "hello world"]
GREEDY = SamplingParams(max_tokens=10)


@pytest.fixture(scope="module", params=["olmoe", "qwen3_moe", "mixtral", "qwen2_moe"])
def lm(request):
    return moesteer.load(tiny_model(request.param), tokenizer=char_tokenizer())


def _counts(lm, policy):
    out = lm.engine.generate(PROMPTS, policy, GREEDY, trace=True)
    return out, torch.cat([out[0].trace.active_counts(layer) for layer in lm.moe_layers]).float()


def test_p_one_with_k_max_the_trained_k_is_the_model_bit_for_bit(lm):
    _, k = lm.engine.routing_sizes()
    base = lm.engine.generate(PROMPTS, None, GREEDY)
    same = lm.engine.generate(PROMPTS, TopP(1.0, k_max=k), GREEDY)
    assert [c.token_ids for c in same] == [c.token_ids for c in base]
    assert [c.logprobs for c in same] == [c.logprobs for c in base]


def test_the_expert_count_grows_with_p_within_its_bounds(lm):
    experts, _ = lm.engine.routing_sizes()
    means = []
    for p in (0.2, 0.5, 0.8, 0.95):
        _, counts = _counts(lm, TopP(p, k_min=1, k_max=experts))
        assert counts.min() >= 1 and counts.max() <= experts
        means.append(float(counts.mean()))
    assert means == sorted(means) and means[-1] > means[0]
    _, bounded = _counts(lm, TopP(0.95, k_min=2, k_max=3))
    assert bounded.min() >= 2 and bounded.max() <= 3


def test_the_chosen_set_is_the_smallest_reaching_p(lm):
    out, _ = _counts(lm, TopP(0.6, renormalise=False))
    record = next(r for r in out[0].trace.records if r.experts.shape[1] > 1)  # a prefill call
    weights, active = record.weights[0], record.experts[0] >= 0
    mass = weights.sum(-1)  # renormalise=False: the bare probabilities of the chosen experts
    assert (mass >= 0.6 - 1e-5).all()
    without_last = mass - weights.gather(-1, (active.sum(-1, keepdim=True) - 1).clamp(min=0)).squeeze(-1)
    assert (without_last < 0.6).all()  # one expert fewer would not reach p


def test_renormalise_makes_the_weights_sum_to_one(lm):
    out, _ = _counts(lm, TopP(0.5, renormalise=True))
    for record in out[0].trace.records:
        assert torch.allclose(record.weights.sum(-1), torch.ones(record.weights.shape[:-1]), atol=1e-5)


def test_the_usage_summary_reports_the_expert_count_histogram(lm):
    experts, k = lm.engine.routing_sizes()
    out, _ = _counts(lm, TopP(0.8, k_max=experts))
    layer = lm.moe_layers[0]
    histogram = k_histogram(out[0].trace, layer)
    assert sum(histogram.values()) == len(out[0].trace.active_counts(layer)) and len(histogram) > 1
    line = usage_summary(out[0].trace, experts)[1]
    mean = sum(k * n for k, n in histogram.items()) / sum(histogram.values())
    assert line.startswith(f"layer {layer}: ") and f"experts per token: mean {mean:.2f} (" in line
    fixed, _ = _counts(lm, TopK(k))
    assert "experts per token" not in "\n".join(usage_summary(fixed[0].trace, experts))


def test_spec_and_bad_parameters():
    assert parse("topp(0.7, k_max=4)").policy == TopP(0.7, k_max=4)
    assert parse(parse("topp(0.7, k_min=2)").spec()).policy == TopP(0.7, k_min=2)
    for make, message in [
        (lambda: TopP(0), "p must be in"),
        (lambda: TopP(1.5), "p must be in"),
        (lambda: TopP(0.5, k_min=0), "k_min must be"),
        (lambda: TopP(0.5, k_min=3, k_max=2), "k_max must be an integer >= k_min"),
    ]:
        with pytest.raises(ValueError, match=message):
            make()
    lm = moesteer.load(tiny_model("olmoe"), tokenizer=char_tokenizer())
    with pytest.raises(ValueError, match="exceed the number of experts"):
        lm.engine.generate(PROMPTS, TopP(0.5, k_max=99), GREEDY)
    assert TopK(2) != TopP(0.5)
