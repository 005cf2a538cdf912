"""C3PO: ω from neighbours (kernel regression, NGD, mode), applied where it says."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moesteer
from moesteer.c3po import ReferenceSet, load_embedder
from moesteer.c3po.references import last_token_routing
from moesteer.evals.references import build
from moesteer.evals.tasks import get_task
from moesteer.routing import Scoped, SetWeights
from moesteer.sampling import SamplingParams
from moesteer.strategies.c3po import C3PO
from moesteer.strategies.combinators import WithPolicy
from moesteer.strategies.spec import parse
from moesteer.strategy import Plain

PROMPTS = ["Q: 37 + 48 - 12 = ?\n", "Q: 5 * 6 - 4 + 17 = ?\n", "Q: 90 - 45 + 3 = ?\n"]
GREEDY = SamplingParams(max_tokens=48)


@pytest.fixture(scope="module")
def lm():
    return moesteer.load()


@pytest.fixture(scope="module")
def refs(lm, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("c3po") / "refs"
    build(lm, get_task("arith"), load_embedder(), split="validation", limit=40).save(folder)
    return str(folder)


def _tokens(lm, strategy, prompts=PROMPTS):
    return [c.token_ids for c in lm.generate(prompts, strategy, GREEDY)]


def test_pathway_is_the_kernel_weighted_average_of_the_neighbours(lm, refs):
    strategy = C3PO(refs, k=3, kernel="gaussian", bandwidth=0.5)
    reference_set = ReferenceSet.load(refs)
    query = load_embedder().encode([PROMPTS[0]])[0]
    omega = strategy.pathway(lm.engine, reference_set, PROMPTS[0], query)
    similarity = reference_set.embeddings @ query
    similarity[similarity > 0.95] = -2  # the near-duplicate guard
    top = similarity.topk(3).indices
    weights = torch.exp(-(2 - 2 * similarity[top]) / (2 * 0.5**2))
    expected = (weights[:, None, None] * reference_set.routing[top]).sum(0) / weights.sum()
    assert torch.allclose(omega, expected, atol=1e-6)
    assert torch.allclose(omega.sum(-1), torch.ones(len(omega)), atol=1e-5)


def test_the_remixed_routing_reaches_the_last_prompt_token_of_the_critical_layers(lm, refs):
    """Critical layers (the last 3 here) route the last prompt token by ω, the others by the model;
    on this prompt ω's top-2 differs from the model's in layer 0 (outside) and layer 1 (inside)."""
    prompt, critical = PROMPTS[0], 3
    strategy, reference_set = C3PO(refs, layers=critical), ReferenceSet.load(refs)
    query = load_embedder().encode([prompt])
    (policy,) = strategy.policies(lm.engine, reference_set, [prompt], query)
    omega, own = strategy.pathway(lm.engine, reference_set, prompt, query[0]), last_token_routing(lm.engine, prompt)
    top2 = lambda dist: set(dist.topk(2).indices.tolist())  # noqa: E731
    assert top2(omega[0]) != top2(own[0]) and top2(omega[1]) != top2(own[1])
    (out,) = lm.engine.generate([prompt], WithPolicy(Plain(), policy), GREEDY, trace=True)
    last = len(lm.engine.encode(prompt)) - 1
    prefill = {r.layer: r for r in out.trace.records if r.experts.shape[1] > 1}
    for i, layer in enumerate(lm.moe_layers):
        chosen = set(prefill[layer].experts[0, last].tolist())
        inside = i >= len(lm.moe_layers) - critical
        assert chosen == top2(omega[i] if inside else own[i]), layer
        if inside:  # weighted by ω (this family does not renormalise its top-k)
            weights = prefill[layer].weights[0, last].sort().values
            assert torch.allclose(weights, omega[i].topk(2).values.sort().values, atol=1e-5)


def test_alpha_one_keeps_the_models_own_pathway(lm, refs):
    assert _tokens(lm, C3PO(refs, alpha=1.0)) == _tokens(lm, None)


def test_remixing_changes_outputs_and_where_last_remixes_every_generated_token(lm, refs):
    plain, last_prompt, last = _tokens(lm, None), _tokens(lm, C3PO(refs)), _tokens(lm, C3PO(refs, where="last"))
    assert last != last_prompt and last != plain


def test_a_batch_equals_its_prompts_one_by_one(lm, refs):
    strategy = C3PO(refs, k=2)
    batch = _tokens(lm, strategy)
    assert batch == [_tokens(lm, strategy, [p])[0] for p in PROMPTS]


def test_no_neighbours_means_the_models_own_routing(lm, refs):
    assert _tokens(lm, C3PO(refs, eps=1e-9)) == _tokens(lm, None)


def test_spec_and_bad_parameters(refs):
    strategy = parse(f"c3po({refs!r}, k=2, kernel='matern')")
    assert parse(strategy.spec()) == strategy
    for spec, message in [
        ("c3po('')", "refs must be the folder"),
        ("c3po('x', k=0)", "k must be an integer"),
        ("c3po('x', kernel='rbf')", "kernel must be one of"),
        ("c3po('x', alpha=2)", "alpha must be in"),
        ("c3po('x', where='all')", "where must be one of"),
        ("c3po('x', eps=3)", "eps must be a cosine distance"),
        ("c3po('x', inner=c3po('y'))", "inner must be a token strategy"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse(spec)


def test_a_missing_reference_set_is_one_line(lm, tmp_path):
    with pytest.raises((OSError, ValueError)) as err:
        lm.generate(PROMPTS[:1], C3PO(str(tmp_path / "none")), GREEDY)
    assert "\n" not in str(err.value)


def test_ngd_with_zero_steps_is_the_models_own_routing(lm, refs):
    assert _tokens(lm, C3PO(refs, surrogate="ngd", steps=0)) == _tokens(lm, None)


def test_ngd_fits_omega_on_the_neighbours_and_leaves_the_model_untouched(lm, refs):
    before = {name: p.detach().clone() for name, p in lm.model.named_parameters()}
    out = lm.generate(PROMPTS, C3PO(refs, surrogate="ngd", steps=6, lr=0.05), GREEDY)
    assert all(torch.equal(p, before[name]) for name, p in lm.model.named_parameters())
    assert all(p.grad is None for p in lm.model.parameters())  # gradients reached ω only
    for c in out:
        losses = c.info["c3po_losses"]
        assert len(losses) == 6 and c.cost["backward_passes"] == 6
        assert min(losses) <= losses[0]
    assert any(c.info["c3po_losses"][-1] < c.info["c3po_losses"][0] for c in out)  # the surrogate loss goes down


def test_mode_finding_converges_to_a_kernel_mean_of_its_nearest_pathways(lm, refs):
    reference_set = ReferenceSet.load(refs)
    rows = list(range(len(lm.moe_layers)))
    strategy = C3PO(refs, surrogate="mode", steps=30, k=5, bandwidth=0.3)
    omega = strategy.seek_mode(last_token_routing(lm.engine, PROMPTS[0]).float(), reference_set, rows)
    pathways = reference_set.routing.flatten(1)
    distance2 = ((pathways - omega.flatten()) ** 2).sum(-1)
    nearest = distance2.topk(5, largest=False).indices
    kernel = torch.exp(-distance2[nearest] / (2 * 0.3**2))
    fixed_point = (kernel[:, None] * pathways[nearest]).sum(0) / kernel.sum()
    assert torch.allclose(omega.flatten(), fixed_point, atol=1e-4)  # a mode: one more shift stays put
    assert not torch.allclose(omega, last_token_routing(lm.engine, PROMPTS[0]), atol=1e-3)  # it moved
    assert _tokens(lm, C3PO(refs, surrogate="mode", steps=0)) == _tokens(lm, None)


def test_a_reference_set_of_other_moe_layers_is_refused(lm, refs, tmp_path):
    held = ReferenceSet.load(refs)
    other = dataclasses.replace(held.manifest, moe_layers=(0, 1, 2, 5))
    ReferenceSet(other, held.references, held.embeddings, held.routing).save(tmp_path / "other")
    with pytest.raises(ValueError, match=r"MoE layers \[0, 1, 2, 5\]; the model has 16 experts in \[0, 1, 2, 3\]"):
        lm.generate(PROMPTS[:1], C3PO(str(tmp_path / "other")), GREEDY)


# ---- tiny random OLMoE and Qwen3-MoE: the optimiser's invariants ------------------------------

TINY_QUESTIONS = ["abcde", "bcdef", "hello", "world", "zyxwv"]
TINY_ANSWERS = ["fg", "gh", "ij", "kl", "mn"]


@pytest.fixture(scope="module", params=["olmoe", "qwen3_moe"])
def tiny(request, tmp_path_factory):
    """A tiny random model of the family and a reference set over its own routing (5 questions)."""
    from moesteer.c3po.references import FORMAT, Manifest, Reference, router_sha256
    from moesteer.testing import char_tokenizer, tiny_model

    tiny_lm = moesteer.load(tiny_model(request.param), tokenizer=char_tokenizer())
    embedder = load_embedder()
    routing = torch.stack([last_token_routing(tiny_lm.engine, q) for q in TINY_QUESTIONS]).float()
    embeddings = embedder.encode(TINY_QUESTIONS)
    manifest = Manifest(
        model=request.param,
        model_type=request.param,
        moe_layers=tuple(tiny_lm.moe_layers),
        num_experts=int(routing.shape[-1]),
        embedding_model=embedder.name,
        embedding_dim=int(embeddings.shape[-1]),
        task="tiny",
        split="none",
        count=len(TINY_QUESTIONS),
        attempted=len(TINY_QUESTIONS),
        router_sha256=router_sha256(tiny_lm.engine.router_weights()),
        format=FORMAT,
    )
    references = tuple(
        Reference(str(i), q, a) for i, (q, a) in enumerate(zip(TINY_QUESTIONS, TINY_ANSWERS, strict=True))
    )
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}") / "refs"
    ReferenceSet(manifest, references, embeddings, routing).save(folder)
    return tiny_lm, str(folder)


def _checksum(model) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        digest.update(name.encode() + p.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _fit(tiny_lm, refs, strategy, question):
    reference_set = ReferenceSet.load(refs)
    (fit,) = strategy.fits(tiny_lm.engine, reference_set, [question], strategy.embed(reference_set, [question]))
    return fit, reference_set


def test_ngd_moves_exactly_the_critical_layers_core_experts(tiny):
    tiny_lm, refs = tiny
    before = _checksum(tiny_lm.model)
    strategy = C3PO(refs, surrogate="ngd", steps=5, lr=0.05, layers=1, core=3, max_similarity=None)
    reference_set = ReferenceSet.load(refs)
    question = "abcdx"
    own = last_token_routing(tiny_lm.engine, question).float()
    omega = strategy.pathway(tiny_lm.engine, reference_set, question, strategy.embed(reference_set, [question])[0])
    moved = omega != own
    core = torch.zeros_like(moved)
    core[-1, own[-1].topk(3).indices] = True  # the last MoE layer's 3 experts with the largest ω⁰
    assert moved.any() and not (moved & ~core).any()  # the update stays inside critical × core
    assert torch.allclose(omega[-1].sum(), torch.tensor(1.0), atol=1e-6)  # still a distribution
    assert _checksum(tiny_lm.model) == before  # the model is unchanged
    assert all(p.grad is None for p in tiny_lm.model.parameters())  # gradients reached ω only


def test_ngd_loss_decreases_on_a_fixed_neighbour_set(tiny):
    tiny_lm, refs = tiny
    strategy = C3PO(refs, surrogate="ngd", steps=8, lr=0.05, core=20, max_similarity=None)
    fit, _ = _fit(tiny_lm, refs, strategy, "abcdx")
    losses = fit.info["c3po_losses"]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert fit.ledger.counts["backward_passes"] == 8
    assert fit.ledger.counts["extra_forward_passes"] == 9  # ω⁰, then one forward per step


def test_one_neighbour_at_similarity_one_gives_its_routing(tiny):
    tiny_lm, refs = tiny
    reference_set = ReferenceSet.load(refs)
    strategy = C3PO(refs, k=1, max_similarity=None, layers=len(tiny_lm.moe_layers))
    for i, question in enumerate(TINY_QUESTIONS[:2]):
        omega = strategy.pathway(tiny_lm.engine, reference_set, question, reference_set.embeddings[i])
        assert torch.equal(omega, reference_set.routing[i])


def _dissimilar_set(tiny_lm, refs, question, folder):
    """The tiny reference set with its embeddings turned so that every reference has a negative
    cosine similarity to ``question`` (the top-3 similarities sum to < 0), saved to ``folder``;
    returns the folder and the question's embedding."""
    reference_set = ReferenceSet.load(refs)
    query = C3PO(refs).embed(reference_set, [question])[0].double()
    query = query / query.norm()
    others = torch.linalg.qr(torch.randn(len(query), len(reference_set), dtype=torch.float64)).Q.T
    others = others - (others @ query)[:, None] * query  # orthogonal to the query
    others = others / others.norm(dim=-1, keepdim=True)
    similarity = torch.tensor([-0.1, -0.2, -0.3, -0.4, -0.5], dtype=torch.float64)
    keys = similarity[:, None] * query + (1 - similarity[:, None] ** 2).sqrt() * others
    dataclasses.replace(reference_set, embeddings=keys.float()).save(folder)
    return str(folder), query.float()


