"""The wire format: strategies, policies (a user's rule and a rule's function included) and
sampling parameters as JSON-safe data that vLLM's serialiser carries into its workers, and back."""

from __future__ import annotations

import pytest
import torch
from custom_rule import Nudge, nudge_expert_one

from moesteer.backends.vllm.registry import EXTRA_ARGS_KEY, Registry, Sequence, row_args
from moesteer.backends.vllm.wire import dumps, from_wire, loads, to_wire
from moesteer.routing import Bias, Capacity, Force, Mask, Replay, RouterLogits, Scoped, TopK, TopP, policy_fingerprint
from moesteer.sampling import SamplingParams
from moesteer.strategies.combinators import WithK
from moesteer.strategies.roe import RoE
from moesteer.strategies.scmoe import SCMoE
from moesteer.strategy import Routed

WIRED = [
    SCMoE(beta=0.3, weak="topk", weak_k=2),
    RoE(samples=3, tau=(0.1, 0.2, 0.3, 0.4)),
    WithK(SCMoE(), k=3),
    Routed(TopK(1) + Bias({1: torch.randn(16, dtype=torch.bfloat16), 3: torch.randn(16)})),
    Routed(Scoped(TopK(2) + Mask(1, 2), (0, 3))),
    Routed(Capacity(float("inf"))),
    Routed(TopP(0.7, k_max=4)),
    Routed(Force(3)),
    Routed(TopK(3) + Nudge(expert=1)),
    Routed(RouterLogits(nudge_expert_one)),
    Routed(Replay({1: torch.tensor([[0, 1], [2, -1]])}, {1: torch.tensor([[0.6, 0.4], [1.0, 0.0]])})),
]


@pytest.mark.parametrize("strategy", WIRED, ids=str)
def test_extra_args_survive_vllms_serialiser(strategy):
    """A request's extra_args, msgpack-encoded and decoded as vLLM does between processes, rebuild
    a sequence with an equal strategy (every field, tensors bit for bit, tuples as tuples)."""
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    sampling = SamplingParams(temperature=0.7, top_p=0.9, stop=("\n\n", "Q:"), seed=11, max_tokens=9)
    seq = Sequence(strategy, strategy.branches(), sampling, prompt_key=5, sample=2, prompt_len=7, offset=3)
    last = len(seq.branches) - 1  # the last branch row (a branch the strategy lacks is no row of it)
    args = row_args(seq, seq_id=41, branch=last, chunk=40, rows=6, eos=(2, 0))
    params = VllmSamplingParams(temperature=0.0, max_tokens=4, extra_args={EXTRA_ARGS_KEY: args})
    received = MsgpackDecoder(VllmSamplingParams).decode(MsgpackEncoder().encode(params))
    assert received.extra_args == {EXTRA_ARGS_KEY: args}
    (seq_id, branch), rebuilt = Registry().lookup(received.extra_args)
    assert (seq_id, branch) == (41, last)
    assert dumps(rebuilt.strategy) == dumps(strategy) and rebuilt.sampling == sampling
    assert (rebuilt.prompt_key, rebuilt.sample, rebuilt.prompt_len, rebuilt.offset, rebuilt.eos) == (5, 2, 7, 3, (2, 0))
    for ours, theirs in zip(rebuilt.branches, strategy.branches(), strict=True):
        assert (ours is None and theirs is None) or policy_fingerprint(ours) == policy_fingerprint(theirs)


def test_equal_specs_share_one_rebuilt_strategy():
    """Rows of equal strategies rebuild one object, so the router hook routes them as one group."""
    registry, sampling = Registry(), SamplingParams()
    made = []
    for seq_id in range(3):
        seq = Sequence(SCMoE(), SCMoE().branches(), sampling, prompt_key=seq_id, sample=0, prompt_len=4)
        made.append(registry.lookup({EXTRA_ARGS_KEY: row_args(seq, seq_id, 0, 0, 3, ())})[1])
    assert made[0].strategy is made[1].strategy is made[2].strategy
    assert made[0].branches[1] is made[2].branches[1]
    registry.pop([0, 1, 2])
    assert not registry.sequences and not registry._specs


def test_a_rules_function_crosses_by_its_module_and_name():
    rule = RouterLogits(nudge_expert_one)
    assert to_wire(rule)["fields"]["fn"] == {"@function": "custom_rule:nudge_expert_one"}
    assert loads(dumps(rule)).fn is nudge_expert_one


def test_a_function_without_an_importable_name_is_refused_in_one_line():
    with pytest.raises(
        TypeError, match=r"^cannot send .*<lambda> to vLLM's workers: define the function at module level$"
    ):
        dumps(RouterLogits(lambda logits, site: logits))


def test_wire_data_naming_something_other_than_a_function_or_a_policy_is_refused():
    with pytest.raises(ValueError, match="is not a function"):
        from_wire({"@function": "moesteer.routing:TopK"})
    with pytest.raises(ValueError, match="not a moesteer policy, strategy or sampling class"):
        from_wire({"@type": "builtins:dict", "fields": {}})
