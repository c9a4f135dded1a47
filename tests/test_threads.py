"""The commands' thread choice: the cores other processes leave free, at least one."""

from __future__ import annotations

import os

import pytest

from asrfx import threads
from asrfx.threads import choose_threads


@pytest.mark.parametrize("cores, load, want", [(2, 1.0, 1), (2, 0.1, 2), (2, 5.0, 1),
                                               (16, 3.4, 13), (1, 0.0, 1)])
def test_threads_are_the_free_cores(monkeypatch, cores, load, want):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(threads, "busy_cores", lambda: (load, "in use"))
    n, why = choose_threads()
    assert n == want and f"{cores} cores" in why


def test_cpu_use_is_measured_not_lagged(monkeypatch):
    """The measure follows /proc/stat over a short window: 3 of 4 CPUs' time idle is one busy
    core, whatever the load average says."""
    samples = iter([(1000, 2000), (1075, 2100)])  # (idle, total): 75 of 100 ticks idle
    monkeypatch.setattr(threads, "_stat", lambda: next(samples))
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 3.0, 3.0), raising=False)
    busy, how = threads.busy_cores(window=0)
    assert (round(busy, 6), how) == (1.0, "in use")


def test_without_proc_stat_the_load_average_is_used(monkeypatch):
    def missing():
        raise OSError("no /proc")

    monkeypatch.setattr(threads, "_stat", missing)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 1.0, 1.0), raising=False)
    assert threads.busy_cores(window=0) == (1.5, "load")


def test_a_requested_count_is_kept_and_a_bad_one_refused():
    assert choose_threads(3) == (3, "as requested")
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="threads"):
            choose_threads(bad)
