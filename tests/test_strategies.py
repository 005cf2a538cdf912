"""SCMoE, RoE and SelfConsistency: degenerate cases, hand computations, naive references, errors."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

import moesteer
from moesteer import steer
from moesteer.answers import majority_vote
from moesteer.backends.hf.hook import BatchLayout, RouterHandle
from moesteer.routing import Gumbel, RankAfterTopK, Ranks
from moesteer.strategies.roe import RoE
from moesteer.strategies.scmoe import SCMoE
from moesteer.strategies.self_consistency import SelfConsistency
from moesteer.strategies.spec import parse
from moesteer.testing import tiny_model

PROMPTS = [[5, 17, 42, 9, 77, 31, 12], [8, 64, 23], [9, 10, 11, 12, 13, 90]]
FAMILIES = ["olmoe", "mixtral", "qwen3_moe", "deepseek_v3"]


@pytest.fixture(scope="module")
def lms() -> dict:
    return {family: moesteer.load(tiny_model(family)) for family in FAMILIES}


def _tokens(lm, strategy, **kwargs):
    return [c.token_ids for c in lm.generate(PROMPTS, strategy, max_tokens=16, ignore_eos=True, **kwargs)]


@pytest.mark.parametrize("family", FAMILIES)
def test_degenerate_cases_equal_plain_greedy(lms, family):
    lm = lms[family]
    plain = _tokens(lm, None)
    assert _tokens(lm, SCMoE(beta=0.0)) == plain
    assert _tokens(lm, SCMoE(alpha=1.0, beta=0.9)) == plain
    assert _tokens(lm, RoE(tau=0.0)) == plain
    assert _tokens(lm, RoE(tau=0.0, cache="clean")) == plain
    assert _tokens(lm, RoE(samples=1, tau=1.0, cache="clean")) == plain  # only the clean row
    assert _tokens(lm, SCMoE(beta=0.9)) != plain  # non-vacuous


def test_roe_single_standard_sample_is_one_noisy_branch(lms):
    lm = lms["olmoe"]
    assert _tokens(lm, RoE(samples=1, tau=1.0)) == _tokens(lm, Gumbel(1.0))
    assert _tokens(lm, RoE(samples=1, tau=1.0)) != _tokens(lm, None)


@pytest.mark.parametrize("family", ["olmoe", "mixtral"])
def test_scmoe_contrast_equals_hand_computation(lms, family):
    """One step from a fixed prefix: the engine's choice and log-prob match the formula computed
    from two separately steered forward passes."""
    lm, prefix = lms[family], PROMPTS[0]
    beta, alpha = 0.7, 0.1
    with torch.no_grad():
        strong = torch.log_softmax(lm.model(torch.tensor([prefix])).logits[0, -1], -1)
        with steer(lm.model, RankAfterTopK(1)):
            weak = torch.log_softmax(lm.model(torch.tensor([prefix])).logits[0, -1], -1)
    contrast = (1 + beta) * strong - beta * weak
    contrast[strong < math.log(alpha) + strong.max()] = float("-inf")
    expected = torch.log_softmax(contrast, -1)
    out = lm.generate([prefix], SCMoE(beta=beta, alpha=alpha), max_tokens=1, ignore_eos=True)[0]
    assert out.token_ids == [int(expected.argmax())]
    assert abs(out.logprobs[0] - float(expected.max())) < 1e-5
    assert (weak - strong).abs().max() > 1e-3  # the weak branch really routes differently


def _naive_clean_roe_step(model, prefix, samples, tau):
    """Reference: every roster row gets its own clean prefill of the prefix, then the last token
    under its own noise (no shared cache, no sibling positions, no 4-D mask)."""
    handle = RouterHandle(model)
    try:
        zeros = torch.zeros(samples, dtype=torch.long)
        ids = torch.tensor([prefix] * samples)
        positions = torch.arange(len(prefix)).expand(samples, -1)
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            handle.layout = BatchLayout([None] * samples, zeros, zeros, torch.arange(samples), positions[:, :-1])
            model(input_ids=ids[:, :-1], position_ids=positions[:, :-1], past_key_values=cache, use_cache=True)
            noisy = Gumbel(tau)
            handle.layout = BatchLayout(
                [None] + [noisy] * (samples - 1), zeros, zeros, torch.arange(samples), positions[:, -1:]
            )
            logits = model(input_ids=ids[:, -1:], position_ids=positions[:, -1:], past_key_values=cache).logits[:, -1]
    finally:
        handle.remove()
    logprobs = torch.log_softmax(logits.float(), -1)
    return torch.log_softmax(torch.logsumexp(logprobs, 0) - math.log(samples), -1)


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe"])
def test_roe_clean_cache_equals_naive_recompute(lms, family):
    lm, prompt, samples, tau = lms[family], PROMPTS[0], 4, 1.5
    out = lm.generate([prompt], RoE(samples=samples, tau=tau, cache="clean"), max_tokens=6, ignore_eos=True)[0]
    for step, token in enumerate(out.token_ids):
        reference = _naive_clean_roe_step(lm.model, prompt + out.token_ids[:step], samples, tau)
        assert token == int(reference.argmax())
        assert abs(out.logprobs[step] - float(reference[token])) < 1e-4
    plain = lm.generate([prompt], max_tokens=6, ignore_eos=True)[0]
    assert max(abs(a - b) for a, b in zip(out.logprobs, plain.logprobs, strict=False)) > 1e-4  # noise mattered


def test_clean_cache_refused_for_non_attention_layers():
    lm = moesteer.load(tiny_model("qwen3_next"))
    with pytest.raises(ValueError, match="full attention"):
        lm.generate([[5, 6, 7]], RoE(cache="clean"), max_tokens=2)


@pytest.mark.parametrize("strategy", [SCMoE(beta=0.5), RoE(samples=3, tau=0.8), RoE(samples=3, tau=0.8, cache="clean")])
def test_sampling_batch_equals_one_by_one(lms, strategy):
    lm = lms["olmoe"]
    sampling = moesteer.sampling.SamplingParams(max_tokens=10, temperature=1.0, seed=5, ignore_eos=True)
    batch = lm.engine.generate(PROMPTS, strategy, sampling)
    for i, prompt in enumerate(PROMPTS):
        assert lm.engine.generate([prompt], strategy, sampling, prompt_keys=[i])[0].token_ids == batch[i].token_ids


def test_self_consistency_votes_over_shared_prefill_samples(lms):
    lm = lms["olmoe"]
    strategy = SelfConsistency(RoE(samples=2, tau=0.5), n=4, extract=lambda text: str(len(text) % 2))
    out = lm.generate(PROMPTS, strategy, max_tokens=8, temperature=1.0, ignore_eos=True)
    assert len(out) == len(PROMPTS) and all(len(c.samples) == 4 for c in out)
    for completion, prompt in zip(out, PROMPTS, strict=True):
        rows = [s.token_rows for s in completion.samples]
        assert rows[0] == 2 * len(prompt) + 2 * 7 and rows[1:] == [2 * 7] * 3  # prefill charged once
        assert completion.forward_passes == 8 and completion.token_rows == sum(rows)
        assert completion.info["answer"] in completion.info["answers"]


def test_majority_vote_ties_break_by_first_seen():
    assert majority_vote(["3", "5", "5", "3", None]) == ("3", {"3": 2, "5": 2})
    assert majority_vote([None, None]) == (None, {})
    assert majority_vote(["7", None, "8", "8"])[0] == "8"


def test_specs_round_trip_and_nest():
    for text in [
        "scmoe(beta=0.5)",
        "scmoe(beta=0.3, weak=ranks(3))",
        "roe(samples=4, tau=0.3, cache='clean')",
        "self_consistency(roe(samples=4), n=8)",
        "self_consistency(scmoe(beta=0.5), n=8)",
    ]:
        assert parse(text).spec() == text
        assert parse(parse(text).spec()) == parse(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("scmoe(beta=-0.1)", "beta must be"),
        ("scmoe(alpha=0)", "alpha must be in"),
        ("scmoe(alpha=1.5)", "alpha must be in"),
        ("scmoe(rank=0)", "rank must be"),
        ("scmoe(weak='strong')", "weak must be one of"),
        ("roe(samples=0)", "samples must be"),
        ("roe(tau=-1)", "tau must be"),
        ("roe(cache='shared')", "cache must be one of"),
        ("self_consistency(plain(), n=0)", "n must be"),
    ],
)
def test_bad_parameters_are_one_line_errors(text, message):
    with pytest.raises(ValueError, match=message) as err:
        parse(text)
    assert "\n" not in str(err.value)


def test_rank_beyond_experts_is_refused(lms):
    with pytest.raises(ValueError, match="exceeds the number of experts"):
        lms["olmoe"].generate([[5, 6]], SCMoE(rank=9), max_tokens=2)
    with pytest.raises(ValueError, match="exceeds the number of experts"):
        lms["olmoe"].generate([[5, 6]], Ranks(9), max_tokens=2)
