"""steer(): identity is bit-exact, the model is restored, nesting and bad input are refused."""

from __future__ import annotations

import pytest
import torch

from moesteer import steer
from moesteer.routing import Bias, Force, TopK


def _state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_noop_policy_is_bit_identical(family_model, prompt_ids):
    with torch.no_grad():
        reference = family_model(prompt_ids).logits
        with steer(family_model, None):
            noop = family_model(prompt_ids).logits
        with steer(family_model, TopK(family_model.config.num_experts_per_tok)):
            neutral = family_model(prompt_ids).logits
    assert torch.equal(reference, noop)
    assert torch.equal(reference, neutral)


def test_generate_inside_steer_matches_plain(family_model, prompt_ids):
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    plain = family_model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), **kwargs)
    with steer(family_model, None):
        noop = family_model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), **kwargs)
    with steer(family_model, TopK(family_model.config.num_experts_per_tok)):
        neutral = family_model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), **kwargs)
    assert torch.equal(plain, noop)
    assert torch.equal(plain, neutral)


def test_steering_changes_logits(family_model, prompt_ids):
    with torch.no_grad():
        reference = family_model(prompt_ids).logits
        with steer(family_model, TopK(1)):
            top1 = family_model(prompt_ids).logits
    assert (reference - top1).abs().max() > 1e-4


def test_model_restored_after_exit_and_exception(family_model, prompt_ids):
    before = _state(family_model)
    with torch.no_grad():
        reference = family_model(prompt_ids).logits
    with steer(family_model, Force(0) + TopK(3)):
        pass
    with pytest.raises(RuntimeError, match="boom"), steer(family_model, TopK(1)):
        family_model(prompt_ids)
        raise RuntimeError("boom")
    after = _state(family_model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any("forward" in vars(m) for m in family_model.modules())
    assert not family_model._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(reference, family_model(prompt_ids).logits)


def test_nesting_is_refused(family_model):
    with steer(family_model, TopK(1)), pytest.raises(ValueError, match="already steered"), steer(family_model, None):
        pass
    with steer(family_model, None):  # the failed inner attempt left nothing behind
        pass


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (lambda e: TopK(e + 1), "exceeds the number of experts"),
        (lambda e: Bias(torch.zeros(e + 1)), "does not match"),
        (lambda e: Force(e), "out of range"),
    ],
)
def test_bad_policies_are_value_errors(family_model, policy, message):
    num_experts = next(
        m for m in family_model.modules() if hasattr(m, "top_k") and hasattr(m, "num_experts")
    ).num_experts
    with pytest.raises(ValueError, match=message), steer(family_model, policy(num_experts)):
        pass
    assert not any("forward" in vars(m) for m in family_model.modules())


def test_multi_branch_strategy_points_to_lm_generate(family_model):
    class TwoBranches:
        def branches(self):
            return (None, TopK(1))

    with pytest.raises(ValueError, match=r"lm\.generate"), steer(family_model, TwoBranches()):
        pass
