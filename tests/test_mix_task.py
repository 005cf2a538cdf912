"""The mix test bed: cells, buckets, splits, training stream, formats, scoring, verifier, registry."""

from __future__ import annotations

import hashlib
import itertools
import re
from collections import Counter

import pytest

from moesteer.evals.tasks import get_task
from moesteer.evals.tasks.mix import extract, prompt, score, splits
from moesteer.evals.tasks.mix.families import CHAIN_FAMILIES, FAMILIES
from moesteer.evals.tasks.mix.formats import EXAMPLE_SEPARATOR, STEP_PATTERNS, STEP_SEPARATOR, truncate
from moesteer.evals.tasks.mix.splits import (
    BEDS,
    BUCKETS,
    HELD_OUT_CELLS,
    REVISION_3,
    SPLIT_SIZES,
    MixConfig,
    document_text,
    load_split,
    train_documents,
)
from moesteer.verifiers import load as load_verifier

EVAL_SPLITS = [(bucket, split) for bucket in BUCKETS for split in SPLIT_SIZES]


def _documents(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    return list(itertools.islice(train_documents(seed=seed), n))


@pytest.mark.parametrize("bed", sorted(BEDS))
def test_split_sizes_and_stratification(bed: str) -> None:
    for bucket, split in EVAL_SPLITS:
        records = load_split(bucket, split, BEDS[bed])
        assert len(records) == SPLIT_SIZES[split]
        families = Counter(r["family"] for r in records)
        assert max(families.values()) - min(families.values()) <= 1, (bucket, split, families)
        assert len({r["id"] for r in records}) == len(records)
    assert len(load_split("s0", "train", BEDS[bed])) == splits.TRAIN_SIZE


def test_cells_of_each_bucket() -> None:
    held_out = set(HELD_OUT_CELLS)
    assert {f for f, _ in held_out} == set(FAMILIES)
    for split in ("validation", "test", "train"):
        s0 = {(r["family"], r["format"]) for r in load_split("s0", split)}
        assert not s0 & held_out and len(s0) == 2 * len(FAMILIES)
    assert {(r["family"], r["format"]) for r in load_split("s1", "test")} == held_out
    assert not {(r["family"], r["format"]) for r in load_split("s2", "test")} & held_out
    assert {r["family"] for r in load_split("s3", "test")} <= {"arith+count", "arith+compare", "strings+strings"}


def test_s2_chains_are_longer_than_every_s0_chain() -> None:
    for family in CHAIN_FAMILIES:
        steps = {
            bucket: [r["target"].count(STEP_SEPARATOR) for r in load_split(bucket, "test") if r["family"] == family]
            for bucket in ("s0", "s2")
        }
        assert min(steps["s2"]) > max(steps["s0"])


@pytest.mark.parametrize("bed", sorted(BEDS))
def test_evaluation_prompts_are_unique_across_buckets_and_splits(bed: str) -> None:
    prompts = [r["prompt"] for bucket, split in EVAL_SPLITS for r in load_split(bucket, split, BEDS[bed])]
    assert len(set(prompts)) == len(prompts)
    train = {r["prompt"] for r in load_split("s0", "train", BEDS[bed])}
    assert not train & set(prompts)


def test_training_stream_never_yields_an_evaluation_prompt_and_held_out_cells_are_rare() -> None:
    held_out = splits.held_out_prompts()
    examples = [r for d in _documents(3000) for r in d]
    assert len(examples) > 9000
    assert not {r["prompt"] for r in examples} & held_out
    for record in examples:
        assert score(record["target"], record)
    in_held_out_cells = sum((r["family"], r["format"]) in HELD_OUT_CELLS for r in examples) / len(examples)
    assert 0.005 < in_held_out_cells < 0.02  # MixConfig.held_out_example_prob = 0.01
    never = MixConfig(held_out_example_prob=0.0)
    examples = [r for d in itertools.islice(train_documents(never), 1000) for r in d]
    assert not {(r["family"], r["format"]) for r in examples} & set(HELD_OUT_CELLS)


def test_revision_3_trains_held_out_cells_mostly_as_whole_documents_and_never_on_evaluation_prompts() -> None:
    documents = list(itertools.islice(train_documents(REVISION_3), 4000))
    examples = [r for d in documents for r in d]
    assert not {r["prompt"] for r in examples} & splits.held_out_prompts(REVISION_3)
    cells = [{(r["family"], r["format"]) for r in d} for d in documents]
    whole = sum(len(c) == 1 and c <= set(HELD_OUT_CELLS) for c in cells) / len(documents)
    assert 0.005 < whole < 0.02  # held_out_document_prob = 0.01
    lone = [
        r
        for d, c in zip(documents, cells, strict=True)
        if len(c) > 1
        for r in d
        if (r["family"], r["format"]) in HELD_OUT_CELLS
    ]
    assert 0.001 < len(lone) / len(examples) < 0.01  # held_out_example_prob = 0.005


def test_revision_3_has_one_digit_compare_options_and_arith_operands_up_to_9() -> None:
    records = load_split("s0", "test", REVISION_3)
    options = [re.findall(r"[abcd]\) ?(\d+)", r["prompt"]) for r in records if r["family"] == "compare"]
    assert options and all(len(o) == 4 and all(len(x) == 1 for x in o) for o in options)
    operands = [int(x) for r in records if r["family"] == "arith" for x in re.findall(r"\d+", r["prompt"])]
    assert max(operands) == REVISION_3.max_operand


def test_revision_2_is_the_stream_and_splits_the_shipped_mix_model_was_trained_and_measured_on() -> None:
    """Digests of ``MixConfig()``'s first 300 training documents and of every evaluation record, as
    the code that trained ``tiny-mix-moe`` and produced docs/testbed.md §10–§13 drew them."""
    stream = hashlib.sha256()
    for document in itertools.islice(train_documents(), 300):
        stream.update(document_text(document).encode())
    assert stream.hexdigest() == "dce950d6bd164b16518ee4c332096e00d6aabfebfe2b1886d77a9ea51f6a952e"
    records = hashlib.sha256()
    for bucket, split in EVAL_SPLITS:
        for r in load_split(bucket, split):
            records.update((r["prompt"] + r["target"] + r["shots"]).encode())
    assert records.hexdigest() == "74b812ef6b71ddecb3b9e6e99ec98b1225b9654bac139512bc995501cde027a0"


def test_documents_of_one_family_switch_formats_and_mixed_documents_switch_families() -> None:
    documents = _documents(2000)
    families = [{r["family"] for r in d} for d in documents if len(d) > 2]
    formats = [{r["format"] for r in d} for d in documents if len(d) > 2]
    one_family_many_formats = sum(len(f) == 1 and len(m) > 1 for f, m in zip(families, formats, strict=True))
    many_families = sum(len(f) > 1 for f in families)
    assert one_family_many_formats > 0.2 * len(families)
    assert many_families > 0.2 * len(families)


def test_training_stream_rejects_prompts_it_would_draw(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mark a third of the prompts the stream draws as held out: the same stream, minus those."""
    drawn = [r["prompt"] for d in _documents(200) for r in d]
    marked = frozenset(drawn[::3])
    evaluation = splits.held_out_prompts
    monkeypatch.setattr(splits, "held_out_prompts", lambda config: evaluation(config) | marked)
    again = [r["prompt"] for d in _documents(200) for r in d]
    assert not set(again) & marked
    kept = [p for p in drawn if p not in marked]
    assert again[: len(kept)] == kept


def test_same_seed_same_problems() -> None:
    assert load_split("s1", "test") == load_split("s1", "test")
    assert load_split("s1", "validation", MixConfig(seed=1)) != load_split("s1", "validation")
    first = [document_text(d) for d in _documents(50, seed=3)]
    assert first == [document_text(d) for d in _documents(50, seed=3)]
    assert first != [document_text(d) for d in _documents(50, seed=4)]


def test_gold_targets_score_and_wrong_answers_do_not() -> None:
    for bucket, split in EVAL_SPLITS:
        for record in load_split(bucket, split)[:100]:
            assert extract(record["target"]) == record["answer"]
            completion = record["target"] + EXAMPLE_SEPARATOR + record["shots"]
            assert truncate(completion) == record["target"] and score(completion, record)
            assert not score(record["target"].replace(record["answer"], record["answer"] + "1"), record)


def test_two_shot_prompts_show_two_solved_examples_of_the_same_cell() -> None:
    task = get_task("mix_s1_2shot")
    for record in task.load("validation")[:50]:
        text = task.prompt(record)
        assert text.endswith(record["prompt"]) and text == prompt(record, 2)
        demos = [d for d in record["shots"].split(EXAMPLE_SEPARATOR) if d]
        opener = record["prompt"].split()[0]
        assert sum(d.startswith(opener) for d in demos) == 2
        assert record["prompt"] not in record["shots"]
    assert get_task("mix_s1").prompt(record) == record["prompt"]


@pytest.mark.parametrize("bed", sorted(BEDS))
def test_registry_declares_every_bucket_and_shot(bed: str) -> None:
    for bucket in BUCKETS:
        for suffix in ("", "_2shot"):
            task = get_task(f"{bed}_{bucket}{suffix}")
            assert task.load("test") == load_split(bucket, "test", BEDS[bed])
            assert task.splits == ("train", "validation", "test") and task.test_split == "test"
            record = task.load("validation")[0]
            assert task.score(record["target"], record) and task.gold(record) == record["answer"]
            assert task.extract(record["target"]).answer == record["answer"]


def test_mix_steps_verifier_scores_gold_chains_and_flags_the_first_error() -> None:
    verifier = load_verifier("mix_steps")
    for bucket in ("s0", "s1", "s2"):
        for record in load_split(bucket, "validation"):
            if record["family"] not in CHAIN_FAMILIES:
                continue
            steps = record["target"].split(STEP_SEPARATOR)
            for shots in (0, 2):
                assert verifier.score([prompt(record, shots)], [steps]) == [[1.0] * len(steps)]
            equation = STEP_PATTERNS[record["format"]].fullmatch(steps[0])
            result = equation.group(4)
            flipped = {"t": "f", "f": "t"}.get(result) or str(int(result) + 1)
            wrong = [steps[0][: equation.start(4)] + flipped + steps[0][equation.end(4) :], *steps[1:]]
            assert verifier.score([record["prompt"]], [wrong]) == [[0.0] * len(steps)]
            skipped = [steps[0], *steps[2:]]
            if steps[1] != steps[2]:  # two equal lines in a row: skipping one leaves the same text
                assert verifier.score([record["prompt"]], [skipped])[0][1:] == [0.0] * (len(steps) - 2)
