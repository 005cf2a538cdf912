"""HF engine: parity with model.generate, batch = one by one, branches, seeds, score, loss, specs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import moesteer
from moesteer.routing import Bias, Gumbel, Policy, TopK
from moesteer.sampling import SamplingParams
from moesteer.strategies.base import Controller
from moesteer.strategies.spec import parse, to_spec
from moesteer.strategy import Plain, Strategy, TokenStrategy
from moesteer.testing import char_tokenizer, tiny_model

PROMPTS = [[5, 17, 42, 9, 77, 31, 12], [8, 64, 23], [9, 10, 11, 12, 13, 90]]


@pytest.fixture(scope="module")
def lms() -> dict:
    return {}


def _lm(lms, family: str):
    if family not in lms:
        lms[family] = moesteer.load(tiny_model(family))
    return lms[family]


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "mixtral", "deepseek_v3", "gpt_oss"])
def test_plain_greedy_matches_model_generate(lms, family):
    lm = _lm(lms, family)
    completions = lm.generate(PROMPTS, max_tokens=16, ignore_eos=True)
    for prompt, completion in zip(PROMPTS, completions, strict=True):
        ids = torch.tensor([prompt])
        reference = lm.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=16,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
        assert completion.token_ids == reference[0, len(prompt) :].tolist()
        assert completion.finish_reason == "length" and len(completion.logprobs) == 16


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe", "phimoe"])
@pytest.mark.parametrize("strategy", [None, TopK(1), Gumbel(1.0)])
def test_batch_equals_one_by_one(lms, family, strategy):
    lm = _lm(lms, family)
    sampling = SamplingParams(max_tokens=12, temperature=0.8, seed=3, ignore_eos=True)
    batch = lm.engine.generate(PROMPTS, strategy, sampling)
    for i, prompt in enumerate(PROMPTS):
        alone = lm.engine.generate([prompt], strategy, sampling, prompt_keys=[i])[0]
        assert alone.token_ids == batch[i].token_ids
        assert max(abs(a - b) for a, b in zip(alone.logprobs, batch[i].logprobs, strict=True)) < 1e-4


@dataclass(frozen=True)
class FirstOfTwo(Strategy, TokenStrategy):
    """Test strategy: branches (TopK(1), plain); decodes with branch 0 only."""

    name: ClassVar[str] = "first_of_two"

    def branches(self) -> tuple[Policy | None, ...]:
        return (TopK(1), None)

    def combine(self, logprobs):
        return logprobs[:, 0]


def test_two_branch_strategy_follows_its_branch(lms):
    lm = _lm(lms, "olmoe")
    two = lm.generate(PROMPTS, FirstOfTwo(), max_tokens=12, ignore_eos=True)
    one = lm.generate(PROMPTS, TopK(1), max_tokens=12, ignore_eos=True)
    plain = lm.generate(PROMPTS, None, max_tokens=12, ignore_eos=True)
    assert [c.token_ids for c in two] == [c.token_ids for c in one]
    assert [c.token_ids for c in two] != [c.token_ids for c in plain]
    for a, b in zip(two, one, strict=True):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-5
        assert a.forward_passes == b.forward_passes == 12
        assert a.token_rows == 2 * b.token_rows


def test_seeds(lms):
    lm = _lm(lms, "olmoe")
    run = lambda seed: [c.token_ids for c in lm.generate(PROMPTS, temperature=1.0, seed=seed, max_tokens=16)]  # noqa: E731
    assert run(1) == run(1)
    assert run(1) != run(2)
    samples = lm.generate(PROMPTS[:1], temperature=1.0, seed=1, max_tokens=16, n=3)
    assert [c.sample_index for c in samples] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in samples}) > 1


def test_score_plain_equals_model_log_softmax(lms):
    lm = _lm(lms, "qwen3_moe")
    prompt, continuation = [5, 17, 42, 9], [77, 31, 12]
    logprobs = lm.score([prompt], [continuation])[0]  # token ids in place of strings
    with torch.no_grad():
        logits = lm.model(torch.tensor([prompt + continuation])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1].gather(-1, torch.tensor(continuation)[:, None])[:, 0]
    torch.testing.assert_close(logprobs, expected, atol=1e-5, rtol=0)


def test_loss_gradient_reaches_bias(lms):
    lm = _lm(lms, "olmoe")
    bias = torch.nn.Parameter(torch.zeros(8))
    loss = lm.engine.loss([5, 17, 42, 9], [77, 31, 12, 4], Bias(bias) + TopK(2))
    loss.backward()
    lm.model.zero_grad(set_to_none=True)
    assert torch.isfinite(loss) and bias.grad is not None
    assert torch.isfinite(bias.grad).all() and bias.grad.abs().sum() > 0


def _char_lm(model_family: str = "olmoe"):
    model = tiny_model(model_family)
    return moesteer.load(model, tokenizer=char_tokenizer(model.config.vocab_size))


def test_stop_strings_and_text():
    lm = _char_lm()
    free = lm.generate(["abc", "hello world"], max_tokens=20, ignore_eos=True)
    stop = free[0].text[5:7]
    stopped = lm.generate(["abc"], max_tokens=20, stop=[stop], ignore_eos=True)[0]
    assert stopped.finish_reason == "stop"
    assert stop not in stopped.text and free[0].text.startswith(stopped.text)
    assert len(stopped.token_ids) < 20


def test_controller_runs_inner_through_engine(lms):
    @dataclass(frozen=True)
    class Twice(Controller):
        name: ClassVar[str] = "twice"

        def run(self, engine, prompts, sampling, context, **options):
            first = engine.generate(prompts, Plain(), sampling)
            return [engine.generate(prompts, TopK(1), sampling)[i] for i in range(len(first))]

    lm = _lm(lms, "olmoe")
    out = lm.generate(PROMPTS, Twice(), max_tokens=8, ignore_eos=True)
    assert [c.token_ids for c in out] == [
        c.token_ids for c in lm.generate(PROMPTS, TopK(1), max_tokens=8, ignore_eos=True)
    ]


def test_engines_refuse_controllers_and_name_the_front_door(lms):
    lm = _lm(lms, "olmoe")
    with pytest.raises(ValueError, match=r"engines do not run: use moesteer\.strategies\.run or LM\.generate"):
        lm.engine.generate(PROMPTS, parse("self_consistency(plain(), n=2)"))


@pytest.mark.parametrize("text", ["plain()", "topk(k=1)", "ranks(2)", "mask(0, 3)", "gumbel(tau=0.5)", "force(1, 2)"])
def test_spec_round_trip(text):
    strategy = parse(text)
    assert to_spec(strategy) == text
    assert parse(to_spec(strategy)) == strategy


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("topk(kk=1)", "did you mean 'k'"),
        ("tpk(k=1)", "did you mean 'topk'"),
        ("topk(k=__import__('os'))", "unknown strategy '__import__'"),
        ("topk(k=0)", "k must be an integer >= 1"),
        ("topk(k=1", "cannot parse"),
        ("topk(k=1) + 2", "unsupported expression"),
    ],
)
def test_bad_specs_are_one_line_errors(text, message):
    with pytest.raises(ValueError, match=message) as err:
        parse(text)
    assert "\n" not in str(err.value)


def test_user_strategy_registration(monkeypatch):
    from moesteer.strategies import spec

    monkeypatch.setattr(spec.STRATEGIES, "_entries", dict(spec.STRATEGIES._entries))  # ends with the test
    spec.register("first_of_two", FirstOfTwo)
    assert isinstance(parse("first_of_two()"), FirstOfTwo)
    assert parse("first_of_two").spec() == "first_of_two()"


def test_sampling_params_validation():
    for bad in ({"temperature": -1}, {"top_p": 0}, {"max_tokens": 0}, {"n": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)
