"""Rows whose routing edits differ only in their values (a bias, mixing weights fitted per
sequence) route in one selection with per-token tensors, and choose their tokens in one call,
exactly as each row alone."""

from __future__ import annotations

import pytest
import torch
from counting import count_calls
from device_paths import hf_route, vllm_route

import moesteer
from moesteer.backends.hf import session
from moesteer.backends.vllm import standin
from moesteer.decoding import chooser
from moesteer.routing import Bias, SetWeights, TopK, pipeline
from moesteer.sampling import SamplingParams
from moesteer.strategies.combinators import WithK, WithPolicy
from moesteer.strategies.scmoe import SCMoE
from moesteer.strategy import Plain, Routed
from moesteer.testing import char_tokenizer, tiny_model

EXPERTS = 8  # the tiny OLMoE of device_paths


def _biases(count: int) -> list[Bias]:
    g = torch.Generator().manual_seed(11)
    return [Bias(torch.randn(EXPERTS, generator=g) * 2) for _ in range(count)]


def _weights(count: int) -> list[SetWeights]:
    g = torch.Generator().manual_seed(12)
    return [SetWeights({layer: torch.rand(EXPERTS, generator=g) for layer in (0, 1)}) for _ in range(count)]


@pytest.fixture
def selections(monkeypatch) -> list[int]:
    """How many tokens each ``select`` call routes."""
    return count_calls(monkeypatch, pipeline, "select", lambda call, edit: call.logits.shape[0])


@pytest.mark.parametrize("values", [_biases, _weights], ids=["bias", "weights"])
def test_hf_rows_with_their_own_values_route_in_one_selection_as_each_alone(selections, values):
    policies = [*values(4), TopK(1) + values(1)[0]]
    hidden = torch.randn(len(policies), 5, 64, generator=torch.Generator().manual_seed(3))  # the tiny OLMoE's width
    together = hf_route(policies, "cpu", hidden.flatten(0, 1))
    assert selections == [4 * 5, 5]  # the four rows' tokens in one call; a different edit keeps its own
    for row, policy in enumerate(policies):
        alone = hf_route([policy], "cpu", hidden[row])
        for merged, own in zip(together, alone, strict=True):  # the top-1 row is padded to 2 slots in the batch
            mine = merged.view(len(policies), 5, *merged.shape[1:])[row]
            assert torch.equal(mine[..., : own.shape[-1]], own)


def test_vllm_requests_with_their_own_biases_route_in_one_selection_as_each_alone(selections):
    def rows(bias: Bias, seq_id: int) -> list[standin.ScheduledRow]:
        return standin.branch_rows(Routed(bias), seq_id, 5, computed=0, scheduled=5)

    biases = _biases(3)
    logits = torch.randn(15, EXPERTS, generator=torch.Generator().manual_seed(0))
    together = vllm_route([r for i, b in enumerate(biases) for r in rows(b, i)], "cpu", logits)[1]
    assert selections == [15]
    for i, bias in enumerate(biases):
        alone = vllm_route(rows(bias, i), "cpu", logits[5 * i : 5 * i + 5])[1]
        for merged, own in zip(together, alone, strict=True):
            assert torch.equal(merged[5 * i : 5 * i + 5], own)


def _steered_scmoe(count: int) -> list[WithPolicy]:
    return [WithPolicy(SCMoE(beta=0.5), bias) for bias in _biases(count)]


@pytest.fixture
def choices(monkeypatch) -> list[int]:
    """How many sequences each HF :func:`next_tokens` call chooses for."""
    return count_calls(
        monkeypatch, session, "next_tokens", lambda strategy, branch_logprobs, *rest: len(branch_logprobs)
    )


def test_sequences_routed_by_their_own_values_choose_their_tokens_in_one_call_as_each_alone(choices):
    """Per-sequence routing values (rerouting's δ, C3PO's ω) leave the token rule alone: the
    sequences of one combine rule pick their tokens together, and each gets its own tokens."""
    lm = moesteer.load(tiny_model("olmoe"), tokenizer=char_tokenizer())
    prompts, strategies = ["abcde fgh", "hello world", "zyxw"], _steered_scmoe(3)
    sampling = SamplingParams(max_tokens=8, ignore_eos=True)
    together = lm.engine.generate(prompts, strategies, sampling)
    assert choices == [3] * 8  # one call a step for the three sequences
    alone = [lm.engine.generate([p], s, sampling)[0] for p, s in zip(prompts, strategies, strict=True)]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    unsteered = lm.engine.generate(prompts, SCMoE(beta=0.5), sampling)
    assert [c.token_ids for c in alone] != [c.token_ids for c in unsteered]  # the biases do route differently


def test_a_routing_only_wrapper_chooses_as_its_inner_strategy():
    assert chooser(Routed(TopK(1))) == Plain() == chooser(Plain())
    assert chooser(WithPolicy(SCMoE(beta=0.5), _biases(1)[0])) == SCMoE(beta=0.5)
    assert chooser(WithK(Routed(TopK(1)), k=3)) == Plain()
