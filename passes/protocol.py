"""The pass protocol: what every pass takes, returns, and how site selection is applied.

A pass is a function ``pass_(gm, ctx) -> list[Site]``: it takes a GraphModule (or, for passes
that rewrite both graphs of a dual-mode model, that module, whose ``graphs()`` lists them) and a
:class:`PassContext`, edits the graph in place and returns one :class:`asrfx.report.Site` record
per place it changed, kept or refused. A kept or refused record always carries a ``code``.

Passes that fold sites one at a time are written as generators of :class:`Step` s: each step
names its site (``key``) and does its work when run. :func:`run_steps` is the one place that
decides which steps run (``ctx.select``), so no pass filters sites itself; steps are produced
lazily, so each is planned against the graph as the steps before it left it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from asrfx.report import Site

__all__ = ["PassContext", "Step", "run_steps", "record"]


def _every(key: str) -> bool:
    return True


@dataclass
class PassContext:
    """What passes may read besides the graph.

    Attributes:
        inputs: the example inputs (a tuple of tensors) the graph's shapes were recorded with.
        select: site key -> whether the steps of that site run (all by default; the pipeline
            narrows it to one site to find the fold that breaks a check).
        reference: the unfolded graph's output on ``inputs``: given by a caller that has just
            run the graph on ``inputs`` recording every node's shapes (a checked capture), else
            set by constant evaluation, which runs the graph anyway.
    """

    inputs: tuple = ()
    select: Callable[[str], bool] = _every
    reference: Any = None


@dataclass
class Step:
    """One site of a pass: ``run()`` does its work and returns its records. ``key=None``
    marks a step that always runs (e.g. a final report of what is left)."""

    key: str | None
    run: Callable[[], list[Site]]


def run_steps(steps: Iterable[Step], ctx: PassContext | None = None) -> list[Site]:
    """Run the steps ``ctx.select`` accepts, in order; their records, concatenated."""
    select = ctx.select if ctx is not None else _every
    records: list[Site] = []
    for step in steps:
        if step.key is None or select(step.key):
            records += step.run()
    return records


def record(key: str, path: str, kind: str, channels: int, action: str = "kept",
           target: str = "", reason: str = "", code: str = "") -> Site:
    """A pass's record of one site (``key`` lets the pipeline re-run the pass on it alone)."""
    return Site(path, kind, int(channels), action, target, reason, code, key=key)
