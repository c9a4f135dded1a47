"""Shared fixtures of the pytest-benchmark suites (``pytest bench --benchmark-only``).

The variants are built by :mod:`asrfx.bench`, exactly as ``asrfx bench`` builds them, once per
(model, attention) and cached for the session. pytest-benchmark times one test after another,
not interleaved: compare within one run (``--benchmark-group-by=param:model,param:batch``) on a
quiet machine, and prefer ``asrfx bench`` (interleaved rounds) for figures to quote.
"""

from __future__ import annotations

import functools

import pytest
import torch

from asrfx.bench import BenchConfig, _variants, build_models


@functools.lru_cache(maxsize=None)
def variants(model: str, attention: str) -> tuple[dict, tuple]:
    cfg = BenchConfig(model=model, attention=(attention,), progress=False)
    _, _, shape = build_models(cfg, attention)
    x1 = torch.randn(1, *shape)
    evals, _, _ = _variants(cfg, x1, torch.device("cpu"))
    return evals, shape


@pytest.fixture(scope="session")
def built():
    """``built(model, attention) -> (variants by name, input shape)``, cached."""
    return variants


@pytest.fixture(scope="session", autouse=True)
def fixed_threads():
    torch.set_num_threads(torch.get_num_threads())
    yield
