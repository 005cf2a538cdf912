"""The `mix` test bed's controls and secondary endpoints (docs/testbed.md §6 and §12), on test.

Each control runs a method at the setting its primary endpoint chose on validation
(``runs/mix_endpoints/validation.json``) on other problems or other context, beside greedy on the
same problems, and is read against the prediction §12 registered before it ran:

- ``*_s3``: S3 compositions nothing was trained for (every method; predicted |Δ| ≤ 2).
- ``c3po_s0``, ``rerouting_s0``: in-distribution problems, no shift (predicted |Δ| ≤ 1).
- ``c3po_wrong_family``: C3PO's endpoint problems with references of the chain families only, so
  every neighbour of a short-answer question is of another family (predicted Δ ≤ 0).
- ``rerouting_other_demos``: the rerouting endpoint's problems, each with the two demos of the
  next problem, which is of another family (predicted Δ ≤ 0).
- ``des_n8``, ``des_n64``: DES against beam search at N = 8 and 64 on the DES endpoint's problems
  (predicted below at 8, not below at 64: §5's secondaries).
- secondaries: ``c3po_ngd``, ``rerouting_online`` (``every=16``), and ``self_consistency`` (n = 8
  at temperature 0.8, a compute reference) on their endpoint's problems.

Reported like the endpoints (Wilson intervals, exact McNemar against the baseline), without Holm:
these are checks of the bed, not claims for a method. Every run is a resumable ``moesteer eval``
folder under ``--out``. Run from the repository root after ``mix_endpoints.py --stage test``::

    .venv/bin/python docs/experiments/mix_controls.py --stage run
    .venv/bin/python docs/experiments/mix_controls.py --stage table

``--bed mix3`` runs them on revision 3 of the bed (runs under ``runs/mix3_controls``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import moesteer
from moesteer.c3po.references import ReferenceSet
from moesteer.evals.tasks.mix import BEDS
from moesteer.evals.tasks.mix.families import CHAIN_FAMILIES, COMPOSITIONS

sys.path.insert(0, str(Path(__file__).parent))
from mix_endpoints import (
    ENDPOINTS,
    REFERENCES,
    Endpoint,
    _summary,
    comparison_cells,
    problems,
    run_eval,
    train_families,
    write_problems,
)

ENDPOINT = {e.name: e for e in ENDPOINTS}
S3 = tuple(COMPOSITIONS)
DEMOS_OF_NEXT = "next problem's demos"
CHAIN_REFERENCES = "chain-family references"


@dataclass(frozen=True)
class Control:
    """A control or secondary endpoint: its problems, the method's spec and the registered prediction."""

    name: str
    problems: Endpoint
    method: str  # a spec, or the name of the endpoint whose validation-chosen setting runs
    prediction: str
    baseline: str = "plain()"
    change: str = ""  # DEMOS_OF_NEXT or CHAIN_REFERENCES
    temperature: float = 0.0


def _on(endpoint: str, name: str, **changes) -> Endpoint:
    return dataclasses.replace(ENDPOINT[endpoint], name=name, candidates=(), **changes)


CONTROLS = (
    Control("c3po_wrong_family", _on("c3po", "c3po_wrong_family"), "c3po", "Δ ≤ 0", change=CHAIN_REFERENCES),
    Control("c3po_s0", _on("c3po", "c3po_s0", buckets=("s0",)), "c3po", "|Δ| ≤ 1"),
    Control("c3po_s3", _on("c3po", "c3po_s3", buckets=("s3",), families=S3, n=300), "c3po", "|Δ| ≤ 2"),
    Control("scmoe_s3", _on("scmoe", "scmoe_s3", buckets=("s3",), families=S3, n=300), "scmoe", "|Δ| ≤ 2"),
    Control("roe_s3", _on("roe", "roe_s3", buckets=("s3",), families=S3, n=300), "roe", "|Δ| ≤ 2"),
    Control(
        "des_n8",
        _on("des", "des_n8"),
        "des(n=8, verifier='mix_steps', ks=[6, 7, 8, 9, 10])",
        "Δ < 0",
        baseline="beam_search(n=8, verifier='mix_steps')",
    ),
    Control(
        "des_n64",
        _on("des", "des_n64"),
        "des(n=64, verifier='mix_steps', ks=[6, 7, 8, 9, 10])",
        "Δ ≥ 0",
        baseline="beam_search(n=64, verifier='mix_steps')",
    ),
    Control("c3po_ngd", _on("c3po", "c3po_ngd"), "c3po('{refs}', surrogate='ngd', layers=3, alpha=0.0)", "Δ ≥ +4"),
    Control("rerouting_s0", _on("rerouting", "rerouting_s0", buckets=("s0",)), "rerouting", "|Δ| ≤ 1"),
    Control(
        "rerouting_other_demos",
        _on("rerouting", "rerouting_other_demos"),
        "rerouting",
        "Δ ≤ 0",
        change=DEMOS_OF_NEXT,
    ),
    Control(
        "rerouting_s3", _on("rerouting", "rerouting_s3", buckets=("s3",), families=S3, n=300), "rerouting", "|Δ| ≤ 2"
    ),
    Control(
        "self_consistency",
        _on("rerouting", "self_consistency"),
        "self_consistency(plain(), n=8)",
        "Δ ≥ 0",
        temperature=0.8,
    ),
    Control(
        "rerouting_online",
        _on("rerouting", "rerouting_online", n=200),
        "rerouting(plain(), every=16, lr=0.05)",
        "same sign as prefill-only, |Δ| ≤ 3",
    ),
)


