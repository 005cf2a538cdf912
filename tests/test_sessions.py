"""Decode sessions: pausing, resuming and forking, a strategy per row, open routing edits, controller context."""

from __future__ import annotations

import random

import pytest
import torch

import moesteer
from moesteer.backends.base import Engine
from moesteer.lm import LM
from moesteer.routing import Bias, RankAfterTopK, Scoped, SetWeights, TopK
from moesteer.sampling import Completion, SamplingParams
from moesteer.strategies.base import run
from moesteer.strategies.combinators import WithK
from moesteer.strategies.context import RunContext
from moesteer.strategies.roe import RoE
from moesteer.strategies.scmoe import SCMoE
from moesteer.strategies.self_consistency import SelfConsistency
from moesteer.strategies.spec import parse
from moesteer.strategy import Plain, Routed, as_strategy
from moesteer.testing import char_tokenizer, tiny_model

PROMPTS = [[5, 17, 42, 9, 77, 31, 12], [8, 64, 23], [9, 10, 11, 12, 13, 90]]
FAMILIES = ["olmoe", "qwen3_moe", "mixtral"]


@pytest.fixture(scope="module")
def lms() -> dict:
    return {}


def _lm(lms, family: str):
    if family not in lms:
        lms[family] = moesteer.load(tiny_model(family), tokenizer=char_tokenizer())
    return lms[family]


def _tokens(session, ids):
    return [session.seqs[i].generated for i in ids]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("temperature", [0.0, 0.9])
@pytest.mark.parametrize("strategy", [None, SCMoE(beta=0.5), RoE(samples=2, tau=0.5)])
def test_pause_and_resume_equals_uninterrupted(lms, family, temperature, strategy):
    lm = _lm(lms, family)
    sampling = SamplingParams(max_tokens=14, temperature=temperature, seed=5, n=2, ignore_eos=True)
    whole = lm.engine.generate(PROMPTS, strategy, sampling)
    rng = random.Random(family)
    with lm.engine.session(sampling) as session:
        strategy_obj = as_strategy(strategy)
        ids = session.add(PROMPTS, [strategy_obj] * len(PROMPTS), [0, 1, 2], copies=2)
        while session.live():
            session.run(max_steps=rng.randint(1, 5))
        resumed = [session.completion(i) for i in ids]
    assert [c.token_ids for c in resumed] == [c.token_ids for c in whole]
    assert [c.token_rows for c in resumed] == [c.token_rows for c in whole]


@pytest.mark.parametrize("family", FAMILIES)
def test_fork_equals_fresh_decode_from_the_prefix(lms, family):
    lm = _lm(lms, family)
    sampling = SamplingParams(max_tokens=16, temperature=1.0, seed=2, ignore_eos=True)
    prompt, strategy = PROMPTS[0], SCMoE(beta=0.3)
    with lm.engine.session(sampling) as session:
        (root,) = session.add([prompt], [strategy], [7])
        session.run(max_steps=5)
        rows_before = session.seqs[root].token_rows
        children = session.fork(root, 3)
        assert all(session.seqs[c].token_rows == 0 for c in children)  # a fork prefills nothing
        prefix = list(session.seqs[root].tokens)
        session.run()
        forked = {c: session.seqs[c] for c in children}
        assert session.seqs[root].token_rows == rows_before + 2 * (16 - 5 - 1)
    tails = [s.tokens[len(prefix) :] for s in forked.values()]
    assert len({tuple(t) for t in tails}) > 1  # siblings differ when sampling
    for child in forked.values():
        with lm.engine.session(sampling) as fresh:
            (sid,) = fresh.add([prefix], [strategy], [7], origins=[len(prompt)])
            fresh.seqs[sid].sample_key = child.sample_key
            fresh.run()
            assert fresh.seqs[sid].tokens == child.tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_rebuild_under_a_bias_equals_a_fresh_prefill(lms, family):
    lm = _lm(lms, family)
    experts = lm.model.config.num_local_experts if hasattr(lm.model.config, "num_local_experts") else None
    experts = experts or lm.model.config.num_experts
    bias = Routed(Bias(torch.linspace(-2.0, 2.0, experts)))
    sampling = SamplingParams(max_tokens=10, ignore_eos=True)
    with lm.engine.session(sampling) as session:
        ids = session.add(PROMPTS[:2], [Plain()] * 2, [0, 1])
        session.run(max_steps=4)
        session.rebuild([ids[0]], bias)
        tokens = list(session.seqs[ids[0]].tokens)
        rebuilt = session._branch_logprobs([ids[0]])[0, 0]
        session.run(max_steps=3)
        continued = session.seqs[ids[0]].tokens
    with lm.engine.session(sampling) as fresh:
        (sid,) = fresh.add([tokens], [bias], [0], origins=[len(PROMPTS[0])])
        reference = fresh._branch_logprobs([sid])[0, 0]
        fresh.run(max_steps=3)
        assert fresh.seqs[sid].tokens == continued
    assert torch.allclose(rebuilt, reference, atol=1e-5)