def test_released_rule_writes_the_questions_own_routing_when_similarities_sum_to_at_most_zero(tiny, tmp_path):
    """The released code (``re_infer_case``): when the k nearest references' similarities sum to
    <= 0, each critical layer keeps the question's own last-token routing ω⁰ and the model still
    routes every last position by it; any other rule keeps the model's routing."""
    tiny_lm, refs = tiny
    question, critical = "abcdx", 2
    folder, query = _dissimilar_set(tiny_lm, refs, question, tmp_path / "far")
    released = C3PO(folder, kernel="linear", where="last", max_similarity=None, layers=critical)
    far = ReferenceSet.load(folder)
    fit_of = lambda strategy: strategy.fits(tiny_lm.engine, far, [question], query[None])[0]  # noqa: E731
    fit = fit_of(released)
    own = last_token_routing(tiny_lm.engine, question).float()
    layers = tiny_lm.moe_layers[-critical:]
    assert fit.info["c3po_fallback"] == "own_pathway" and fit.policy.where == "last"
    assert set(fit.policy.policy.values) == set(layers)
    for i, layer in enumerate(layers):
        assert torch.equal(fit.policy.policy.values[layer], own[len(tiny_lm.moe_layers) - critical + i])
    renormalise = bool(tiny_lm.engine.config.norm_topk_prob)  # the released forward renormalises the top-k so
    remixed = SetWeights(dict(zip(layers, own[-critical:], strict=True)), renormalise=renormalise)
    official = WithPolicy(Plain(), Scoped(remixed, "last"))
    assert _tokens(tiny_lm, released, [question]) == _tokens(tiny_lm, official, [question])
    elsewhere = dataclasses.replace(released, where="last_prompt")  # not the released rule
    assert fit_of(elsewhere).policy is None and fit_of(elsewhere).info["c3po_fallback"] == "model_routing"


