"""DES, beam search and Best-of-N: verifiers, the search loop's invariants, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

import moesteer
from moesteer import verifiers
from moesteer.cli import main
from moesteer.strategies.combinators import WithK
from moesteer.strategies.des import DES, BeamSearch, BestOfN, default_ks
from moesteer.strategies.scmoe import SCMoE
from moesteer.strategies.search import segment_steps, spread
from moesteer.strategies.self_consistency import SelfConsistency
from moesteer.strategies.spec import parse
from moesteer.strategy import Plain
from moesteer.testing import char_tokenizer, tiny_model
from moesteer.verifiers.arith import ArithSteps

QUESTION = "Q: 37 + 48 - 12 * 2 = ?\n"
PROMPTS = ["Q: 37 + 48 - 12 = ?\n", "Q: 5 * 6 - 4 + 17 = ?\n", "Q: 90 - 45 + 3 = ?\n"]


@pytest.fixture(scope="module")
def lm():
    return moesteer.load()


def _search(lm, strategy, prompts=PROMPTS, **sampling):
    return lm.generate(prompts, strategy=strategy, max_tokens=sampling.pop("max_tokens", 96), **sampling)


def _shape(completion) -> list:
    """A search trace without its float scores."""
    keys = ("id", "parent", "k", "finished", "kept")
    return [[tuple(b[k] for k in keys) for b in step["beams"]] for step in completion.info["trace"]]


def _beams(completion) -> dict[int, dict]:
    return {b["id"]: b for step in completion.info["trace"] for b in step["beams"]}


# ---- verifiers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        (["37 + 48 = 85", "85 - 12 = 73", "73 * 2 = 146", "#### 146"], [1, 1, 1, 1]),
        (["37 + 48 = 85", "85 - 13 = 72", "72 * 2 = 144", "#### 144"], [1, 0, 0, 0]),  # wrong operand
        (["37 + 48 = 85", "85 - 12 = 74", "74 * 2 = 148", "#### 148"], [1, 0, 0, 0]),  # wrong result
        (["37 + 48 = 85", "85 * 2 = 170", "#### 170"], [1, 0, 0]),  # skipped step
        (["37 + 48 = 84", "84 - 12 = 72"], [0, 0]),  # later steps cannot recover
        (["37 + 48 = 85", "#### 85"], [1, 0]),  # answer before the last operation
        (["37 + 48 = 85\n85 - 12 = 73", "73 * 2 = 146\n#### 146"], [1, 1]),  # several lines a step
        (["37 + 48 = 85", "85 - 12 = 73", "73 * 2 = 146", "#### 146", "146 + 1 = 147"], [1, 1, 1, 1, 0]),
        (["the sum is 85", "85 - 12 = 73"], [0, 0]),  # unparseable
        (["", "37 + 48 = 85"], [0, 0]),  # empty step
        (["37 + 48 = 85", "85 - 12 = 73", "73 * 2 = 146", "#### 147"], [1, 1, 1, 0]),  # wrong answer line
    ],
)
def test_arith_steps_scores_hand_made_chains(steps, expected):
    assert ArithSteps().score([QUESTION], [steps]) == [[float(x) for x in expected]]


def test_arith_steps_refuses_other_questions():
    with pytest.raises(ValueError, match="arith questions"):
        ArithSteps().score(["What is the capital of France?"], [["Paris"]])


def test_confidence_is_the_geometric_mean_token_probability():
    scores = verifiers.load("confidence").score(["q"], [["a", "b", ""]], [[[-0.5, -1.5], [0.0], []]])
    assert scores == [[pytest.approx(math.exp(-1.0)), 1.0, 0.0]]


def test_aggregates_and_search_and_learn_shape():
    assert verifiers.aggregate([0.9, 0.2, 0.5], "last") == 0.5
    assert verifiers.aggregate([0.9, 0.2, 0.5], "min") == 0.2
    assert verifiers.aggregate([0.9, 0.2, 0.5], "prod") == pytest.approx(0.09)
    nested = verifiers.score_outputs(ArithSteps(), [QUESTION], [["37 + 48 = 85\n\n85 - 12 = 70", "37 + 48 = 85"]])
    assert nested == [[[1.0, 0.0], [1.0]]]


def test_segment_steps_splits_at_the_separator_with_each_steps_logprobs(lm):
    text = "37 + 48 = 85\n\n85 - 12 = 73\n\n#### 73"
    ids = [*lm.engine.encode(text, special=False), 2]
    pieces = segment_steps(lm.tokenizer, ids, list(range(len(ids))), "\n\n", frozenset({2}))
    assert [t for t, _ in pieces] == ["37 + 48 = 85", "85 - 12 = 73", "#### 73"]
    assert sum(len(lp) for _, lp in pieces) == len(ids) - 1  # every token but the final EOS belongs to one step
    assert pieces[1][1][0] == len("37 + 48 = 85\n\n")  # the second step's log-probs start after the separator


def _save_tiny_prm(path, labels: int = 2):
    from transformers import Qwen2Config, Qwen2ForTokenClassification

    tokenizer = char_tokenizer(128)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<extra_0>"]})
    config = Qwen2Config(
        vocab_size=160,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=labels,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    Qwen2ForTokenClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_tiny_prm_scores_each_step_at_its_separator(tmp_path):
    path = _save_tiny_prm(tmp_path / "prm")
    prm = verifiers.load("prm", str(path))
    chains = [["1 + 1 = 2", "#### 2"], ["1 + 1 = 3", "3 * 2 = 6", "#### 6"]]
    scores = prm.score(["Q: 1 + 1 = ?", "Q: 1 + 1 * 2 = ?"], chains)
    assert [len(s) for s in scores] == [2, 3]
    text = prm.text("Q: 1 + 1 * 2 = ?", chains[1])  # by hand: the positive-class probability at each separator
    ids = torch.tensor([prm.tokenizer.encode(text, add_special_tokens=False)])
    positive = prm.model(input_ids=ids).logits.softmax(-1)[0, :, 1]
    expected = positive[ids[0] == prm.separator_id].tolist()
    assert scores[1] == pytest.approx(expected, abs=1e-5)
    assert len(set(scores[1])) == 3  # real per-step outputs, not a constant


def test_prm_errors_name_the_model(tmp_path):
    with pytest.raises(ValueError, match="cannot load the PRM '/no/such/prm'"):
        verifiers.load("prm", "/no/such/prm")
    lm_path = moesteer.testing.save_tiny(tmp_path / "lm")
    with pytest.raises(ValueError, match="is not a process reward model"):
        verifiers.load("prm", str(lm_path))
    with pytest.raises(ValueError, match="is not a process reward model"):
        verifiers.load("prm", str(_save_tiny_prm(tmp_path / "three", labels=3)))


def test_des_runs_with_a_prm_verifier(lm, tmp_path):
    path = str(_save_tiny_prm(tmp_path / "prm"))
    (out,) = _search(lm, DES(n=4, ks=(1, 2), verifier="prm", verifier_model=path, max_steps=2), PROMPTS[:1])
    assert out.cost["verifier_calls"] == 8 and all(0 < b["score"] < 1 for b in _beams(out).values())


# ---- the search loop -----------------------------------------------------------------------------


def test_default_ks_and_spread():
    assert default_ks(2, 16) == (1, 2, 3, 4)
    assert default_ks(8, 128) == (7, 8, 9, 10, 16)
    assert default_ks(1, 2) == (1, 2)
    assert spread(16, 5) == [4, 3, 3, 3, 3] and spread(16, 4) == [4] * 4


@pytest.mark.parametrize("verifier", ["arith_steps", "confidence"])
def test_des_with_one_k_is_exactly_beam_search(lm, verifier):
    beam = _search(lm, BeamSearch(n=8, verifier=verifier))
    des = _search(lm, DES(n=8, ks=(2,), verifier=verifier))  # the embedded model's own k
    assert [c.token_ids for c in des] == [c.token_ids for c in beam]
    assert [c.info["trace"] for c in des] == [c.info["trace"] for c in beam]
    assert [c.token_rows for c in des] == [c.token_rows for c in beam]


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe"])
def test_des_with_one_k_is_beam_search_on_tiny_families(family):
    lm = moesteer.load(tiny_model(family), tokenizer=char_tokenizer())
    kwargs = {"n": 4, "m": 2, "max_steps": 3, "separator": "e", "temperature": 1.5, "verifier": "confidence"}
    prompts = ["hello", "abc"]
    beam = lm.generate(prompts, strategy=BeamSearch(**kwargs), max_tokens=24)
    des = lm.generate(prompts, strategy=DES(ks=(2,), **kwargs), max_tokens=24)
    assert [c.token_ids for c in des] == [c.token_ids for c in beam]
    multi = lm.generate(prompts, strategy=DES(ks=(1, 2, 4), **kwargs), max_tokens=24)
    _check_inheritance(multi)


def _check_inheritance(completions):
    for c in completions:
        beams = _beams(c)
        children = [b for b in beams.values() if b["parent"] is not None]
        assert children, "the search never expanded a beam"
        assert all(beams[b["parent"]]["k"] == b["k"] for b in children)
        assert all(beams[b["parent"]]["kept"] for b in children)


def test_children_inherit_their_parents_k(lm):
    out = _search(lm, DES(n=16, verifier="confidence"))
    _check_inheritance(out)
    first = out[0].info["trace"][0]["beams"]
    assert sorted(b["k"] for b in first) == sorted([1, 2, 3, 4] * 4)  # step 1: n spread evenly over the ks
    assert all(s["k"] in (1, 2, 3, 4) for s in (x.info for x in out[0].samples))


def test_beams_of_different_k_never_share_a_kv_cache(lm):
    """Each finished beam's recorded log-probs equal a fresh teacher-forced pass under its own k, and
    differ under another k: a beam that had read KV computed under a different k would fail."""
    (out,) = _search(lm, DES(n=4, m=4, ks=(1, 3), verifier="confidence", max_steps=3), PROMPTS[:1])
    checked = 0
    for sample in out.samples:
        k = sample.info["k"]
        ids = lm.engine.encode(sample.text, special=False)
        assert ids == sample.token_ids[: len(ids)]
        own = lm.engine.score(PROMPTS[:1], [sample.text], WithK(Plain(), k))[0]
        other = lm.engine.score(PROMPTS[:1], [sample.text], WithK(Plain(), 4 - k))[0]
        assert torch.allclose(own, torch.tensor(sample.logprobs[: len(ids)]), atol=1e-4)
        assert not torch.allclose(other, own, atol=1e-3)
        checked += 1
    assert {s.info["k"] for s in out.samples} == {1, 3} and checked == len(out.samples)


def test_budget_n_m_and_max_steps_are_honoured_exactly(lm):
    n, m, steps = 8, 2, 3
    calls = []
    hook = lm.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        (out,) = _search(lm, DES(n=n, m=m, ks=(1, 2), verifier="arith_steps", max_steps=steps), PROMPTS[1:2])
    finally:
        hook.remove()
    trace = out.info["trace"]
    assert 1 <= len(trace) <= steps
    for i, step in enumerate(trace):
        assert len(step["beams"]) == n  # every step runs exactly n rollouts
        assert sum(b["kept"] for b in step["beams"]) <= m
        if i:
            kept_before = {b["id"] for b in trace[i - 1]["beams"] if b["kept"]}
            assert {b["parent"] for b in step["beams"]} <= kept_before
    rollouts = sum(len(s["beams"]) for s in trace)
    assert out.cost["rollouts"] == out.cost["verifier_calls"] == rollouts
    assert out.forward_passes == len(calls)  # one problem: the search's forwards are the model's
    assert len(out.samples) == sum(b["finished"] for s in trace for b in s["beams"])


def test_best_of_n_samples_n_chains_and_scores_each_once(lm):
    out = _search(lm, BestOfN(n=6, verifier="arith_steps"))
    for c in out:
        assert len(c.samples) == 6 and c.cost["verifier_calls"] == 6 and len(c.info["trace"]) == 1
        assert c.info["score"] == max(s.info["score"] for s in c.samples)
    assert len({s.text for c in out for s in c.samples}) > 3  # diverse samples


def test_a_batch_equals_its_problems_one_by_one(lm):
    strategy = DES(n=8, verifier="confidence", max_steps=4)
    sampling = moesteer.SamplingParams(max_tokens=96)
    batch = lm.generate(PROMPTS, strategy, sampling)
    alone = [lm.generate([p], strategy, sampling, prompt_keys=[i])[0] for i, p in enumerate(PROMPTS)]
    assert [c.token_ids for c in batch] == [c.token_ids for c in alone]
    assert [_shape(c) for c in batch] == [_shape(c) for c in alone]
    scores = lambda c: [b["score"] for step in c.info["trace"] for b in step["beams"]]  # noqa: E731
    assert all(scores(b) == pytest.approx(scores(a), abs=1e-5) for b, a in zip(batch, alone, strict=True))


def test_selection_by_vote_and_by_verifier_are_both_recorded(lm):
    by_vote = _search(lm, DES(n=8, select="vote", verifier="confidence"))
    by_score = _search(lm, DES(n=8, select="verifier", verifier="confidence"))
    for v, s in zip(by_vote, by_score, strict=True):
        assert v.info["answer_vote"] == s.info["answer_vote"] and v.info["answer_verifier"] == s.info["answer_verifier"]
        assert v.info["answer"] == v.info["answer_vote"] and s.info["answer"] == s.info["answer_verifier"]
        votes = v.info["votes"]
        assert votes[v.info["answer_vote"]] == max(votes.values())


def test_des_over_scmoe_and_self_consistency_over_des(lm):
    (out,) = _search(lm, DES(SCMoE(beta=0.1), n=4, ks=(1, 2), verifier="arith_steps", max_steps=2), PROMPTS[:1])
    assert {s.info["k"] for s in out.samples} <= {1, 2}
    assert out.token_rows > 0 and out.info["answer"] is not None
    voted = _search(lm, SelfConsistency(DES(n=4, ks=(1, 2), max_steps=2), n=2), PROMPTS[:2])
    assert all(len(c.samples) == 2 and c.info["answer"] is not None for c in voted)


def test_repeated_searches_differ_and_n_samples_a_search_each(lm):
    out = _search(lm, DES(n=8, verifier="confidence", temperature=1.2), PROMPTS[:1], n=3)
    assert [c.sample_index for c in out] == [0, 1, 2]
    assert len({tuple(b["score"] for s in c.info["trace"] for b in s["beams"]) for c in out}) == 3


def test_spec_round_trip():
    for text in ["des(n=8, ks=(1, 2, 4), verifier='arith_steps')", "beam_search(m=2)", "best_of_n(n=4, select='vote')"]:
        strategy = parse(text)
        assert parse(strategy.spec()) == strategy


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("des(ks=())", "non-empty tuple"),
        ("des(ks=(0, 2))", "every k in ks must be an integer in 1..65536"),
        ("des(ks=(2, 2))", "repeated"),
        ("des(n=2, ks=(1, 2, 3))", "cannot cover"),
        ("des(n=16, m=17)", "m must be an integer in 1..16"),
        ("des(n=0)", "n must be an integer in 1..1024"),
        ("des(max_steps=0)", "max_steps must be an integer"),
        ("des(verifier='arith_step')", "did you mean 'arith_steps'"),
        ("des(verifier='none')", "use select='vote'"),
        ("des(aggregate='mean')", "aggregate must be one of last, min, prod"),
        ("des(select='best')", "select must be one of verifier, vote"),
        ("des(separator='')", "separator must be a non-empty string"),
        ("des(verifier_model='x')", "verifier_model is for verifier='prm'"),
        ("des(temperature=-1)", "temperature must be a finite number"),
        ("des(inner=des())", "inner must be a token strategy"),
    ],
)
def test_bad_parameters_are_one_line_errors(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        parse(spec)
    assert "\n" not in str(err.value)


def test_expert_counts_beyond_the_model_are_refused(lm):
    with pytest.raises(ValueError, match="has 17, but the model has 16 experts"):
        _search(lm, DES(ks=(2, 17)), PROMPTS[:1])


def test_cli_eval_and_generate(tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        main,
        [
            "generate",
            "--strategy",
            "des",
            "-p",
            "n=4",
            "-p",
            "verifier=confidence",
            "-p",
            "max_steps=2",
            "--json",
            "Q: 5 * 6 - 4 = ?",
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[0])
    assert record["info"]["trace"][0]["beams"][0]["k"] in (1, 2, 3, 4) and record["cost"]["verifier_calls"] == 8
    result = runner.invoke(
        main,
        [
            "eval",
            "--task",
            "arith",
            "--limit",
            "2",
            "--output",
            str(tmp_path),
            "--strategy",
            "des(n=4, verifier='arith_steps', max_steps=3)",
        ],
    )
    assert result.exit_code == 0, result.output
    results = json.loads(next(tmp_path.glob("arith/*/results.json")).read_text())
    assert results["num_samples"] == 2
    bad = runner.invoke(
        main, ["eval", "--task", "arith", "--limit", "2", "--output", str(tmp_path), "--strategy", "des(n=4, m=9)"]
    )
    assert bad.exit_code == 2 and "m must be an integer in 1..4" in bad.output
