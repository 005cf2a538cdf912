"""User tasks from a YAML or JSON file, without touching the package.

Example ``my_task.yaml``::

    name: capitals
    data: capitals.jsonl          # relative to the YAML file; one record per line (the test split)
    # data: {validation: dev.jsonl, test: capitals.jsonl}   # or one file per split (tune uses validation)
    prompt: "Q: What is the capital of {country}?\\nA:"
    answer: capital               # the record field holding the gold answer
    scorer: exact                 # exact | number | math | choice
    choices: options              # for scorer: choice — the field holding the list of options
    max_tokens: 16
    stop: ["\\n"]

``exact`` compares the stripped first line case-insensitively; ``number`` uses the GSM8K rules;
``math`` math-verify; ``choice`` scores each option by steered log-likelihood (``answer`` then
holds the index of the right option). ``name`` is also the run folder (letters, digits, ``_.-``).
The prompt names record fields (``{country}``; positional ``{0}`` is an error), and every record
must hold them, the answer and the choices field.
"""

from __future__ import annotations

import json
import re
import string
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
    spec = _read(path)
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: expected a mapping of task fields")
    unknown = set(spec) - _FIELDS
    missing = {"name", "data", "prompt", "answer"} - set(spec)
    if unknown or missing:
        raise ValueError(
            f"{path}: unknown fields {sorted(unknown)}, missing fields {sorted(missing)}; allowed: {sorted(_FIELDS)}"
        )
    if not isinstance(spec["name"], str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", spec["name"]):
        raise ValueError(f"{path}: name {spec['name']!r} must be letters, digits, '_', '.' or '-' (a folder name)")
    scorer = spec.get("scorer", "exact")
    if scorer not in SCORERS:
        raise ValueError(f"{path}: scorer {scorer!r} is not one of {', '.join(SCORERS)}")
    if (scorer == "choice") != ("choices" in spec):
        raise ValueError(f"{path}: a 'choices' field goes with scorer: choice (and only with it)")
    files = _split_files(path, spec["data"])
    template, field = spec["prompt"], spec["answer"]
    needed = {*_template_fields(path, template), field, *([spec["choices"]] if scorer == "choice" else [])}
    gold = lambda r: str(r[field])  # noqa: E731
    common = {
        "name": spec["name"],
        "splits": tuple(files),
        "load": lambda split: _records(files[split], needed),
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


def _read(path: Path) -> object:
    """The parsed YAML or JSON file; a syntax error is a one-line ``ValueError`` naming the file."""
    try:
        return json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{path}{where}: invalid YAML ({getattr(err, 'problem', None) or err})") from None


def _split_files(path: Path, data: object) -> dict[str, Path]:
    """``data`` as split -> file (a single file is the test split); the test split goes last."""
    files = data if isinstance(data, dict) else {"test": data}
    if not files or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise ValueError(f"{path}: data must be a file name or a mapping of split names to file names")
    order = sorted(files, key=lambda split: split == "test")
    return {split: (path.parent / files[split]).resolve() for split in order}


def _template_fields(path: Path, template: object) -> set[str]:
    """The record fields a prompt template names; positional or computed fields are errors."""
    if not isinstance(template, str):
        raise ValueError(f"{path}: prompt must be a string, got {type(template).__name__}")
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise ValueError(f"{path}: bad prompt template ({err}); write literal braces as {{{{ and }}}}") from None
    bad = sorted(name for name in names if not name.isidentifier())
    if bad:
        raise ValueError(f"{path}: prompt field {{{bad[0]}}} must name a record field, e.g. {{question}}")
    return names


def _records(data: Path, needed: set[str]) -> list[dict]:
    """The records of ``data``, each checked to hold every field the task reads."""
    records = read_jsonl(data)
    for record in records:
        missing = sorted(needed - set(record))
        if missing:
            raise ValueError(f"{data}: record {record['id']!r} lacks field {missing[0]!r}, which the task uses")
    return records
