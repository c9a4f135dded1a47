"""pytest configuration for the asrfx tests.

``randomize_bn(model, seed)`` (defined in :mod:`helpers`, re-exported here) sets every BatchNorm's
running statistics and affine parameters to random values; equivalence tests call it before each
comparison so that a fold cannot pass just because fresh BatchNorms are the identity.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import randomize_bn  # noqa: E402,F401  (re-exported: ``from conftest import ...``)


@pytest.fixture
def bn_randomizer():
    """The :func:`helpers.randomize_bn` function, as a fixture."""
    return randomize_bn


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Every test starts from the same global RNG state and the same thread count."""
    torch.manual_seed(0)
    yield
