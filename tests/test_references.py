"""C3PO foundation: reference sets on the embedded model, MiniLM embeddings, retrieval and kernels."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import moesteer
import moesteer.c3po.references as refs_module
from moesteer.backends.hf.hook import RouterHandle
from moesteer.c3po import (
    KNN,
    EpsilonBall,
    Gaussian,
    Linear,
    Matern,
    Polynomial,
    ReferenceSet,
    last_token_routing,
    load_embedder,
    neighbours,
)
from moesteer.cli import main
from moesteer.evals.references import build
from moesteer.evals.runner import load_problems, task_sampling
from moesteer.evals.tasks import get_task
from moesteer.trace import RoutingTrace

LIMIT = 20
ARITH = get_task("arith")


@pytest.fixture(scope="module")
def lm() -> moesteer.LM:
    return moesteer.load()


@pytest.fixture(scope="module")
def embedder():
    return load_embedder()


@pytest.fixture(scope="module")
def refs(lm, embedder) -> ReferenceSet:
    return build(lm, ARITH, embedder, split="validation", limit=LIMIT)


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


def _error_line(result) -> str:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.strip().endswith(errors[0]), result.stderr
    assert "Traceback" not in result.stderr
    return errors[0]


# ---- building ----------------------------------------------------------------------------------


def test_keeps_exactly_the_problems_the_task_scores_correct(lm, refs):
    problems = load_problems(ARITH, "validation", limit=LIMIT)
    prompts = [ARITH.prompt(p) for p in problems]
    texts = [c.text for c in lm.engine.generate(prompts, None, task_sampling(ARITH))]
    correct = {p["id"]: t for p, t in zip(problems, texts, strict=True) if ARITH.score(t, p)}
    assert 0 < len(correct) < LIMIT  # the check means something: some kept, some dropped
    assert {r.id: r.answer for r in refs.references} == correct
    by_id = {p["id"]: ARITH.prompt(p) for p in problems}
    assert all(r.question == by_id[r.id] for r in refs.references)
    assert refs.manifest.count == len(correct) and refs.manifest.attempted == LIMIT


def test_shapes_and_distributions(lm, refs, embedder):
    num_experts, _ = lm.engine.routing_sizes()
    n = len(refs)
    assert refs.routing.shape == (n, len(lm.moe_layers), num_experts)
    assert torch.allclose(refs.routing.sum(-1), torch.ones(n, len(lm.moe_layers)), atol=1e-5)
    assert (refs.routing >= 0).all()
    assert refs.embeddings.shape == (n, embedder.dim)
    assert torch.allclose(refs.embeddings.norm(dim=-1), torch.ones(n), atol=1e-5)
    m = refs.manifest
    assert (m.model, m.moe_layers, m.num_experts) == (lm.name, tuple(lm.moe_layers), num_experts)
    assert (m.task, m.split, m.embedding_model, m.position) == (
        "arith",
        "validation",
        "sentence-transformers/all-MiniLM-L6-v2",
        "last_prompt_token",
    )


def test_routing_is_the_last_prompt_token_of_a_longer_forward(lm):
    """Causal attention: the prompt's last position routes the same with tokens after it."""
    prompt = ARITH.prompt(load_problems(ARITH, "validation", limit=1)[0])
    ids = lm.engine.encode(prompt)
    trace = RoutingTrace(distributions=True)
    handle = RouterHandle(lm.model, trace=trace)
    try:
        with torch.no_grad():
            lm.model(input_ids=torch.tensor([[*ids, *lm.engine.encode("1 + 2", special=False)]]))
    finally:
        handle.remove()
    expected = torch.stack([r.probs[0, len(ids) - 1] for r in trace.records])
    assert torch.allclose(last_token_routing(lm.engine, prompt), expected, atol=1e-6)


def test_save_load_round_trip(refs, tmp_path):
    folder = refs.save(tmp_path / "refs")
    loaded = ReferenceSet.load(folder)
    assert loaded.manifest == refs.manifest and loaded.references == refs.references
    assert torch.equal(loaded.embeddings, refs.embeddings) and torch.equal(loaded.routing, refs.routing)
    assert sorted(p.name for p in folder.iterdir()) == [
        "manifest.json",
        "references.jsonl",
        "references.safetensors",
    ]
    assert json.loads((folder / "manifest.json").read_text())["count"] == len(refs)