def test_no_state_leaks_between_prompts(tiny):
    tiny_lm, refs = tiny
    strategy, a, b = C3PO(refs, surrogate="ngd", steps=3, lr=0.05, max_similarity=None), "abcdx", "qwert"
    first = _tokens(tiny_lm, strategy, [a])
    _tokens(tiny_lm, strategy, [b])
    assert _tokens(tiny_lm, strategy, [a]) == first


def test_alpha_search_picks_the_grid_point_of_least_neighbour_loss(tiny):
    tiny_lm, refs = tiny
    strategy, question = C3PO(refs, alpha_search=5, max_similarity=None), "abcdx"
    fit, reference_set = _fit(tiny_lm, refs, strategy, question)
    grid, losses = [0.0, 0.25, 0.5, 0.75, 1.0], fit.info["c3po_alpha_losses"]
    assert len(losses) == 5 and fit.info["c3po_alpha"] == grid[losses.index(min(losses))]
    assert fit.ledger.counts["extra_forward_passes"] == 6  # ω⁰ and one forward per α
    query = strategy.embed(reference_set, [question])[0]
    fixed = dataclasses.replace(strategy, alpha_search=0, alpha=fit.info["c3po_alpha"])
    searched = strategy.pathway(tiny_lm.engine, reference_set, question, query)
    assert torch.allclose(searched, fixed.pathway(tiny_lm.engine, reference_set, question, query))


