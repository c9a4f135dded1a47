"""The one seam between a model and the graphs asrfx compiles.

Every caller that needs a model's graphs (``prepare``, ``fold``, ``trace``, the benchmarks) gets
them from :func:`capture`; nothing else calls a front end. Today there is one front end, torch.fx
symbolic tracing (:mod:`asrfx.tracing`). A second one (torch.export, say) is one more module and
one more branch here.

What a front end must provide, for ``model`` and its example inputs, is a
:class:`~asrfx.tracing.TraceResult`:

* ``train`` and ``eval``: ``torch.fx.GraphModule`` s over the model's own submodules and
  parameters (not copies), the graph of each mode; the same object when the two modes compute
  the same graph. With example inputs, the eval graph must compute what the eager model does
  on them, and every node of it that produces a tensor carries ``node.meta["tensor_meta"]``
  (shape and dtype, as :class:`asrfx.passes.shapes.ShapeRecorder` writes it), and
  ``shaped`` is True saying so, with the eval graph's ``output`` on them. Callers run :func:`asrfx.passes.shapes.propagate_shapes` on any
  other graph (a separate train graph) before a pass reads shapes.
* ``leaves``: the paths of submodules the graphs call as one opaque ``call_module`` node
  because they could not be captured faithfully (a warning names each).
* ``hooked``: path -> hook kinds of each submodule kept opaque only because it has hooks, so
  that they run (see :func:`asrfx.tracing.hooked_leaves`).
* ``build()``: one module for both modes, a plain GraphModule when the graphs agree, otherwise
  an :class:`asrfx.DualModeGraphModule`.

The model's own train/eval flags are as they were afterwards.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from .tracing import TraceResult, trace_eval, trace_modes

__all__ = ["capture"]


def capture(model: nn.Module, example_inputs: tuple | None,
            leaf_modules: Sequence[str | type] = (), *, checked: bool = True) -> TraceResult:
    """The graphs of ``model`` in train and in eval mode.

    Args:
        model: any ``nn.Module``; its graphs share its submodules and parameters.
        example_inputs: a tuple of inputs (already normalized, see
            :func:`asrfx.inputs.normalize_inputs`), or None. With inputs, the eval graph is
            checked against the eager model and submodules that capture unfaithfully become
            leaves; without, the graphs are unchecked and carry no shape metadata.
        leaf_modules: qualified module names or module types to keep as opaque calls.
        checked: False: the eval graph alone, neither run nor checked (``shaped`` False), for
            a caller that checks its own end result against the eager model and captures
            again, checked, when that fails (fold).

    Returns:
        A :class:`~asrfx.tracing.TraceResult` (see the module docstring for what it holds).

    Raises:
        TraceError: the top level of ``model`` cannot be captured (names the reason and the fix).
        InputError: ``model`` fails on ``example_inputs`` in eval mode.
    """
    if not checked:
        return trace_eval(model, leaf_modules, example_inputs)
    return trace_modes(model, leaf_modules, example_inputs)
