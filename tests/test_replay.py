"""Routing capture and replay: a run replayed under its own trace reproduces its tokens."""

from __future__ import annotations

import json
import os

import pytest
import torch

import moesteer
from moesteer.routing import Ranks, Replay, ReplayFile, TopK, policy_fingerprint
from moesteer.sampling import SamplingParams
from moesteer.strategy import Routed
from moesteer.testing import char_tokenizer, tiny_model
from moesteer.trace import RowId
from moesteer.trace_file import TraceFile

GREEDY = SamplingParams(max_tokens=24)


@pytest.fixture(scope="module", params=["embedded", "olmoe", "qwen3_moe", "mixtral"])
def case(request):
    if request.param == "embedded":
        return moesteer.load(), "Q: 37 + 48 - 12 = ?\n"
    return moesteer.load(tiny_model(request.param), tokenizer=char_tokenizer()), "abcde fgh"


@pytest.mark.parametrize("policy", [None, TopK(1)])
def test_a_run_replayed_under_its_own_trace_reproduces_it(case, policy):
    lm, prompt = case
    (recorded,) = lm.engine.generate([prompt], policy, GREEDY, trace=True)
    replay = Replay.from_trace(recorded.trace)
    (again,) = lm.engine.generate([prompt], replay, GREEDY, trace=True)
    assert again.token_ids == recorded.token_ids
    assert again.logprobs == recorded.logprobs
    for a, b in zip(again.trace.records, recorded.trace.records, strict=True):
        assert torch.equal(a.experts, b.experts) and torch.equal(a.weights, b.weights)


def test_a_replayed_routing_is_forced_and_positions_beyond_it_are_refused():
    lm, prompt = moesteer.load(), "Q: 37 + 48 - 12 = ?\n"
    (k1,) = lm.engine.generate([prompt], Ranks(2), GREEDY, trace=True)
    (plain,) = lm.engine.generate([prompt], None, GREEDY)
    (forced,) = lm.engine.generate([prompt], Replay.from_trace(k1.trace), GREEDY)
    assert forced.token_ids == k1.token_ids != plain.token_ids  # the recorded routing, not the model's
    with pytest.raises(ValueError, match="recorded for positions <"):
        lm.engine.generate([prompt], Replay.from_trace(k1.trace), SamplingParams(max_tokens=40))


def test_each_completion_of_a_batch_replays_to_its_own_tokens():
    """A batch's prompts have different lengths (padded on HF): each completion's trace is its own
    request's routing, pads left out, and replaying it alone reproduces that completion."""
    lm = moesteer.load()
    prompts = ["Q: 37 + 48 - 12 = ?\n", "Q: 5 * 6 - 4 + 17 = ?\n", "Q: 9 * 9 = ?\n"]
    recorded = lm.engine.generate(prompts, Ranks(2), GREEDY, trace=True)
    replays = [Replay.from_trace(c.trace) for c in recorded]
    again = lm.engine.generate(prompts, replays, GREEDY)
    assert [c.token_ids for c in again] == [c.token_ids for c in recorded]
    (plain,) = lm.engine.generate(prompts[:1], None, GREEDY)
    assert recorded[0].token_ids != plain.token_ids


def test_a_sample_forked_after_the_shared_prefill_replays_to_its_own_tokens():
    lm = moesteer.load()
    prompt, sampling = "Q: 37 + 48 - 12 = ?\n", SamplingParams(max_tokens=16, n=3, temperature=1.0, seed=5)
    recorded = lm.engine.generate([prompt], TopK(1), sampling, trace=True)
    assert len({tuple(c.token_ids) for c in recorded}) > 1
    for sample, completion in enumerate(recorded):
        positions = len(lm.engine.encode(prompt)) + completion.num_tokens - 1
        joined = completion.trace.joined()
        assert all(r.experts.shape[1] == positions for r in joined.values())  # the prefill, then its own steps
        again = lm.engine.generate([prompt], Replay.from_trace(completion.trace), sampling)
        assert again[sample].token_ids == completion.token_ids


def test_a_batch_trace_names_its_rows_and_slices_by_request():
    lm = moesteer.load()
    prompts = [lm.engine.encode(p) for p in ("Q: 1 + 2 = ?\n", "Q: 30 * 4 - 2 = ?\n")]
    experts = lm.engine.routing_sizes()[0]
    with lm.engine.session(GREEDY, trace=True) as session:
        ids = session.add(prompts, [Routed(None)] * 2, [0, 1])
        session.run()
    trace = session.trace
    assert trace.requests() == ids
    with pytest.raises(ValueError, match=r"holds requests \[0, 1\]; take one with trace.request"):
        trace.joined()
    alone = [trace.request(i) for i in ids]
    assert all(r.rows == (RowId(i, 0),) for i, t in zip(ids, alone, strict=True) for r in t.records)
    # padding is routed on HF but belongs to no request: the batch's load is its requests' load
    assert torch.equal(trace.expert_load(experts), sum(t.expert_load(experts) for t in alone))


