"""Constant evaluation: input-independent branches become constant buffers.

After the ASR rewrite an attention branch depends on the input only through its shape (psi is
expanded to the batch size). In eval mode its value is a constant; this pass runs the graph once
on example inputs, records the value of every input-independent tensor that feeds the
input-dependent part of the graph, and replaces the branch with a buffer. Values that were
expanded over the batch are stored with batch 1 (they only meet the input through broadcasting).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from .graph_utils import (safe_dce, ADD_OPS, MUL_OPS, SUB_OPS, reads_shape_only, is_op, module_path,
                          set_attr_path, unique_name, value_dependent)

__all__ = ["evaluate_constants"]

_BROADCAST_OPS = MUL_OPS | ADD_OPS | SUB_OPS | {operator.truediv, torch.div, "div", "div_",
                                                 operator.itruediv}


def _broadcast_expands(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, fx.Node]]:
    """(op, expand node, its input) for every ``x * g.expand_as(x)`` (likewise
    ``g.expand(<x's shape>)``, ``+ - /``): the broadcasting op gives the same values from ``g``
    itself."""
    found = []
    for e in gm.graph.nodes:
        if e.op != "call_method" or e.target not in ("expand_as", "expand") or e.kwargs or \
                not e.args or not isinstance(e.args[0], fx.Node):
            continue
        g = e.args[0]
        for u in e.users:
            if not is_op(u, _BROADCAST_OPS) or len(u.args) != 2 or u.kwargs:
                continue
            a, b = u.args
            if a is e and (isinstance(u.target, str) and u.target.endswith("_") or
                           u.target in (operator.imul, operator.iadd, operator.isub,
                                        operator.itruediv)):
                continue  # an in-place op writes into its first operand
            other = b if a is e else a
            if not isinstance(other, fx.Node) or other is e:
                continue
            if e.target == "expand_as":
                same = len(e.args) == 2 and e.args[1] is other
            else:
                se, so, sg = (n.meta.get("tensor_meta") for n in (e, other, g))
                same = all(m is not None and hasattr(m, "shape") for m in (se, so, sg)) and \
                    tuple(se.shape) == tuple(so.shape) and len(sg.shape) <= len(se.shape)
            if same:
                found.append((u, e, g))
    return found


def drop_broadcast_expands(gm: fx.GraphModule,
                           found: list[tuple[fx.Node, fx.Node, fx.Node]] | None = None) -> int:
    """``x * g.expand_as(x)`` -> ``x * g`` (see :func:`_broadcast_expands`), so that an
    evaluated branch keeps its per-channel shape -- not one value per position of the example
    input -- and no longer reads ``x``. Returns how many operands were replaced."""
    found = _broadcast_expands(gm) if found is None else found
    for u, e, g in found:
        u.replace_input_with(e, g)
    for e in {e for _, e, _ in found}:
        if not e.users:
            gm.graph.erase_node(e)
    if found:
        gm.recompile()
    return len(found)


def evaluate_constants(gm: fx.GraphModule, example_inputs: tuple,
                       outputs: list | None = None) -> list[dict[str, Any]]:
    """Replace input-independent tensor subgraphs feeding the input-dependent graph by buffers.

    Args:
        gm: a GraphModule in eval mode (the constants are eval-mode values).
        example_inputs: inputs to run ``gm`` on once (this run also refreshes every node's
            ``tensor_meta``).
        outputs: if a list is given, the output of that run (before any change) is appended.

    Returns:
        One record per constant: ``{"node", "path", "shape", "buffer"}`` when baked, or
        ``{"node", "path", "refused": reason}`` when it had to stay a computation.
    """
    graph = gm.graph
    expands = _broadcast_expands(gm)
    reference = None
    if expands and outputs is not None:  # the reference output is the unchanged graph's
        with torch.no_grad():
            reference = gm(*example_inputs)
    drop_broadcast_expands(gm, expands)
    dep = value_dependent(graph)
    shape_dep: set[fx.Node] = set()
    for n in graph.nodes:
        if n in dep:
            continue
        if (reads_shape_only(n) and any(a in dep for a in n.all_input_nodes)) or \
                any(a in shape_dep for a in n.all_input_nodes):
            shape_dep.add(n)
    frontier = [n for n in graph.nodes
                if n not in dep and n.op in ("call_function", "call_method", "call_module")
                and not reads_shape_only(n) and any(u in dep for u in n.users)]
    from asrfx.tracing import ShapeRecorder  # the recorder lives with the tracer

    rec = ShapeRecorder(gm, keep=frontier)
    with torch.no_grad():
        out = rec.propagate(*example_inputs)
    if outputs is not None:
        outputs.append(out if reference is None else reference)
    records = []
    for n in frontier:
        v = rec.values.get(n)
        path = module_path(n)
        if not isinstance(v, torch.Tensor):
            continue
        broadcast_only = all(is_op(u, _BROADCAST_OPS) for u in n.users)
        if n in shape_dep:
            if not broadcast_only:
                records.append({"node": n.name, "path": path,
                                "refused": "its shape follows the input's; kept as computed"})
                continue
            if v.dim() >= 1 and v.shape[0] > 1:
                first = v[:1]
                if not torch.allclose(v, first.expand_as(v), rtol=1e-6, atol=0):
                    records.append({"node": n.name, "path": path,
                                    "refused": "differs across the batch; kept as computed"})
                    continue
                v = first.clone()
        name = unique_name(gm, f"{path}.asrfx_const" if path else "asrfx_const")
        set_attr_path(gm, name, v)
        with graph.inserting_before(n):
            c = graph.get_attr(name)
        n.replace_all_uses_with(c)
        records.append({"node": n.name, "path": path, "shape": tuple(v.shape), "buffer": name})
    safe_dce(gm)
    return records