@pytest.mark.parametrize(
    "spec",
    [{"surrogate": "ngd", "steps": 6, "lr": 0.05, "core": 4}, {"alpha_search": 5}],
    ids=["ngd", "alpha_search"],
)
def test_problems_fitted_together_equal_each_fitted_alone(tiny, spec):
    """NGD and the α search run all questions' neighbours in one forward (and backward) a step;
    each question's ω and losses equal fitting it alone within 1e-5 (the float rounding of a
    larger, differently padded batch), and so do the counted passes."""
    tiny_lm, refs = tiny
    strategy, reference_set = C3PO(refs, max_similarity=None, k=2, **spec), ReferenceSet.load(refs)
    questions = ["abcdx", "hellp", "zyxwa"]
    together = strategy.fits(tiny_lm.engine, reference_set, questions, strategy.embed(reference_set, questions))
    losses = "c3po_losses" if "steps" in spec else "c3po_alpha_losses"
    for question, fit in zip(questions, together, strict=True):
        alone, _ = _fit(tiny_lm, refs, strategy, question)
        assert fit.info[losses] == pytest.approx(alone.info[losses], abs=1e-5)
        for layer, omega in fit.policy.policy.values.items():
            assert torch.allclose(omega, alone.policy.policy.values[layer], atol=1e-5)
        counts = ("extra_forward_passes", "backward_passes")
        assert [fit.ledger.counts[c] for c in counts] == [alone.ledger.counts[c] for c in counts]


