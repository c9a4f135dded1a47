"""How many torch threads a command uses: never more than the cores nobody else is using.

torch's default is one intra-op thread per core. On a shared machine that oversubscribes: on a
2-core machine beside one busy process, a ResNet-20 training step on 8x8 digits took 24 ms with
one thread and 1,765 ms with two (measured on a 2-core AMD EPYC; a thread that waits for a busy
core stalls every parallel region). The commands that train or time models choose
``cores - busy cores`` threads (the 1-minute load average, rounded), at least one, unless told.
"""

from __future__ import annotations

import os

__all__ = ["choose_threads", "use_threads"]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def choose_threads(requested: int = 0) -> tuple[int, str]:
    """``(threads, why)``: ``requested`` when it is positive, else the cores this process may
    run on minus those other processes keep busy (the 1-minute load average), at least 1.

    Raises:
        ValueError: ``requested`` is negative or not an int.
    """
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 0:
        raise ValueError(f"threads must be 0 (choose) or a positive int, got {requested!r}")
    if requested:
        return requested, "as requested"
    cores = _cores()
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average (Windows): use every core
        return cores, f"{cores} cores"
    n = max(1, min(cores, int(cores - busy + 0.5)))
    return n, f"{cores} cores, load {busy:.1f}: {n} free (--threads N to choose)"


def use_threads(requested: int = 0) -> str:
    """Set torch's intra-op threads as :func:`choose_threads` says; a line saying so."""
    import torch

    n, why = choose_threads(requested)
    torch.set_num_threads(n)
    return f"torch threads: {n} ({why})"