def test_a_failed_write_leaves_no_folder_and_keeps_the_previous_set(refs, tmp_path, monkeypatch):
    def broken(tensors, path):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(refs_module, "save_file", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        refs.save(tmp_path / "refs")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a staging folder

    monkeypatch.undo()
    folder = refs.save(tmp_path / "refs")
    smaller = ReferenceSet(
        refs.manifest.__class__(**{**refs.manifest.__dict__, "count": 1}),
        refs.references[:1],
        refs.embeddings[:1],
        refs.routing[:1],
    )
    monkeypatch.setattr(refs_module, "save_file", broken)
    with pytest.raises(RuntimeError):
        smaller.save(folder)
    assert ReferenceSet.load(folder).references == refs.references
    assert [p.name for p in tmp_path.iterdir()] == ["refs"]


def test_replacing_a_set_swaps_it_whole(refs, tmp_path):
    folder = refs.save(tmp_path / "refs")
    one = ReferenceSet(
        refs.manifest.__class__(**{**refs.manifest.__dict__, "count": 1}),
        refs.references[:1],
        refs.embeddings[:1],
        refs.routing[:1],
    )
    one.save(folder)
    assert len(ReferenceSet.load(folder)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["refs"]


def test_a_failed_swap_puts_the_previous_set_back(refs, tmp_path, monkeypatch):
    folder = refs.save(tmp_path / "refs")
    real, calls = refs_module.os.rename, []

    def second_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the new set into place
            raise OSError("rename failed")
        real(src, dst)

    monkeypatch.setattr(refs_module.os, "rename", second_fails)
    with pytest.raises(OSError, match="rename failed"):
        refs.save(folder)
    monkeypatch.undo()
    assert ReferenceSet.load(folder).references == refs.references
    assert [p.name for p in tmp_path.iterdir()] == ["refs"]


def test_refuses_to_replace_a_folder_that_is_not_a_set(refs, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a reference set"):
        refs.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_inconsistent_sets_are_rejected(refs):
    with pytest.raises(ValueError, match="routing has shape"):
        ReferenceSet(refs.manifest, refs.references, refs.embeddings, refs.routing[:, :1])
    with pytest.raises(ValueError, match="manifest says"):
        ReferenceSet(
            refs.manifest.__class__(**{**refs.manifest.__dict__, "count": 99}),
            refs.references,
            refs.embeddings,
            refs.routing,
        )


# ---- embeddings ------------------------------------------------------------------------------


def test_minilm_puts_paraphrases_closer_than_unrelated_text(embedder):
    a, b, c = embedder.encode(
        ["What is 3 plus 4?", "Compute the sum of 3 and 4.", "The cathedral was rebuilt after the fire."]
    )
    assert embedder.dim == 384
    assert float(a @ b) > float(a @ c) + 0.3 and float(a @ b) > float(b @ c) + 0.3


def test_missing_embedding_model_is_one_clear_error(tmp_path):
    with pytest.raises(OSError, match="cannot load embedding model"):
        load_embedder(str(tmp_path / "absent"))


# ---- retrieval and kernels -------------------------------------------------------------------


def _unit(*angles_deg: float) -> torch.Tensor:
    radians = torch.tensor(angles_deg) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=-1)


QUERY = torch.tensor([1.0, 0.0])
KEYS = _unit(80, 10, 45, 2, 30, 170)  # similarities cos(θ): .174, .985, .707, .9994, .866, -.985


def test_knn_returns_the_nearest_after_the_duplicate_guard():
    found = neighbours(QUERY, KEYS)  # 2° (0.9994) and 10° (0.985) are above 0.95: dropped
    assert found.index.tolist() == [4, 2, 0]
    assert torch.allclose(found.similarity, torch.tensor([30.0, 45, 80]).deg2rad().cos(), atol=1e-6)
    assert neighbours(QUERY, KEYS, KNN(2), max_similarity=None).index.tolist() == [3, 1]
    assert neighbours(QUERY, KEYS, KNN(10)).index.tolist() == [4, 2, 0, 5]  # fewer than k remain


def test_epsilon_ball_uses_cosine_distance():
    assert neighbours(QUERY, KEYS, EpsilonBall(0.3)).index.tolist() == [4, 2]  # 1 − cos ≤ 0.3
    assert neighbours(QUERY, KEYS, EpsilonBall(0.3), max_similarity=None).index.tolist() == [3, 1, 4, 2]
    assert len(neighbours(QUERY, KEYS, EpsilonBall(0.01))) == 0  # only duplicates are that close


def test_kernel_formulas_on_known_numbers():
    s = torch.tensor([1.0, 0.5, 0.0])  # squared distances 0, 1, 2 between unit vectors
    assert torch.allclose(Gaussian()(s), torch.tensor([1.0, math.exp(-0.5), math.exp(-1.0)]))
    assert torch.allclose(Gaussian(bandwidth=0.5)(s), torch.tensor([1.0, math.exp(-2.0), math.exp(-4.0)]))
    assert torch.equal(Linear()(s), s)
    assert torch.allclose(Polynomial()(s), torch.tensor([4.0, 2.25, 1.0]))
    assert torch.allclose(Polynomial(degree=3, offset=0.0)(s), torch.tensor([1.0, 0.125, 0.0]))
    root3 = math.sqrt(3)
    matern = [1.0, (1 + root3) * math.exp(-root3), (1 + root3 * math.sqrt(2)) * math.exp(-root3 * math.sqrt(2))]
    assert torch.allclose(Matern()(s), torch.tensor(matern))
    assert torch.allclose(
        Matern(length_scale=2.0)(torch.tensor([0.5])), torch.tensor([(1 + root3 / 2) * math.exp(-root3 / 2)])
    )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: KNN(0), "k must be"),
        (lambda: EpsilonBall(-0.1), "eps must be"),
        (lambda: Gaussian(0.0), "bandwidth must be"),
        (lambda: Matern(float("nan")), "length_scale must be"),
        (lambda: Polynomial(degree=0), "degree must be"),
    ],
)
def test_bad_parameters_are_one_line_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ---- the CLI ---------------------------------------------------------------------------------