def chain_references(source: Path, folder: Path, bed: str) -> Path:
    """``source``'s references of the chain families only (wrong-family neighbours for short answers)."""
    if folder.exists():
        return folder
    refs = ReferenceSet.load(source)
    family = train_families(bed)
    keep = [i for i, r in enumerate(refs.references) if family[r.id] in CHAIN_FAMILIES]
    manifest = dataclasses.replace(refs.manifest, count=len(keep))
    subset = ReferenceSet(manifest, tuple(refs.references[i] for i in keep), refs.embeddings[keep], refs.routing[keep])
    return subset.save(folder)


def method_spec(control: Control, chosen: dict[str, str], refs: Path, out: Path, bed: str) -> str:
    spec = chosen.get(control.method, control.method).replace("{refs}", str(refs))
    if control.change == CHAIN_REFERENCES:
        spec = spec.replace(str(refs), str(chain_references(refs, out / "chain_refs", bed)))
    return spec


def records(control: Control, bed: str) -> list[dict]:
    chosen = problems(control.problems, "test", bed=bed)
    if control.change == DEMOS_OF_NEXT:
        return [{**r, "shots": chosen[(i + 1) % len(chosen)]["shots"]} for i, r in enumerate(chosen)]
    return chosen


def run_control(lm, control: Control, spec: str, out: Path, bed: str) -> dict:
    data = write_problems(out, control.problems, "test", records(control, bed))
    base = run_eval(lm, control.problems, control.baseline, "test", data, out, bed)
    row = _summary(run_eval(lm, control.problems, spec, "test", data, out, bed, control.temperature), base)
    return {"baseline": _summary(base, None), "method": row, "prediction": control.prediction}


def _met(prediction: str, delta: float) -> str:
    """Whether Δ (points) meets a registered prediction of the forms used in :data:`CONTROLS`."""
    if prediction.startswith("|Δ| ≤"):
        return "yes" if abs(delta) <= float(prediction.split("≤")[1]) else "no"
    if prediction.startswith("Δ ≤"):
        return "yes" if delta <= float(prediction.split("≤")[1]) else "no"
    if prediction.startswith("Δ ≥"):
        return "yes" if delta >= float(prediction.split("≥")[1]) else "no"
    if prediction == "Δ < 0":
        return "yes" if delta < 0 else "no"
    return "see text"


def table(report: dict) -> str:
    lines = [
        "| control | n | baseline | method | Δ (points) | fixed / broken | McNemar p | prediction | met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for control in CONTROLS:
        if control.name not in report:
            continue
        entry = report[control.name]
        base, row = entry["baseline"], entry["method"]
        prediction = entry["prediction"]
        met = _met(prediction, 100 * row["delta"])
        lines.append(f"| {control.name} | {comparison_cells(base, row)} | {prediction} | {met} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("run", "table"), required=True)
    parser.add_argument("--only", action="append", choices=[c.name for c in CONTROLS], help="controls to run")
    parser.add_argument("--bed", choices=sorted(BEDS), default="mix", help="revision of the bed (default mix)")
    parser.add_argument("--endpoints", type=Path, default=None, help="mix_endpoints.py --out (runs/<bed>_endpoints)")
    parser.add_argument("--out", type=Path, default=None, help="default runs/<bed>_controls")
    args = parser.parse_args(argv)
    args.endpoints = args.endpoints or Path(f"runs/{args.bed}_endpoints")
    args.out = args.out or Path(f"runs/{args.bed}_controls")
    report_path = args.out / "controls.json"
    if args.stage == "table":
        print(table(json.loads(report_path.read_text())))
        return
    chosen = {
        name: entry["chosen"] for name, entry in json.loads((args.endpoints / "validation.json").read_text()).items()
    }
    lm = moesteer.load(args.bed)
    for control in (c for c in CONTROLS if not args.only or c.name in args.only):
        spec = method_spec(control, chosen, args.endpoints / REFERENCES, args.out, args.bed)
        result = run_control(lm, control, spec, args.out, args.bed)
        report = json.loads(report_path.read_text()) if report_path.exists() else {}
        report[control.name] = result
        report_path.write_text(json.dumps(report, indent=2) + "\n")
        print(table(report).splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
