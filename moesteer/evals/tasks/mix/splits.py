"""Cells, buckets, fixed evaluation splits and the training stream of the ``mix`` test bed.

A *cell* is a family in a format. Each family is trained in two formats; the five held-out cells
(:data:`HELD_OUT_CELLS`, a Latin square: each family and each format misses once or twice) are
*rare*: an example of the training stream is rendered in its family's held-out format with
probability ``MixConfig.held_out_example_prob``, and a whole document is of one held-out cell with
probability ``MixConfig.held_out_document_prob`` (both 0: never trained). :data:`BEDS` names the
revisions: ``mix`` (revision 2, ``MixConfig()``) and ``mix3`` (:data:`REVISION_3`). Buckets: ``s0``
trained cells at training sizes, ``s1`` held-out cells at training sizes (the shift), ``s2``
trained cells at longer sizes, ``s3`` compositions of two families (a negative control). Each
bucket's ``validation`` (300) and ``test`` (1000) problems are fixed by the seed and stratified
over families (and trained formats); every record carries two solved demos of its own cell
(``shots``) for 2-shot prompts. The training stream draws documents of 2–6 examples, of one cell,
of one family across its formats, or of mixed cells (``MixConfig.document_kinds``), and never
yields an evaluation prompt.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType

from moesteer.evals.tasks.mix.families import COMPOSITIONS, DRAW, FAMILIES, draw_arith
from moesteer.evals.tasks.mix.formats import EXAMPLE_SEPARATOR, FORMATS, render

HELD_OUT_CELLS = (("arith", "f3"), ("logic", "f2"), ("strings", "f2"), ("count", "f3"), ("compare", "f1"))
TRAINED_FORMATS = {family: tuple(fmt for fmt in FORMATS if (family, fmt) not in HELD_OUT_CELLS) for family in FAMILIES}
HELD_OUT_FORMAT = dict(HELD_OUT_CELLS)
COMPOSITION_FORMATS = {"arith+count": "f1", "arith+compare": "f2", "strings+strings": "f1"}
"""Each S3 composition is asked in a format both of its families were trained in."""
BUCKETS = ("s0", "s1", "s2", "s3")
SPLIT_SIZES = {"validation": 300, "test": 1000}
TRAIN_SIZE = 5000
"""Records in the ``train`` split (trained cells and sizes; C3PO's references)."""


def _frozen(mapping: dict) -> MappingProxyType:
    return MappingProxyType(mapping)


@dataclass(frozen=True)
class MixConfig:
    """How problems are drawn: sizes per family (operators, word length, digits), documents, mixture."""

    seed: int = 0
    train_sizes: MappingProxyType = field(
        default_factory=lambda: _frozen(
            {"arith": (2, 3), "logic": (3, 6), "strings": (6, 9), "count": (4, 8), "compare": (2, 2)}
        )
    )
    long_sizes: MappingProxyType = field(
        default_factory=lambda: _frozen(
            {"arith": (4, 5), "logic": (7, 8), "strings": (10, 11), "count": (10, 12), "compare": (3, 3)}
        )
    )
    composition_sizes: MappingProxyType = field(
        default_factory=lambda: _frozen({"arith+count": (2, 3), "arith+compare": (2, 2), "strings+strings": (6, 9)})
    )
    family_weights: MappingProxyType = field(
        default_factory=lambda: _frozen({"arith": 0.20, "logic": 0.14, "strings": 0.35, "count": 0.17, "compare": 0.14})
    )
    examples_per_document: tuple[int, int] = (2, 6)
    document_kinds: MappingProxyType = field(
        default_factory=lambda: _frozen({"cell": 0.4, "family": 0.3, "mixed": 0.3})
    )
    """Probabilities of a document of one cell, of one family in its trained formats, of mixed cells."""
    held_out_example_prob: float = 0.01
    held_out_document_prob: float = 0.0
    """Probability that a document is all examples of one held-out cell (its family drawn by weight)."""
    max_operand: int = 19
    """``arith`` operands are drawn from 0..max_operand."""

    def __hash__(self) -> int:
        return hash(
            tuple((k, tuple(v.items()) if isinstance(v, MappingProxyType) else v) for k, v in vars(self).items())
        )


REVISION_3 = MixConfig(
    train_sizes=_frozen({"arith": (2, 3), "logic": (3, 6), "strings": (8, 11), "count": (3, 6), "compare": (1, 1)}),
    long_sizes=_frozen({"arith": (4, 5), "logic": (7, 8), "strings": (12, 13), "count": (8, 10), "compare": (2, 2)}),
    family_weights=_frozen({"arith": 0.22, "logic": 0.14, "strings": 0.24, "count": 0.25, "compare": 0.15}),
    held_out_example_prob=0.005,
    held_out_document_prob=0.01,
    max_operand=9,
)
"""Revision 3 of the bed (``docs/testbed.md`` §14): easier arith (operands 0..9), count (3–6
letters) and compare (one-digit options), harder strings (8–11 letters), token shares 30/20/15/20/15,
and held-out cells mostly as whole documents of their cell, so that demos of a rare cell select it."""
BEDS = MappingProxyType({"mix": MixConfig(), "mix3": REVISION_3})
"""The named revisions of the bed: ``mix`` (revision 2, ``MixConfig()``) and ``mix3`` (revision 3)."""


def make_record(rng: random.Random, config: MixConfig, bucket: str, family: str, fmt: str, id: str) -> dict[str, str]:
    """One problem of ``family`` (or S3 composition) in ``fmt``, sized for ``bucket``, as a record."""
    if bucket == "s3":
        problem = COMPOSITIONS[family](rng, rng.randint(*config.composition_sizes[family]))
    else:
        sizes = config.long_sizes if bucket == "s2" else config.train_sizes
        size = rng.randint(*sizes[family])
        problem = draw_arith(rng, size, config.max_operand) if family == "arith" else DRAW[family](rng, size)
    prompt, target = render(problem, fmt)
    return {
        "id": id,
        "bucket": bucket,
        "family": family,
        "format": fmt,
        "prompt": prompt,
        "target": target,
        "answer": problem.answer,
    }


def cell_of(bucket: str, index: int) -> tuple[str, str]:
    """The ``(family, format)`` of a bucket's ``index``-th fixed problem (stratified round-robin)."""
    if bucket == "s3":
        kind = list(COMPOSITIONS)[index % len(COMPOSITIONS)]
        return kind, COMPOSITION_FORMATS[kind]
    family = FAMILIES[index % len(FAMILIES)]
    if bucket == "s1":
        return family, HELD_OUT_FORMAT[family]
    formats = TRAINED_FORMATS[family]
    return family, formats[(index // len(FAMILIES)) % len(formats)]


def _draw_fixed(config: MixConfig, bucket: str, split: str, size: int, avoid: set[str]) -> list[dict[str, str]]:
    """``size`` records of a bucket, none of whose prompts is in ``avoid`` (which grows)."""
    rng = random.Random(f"mix/{bucket}/{split}/{config.seed}")
    records: list[dict[str, str]] = []
    while len(records) < size:
        family, fmt = cell_of("s0" if bucket == "train" else bucket, len(records))
        record = make_record(rng, config, bucket, family, fmt, f"mix-{bucket}-{split}-{len(records)}")
        if record["prompt"] not in avoid:
            avoid.add(record["prompt"])
            records.append(record)
    return records


def example_text(record: dict[str, str]) -> str:
    """A solved example: prompt then target."""
    return record["prompt"] + record["target"]


def _add_shots(records: list[dict[str, str]], config: MixConfig, name: str, held_out: set[str]) -> None:
    """Give each record two solved demos of its own cell (not an evaluation prompt, not its own)."""
    rng = random.Random(f"mix/shots/{name}/{config.seed}")
    for record in records:
        demos: list[str] = []
        while len(demos) < 2:
            demo = make_record(rng, config, record["bucket"], record["family"], record["format"], "")
            if demo["prompt"] not in held_out and demo["prompt"] != record["prompt"]:
                demos.append(example_text(demo) + EXAMPLE_SEPARATOR)
        record["shots"] = "".join(demos)


@lru_cache(maxsize=4)
def _fixed_splits(config: MixConfig) -> dict[tuple[str, str], tuple[dict[str, str], ...]]:
    """Every bucket's validation and test records; prompts unique across all of them."""
    seen: set[str] = set()
    splits = {
        (bucket, split): _draw_fixed(config, bucket, split, size, seen)
        for bucket in BUCKETS
        for split, size in SPLIT_SIZES.items()
    }
    for (bucket, split), records in splits.items():
        _add_shots(records, config, f"{bucket}/{split}", seen)
    return {key: tuple(records) for key, records in splits.items()}


def held_out_prompts(config: MixConfig = MixConfig()) -> frozenset[str]:
    """Every validation and test prompt of every bucket (the training stream never yields one)."""
    return frozenset(r["prompt"] for records in _fixed_splits(config).values() for r in records)


@lru_cache(maxsize=4)
def _train_split(config: MixConfig) -> tuple[dict[str, str], ...]:
    held_out = set(held_out_prompts(config))
    records = _draw_fixed(config, "train", "train", TRAIN_SIZE, set(held_out))
    _add_shots(records, config, "train", held_out)
    return tuple(records)


def load_split(bucket: str, split: str, config: MixConfig = MixConfig()) -> list[dict[str, str]]:
    """A bucket's fixed ``validation`` or ``test`` records, or the shared ``train`` records.

    A record: ``id, bucket, family, format, prompt, target, answer, shots`` (``shots + prompt`` is
    the 2-shot prompt). ``train`` holds trained cells at training sizes, disjoint from every
    evaluation prompt (C3PO's references); it is the same for every bucket.
    """
    if bucket not in BUCKETS:
        raise ValueError(f"unknown bucket {bucket!r}; mix has {', '.join(BUCKETS)}")
    if split == "train":
        return [dict(r) for r in _train_split(config)]
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown split {split!r}; mix has train, {', '.join(SPLIT_SIZES)}")
    return [dict(r) for r in _fixed_splits(config)[bucket, split]]


def _family(rng: random.Random, config: MixConfig) -> str:
    """A family drawn by ``config.family_weights``."""
    return rng.choices(FAMILIES, weights=[config.family_weights[f] for f in FAMILIES])[0]


def _trained_cell(rng: random.Random, config: MixConfig, family: str | None = None) -> tuple[str, str]:
    """A trained cell (of ``family`` when given, else one drawn by :func:`_family`)."""
    family = family or _family(rng, config)
    return family, rng.choice(TRAINED_FORMATS[family])


def _document_cells(rng: random.Random, config: MixConfig, size: int) -> list[tuple[str, str]]:
    """The cells of a document's ``size`` examples, by the document kind drawn (or one held-out cell)."""
    if config.held_out_document_prob and rng.random() < config.held_out_document_prob:
        family = _family(rng, config)
        return [(family, HELD_OUT_FORMAT[family])] * size
    kinds = list(config.document_kinds)
    kind = rng.choices(kinds, weights=[config.document_kinds[k] for k in kinds])[0]
    first = _trained_cell(rng, config)
    if kind == "cell":
        cells = [first] * size
    elif kind == "family":
        cells = [first, *(_trained_cell(rng, config, first[0]) for _ in range(size - 1))]
    else:
        cells = [first, *(_trained_cell(rng, config) for _ in range(size - 1))]
    return [
        (family, HELD_OUT_FORMAT[family]) if rng.random() < config.held_out_example_prob else (family, fmt)
        for family, fmt in cells
    ]


def train_documents(config: MixConfig = MixConfig(), seed: int = 0) -> Iterator[list[dict[str, str]]]:
    """Endless training documents (lists of records), seeded by ``seed``.

    A document holds 2–6 examples at training sizes, none with an evaluation prompt; its cells
    follow :func:`_document_cells` (an example is in its family's held-out cell with probability
    ``config.held_out_example_prob``).
    """
    held_out = held_out_prompts(config)
    rng = random.Random(f"mix/train-documents/{config.seed}/{seed}")
    for index in itertools.count():
        document: list[dict[str, str]] = []
        for family, fmt in _document_cells(rng, config, rng.randint(*config.examples_per_document)):
            record = make_record(rng, config, "train", family, fmt, f"mix-doc-{index}-{len(document)}")
            if record["prompt"] not in held_out:
                document.append(record)
        if document:
            yield document


def document_text(document: list[dict[str, str]]) -> str:
    """A training document's text: its solved examples joined by the example separator."""
    return EXAMPLE_SEPARATOR.join(example_text(r) for r in document)
