"""How many torch threads a command uses: never more than the cores nobody else is using.

torch's default is one intra-op thread per core. On a shared machine that oversubscribes: on a
2-core machine beside one busy process, a ResNet-20 training step on 8x8 digits took 24 ms with
one thread and 1,765 ms with two (measured on a 2-core AMD EPYC; a thread that waits for a busy
core stalls every parallel region). The commands that train or time models choose
``cores - busy cores`` threads (CPU use measured over a fraction of a second, rounded), at least
one, unless told.
"""

from __future__ import annotations

import os

__all__ = ["choose_threads", "use_threads", "busy_cores"]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _stat() -> tuple[int, int]:
    """(idle, total) CPU time of the whole machine so far, from ``/proc/stat`` (Linux)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    return fields[3] + fields[4], sum(fields)  # idle + iowait, of user..steal


def busy_cores(window: float = 0.3) -> tuple[float, str]:
    """How many cores other processes keep busy, and how that was measured: the machine's CPU
    use over ``window`` seconds (while this process sleeps), else the 1-minute load average
    (which lags a process that just started by up to a minute)."""
    import time

    try:
        idle0, total0 = _stat()
        time.sleep(window)
        idle1, total1 = _stat()
        if total1 > total0:
            return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / (total1 - total0)), "in use"
    except (OSError, ValueError, IndexError):
        pass
    return os.getloadavg()[0], "load"  # AttributeError / OSError where there is none


def choose_threads(requested: int = 0) -> tuple[int, str]:
    """``(threads, why)``: ``requested`` when it is positive, else the cores this process may
    run on minus those other processes keep busy (:func:`busy_cores`), at least 1.

    Raises:
        ValueError: ``requested`` is negative or not an int.
    """
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 0:
        raise ValueError(f"threads must be 0 (choose) or a positive int, got {requested!r}")
    if requested:
        return requested, "as requested"
    cores = _cores()
    try:
        busy, how = busy_cores()
    except (AttributeError, OSError):  # no measure at all (Windows): every core
        return cores, f"{cores} cores"
    n = max(1, min(cores, int(cores - busy + 0.5)))
    return n, f"{cores} cores, {busy:.1f} {how} by others: {n} free (--threads N to choose)"


def use_threads(requested: int = 0) -> str:
    """Set torch's intra-op threads as :func:`choose_threads` says; a line saying so."""
    import torch

    n, why = choose_threads(requested)
    torch.set_num_threads(n)
    return f"torch threads: {n} ({why})"
