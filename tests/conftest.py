"""Shared fixtures: tiny random-init models of every supported family (seconds to build)."""

from __future__ import annotations

import pytest
import torch

from moesteer.models.adapters import SUPPORTED_FAMILIES
from moesteer.testing import tiny_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_models() -> dict:
    return {}


@pytest.fixture(params=SUPPORTED_FAMILIES)
def family_model(request, tiny_models):
    """A cached tiny model per family (tests must not mutate its weights)."""
    if request.param not in tiny_models:
        tiny_models[request.param] = tiny_model(request.param)
    return tiny_models[request.param]


@pytest.fixture
def prompt_ids() -> torch.Tensor:
    return torch.tensor([[5, 17, 42, 9, 77, 31, 12], [8, 64, 23, 99, 3, 50, 11]])
