"""The `mix` test bed's endpoints (docs/testbed.md §5 and §9): tune on validation, read test once.

Each endpoint names its problems (buckets × families × shots, the first ``n`` of the test split,
interleaved over buckets so a prefix keeps every cell's share), the greedy baseline and the
candidate settings pre-registered in docs/testbed.md §9. For each endpoint the candidates run on
the validation problems of the same buckets and families; the most accurate (ties: the first
listed) is the one test reads, beside greedy on the same problems. Reported per endpoint:
accuracy with Wilson 95% intervals, the paired exact McNemar p against the baseline, Holm's
adjustment over the endpoints run, and cost per problem (forward passes, token rows, seconds).

Every run is a resumable ``moesteer eval`` run folder under ``--out`` (a crash loses nothing;
re-running skips what is done). Run from the repository root, validation first::

    .venv/bin/python docs/experiments/mix_endpoints.py --stage validation
    .venv/bin/python docs/experiments/mix_endpoints.py --stage test   # after validation chose

``--only NAME`` restricts to some endpoints; ``--limit-validation`` caps the validation problems;
``--bed mix3`` runs revision 3 of the bed (model and tasks ``mix3``, runs under ``runs/mix3_endpoints``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import moesteer
from moesteer.c3po.embedding import load_embedder
from moesteer.c3po.references import MANIFEST
from moesteer.evals import runner
from moesteer.evals.references import build
from moesteer.evals.rundir import read_samples, run_path
from moesteer.evals.stats import holm, mcnemar_p, wilson_interval
from moesteer.evals.tasks import get_task
from moesteer.evals.tasks.mix import BEDS, load_split

GREEDY = "plain()"
REFERENCES = "refs"


@dataclass(frozen=True)
class Endpoint:
    """A primary endpoint: its problems, its baseline and the settings tuned on validation."""

    name: str
    buckets: tuple[str, ...]
    families: tuple[str, ...]
    n: int
    candidates: tuple[str, ...]
    shots: int = 0
    baseline: str = GREEDY

    def task(self, bed: str) -> str:
        """The registered task whose prompts and scoring the endpoint's records use."""
        return f"{bed}_s0" + ("_2shot" if self.shots else "")


CHAIN = ("arith", "logic")
SHORT = ("strings", "count", "compare")
ALL = (*CHAIN, *SHORT)
SCMOE = tuple(f"scmoe(beta={b}, weak='{w}')" for w in ("rank", "topk") for b in (0.1, 0.5, 0.9))
ROE = tuple(f"roe(samples=8, tau={t}, skip=1, cache='clean')" for t in (0.1, 0.25, 0.5))
C3PO = tuple(f"c3po('{{refs}}', surrogate='{s}', layers=3, alpha={a})" for s in ("kernel", "ngd") for a in (0.0, 0.5))

ENDPOINTS = (
    Endpoint("scmoe", ("s0", "s2"), CHAIN, 800, SCMOE),
    Endpoint("roe", ("s0", "s1", "s2"), CHAIN, 1200, ROE),
    Endpoint(
        "des",
        ("s0", "s1", "s2"),
        CHAIN,
        32,
        (
            "des(n=32, verifier='mix_steps', ks=[6, 7, 8, 9, 10])",
            "des(n=32, verifier='mix_steps', ks=[4, 5, 6, 7, 8, 9, 10, 11])",
        ),
        baseline="beam_search(n=32, verifier='mix_steps')",
    ),
    Endpoint("c3po", ("s1",), SHORT, 600, C3PO),
    Endpoint(
        "rerouting",
        ("s1",),
        ALL,
        400,
        ("rerouting(every=None, lr=0.01)", "rerouting(every=None, lr=0.05)"),
        shots=2,
    ),
)


def problems(endpoint: Endpoint, split: str, limit: int | None = None, bed: str = "mix") -> list[dict]:
    """The endpoint's records of ``split`` of ``bed``: its families, buckets interleaved; on test
    the first ``endpoint.n``, on validation the first ``limit`` (``None``: all)."""
    per_bucket = [
        [r for r in load_split(b, split, BEDS[bed]) if r["family"] in endpoint.families] for b in endpoint.buckets
    ]
    interleaved = [r for group in zip(*per_bucket, strict=False) for r in group]
    return interleaved[: endpoint.n if split == "test" else limit]


def train_families(bed: str) -> dict[str, str]:
    """The family of each ``train`` record of ``bed``, by id (C3PO's references carry only the id)."""
    return {r["id"]: r["family"] for r in load_split("s0", "train", BEDS[bed])}


def write_problems(out: Path, endpoint: Endpoint, split: str, records: list[dict]) -> Path:
    path = out / "data" / f"{endpoint.name}-{split}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_eval(
    lm, endpoint: Endpoint, spec: str, split: str, data: Path, out: Path, bed: str, temperature: float = 0.0
) -> dict:
    config = runner.EvalConfig(
        task=endpoint.task(bed), strategy=spec, model=bed, split=split, data=str(data), temperature=temperature
    )
    folder = run_path(out / split, endpoint.name, spec)
    results = runner.run(config, folder, lm=lm, batch_size=32)
    correct = {i: bool(r["correct"]) for i, r in read_samples(folder / runner.SAMPLES).items()}
    return {"spec": results["strategy"], "results": results, "correct": correct}