def test_a_rebuilt_cache_counts_in_the_request_trace():
    """After ``rebuild`` under another strategy, the trace's routing at every position is the
    rebuilt one (the later call at a position counts)."""
    lm = moesteer.load()
    prompt = lm.engine.encode("Q: 37 + 48 - 12 = ?\n")
    with lm.engine.session(SamplingParams(max_tokens=6), trace=True) as session:
        (sid,) = session.add([prompt], [Routed(None)], [0])
        for _ in range(3):
            session.step()
        session.rebuild([sid], Routed(TopK(1)))
        session.run()
    joined = session.trace.request(sid).joined()
    fed = len(session.seqs[sid].tokens) - 1
    for record in joined.values():
        active = (record.experts[0] >= 0).sum(-1)
        assert record.experts.shape[1] == fed and bool((active == 1).all())


def test_generate_writes_a_trace_file_that_replay_forces_from_the_command_line(tmp_path):
    from click.testing import CliRunner

    from moesteer.cli import main

    runner, traces = CliRunner(), tmp_path / "run.json"
    prompts = ["Q: 5 * 6 - 4 = ?", "Q: 37 + 48 - 12 = ?"]
    common = ["generate", "--max-tokens", "24", "--json"]
    recorded = runner.invoke(main, [*common, "--strategy", "ranks(2)", "--trace-out", str(traces), *prompts])
    assert recorded.exit_code == 0, recorded.output
    texts = [json.loads(line)["text"] for line in recorded.stdout.splitlines()]
    plain = runner.invoke(main, [*common, prompts[0]])
    assert json.loads(plain.stdout)["text"] != texts[0]
    for i, prompt in enumerate(prompts):
        again = runner.invoke(main, [*common, "--strategy", f"replay('{traces}', completion={i})", prompt])
        assert again.exit_code == 0, again.output
        assert json.loads(again.stdout)["text"] == texts[i]
    other = tmp_path / "other.json"
    notes = tmp_path / "notes.json"
    notes.write_text('{"hello": 1}')
    small = moesteer.load(tiny_model("olmoe"), tokenizer=char_tokenizer())
    (foreign,) = small.engine.generate(["abc"], None, SamplingParams(max_tokens=2), trace=True)
    TraceFile.of([foreign], small, "plain()").save(other)
    for spec, message in (
        (f"replay('{tmp_path / 'none.json'}')", "no moesteer trace file at"),
        (f"replay('{traces}', completion=2)", "completion 2 is out of range: the trace file holds 2"),
        (f"replay('{notes}')", "is not a moesteer trace file"),
        (f"replay('{other}')", "the trace file was recorded on"),
        (f"replay('{traces}', completion=-1)", "completion must be an integer >= 0"),
    ):
        bad = runner.invoke(main, [*common, "--strategy", spec, prompts[0]])
        assert bad.exit_code == 2 and message in bad.output and "Traceback" not in bad.output, (spec, bad.output)


def test_a_rewritten_trace_file_is_another_routing(tmp_path):
    lm = moesteer.load()
    path = tmp_path / "run.json"
    (first,) = lm.engine.generate(["Q: 1 + 2 = ?\n"], Ranks(2), GREEDY, trace=True)
    TraceFile.of([first], lm, "ranks(2)").save(path)
    before = policy_fingerprint(ReplayFile(str(path)))
    os.utime(path, (1, 1))
    assert policy_fingerprint(ReplayFile(str(path))) != before  # a vLLM prefix-cache salt follows the file


def test_joined_reads_each_branch_of_a_batch_trace_of_one_request():
    """A session's own trace of one SCMoE sequence holds both branches in each call's record:
    ``joined(branch)`` reads either, as the completion's own trace does."""
    from moesteer.strategies.scmoe import SCMoE

    lm = moesteer.load()
    with lm.engine.session(GREEDY, trace=True) as session:
        (sid,) = session.add([lm.engine.encode("Q: 5 * 6 - 4 = ?\n")], [SCMoE()], [0])
        session.run()
    assert any(len(r.rows) == 2 for r in session.trace.records)
    for branch in (0, 1):
        whole, own = session.trace.joined(branch), session.trace.request(sid).joined(branch)
        assert sorted(whole) == sorted(own)
        assert all(torch.equal(whole[k].experts, own[k].experts) for k in own)
    ks = {int((session.trace.joined(b)[0].experts[0] >= 0).sum(-1).max()) for b in (0, 1)}
    assert ks == {1, 2}  # the two branches, not one twice
