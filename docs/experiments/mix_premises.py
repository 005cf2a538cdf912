"""Premise checks of the `mix` test bed (docs/testbed.md §5, M2–M6), on validation only.

- ``scmoe``: teacher-forced on the gold chains of the SCMoE endpoint's validation problems, the
  positions where the strong branch's argmax is wrong and the contrast's is right (*fixed*) against
  those where it is right and the contrast's wrong (*broken*); the premise holds at ratio ≥ 1.2.
- ``roe``: the gold targets' mean per-token NLL under RoE's averaged distribution against plain
  decoding (premise: −1% or better), and, over gold tokens the model gives p < 0.5, the share whose
  probability the route average raises (premise: > 50%).
- ``des``: greedy accuracy at each expert count k (``topk(k)``) on the DES endpoint's validation
  problems, the mean Jaccard overlap of the solved sets of each k with the trained k (8), and the
  union of solved problems over the best single k (premise: each k within ±5 points of k = 8, overlap < 0.8,
  union/best ≥ 1.2).
- ``rerouting``: the cosine between the gradients, at δ = 0, of the context loss rerouting minimises
  (the prompt's own next-token loss) and of the gold target's loss, for a router bias δ on every
  MoE layer; on S1 2-shot (premise: mean > 0 with its 95% interval), on S0 2-shot and on S1 with the
  demos of another family's problem (controls: interval containing 0).
- ``c3po``: precision@3 of the reference neighbours (same family as the question) on the C3PO
  endpoint's validation problems (premise: ≥ 0.9), with the reference set mix_endpoints.py built.

Run from the repository root after ``mix_endpoints.py --stage validation`` (which builds the
references and the eval runs this reuses): ``.venv/bin/python docs/experiments/mix_premises.py``
(``--bed mix3`` for revision 3 of the bed).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

import moesteer
from moesteer.backends.hf.steer import steer
from moesteer.c3po.embedding import load_embedder
from moesteer.c3po.references import ReferenceSet
from moesteer.c3po.retrieval import KNN, neighbours
from moesteer.evals.tasks.mix import BEDS, load_split
from moesteer.routing import Bias
from moesteer.strategies.spec import parse

sys.path.insert(0, str(Path(__file__).parent))
from mix_endpoints import ENDPOINTS, problems, run_eval, train_families, write_problems

ENDPOINT = {e.name: e for e in ENDPOINTS}


def _branch_logprobs(lm, strategy, prompt: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced log-probs ``[T, branches, V]`` at the target's positions, and its token ids."""
    prompt_ids = lm.engine.encode(prompt)
    target_ids = lm.engine.encode(target, special=False)
    ids = torch.tensor([prompt_ids + target_ids])
    rows = []
    for policy in strategy.branches():
        with steer(lm.model, policy), torch.no_grad():
            logits = lm.model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1]
        rows.append(torch.log_softmax(logits.float(), dim=-1))
    return torch.stack(rows, dim=1), torch.tensor(target_ids)


def scmoe(lm, spec: str, limit: int, bed: str) -> dict:
    """Positions the contrast fixes against those it breaks, teacher-forced on gold targets."""
    strategy = parse(spec)
    fixed = broken = tokens = 0
    for record in problems(ENDPOINT["scmoe"], "validation", limit, bed):
        logprobs, gold = _branch_logprobs(lm, strategy, record["prompt"], record["target"])
        strong = logprobs[:, 0].argmax(-1) == gold
        contrast = strategy.combine(logprobs).argmax(-1) == gold
        fixed += int((contrast & ~strong).sum())
        broken += int((strong & ~contrast).sum())
        tokens += len(gold)
    return {"spec": spec, "tokens": tokens, "fixed": fixed, "broken": broken, "ratio": fixed / max(broken, 1)}


def roe(lm, spec: str, limit: int, bed: str) -> dict:
    """Gold NLL under RoE's average against plain, and how often it raises an unlikely gold token."""
    records = problems(ENDPOINT["roe"], "validation", limit, bed)
    prompts, targets = [r["prompt"] for r in records], [r["target"] for r in records]
    plain = torch.cat(lm.engine.score(prompts, targets, parse("plain")))
    routed = torch.cat(lm.engine.score(prompts, targets, parse(spec)))
    unlikely = plain.exp() < 0.5
    return {
        "spec": spec,
        "tokens": len(plain),
        "nll_plain": float(-plain.mean()),
        "nll_roe": float(-routed.mean()),
        "nll_relative_change": float(routed.mean() / plain.mean() - 1),
        "unlikely_tokens": int(unlikely.sum()),
        "unlikely_raised": float((routed[unlikely] > plain[unlikely]).float().mean()),
    }