def _summary(run: dict, base: dict | None) -> dict:
    correct = run["correct"]
    total, hits = len(correct), sum(correct.values())
    cost = run["results"]["cost"]
    row = {
        "spec": run["spec"],
        "n": total,
        "accuracy": hits / total,
        "ci95": wilson_interval(hits, total),
        "forward_passes": cost["forward_passes_per_sample"],
        "token_rows": cost["token_rows_per_sample"],
        "seconds": cost["seconds_per_sample"],
    }
    if base is not None:
        ids = sorted(correct)
        row["delta"] = row["accuracy"] - sum(base["correct"].values()) / len(base["correct"])
        row["mcnemar_p"] = mcnemar_p([base["correct"][i] for i in ids], [correct[i] for i in ids])
        row["fixed"] = sum(correct[i] and not base["correct"][i] for i in ids)
        row["broken"] = sum(base["correct"][i] and not correct[i] for i in ids)
    return row


def _specs(endpoint: Endpoint, refs: Path) -> tuple[str, ...]:
    return tuple(spec.replace("{refs}", str(refs)) for spec in endpoint.candidates)


def build_references(lm, out: Path, limit: int, bed: str) -> Path:
    """C3PO's reference set: the first ``limit`` records of the ``train`` split the model solves."""
    folder = out / REFERENCES
    if not (folder / MANIFEST).exists():
        built = build(lm, get_task(f"{bed}_s0"), load_embedder(), split="train", limit=limit, progress=True)
        built.save(folder)
    return folder


def validate(lm, endpoint: Endpoint, out: Path, refs: Path, limit: int | None, bed: str) -> dict:
    """Run the baseline and every candidate on validation; the most accurate candidate is chosen."""
    data = write_problems(out, endpoint, "validation", problems(endpoint, "validation", limit, bed))
    base = run_eval(lm, endpoint, endpoint.baseline, "validation", data, out, bed)
    specs = _specs(endpoint, refs)
    rows = [_summary(run_eval(lm, endpoint, spec, "validation", data, out, bed), base) for spec in specs]
    chosen = max(rows, key=lambda row: row["accuracy"])  # max keeps the first of equals
    return {"baseline": _summary(base, None), "candidates": rows, "chosen": chosen["spec"]}


def chosen_setting(out: Path, endpoint: Endpoint) -> str:
    """The setting validation chose, or the endpoint's first candidate where validation did not run."""
    path = out / "validation.json"
    chosen = json.loads(path.read_text()).get(endpoint.name) if path.exists() else None
    return chosen["chosen"] if chosen else _specs(endpoint, out / REFERENCES)[0]


def test(lm, endpoint: Endpoint, out: Path, chosen: str, bed: str) -> dict:
    """Read the test problems once: the baseline and the setting chosen on validation."""
    data = write_problems(out, endpoint, "test", problems(endpoint, "test", bed=bed))
    base = run_eval(lm, endpoint, endpoint.baseline, "test", data, out, bed)
    row = _summary(run_eval(lm, endpoint, chosen, "test", data, out, bed), base)
    return {"baseline": _summary(base, None), "chosen": row}


def _accuracy(row: dict) -> str:
    low, high = row["ci95"]
    return f"`{row['spec']}` {100 * row['accuracy']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def comparison_cells(base: dict, row: dict) -> str:
    """The cells every comparison table has: n, baseline and method with their 95% intervals, Δ
    (points), fixed / broken problems and McNemar's p."""
    return (
        f"{row['n']} | {_accuracy(base)} | {_accuracy(row)} | {100 * row['delta']:+.1f} "
        f"| {row['fixed']} / {row['broken']} | {row['mcnemar_p']:.3g}"
    )


def table(report: dict) -> str:
    """The test endpoints as a markdown table: baseline and method with 95% intervals, Δ, fixed and
    broken problems, McNemar p, Holm p, token rows over the baseline's."""
    lines = [
        "| endpoint | n | baseline | method | Δ (points) | fixed / broken | McNemar p | Holm p | token rows |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    report = {e.name: report[e.name] for e in ENDPOINTS if e.name in report}  # the registered order
    adjusted = holm([entry["chosen"]["mcnemar_p"] for entry in report.values()])
    for (name, entry), holm_p in zip(report.items(), adjusted, strict=True):
        base, row = entry["baseline"], entry["chosen"]
        rows = row["token_rows"] / base["token_rows"]
        lines.append(f"| {name} | {comparison_cells(base, row)} | {holm_p:.3g} | {rows:.1f}× |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("validation", "test", "table"), required=True)
    parser.add_argument("--only", action="append", choices=[e.name for e in ENDPOINTS], help="endpoints to run")
    parser.add_argument("--bed", choices=sorted(BEDS), default="mix", help="revision of the bed (default mix)")
    parser.add_argument("--out", type=Path, default=None, help="default runs/<bed>_endpoints")
    parser.add_argument("--limit-validation", type=int, default=None, help="validation problems per endpoint")
    parser.add_argument("--references", type=int, default=2000, help="train records C3PO's references come from")
    args = parser.parse_args(argv)
    args.out = args.out or Path(f"runs/{args.bed}_endpoints")
    if args.stage == "table":
        print(table(json.loads((args.out / "test.json").read_text())))
        return {}
    lm = moesteer.load(args.bed)
    selected = [e for e in ENDPOINTS if not args.only or e.name in args.only]
    wants_references = any(e.name == "c3po" for e in selected)
    refs = build_references(lm, args.out, args.references, args.bed) if wants_references else Path()
    report_path = args.out / f"{args.stage}.json"
    for endpoint in selected:
        if args.stage == "validation":
            result = validate(lm, endpoint, args.out, refs, args.limit_validation, args.bed)
        else:
            result = test(lm, endpoint, args.out, chosen_setting(args.out, endpoint), args.bed)
        report = json.loads(report_path.read_text()) if report_path.exists() else {}  # other runs' endpoints too
        report[endpoint.name] = result
        report_path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