def test_cli_build_info_neighbours(tmp_path):
    out = tmp_path / "refs"
    result = _run("references", "build", "--task", "arith", "--split", "validation", "--limit", "10", "--out", str(out))
    assert result.exit_code == 0, result.stderr
    built = ReferenceSet.load(out)
    assert f"references: {len(built)} of 10 attempted" in result.stdout

    info = _run("references", "info", str(out))
    assert info.exit_code == 0, info.stderr
    assert info.stdout == built.summary() + "\n"
    assert "MoE layers: 4 [0, 1, 2, 3], experts: 16" in info.stdout
    assert "sentence-transformers/all-MiniLM-L6-v2" in info.stdout

    near = _run("references", "neighbours", str(out), built.references[0].question, "--k", "2")
    assert near.exit_code == 0, near.stderr
    header, _, *rows = near.stdout.splitlines()
    assert header.split() == ["cosine", "weight", "id", "question"] and 1 <= len(rows) <= 2
    assert all(0 < float(row.split()[1]) <= 1 for row in rows) and max(map(len, near.stdout.splitlines())) <= 120


def test_cli_one_line_errors(tmp_path):
    assert "no reference set at" in _error_line(_run("references", "info", str(tmp_path / "missing")))
    assert "no reference set at" in _error_line(_run("references", "neighbours", str(tmp_path / "missing"), "Q"))
    assert "--k" in _error_line(_run("references", "neighbours", str(tmp_path), "Q", "--k", "0"))
    assert "--eps" in _error_line(_run("references", "neighbours", str(tmp_path), "Q", "--eps", "3"))
    out = str(tmp_path / "refs")
    assert "--backend" in _error_line(_run("references", "build", "--task", "arith", "--out", out, "--backend", "vllm"))
    assert "no split" in _error_line(_run("references", "build", "--task", "arith", "--split", "dev", "--out", out))
    assert "unknown task" in _error_line(_run("references", "build", "--task", "arithh", "--out", out))


def test_cli_no_correct_answer_is_an_empty_set_error(tmp_path):
    data = tmp_path / "wrong.jsonl"
    data.write_text(json.dumps({"id": "w0", "prompt": "Q: 1 + 1 = ?\n", "answer": "999"}) + "\n")
    out = tmp_path / "refs"
    line = _error_line(_run("references", "build", "--task", "arith", "--data", str(data), "--out", str(out)))
    assert "answered none of the 1 problems" in line and "no references" in line
    assert not out.exists()


def test_killing_a_build_leaves_the_previous_set_intact(refs, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "refs"
    refs.save(out)
    before = (out / "manifest.json").read_bytes()
    command = [sys.executable, "-m", "moesteer", "references", "build", "--task", "arith", "--split", "train"]
    build = subprocess.Popen([*command, "--limit", "2000", "--out", str(out)], stderr=subprocess.PIPE, text=True)
    try:
        for line in build.stderr:  # the model is loaded: the build is under way
            if line.startswith("loaded "):
                break
        time.sleep(1.0)
        assert build.poll() is None, "the build ended before it could be killed"
        build.send_signal(signal.SIGKILL)
        build.wait(timeout=30)
    finally:
        build.kill()
        build.stderr.close()
    assert (out / "manifest.json").read_bytes() == before
    assert len(ReferenceSet.load(out)) == len(refs)
