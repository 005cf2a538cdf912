"""The ``mix`` test bed: five problem families in three formats, held-out cells, four buckets.

:mod:`.families` draws format-free problems, :mod:`.formats` renders them as text and extracts
answers, :mod:`.splits` fixes the evaluation splits and streams training documents.
"""

from __future__ import annotations

from moesteer.evals.tasks.mix.formats import STOP, extract
from moesteer.evals.tasks.mix.splits import BUCKETS, MixConfig, load_split, train_documents


def score(text: str, record: dict[str, str]) -> bool:
    """Exact match of the completion's stated answer (:func:`extract`) with the record's answer."""
    return extract(text) == record["answer"]


__all__ = ["BUCKETS", "STOP", "MixConfig", "extract", "load_split", "score", "train_documents"]