def test_a_set_built_with_another_model_is_refused(lm, tiny, tmp_path):
    tiny_lm, refs = tiny
    held = ReferenceSet.load(refs)
    other = dataclasses.replace(held.manifest, router_sha256="0" * 64)
    ReferenceSet(other, held.references, held.embeddings, held.routing).save(tmp_path / "other")
    with pytest.raises(ValueError, match=r"built with another model \(.*\): its router weights differ"):
        tiny_lm.generate(["abc"], C3PO(str(tmp_path / "other")), GREEDY)
    empty = dataclasses.replace(held.manifest, count=0)
    ReferenceSet(empty, (), held.embeddings[:0], held.routing[:0]).save(tmp_path / "empty")
    with pytest.raises(ValueError, match="holds no references"):
        tiny_lm.generate(["abc"], C3PO(str(tmp_path / "empty")), GREEDY)


def test_self_consistency_optimises_once_per_prompt_then_samples(lm, refs):
    strategy = parse(f"self_consistency(c3po({refs!r}, surrogate='ngd', steps=2), n=3)")
    out = lm.generate(PROMPTS[:2], strategy, SamplingParams(max_tokens=48, temperature=0.7, seed=1))
    assert len(out) == 2
    for c in out:
        assert len(c.info["answers"]) == 3 and c.cost["backward_passes"] == 2  # one fit, then three samples


def test_within_keeps_neighbours_of_the_questions_operator_pattern(lm, refs):
    import re

    from moesteer.c3po.groups import operator_pattern

    reference_set = ReferenceSet.load(refs)
    prompt = re.sub(r"\d+", lambda m: str(int(m.group()) + 1), reference_set.references[0].question)
    pattern = operator_pattern(prompt)
    fit, _ = _fit(lm, refs, C3PO(refs, within="arith_ops", k=3), prompt)
    by_id = {r.id: r.question for r in reference_set.references}
    same = [q for q in by_id.values() if operator_pattern(q) == pattern]
    assert len(fit.info["c3po_neighbours"]) == min(3, len(same)) > 0
    assert all(operator_pattern(by_id[i]) == pattern for i in fit.info["c3po_neighbours"])
    with pytest.raises(ValueError, match="within must be one of arith_ops"):
        parse("c3po('x', within='ops')")
