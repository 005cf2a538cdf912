"""The routing pipeline: a rule is one class or one function that the fixed stages run, and a
user's rule routes exactly like the built-in rule that does the same thing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from custom_rule import Nudge, nudge_expert_one
from device_paths import hf_route

import moesteer
from moesteer.models.adapters import get_adapter
from moesteer.routing import Bias, Force, Primitive, RouterCall, RouterLogits, TopK
from moesteer.routing.call import RouterSite, TokenKeys
from moesteer.routing.pipeline import select
from moesteer.routing.policy import RouterEdit
from moesteer.sampling import SamplingParams
from moesteer.testing import tiny_model

EXPERTS = 8  # the tiny OLMoE of device_paths


def _one_hot(expert: int, amount: float, width: int) -> torch.Tensor:
    return torch.zeros(width).index_fill(0, torch.tensor([expert]), amount)


@pytest.mark.parametrize(
    "custom, builtin",
    [
        (Nudge(expert=1), Bias(_one_hot(1, 4.0, EXPERTS))),
        (RouterLogits(nudge_expert_one), Bias(_one_hot(1, 4.0, EXPERTS))),
        (TopK(3) + Nudge(expert=1), TopK(3) + Bias(_one_hot(1, 4.0, EXPERTS))),
    ],
    ids=["class", "function", "composed"],
)
def test_a_users_rule_routes_as_the_builtin_rule_that_does_the_same(custom, builtin):
    plain = hf_route([None], "cpu")
    ours, theirs = hf_route([custom], "cpu"), hf_route([builtin], "cpu")
    for mine, reference in zip(ours, theirs, strict=True):
        assert torch.equal(mine, reference)
    assert any(not torch.equal(a, b) for a, b in zip(ours, plain, strict=True))  # the nudge moved the routing


def test_a_users_rule_decodes_as_the_builtin_rule_on_the_embedded_model():
    lm = moesteer.load()
    prompts, sampling = ["Q: 37 + 48 - 12 = ?\n", "Q: 5 * 6 = ?\n"], SamplingParams(max_tokens=24)
    width = lm.engine.routing_sizes()[0]
    ours = lm.engine.generate(prompts, Nudge(expert=1, amount=3.0), sampling)
    reference = lm.engine.generate(prompts, Bias(_one_hot(1, 3.0, width)), sampling)
    assert [c.token_ids for c in ours] == [c.token_ids for c in reference]


class _Recorder(Primitive):
    """Records the order in which the pipeline calls its stage hooks."""

    def __init__(self, seen: list[str]) -> None:
        self.seen = seen

    def on_logits(self, call: RouterCall) -> None:
        self.seen.append("logits")

    def on_noise(self, call: RouterCall) -> None:
        self.seen.append("noise")

    def on_key(self, call: RouterCall) -> None:
        assert call.key is None  # nothing has scored yet
        self.seen.append("key")

    def on_active(self, call: RouterCall) -> None:
        assert call.top is not None and call.active is not None
        self.seen.append("active")

    def on_weights(self, call: RouterCall) -> None:
        self.seen.append("weights")


def test_the_stages_run_in_the_documented_order_once_each():
    model = tiny_model("olmoe")
    adapter = get_adapter(model.config)
    router = next(r for r in model.modules() if type(r).__name__ == adapter.router_class)
    site = RouterSite(0, 0, 1, EXPERTS, 2)
    seen: list[str] = []
    edit = (Force(5) + _Recorder(seen)).edit(site)
    assert isinstance(edit, RouterEdit)
    tokens = torch.arange(3)
    keys = TokenKeys(tokens, tokens * 0, tokens * 0, tokens)
    call = RouterCall(
        adapter.scoring,
        adapter.scoring.facts(router),
        site,
        keys,
        torch.float32,
        2,
        torch.randn(3, EXPERTS, generator=torch.Generator().manual_seed(0)),
    )
    ids, weights, active = select(call, edit)
    assert seen == ["logits", "noise", "key", "active", "weights"]
    assert (ids[:, 0] == 5).all()  # the forced expert first, as the slot algebra says
    assert weights.shape == active.shape == (3, 2)


def test_the_readmes_own_rule_runs_as_written(capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = readme.split("## Your own routing rule", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md", "exec", dont_inherit=True), {"__name__": "readme_rule"})
    assert capsys.readouterr().out.strip()  # it printed a completion