def test_stop_string_split_across_two_runs_is_found(lms):
    lm = _lm(lms, "olmoe")
    plain = lm.engine.generate([PROMPTS[0]], None, SamplingParams(max_tokens=12, ignore_eos=True))[0].text
    at = next(i for i in range(3, 10) if plain[i : i + 2] not in plain[: i + 1])  # first occurrence at ``at``
    stop = plain[at : at + 2]
    sampling = SamplingParams(max_tokens=12, ignore_eos=True, stop=(stop,))
    with lm.engine.session(sampling) as session:
        (sid,) = session.add([PROMPTS[0]], [Plain()], [0])
        session.run(max_steps=at + 1)  # ends on the stop string's first character (one token per character)
        assert session.seqs[sid].finished is None
        session.run()
        done = session.completion(sid)
    assert done.finish_reason == "stop" and done.num_tokens == at + 2 and done.text == plain[:at]


def test_run_until_a_separator_pauses_each_sequence(lms):
    lm = _lm(lms, "olmoe")
    sampling = SamplingParams(max_tokens=30, ignore_eos=True)
    texts = [c.text for c in lm.engine.generate(PROMPTS, None, sampling)]
    separator = texts[0][3]
    with lm.engine.session(sampling) as session:
        ids = session.add(PROMPTS, [Plain()] * 3, [0, 1, 2])
        paused = session.run(until=separator)
        for sid, text in zip(ids, texts, strict=True):
            got = lm.tokenizer.decode(session.seqs[sid].generated, skip_special_tokens=True)
            if sid in paused:
                assert got == text[: text.index(separator) + 1]
            else:
                assert separator not in text and session.seqs[sid].finished is not None
        session.run()
        assert [lm.tokenizer.decode(session.seqs[i].generated, skip_special_tokens=True) for i in ids] == texts


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe"])
def test_a_batch_mixing_strategies_gives_every_row_what_it_gives_alone(lms, family):
    lm = _lm(lms, family)
    mixed = [None, TopK(1), TopK(4), SCMoE(beta=0.5), RoE(samples=2, tau=0.5)]
    prompts = [PROMPTS[i % 3] for i in range(len(mixed))]
    sampling = SamplingParams(max_tokens=12, temperature=0.7, seed=1, ignore_eos=True)
    together = lm.engine.generate(prompts, mixed, sampling)
    for i, (prompt, strategy) in enumerate(zip(prompts, mixed, strict=True)):
        alone = lm.engine.generate([prompt], strategy, sampling, prompt_keys=[i])[0]
        assert together[i].token_ids == alone.token_ids
        assert max(abs(a - b) for a, b in zip(together[i].logprobs, alone.logprobs, strict=True)) < 1e-4


def test_clean_cache_strategies_run_beside_others_in_one_call(lms):
    lm = _lm(lms, "olmoe")
    mixed = [RoE(samples=3, tau=0.5, cache="clean"), None, SCMoE()]
    sampling = SamplingParams(max_tokens=8, ignore_eos=True)
    together = lm.engine.generate(PROMPTS, mixed, sampling)
    for i, strategy in enumerate(mixed):
        alone = lm.engine.generate([PROMPTS[i]], strategy, sampling, prompt_keys=[i])[0]
        assert together[i].token_ids == alone.token_ids


