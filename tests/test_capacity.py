"""Capacity-aware routing (arXiv 2503.05066): token drop and expanded drop at a per-expert capacity."""

from __future__ import annotations

import math

import pytest
import torch

import moesteer
from moesteer.routing import Capacity
from moesteer.sampling import SamplingParams
from moesteer.strategy import as_strategy
from moesteer.testing import char_tokenizer, tiny_model

PROMPTS = ["abcdefghijklmnop", "the quick brown fox jumps"]
GREEDY = SamplingParams(max_tokens=8)


@pytest.fixture(scope="module", params=["olmoe", "qwen3_moe"])
def lm(request):
    return moesteer.load(tiny_model(request.param), tokenizer=char_tokenizer())


def _prefill_records(lm, prompts, strategy):
    """The prefill calls of one batch's routing trace (capacity is shared by the batch's tokens)."""
    with lm.engine.session(GREEDY, trace=True) as session:
        session.add([lm.engine.encode(p) for p in prompts], [as_strategy(strategy)] * len(prompts), [0, 1])
        session.run()
    return [r for r in session.trace.records if r.experts.shape[1] > 1]


def test_infinite_capacity_is_the_model_bit_for_bit(lm):
    base = lm.engine.generate(PROMPTS, None, GREEDY)
    same = lm.engine.generate(PROMPTS, Capacity(math.inf), GREEDY)
    assert [c.logprobs for c in same] == [c.logprobs for c in base]


@pytest.mark.parametrize("drop", ["score", "random", "first", "last"])
def test_no_expert_exceeds_its_capacity_in_a_prefill(lm, drop):
    experts, k = lm.engine.routing_sizes()
    gamma = 0.5
    dropped = 0
    for record in _prefill_records(lm, PROMPTS, Capacity(gamma, drop=drop)):
        chosen = record.experts.flatten(0, 1)  # [T, K], -1 = dropped
        capacity = math.ceil(gamma * k * chosen.shape[0] / experts)
        load = torch.bincount(chosen[chosen >= 0], minlength=experts)
        assert int(load.max()) <= capacity
        dropped += int((chosen < 0).sum())
    assert dropped > 0


def test_score_drop_keeps_the_most_probable_tokens_and_decode_steps_are_untouched(lm):
    out = lm.engine.generate(PROMPTS[:1], Capacity(0.5), GREEDY, trace=True)
    decode = [r for r in out[0].trace.records if r.experts.shape[1] == 1]
    assert decode and all((r.experts >= 0).all() for r in decode)  # one token per sequence: no drop


def test_renormalise_makes_the_kept_weights_sum_to_one(lm):
    for record in _prefill_records(lm, PROMPTS, Capacity(0.5, renormalise=True)):
        kept = (record.experts >= 0).any(-1)
        sums = record.weights.sum(-1)[kept]
        assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)


@pytest.mark.parametrize("drop", ["score", "random", "first"])
def test_expanded_drop_is_expert_choice_at_the_capacity(lm, drop):
    """Every expert takes exactly min(C, T) tokens of a prefill call (so k·T assignments in all when
    C binds: some tokens get more than k experts, some fewer), by score the most probable ones;
    decode steps keep the model's k experts."""
    experts, k = lm.engine.routing_sizes()
    strategy = Capacity(1.0, drop=drop, expanded=True)
    counts = []
    for record in _prefill_records(lm, PROMPTS, strategy):
        chosen = record.experts.flatten(0, 1)  # [T, E], -1 = not taken
        tokens = chosen.shape[0]
        capacity = math.ceil(k * tokens / experts)
        load = torch.bincount(chosen[chosen >= 0], minlength=experts)
        assert (load == min(capacity, tokens)).all()
        counts.append((chosen >= 0).sum(-1))
    counts = torch.cat(counts)
    assert counts.min() < k < counts.max()
    (out,) = lm.engine.generate(PROMPTS[:1], strategy, GREEDY, trace=True)
    decode = [r for r in out.trace.records if r.experts.shape[1] == 1]
    assert decode and all(((r.experts >= 0).sum(-1) == k).all() for r in decode)


def test_expanded_drop_by_score_takes_each_experts_most_probable_tokens(lm):
    experts, k = lm.engine.routing_sizes()
    tokens = lm.engine.tokenizer(PROMPTS[0])["input_ids"]
    routing = lm.engine.routing(tokens, Capacity(1.0, expanded=True), distributions=True)
    capacity = math.ceil(k * len(tokens) / experts)
    for record in routing.values():
        probs, chosen = record.probs[0], record.experts[0]  # [T, E]: the router's distribution, the taken experts
        for expert in range(experts):
            taken = set((chosen == expert).any(-1).nonzero().flatten().tolist())
            assert taken == set(probs[:, expert].topk(capacity).indices.tolist())


def test_expanded_drop_with_capacity_beyond_the_tokens_is_dense(lm):
    assert all((r.experts >= 0).all() for r in _prefill_records(lm, PROMPTS, Capacity(math.inf, expanded=True)))


def test_bad_parameters():
    for make, message in [
        (lambda: Capacity(0), "gamma must be a positive"),
        (lambda: Capacity(1.0, drop="low"), "drop must be one of"),
    ]:
        with pytest.raises(ValueError, match=message):
            make()
    assert Capacity(1.0, drop="random").stochastic and not Capacity(1.0).stochastic
