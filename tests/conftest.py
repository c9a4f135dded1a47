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
from hypothesis import HealthCheck, Phase, settings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# the shared checks in helpers (assert_outputs_close, roundtrip, ...) assert: show their values
pytest.register_assert_rewrite("helpers")

from helpers import randomize_bn  # noqa: E402,F401  (re-exported: ``from conftest import ...``)

# Hypothesis profiles, picked with HYPOTHESIS_PROFILE (default "ci"). Tests that set their own
# max_examples keep it; the rest (the random-architecture fuzzer, tests/test_fuzz.py) take the
# profile's. "ci": derandomized (the same examples every run), 150 examples per test, and no
# shrinking: a failure is reported as drawn, at once (shrinking a random architecture took
# minutes per failure). "long": thousands of random examples, shrunk, run by hand:
#   HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest -q tests/test_fuzz.py
settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True,
                          database=None, print_blob=True,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate],
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=3000, deadline=None, derandomize=False,
                          suppress_health_check=[HealthCheck.too_slow])
# hunting: as "long", but a failure is reported as found (no shrinking, which can take longer
# than the search on these models), with its reproduction blob
settings.register_profile("hunt", max_examples=3000, deadline=None, derandomize=False,
                          print_blob=True, phases=[Phase.explicit, Phase.generate],
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The models here are small; on a shared 2-core runner intra-op threads that busy-wait for a core
# another process holds made a ResNet-164 training step ~30x slower than one thread (measured:
# 94.8 s vs 3.4 s for the ResNet-164 prepare/train/fold pipeline). Override with
# ASRFX_TEST_THREADS=N.
torch.set_num_threads(int(os.environ.get("ASRFX_TEST_THREADS", "1")))


@pytest.fixture
def bn_randomizer():
    """The :func:`helpers.randomize_bn` function, as a fixture."""
    return randomize_bn


_TEST_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Every test starts from the same global RNG state and the suite's thread count (a
    command run in a test chooses its own, which must not outlive the test)."""
    torch.manual_seed(0)
    torch.set_num_threads(_TEST_THREADS)
    yield
    torch.set_num_threads(_TEST_THREADS)
