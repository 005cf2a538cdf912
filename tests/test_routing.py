"""Each routing primitive does what it says, on every family (read off the routing trace)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from moesteer import steer
from moesteer.models.adapters import find_routers, get_adapter
from moesteer.routing import Bias, Force, Gumbel, Mask, OnLayers, Ranks, Rescale, TopK
from moesteer.testing import tiny_model


def _trace(model, ids, policy, **kwargs):
    with torch.no_grad(), steer(model, policy, trace=True, **kwargs) as handle:
        logits = model(ids).logits
    return handle.trace, logits


def _first_layer(trace):
    return next(r for r in trace.records if r.layer == trace.layers()[0])


def _num_experts(model) -> int:
    return next(iter(find_routers(model, get_adapter(model.config)).values())).num_experts


def test_topk_sets_active_experts(family_model, prompt_ids):
    for k in (1, 3, _num_experts(family_model)):
        trace, _ = _trace(family_model, prompt_ids, TopK(k))
        for layer in trace.layers():
            assert (trace.active_counts(layer) == k).all()


def test_forced_expert_in_every_token(family_model, prompt_ids):
    trace, _ = _trace(family_model, prompt_ids, Force(5))
    for record in trace.records:
        assert (record.experts == 5).any(-1).all()
        assert ((record.experts >= 0).sum(-1) == family_model.config.num_experts_per_tok).all()


def test_masked_experts_never_chosen(family_model, prompt_ids):
    plain, _ = _trace(family_model, prompt_ids, None)
    popular = int(plain.expert_load(_num_experts(family_model))[0].argmax())
    trace, _ = _trace(family_model, prompt_ids, Mask(popular, 1))
    assert all(not ((r.experts == popular) | (r.experts == 1)).any() for r in trace.records)


def test_ranks_pick_the_ranked_expert(family_model, prompt_ids):
    first = _first_layer(_trace(family_model, prompt_ids, Ranks(1))[0]).experts[..., 0]
    second = _first_layer(_trace(family_model, prompt_ids, Ranks(2))[0])
    pair = _first_layer(_trace(family_model, prompt_ids, TopK(2))[0]).experts
    assert ((second.experts >= 0).sum(-1) == 1).all()
    chosen = second.experts[..., 0]
    assert (chosen != first).all()
    assert ((pair == chosen[..., None]).any(-1) & (pair == first[..., None]).any(-1)).all()


def test_rescale_multiplies_weights(family_model, prompt_ids):
    plain = _first_layer(_trace(family_model, prompt_ids, None)[0])
    factor = {e: 2.0 for e in range(_num_experts(family_model))}
    scaled = _first_layer(_trace(family_model, prompt_ids, Rescale(factor))[0])
    assert torch.equal(plain.experts, scaled.experts)
    torch.testing.assert_close(scaled.weights, 2 * plain.weights)


def test_on_layers_restricts_to_layer_subset(family_model, prompt_ids):
    plain, _ = _trace(family_model, prompt_ids, None)
    last = plain.layers()[-1]
    trace, _ = _trace(family_model, prompt_ids, OnLayers(TopK(1), [last]))
    assert torch.equal(_first_layer(trace).experts, _first_layer(plain).experts)
    assert (trace.active_counts(last) == 1).all()


def test_bias_gradient_reaches_parameter(family_model, prompt_ids):
    bias = torch.nn.Parameter(torch.zeros(_num_experts(family_model)))
    with steer(family_model, Bias(bias) + TopK(3)):
        logits = family_model(prompt_ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), prompt_ids[:, 1:].flatten())
    loss.backward()
    family_model.zero_grad(set_to_none=True)
    assert bias.grad is not None and torch.isfinite(bias.grad).all() and bias.grad.abs().sum() > 0


def test_bias_moves_routing(family_model, prompt_ids):
    push = torch.zeros(_num_experts(family_model))
    push[3] = 50.0
    plain, _ = _trace(family_model, prompt_ids, None)
    trace, _ = _trace(family_model, prompt_ids, Bias(push))
    num_experts = _num_experts(family_model)
    assert (trace.expert_load(num_experts)[:, 3] > plain.expert_load(num_experts)[:, 3]).all()
    if family_model.config.model_type != "deepseek_v3":  # V3 saturates at sigmoid = 1 inside group routing
        assert all((r.experts == 3).any(-1).all() for r in trace.records)


def test_gumbel_zero_is_identity_and_noise_is_seeded(family_model, prompt_ids):
    _, plain = _trace(family_model, prompt_ids, None)
    _, zero = _trace(family_model, prompt_ids, Gumbel(0.0))
    assert torch.equal(plain, zero)
    a, _ = _trace(family_model, prompt_ids, Gumbel(2.0), seed=1)
    b, _ = _trace(family_model, prompt_ids, Gumbel(2.0), seed=1)
    c, _ = _trace(family_model, prompt_ids, Gumbel(2.0), seed=2)
    same = [torch.equal(x.experts, y.experts) for x, y in zip(a.records, b.records, strict=True)]
    other = [torch.equal(x.experts, y.experts) for x, y in zip(a.records, c.records, strict=True)]
    assert all(same) and not all(other)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: TopK(0), "k must be an integer >= 1"),
        (lambda: TopK(-2), "k must be an integer >= 1"),
        (lambda: Ranks(0), "ranks must be distinct integers >= 1"),
        (lambda: Gumbel(-1.0), "tau must be a finite number >= 0"),
        (lambda: Mask(-1), "expert ids"),
        (lambda: Bias(torch.zeros(2, 3, 4)), "num_experts"),
    ],
)
def test_primitives_validate_on_construction(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_layer_that_is_not_moe_is_refused():
    model = tiny_model("qwen2_moe")  # layer 0 is an MLP-only layer
    for policy in (OnLayers(TopK(1), [0]), Bias({0: torch.zeros(8)}), OnLayers(TopK(1), [7])):
        with pytest.raises(ValueError, match=r"not an MoE layer|not MoE layers"), steer(model, policy):
            pass


def test_unknown_family_lists_supported():
    with pytest.raises(ValueError, match=r"'llama' is not a supported MoE family.*mixtral.*olmoe"):
        get_adapter(LlamaConfig())


def test_force_and_mask_same_expert_is_refused(family_model):
    with pytest.raises(ValueError, match="both forced and masked"), steer(family_model, Force(2) + Mask(2)):
        pass
