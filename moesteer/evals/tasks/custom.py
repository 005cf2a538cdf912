"""User tasks from a YAML or JSON file, without touching the package.

Example ``my_task.yaml``::

    name: capitals
    data: capitals.jsonl          # relative to the YAML file; one record per line
    prompt: "Q: What is the capital of {country}?\\nA:"
    answer: capital               # the record field holding the gold answer
    scorer: exact                 # exact | number | math | choice
    choices: options              # for scorer: choice — the field holding the list of options
    max_tokens: 16
    stop: ["\\n"]

``exact`` compares the stripped first line case-insensitively; ``number`` uses the GSM8K rules;
``math`` math-verify; ``choice`` scores each option by steered log-likelihood (``answer`` then
holds the index of the right option).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from moesteer.evals.data import read_jsonl
from moesteer.evals.scoring import Extraction, extract_gsm8k, score_math, score_number
from moesteer.evals.tasks.base import Task

SCORERS = ("exact", "number", "math", "choice")
_FIELDS = {"name", "data", "prompt", "answer", "scorer", "choices", "max_tokens", "stop"}


def _first_line(text: str) -> Extraction:
    lines = text.strip().splitlines()
    return Extraction(lines[0].strip() if lines else None, "strict")


def load_task_file(path: str | Path) -> Task:
    """A :class:`Task` from a YAML/JSON declaration; ``ValueError`` naming the bad field."""
    path = Path(path)
    spec = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: expected a mapping of task fields")
    unknown = set(spec) - _FIELDS
    missing = {"name", "data", "prompt", "answer"} - set(spec)
    if unknown or missing:
        raise ValueError(
            f"{path}: unknown fields {sorted(unknown)}, missing fields {sorted(missing)}; allowed: {sorted(_FIELDS)}"
        )
    scorer = spec.get("scorer", "exact")
    if scorer not in SCORERS:
        raise ValueError(f"{path}: scorer {scorer!r} is not one of {', '.join(SCORERS)}")
    if (scorer == "choice") != ("choices" in spec):
        raise ValueError(f"{path}: a 'choices' field goes with scorer: choice (and only with it)")
    data = (path.parent / spec["data"]).resolve()
    template, field = spec["prompt"], spec["answer"]
    gold = lambda r: str(r[field])  # noqa: E731
    common = {
        "name": spec["name"],
        "splits": ("test",),
        "load": lambda split: read_jsonl(data),
        "prompt": lambda r: template.format(**r),
        "gold": gold,
        "max_tokens": int(spec.get("max_tokens", 256)),
        "stop": tuple(spec.get("stop", ())),
        "source": f"user task {path}",
    }
    if scorer == "choice":
        return Task(**common, choices=lambda r: [f" {c}" for c in r[spec["choices"]]])
    extract, score = {
        "exact": (_first_line, lambda text, r: (_first_line(text).answer or "").lower() == gold(r).strip().lower()),
        "number": (extract_gsm8k, lambda text, r: score_number(extract_gsm8k(text).answer, gold(r))),
        "math": (extract_gsm8k, lambda text, r: score_math(text, gold(r))),
    }[scorer]
    return Task(**common, extract=extract, score=score)
