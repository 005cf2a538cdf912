"""Rows whose routing edits differ only in their values (a bias, mixing weights fitted per
sequence) route in one selection with per-token tensors, exactly as each row routes alone."""

from __future__ import annotations

import pytest
import torch
from device_paths import hf_route, vllm_route

from moesteer.backends.vllm import standin
from moesteer.routing import Bias, SetWeights, TopK, pipeline
from moesteer.strategy import Routed

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
    calls, original = [], pipeline.select

    def counted(call, edit):
        calls.append(call.logits.shape[0])
        return original(call, edit)

    monkeypatch.setattr(pipeline, "select", counted)
    return calls


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
