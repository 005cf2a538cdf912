"""What users see did not change with engine v2: the completions recorded before it, hashed."""

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
