"""What users see does not change: completions recorded at a fixed commit, hashed, reproduced."""

from __future__ import annotations

import pytest
from golden import GOLDEN, RUNS, completion_digest

import moesteer


@pytest.fixture(scope="module")
def embedded():
    return moesteer.load()


@pytest.mark.parametrize("spec", list(RUNS))
def test_completions_match_the_recording(embedded, spec):
    assert completion_digest(embedded, spec, RUNS[spec]) == GOLDEN[spec]