@pytest.mark.parametrize("where", ["generated", "last_prompt", "prompt", (2, 9)])
def test_a_scoped_policy_changes_only_the_positions_it_names(lms, where):
    lm = _lm(lms, "olmoe")
    prompt = PROMPTS[0]
    sampling = SamplingParams(max_tokens=5, ignore_eos=True)
    out = lm.engine.generate([prompt], Scoped(TopK(1), where), sampling, trace=True)[0]
    layer = out.trace.layers()[0]
    per_position = torch.cat([(r.experts >= 0).sum(-1)[0] for r in out.trace.records if r.layer == layer])
    length = len(prompt)
    positions = torch.arange(len(per_position))
    expected = (
        {
            "generated": positions >= length,
            "last_prompt": positions == length - 1,
            "prompt": positions < length,
        }.get(where)
        if isinstance(where, str)
        else torch.isin(positions, torch.tensor(where))
    )
    assert per_position.tolist() == [1 if e else 2 for e in expected.tolist()]


def test_set_weights_routes_by_omega_and_gives_it_gradients(lms):
    lm = _lm(lms, "olmoe")
    layers = lm.moe_layers
    experts = lm.model.config.num_experts
    omega = torch.nn.Parameter(torch.softmax(torch.randn(experts, generator=torch.Generator().manual_seed(0)), -1))
    policy = SetWeights({layers[0]: omega})
    loss = lm.engine.loss(PROMPTS[0], [3, 4, 5, 6], policy)
    loss.backward()
    assert omega.grad is not None and omega.grad.abs().sum() > 0
    out = lm.engine.generate([PROMPTS[0]], policy, SamplingParams(max_tokens=2), trace=True)[0]
    first = next(r for r in out.trace.records if r.layer == layers[0])
    assert set(first.experts[0, 0].tolist()) == set(omega.detach().topk(2).indices.tolist())
    assert torch.allclose(first.weights[0].sum(-1), torch.ones(first.weights.shape[1]))


def test_per_row_bias_in_one_batched_loss(lms):
    lm = _lm(lms, "olmoe")
    experts = lm.model.config.num_experts
    delta = torch.nn.Parameter(torch.zeros(2, experts))
    losses = lm.engine.loss([PROMPTS[0], PROMPTS[1]], [[3, 4], [5, 6, 7]], Bias(delta), reduction="none")
    for row in range(2):
        alone = lm.engine.loss(PROMPTS[row], [[3, 4], [5, 6, 7]][row], None)
        assert torch.allclose(losses[row], alone, atol=1e-5)
    losses[1].backward()
    assert delta.grad[0].abs().sum() == 0 and delta.grad[1].abs().sum() > 0


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3"])
def test_trace_records_full_router_distributions(lms, family):
    lm = _lm(lms, family)
    trace = moesteer.trace.RoutingTrace(distributions=True)
    with lm.engine.session(SamplingParams(max_tokens=3), trace=trace) as session:
        session.add([PROMPTS[0]], [Routed(TopK(1))], [0])
        session.run()
    assert trace.records and all(r.probs is not None for r in trace.records)
    for r in trace.records:
        assert torch.allclose(r.probs.sum(-1), torch.ones(r.probs.shape[:-1]), atol=1e-5)


def test_with_k_moves_every_branch_and_the_weak_rank_follows():
    site = moesteer.routing.RouterSite(layer=0, moe_index=0, num_moe_layers=2, num_experts=8, top_k=2)
    strong, weak = WithK(SCMoE(beta=0.5), k=4).branches()
    assert strong.edit(site).k == 4 and weak.edit(site).ranks == (5,)
    assert RankAfterTopK().edit(site).ranks == (3,)
    assert parse("with_k(scmoe(beta=0.5), k=4)") == WithK(SCMoE(beta=0.5), k=4)
    assert parse("with_k(scmoe(beta=0.5), k=4)").spec() == "with_k(scmoe(beta=0.5), k=4)"


def test_with_k_runs_in_a_mixed_batch(lms):
    lm = _lm(lms, "olmoe")
    sampling = SamplingParams(max_tokens=8, ignore_eos=True)
    k4 = WithK(SCMoE(beta=0.5), k=4)
    together = lm.engine.generate(PROMPTS[:2], [k4, SCMoE(beta=0.5)], sampling)
    assert together[0].token_ids == lm.engine.generate([PROMPTS[0]], k4, sampling)[0].token_ids


