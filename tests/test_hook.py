"""HF's router hook: per-row policies in one batch route as each row alone, and a forward's
routing layout lives only as long as the forward (or the ``routing`` block) it belongs to."""

from __future__ import annotations

import pytest
import torch

from moesteer import steer
from moesteer.backends.hf.hook import BatchLayout, RouterHandle
from moesteer.routing import Gumbel, TopK
from moesteer.testing import tiny_model


def _layout_logits(model, ids, policies, prompt):
    positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    handle = RouterHandle(model)
    try:
        zeros = torch.zeros(len(prompt), dtype=torch.long)
        layout = BatchLayout(policies, torch.tensor(prompt), zeros, zeros, positions, seed=3)
        with torch.no_grad(), handle.routing(layout):
            return model(ids).logits
    finally:
        handle.remove()


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_per_row_policies_and_batch_equals_single(family, prompt_ids):
    model = tiny_model(family)
    noisy, top1 = Gumbel(1.5), TopK(1)
    batch = _layout_logits(model, prompt_ids, [top1, noisy], [0, 1])
    alone_top1 = _layout_logits(model, prompt_ids[:1], [top1], [0])
    alone_noisy = _layout_logits(model, prompt_ids[1:], [noisy], [1])
    with torch.no_grad():
        plain = model(prompt_ids).logits
    torch.testing.assert_close(batch[0], alone_top1[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batch[1], alone_noisy[0], atol=1e-5, rtol=0)
    assert (batch[1] - plain[1]).abs().max() > 1e-4


def test_a_layout_lives_for_its_forward_only(prompt_ids):
    model = tiny_model("olmoe")
    with torch.no_grad(), steer(model, TopK(1)) as handle:
        assert handle.layout is None
        model(prompt_ids)
        assert handle.layout is None  # set by the forward's pre-hook, cleared after it
        outer = BatchLayout.uniform(TopK(1), torch.arange(prompt_ids.shape[1]).expand(prompt_ids.shape[0], -1))
        with handle.routing(outer):
            with pytest.raises(RuntimeError), handle.routing(None):
                assert handle.layout is None
                raise RuntimeError("a failing forward")
            assert handle.layout is outer  # the outer layout comes back, also after an error
        assert handle.layout is None
