"""Routing hot paths keep every tensor on the model's device and read nothing back per layer.

The checks of ``device_paths.py`` run with every model-side tensor on PyTorch's ``meta`` device:
meta tensors carry shapes and devices but no values, so a CPU-built index, key or noise tensor
meeting them fails like it would on a GPU, and so does any read of a value (``.item()``, ``.tolist()``,
``int(t)``, a data-dependent ``if``), except the step's one named transfer, which the combiner test
stands in for and counts. HF's ``Scoped`` split selects tokens by a boolean mask, whose result
size meta cannot know, and a routing trace copies each router call to the host by design (an
opt-in diagnostic): both run on CUDA in ``bench/gpu_check.py`` instead.
"""

from __future__ import annotations

import pytest
import torch
from device_paths import COMBINE_CASES, combine_step, hf_cases, hf_route, vllm_cases, vllm_route

from moesteer.backends.vllm import step_tokens

META = torch.device("meta")
HF_ON_META = [name for name in hf_cases() if name != "scoped"]
VLLM_ON_META = [name for name in vllm_cases() if name != "traced"]


@pytest.mark.parametrize("case", HF_ON_META)
def test_hf_router_interception_stays_on_the_device(case):
    outputs = hf_route(hf_cases()[case], META)
    assert outputs and all(t.device == META for t in outputs)


@pytest.mark.parametrize("case", VLLM_ON_META)
def test_vllm_router_hook_stays_on_the_device(case):
    _, (weights, ids) = vllm_route(vllm_cases()[case], META)
    assert weights.device == META and ids.device == META
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32


@pytest.mark.parametrize("case", list(COMBINE_CASES))
def test_branch_rule_stays_on_the_device_and_reads_back_once(monkeypatch, case):
    reads = []

    def read_step(chosen: torch.Tensor) -> list[list[float]]:
        assert chosen.device == META
        reads.append(chosen.shape)
        return [[3.0, -0.5, 1.0]] * chosen.shape[0]  # token 3, its log-prob, finite

    monkeypatch.setattr(step_tokens, "read_step", read_step)
    logits, logprobs = combine_step(*COMBINE_CASES[case], META)
    assert logits.device == META
    assert reads == [torch.Size([2, 3])]  # one transfer for the step, both sequences in it
    assert logprobs == [[-0.5], [-0.5]]
