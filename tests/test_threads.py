"""The commands' thread choice: the cores other processes leave free, at least one."""

from __future__ import annotations

import os

import pytest

from asrfx.threads import choose_threads


@pytest.mark.parametrize("cores, load, want", [(2, 1.0, 1), (2, 0.1, 2), (2, 5.0, 1),
                                               (16, 3.4, 13), (1, 0.0, 1)])
def test_threads_are_the_free_cores(monkeypatch, cores, load, want):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load), raising=False)
    n, why = choose_threads()
    assert n == want and f"{cores} cores" in why


def test_a_requested_count_is_kept_and_a_bad_one_refused():
    assert choose_threads(3) == (3, "as requested")
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="threads"):
            choose_threads(bad)