def des(lm, out: Path, ks: Sequence[int], bed: str) -> dict:
    """Greedy accuracy per expert count and how much the solved sets differ."""
    endpoint, trained = ENDPOINT["des"], lm.model.config.num_experts_per_tok
    records = problems(endpoint, "validation", bed=bed)
    data = write_problems(out, endpoint, "validation", records)
    runs = {k: run_eval(lm, endpoint, f"topk(k={k})", "validation", data, out, bed) for k in ks}
    solved = {k: {i for i, ok in run["correct"].items() if ok} for k, run in runs.items()}
    total = len(records)
    best = max(len(s) for s in solved.values())
    jaccard = {
        k: len(solved[k] & solved[trained]) / max(len(solved[k] | solved[trained]), 1) for k in ks if k != trained
    }
    return {
        "problems": total,
        "accuracy": {k: len(s) / total for k, s in solved.items()},
        "jaccard_with_trained_k": jaccard,
        "mean_jaccard": sum(jaccard.values()) / len(jaccard),
        "union_over_best": len(set().union(*solved.values())) / max(best, 1),
    }


def _gradient(lm, first: list[int] | str, rest: list[int] | str) -> torch.Tensor:
    """∇δ of the loss of ``rest`` after ``first`` at δ = 0 (a bias on every MoE layer), flattened."""
    layers = lm.moe_layers
    delta = torch.zeros(len(layers), lm.model.config.num_experts, requires_grad=True)
    loss = lm.engine.loss(first, rest, Bias({layer: delta[j] for j, layer in enumerate(layers)}))
    (grad,) = torch.autograd.grad(loss, [delta])
    return grad.flatten()


def _mean_interval(values: list[float]) -> dict:
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    half = 1.96 * sd / len(values) ** 0.5
    return {"n": len(values), "mean": mean, "ci95": (mean - half, mean + half)}


def rerouting(lm, limit: int, bed: str) -> dict:
    """cos(∇δ context loss, ∇δ gold loss) on S1 2-shot, S0 2-shot and S1 with another family's demos."""
    s1, s0 = (load_split(bucket, "validation", BEDS[bed])[:limit] for bucket in ("s1", "s0"))
    conditions = {
        "s1_2shot": [(r["shots"] + r["prompt"], r["target"]) for r in s1],
        "s0_2shot": [(r["shots"] + r["prompt"], r["target"]) for r in s0],
        "s1_other_family_demos": [
            (s1[(i + 1) % len(s1)]["shots"] + r["prompt"], r["target"]) for i, r in enumerate(s1)
        ],
    }
    report = {}
    for name, pairs in conditions.items():
        cosines = []
        for prompt, target in pairs:
            ids = lm.engine.encode(prompt)
            context, gold = _gradient(lm, ids[:1], ids[1:]), _gradient(lm, prompt, target)
            cosines.append(float(torch.nn.functional.cosine_similarity(context, gold, dim=0)))
        report[name] = _mean_interval(cosines)
    return report


def c3po(out: Path, bed: str, k: int = 3) -> dict:
    """Share of each question's k nearest references that are of the question's family."""
    refs = ReferenceSet.load(out / "refs")
    family = train_families(bed)
    ref_family = [family[r.id] for r in refs.references]
    records = problems(ENDPOINT["c3po"], "validation", bed=bed)
    queries = load_embedder(refs.manifest.embedding_model).encode([r["prompt"] for r in records])
    same = [
        ref_family[int(i)] == record["family"]
        for record, query in zip(records, queries, strict=True)
        for i in neighbours(query, refs.embeddings, KNN(k)).index
    ]
    by_family = {f: sum(f == x for x in ref_family) for f in sorted(set(ref_family))}
    return {"questions": len(records), "precision_at_3": sum(same) / len(same), "references_by_family": by_family}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bed", choices=sorted(BEDS), default="mix", help="revision of the bed (default mix)")
    parser.add_argument(
        "--out", type=Path, default=None, help="mix_endpoints.py's --out (default runs/<bed>_endpoints)"
    )
    parser.add_argument("--only", action="append", choices=("scmoe", "roe", "des", "rerouting", "c3po"))
    parser.add_argument("--limit", type=int, default=120, help="validation problems for the teacher-forced checks")
    parser.add_argument("--scmoe", default=None, help="the SCMoE setting (default: validation's choice)")
    parser.add_argument("--roe", default=None, help="the RoE setting (default: validation's choice)")
    args = parser.parse_args(argv)
    args.out = args.out or Path(f"runs/{args.bed}_endpoints")
    chosen = json.loads((args.out / "validation.json").read_text()) if (args.out / "validation.json").exists() else {}
    lm, bed = moesteer.load(args.bed), args.bed
    checks = {
        "scmoe": lambda: scmoe(lm, args.scmoe or chosen["scmoe"]["chosen"], args.limit, bed),
        "roe": lambda: roe(lm, args.roe or chosen["roe"]["chosen"], args.limit, bed),
        "des": lambda: des(lm, args.out, range(6, 11), bed),
        "rerouting": lambda: rerouting(lm, args.limit, bed),
        "c3po": lambda: c3po(args.out, bed),
    }
    report_path = args.out / "premises.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    for name in args.only or checks:
        report[name] = checks[name]()
        report_path.write_text(json.dumps(report, indent=2) + "\n")
        print(name, json.dumps(report[name]), flush=True)
    return report


if __name__ == "__main__":
    main()