class _ScriptedEngine(Engine):
    """An engine that answers with fixed texts: controllers' voting without a model."""

    backend_name = "scripted"
    capabilities = moesteer.backends.base.Capabilities()

    def __init__(self, texts: list[str]) -> None:
        self.texts, self.name, self.tokenizer, self.eos_ids = texts, "scripted", None, frozenset()

    def encode(self, text, *, chat=False, special=True):
        return [1]

    def _generate(self, request, trace):
        n = request.sampling.n
        return [
            Completion(p, s, self.texts[s % len(self.texts)], [1], [0.0], "stop")
            for p in range(len(request.prompt_ids))
            for s in range(n)
        ]


BOXED = ["so \\boxed{7}, checked 3 times", "\\boxed{7} after 4 steps", "\\boxed{5} in 4 steps"]


def _boxed(text: str) -> str | None:
    start = text.find("\\boxed{")
    return text[start + 7 : text.index("}", start)] if start >= 0 else None


def test_self_consistency_votes_with_the_tasks_extractor():
    engine = _ScriptedEngine(BOXED)
    strategy = SelfConsistency(n=3)
    voted = run(strategy, engine, ["q"], SamplingParams(temperature=1.0), context=RunContext(extract=_boxed))[0]
    assert voted.info["answer"] == "7" and voted.info["votes"] == {"7": 2, "5": 1}
    outside = run(strategy, engine, ["q"], SamplingParams(temperature=1.0))[0]
    assert outside.info["answers"] == ["3", "4", "4"]  # GSM8K rules: the last number


def test_runner_vote_and_controller_vote_use_the_same_extractor():
    from moesteer.evals.runner import evaluate
    from moesteer.evals.scoring import Extraction
    from moesteer.evals.tasks.base import Task

    task = Task(
        name="boxed_fixture",
        load=lambda split: [{"id": "a", "answer": "7"}],
        prompt=lambda r: "q",
        gold=lambda r: r["answer"],
        extract=lambda text: Extraction(_boxed(text), "boxed"),
        score=lambda text, r: _boxed(text) == r["answer"],
        splits=("test",),
    )

    lm = LM(None, None, None, "scripted", _ScriptedEngine(BOXED))
    sampling = SamplingParams(temperature=1.0, n=3)
    (by_runner,) = evaluate(lm, task, parse("plain()"), sampling, [(0, {"id": "a", "answer": "7"})])
    (by_controller,) = evaluate(
        lm, task, SelfConsistency(n=3), SamplingParams(temperature=1.0), [(0, {"id": "a", "answer": "7"})]
    )
    assert by_runner["votes"] == by_controller["votes"] == {"7": 2, "5": 1}
    assert by_runner["correct"] and by_controller["correct"]


def test_controllers_nest():
    engine = _ScriptedEngine(BOXED)
    nested = parse("self_consistency(self_consistency(plain(), n=3), n=2)")
    voted = run(nested, engine, ["q"], SamplingParams(temperature=1.0), context=RunContext(extract=_boxed))[0]
    assert len(voted.samples) == 2 and all(len(s.samples) == 3 for s in voted.samples)
    assert voted.info["answers"] == ["7", "7"]


@pytest.mark.parametrize("strategy", [None, SCMoE(beta=0.5)])
def test_extend_records_teacher_forced_logprobs_and_continues(lms, strategy):
    lm = _lm(lms, "olmoe")
    strategy = as_strategy(strategy)
    continuation = [40, 41, 42, 43]
    reference = lm.engine.score([PROMPTS[0]], [continuation], strategy)[0]
    sampling = SamplingParams(max_tokens=10, ignore_eos=True)
    with lm.engine.session(sampling) as session:
        (sid,) = session.add([PROMPTS[0]], [strategy], [0])
        session.extend(sid, continuation)
        assert torch.allclose(torch.tensor(session.seqs[sid].logprobs), reference, atol=1e-4)
        session.run()
        extended = session.seqs[sid].tokens
    with lm.engine.session(sampling) as fresh:
        (ref,) = fresh.add([PROMPTS[0] + continuation], [strategy], [0], origins=[len(PROMPTS[0])])
        fresh.run()
        assert fresh.seqs[ref].tokens == extended
