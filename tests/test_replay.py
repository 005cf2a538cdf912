"""Routing capture and replay (issue 17): a run replayed under its own trace reproduces its tokens."""

from __future__ import annotations

import pytest
import torch

import moesteer
from moesteer.models.tiny import char_tokenizer, tiny_model
from moesteer.routing import Ranks, Replay, TopK
from moesteer.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=24)


@pytest.fixture(scope="module", params=["embedded", "olmoe", "qwen3_moe", "mixtral"])
def case(request):
    if request.param == "embedded":
        return moesteer.load(), "Q: 37 + 48 - 12 = ?\n"
    return moesteer.load(tiny_model(request.param), tokenizer=char_tokenizer()), "abcde fgh"


@pytest.mark.parametrize("policy", [None, TopK(1)])
def test_a_run_replayed_under_its_own_trace_reproduces_it(case, policy):
    lm, prompt = case
    (recorded,) = lm.engine.generate([prompt], policy, GREEDY, trace=True)
    replay = Replay.from_trace(recorded.trace)
    (again,) = lm.engine.generate([prompt], replay, GREEDY, trace=True)
    assert again.token_ids == recorded.token_ids
    assert again.logprobs == recorded.logprobs
    for a, b in zip(again.trace.records, recorded.trace.records, strict=True):
        assert torch.equal(a.experts, b.experts) and torch.equal(a.weights, b.weights)


def test_a_replayed_routing_is_forced_and_positions_beyond_it_are_refused():
    lm, prompt = moesteer.load(), "Q: 37 + 48 - 12 = ?\n"
    (k1,) = lm.engine.generate([prompt], Ranks(2), GREEDY, trace=True)
    (plain,) = lm.engine.generate([prompt], None, GREEDY)
    (forced,) = lm.engine.generate([prompt], Replay.from_trace(k1.trace), GREEDY)
    assert forced.token_ids == k1.token_ids != plain.token_ids  # the recorded routing, not the model's
    with pytest.raises(ValueError, match="recorded for positions <"):
        lm.engine.generate([prompt], Replay.from_trace(k1.trace), SamplingParams(max_tokens=40))
