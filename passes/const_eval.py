"""Constant evaluation: input-independent branches become constant buffers.

After the ASR rewrite an attention branch depends on the input only through its shape (psi is
expanded to the batch size). In eval mode its value is a constant; this pass runs the graph once
on example inputs, records the value of every input-independent tensor that feeds the
input-dependent part of the graph, and replaces the branch with a buffer. Values that were
expanded over the batch are stored with batch 1 (they only meet the input through broadcasting).
"""

from __future__ import annotations

import math
from typing import Any
import operator


import torch
import torch.fx as fx

from asrfx.report import Site

from .batch_rows import _shape_feeds, collapse_batch, one_row
from .graph_utils import (drop_dead, safe_dce, ADD_OPS, MUL_OPS, SUB_OPS, reads_shape_only, is_op,
                          module_path, set_attr_path, stable_toposort, tensor_shape, unique_name,
                          size_dim, value_dependent)
from .protocol import PassContext, record
from .shapes import ShapeRecorder
from .sizes import channel_dims

__all__ = ["evaluate_constants", "rows_agree", "channel_dims"]

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


def _tensor_valued(n: fx.Node) -> bool:
    return n.op == "get_attr" or hasattr(n.meta.get("tensor_meta"), "shape")


def _region(targets: list[fx.Node], dep: set[fx.Node]) -> set[fx.Node]:
    """The tensor nodes that compute ``targets`` from parameters, buffers and shapes alone."""
    seen: set[fx.Node] = set()
    stack = list(targets)
    while stack:
        n = stack.pop()
        if n in seen or n in dep or reads_shape_only(n) or not _tensor_valued(n):
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def rows_agree(v: torch.Tensor) -> bool:
    """Whether every row of ``v`` equals the first within the rounding of ``v``'s dtype.

    Only for a branch whose batch size could not be reduced to one row (it reaches the branch
    other than as a size): N rows computed by one kernel may differ in the last bits, so they
    are compared to ``16 * eps`` of the largest magnitude, never bit for bit."""
    first = v[:1].expand_as(v)
    if not v.is_floating_point():
        return bool(torch.equal(v, first))
    eps = torch.finfo(v.dtype).eps
    scale = float(v.detach().abs().max()) if v.numel() else 0.0
    if not math.isfinite(scale):
        return False
    return bool(((v - first).abs() <= 16 * eps * max(scale, torch.finfo(v.dtype).tiny)).all())


def evaluate_constants(gm: fx.GraphModule, ctx: PassContext) -> list[Site]:
    """Replace input-independent tensor subgraphs feeding the input-dependent graph by buffers.

    A subgraph that reads the input's batch size only to give its result N rows (an expanded
    psi, ``y.view(b, c, 1, 1)``) is first rewritten to compute one row
    (:func:`batch_rows.collapse_batch`), and that row is the buffer: the op applying it to the
    input broadcasts it. Rows are never compared for this; only a branch that uses the batch
    size otherwise is evaluated at the example's batch size and kept unless its rows agree.

    Args:
        gm: a GraphModule in eval mode (the constants are eval-mode values).
        ctx: ``ctx.inputs`` are the inputs to run ``gm`` on (these runs also refresh every
            node's ``tensor_meta``); the output of the unchanged graph is stored in
            ``ctx.reference``. When ``ctx.reference`` is given (the graph's shapes are current
            for the inputs, see :class:`PassContext`), the graph runs only if it has constants
            to evaluate.

    Returns:
        A "constant branch" record (kept, with a code: ``shape-follows-input``,
        ``batch-dependent``) for each input-independent value that had to stay a
        computation; baked constants are reported by the passes that fold them.
    """
    graph = gm.graph
    expands = _broadcast_expands(gm)
    given = ctx.reference is not None  # then the graph has just run on the inputs
    rec: ShapeRecorder | None = None
    if expands:  # the reference output is the unchanged graph's
        if not given:
            with torch.no_grad():
                ctx.reference = ShapeRecorder(gm).propagate(*ctx.inputs)
        drop_broadcast_expands(gm, expands)
        dep, shape_dep, frontier = _frontier(graph)
    else:
        dep, shape_dep, frontier = _frontier(graph)
        if frontier or not given:
            rec = ShapeRecorder(gm, keep=frontier)
            with torch.no_grad():
                out = rec.propagate(*ctx.inputs)
            if not given:
                ctx.reference = out
    if _drop_constant_guards(graph, dep, shape_dep):
        dep, shape_dep, frontier = _frontier(graph)
    rows: str | None = None
    targets = [n for n in frontier if n in shape_dep and _broadcast_only(n)]
    if targets:
        others = [n for n in frontier if n not in targets]
        nodes = _region(targets, dep) - _region(others, dep)
        outs = {u for n in targets for u in n.users}
        changed, rows = collapse_batch(gm, nodes, outs, dep)
        if changed:
            stable_toposort(graph)
            rec = None
    if rec is None and frontier:  # (no constants: the run above, if any, recorded the shapes)
        rec = ShapeRecorder(gm, keep=frontier)
        with torch.no_grad():
            rec.propagate(*ctx.inputs)
    evaluated = _region(list(frontier), dep)
    records = [r for n in frontier
               if (r := _bake(gm, n, rec.values.get(n), n in shape_dep, rows,
                              n in shape_dep and _reads_varying_extent(gm, n, dep)))
               is not None]
    safe_dce(gm)
    # the calls that computed the baked values ran: opaque ones too go once nothing reads them
    drop_dead(gm, evaluated)
    return records


def _frontier(graph: fx.Graph) -> tuple[set, set, list]:
    """(value-dependent nodes, constants whose shape follows the input's, the constants the
    input-dependent graph reads)."""
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
    return dep, shape_dep, frontier


def _drop_constant_guards(graph: fx.Graph, dep: set, shape_dep: set) -> bool:
    """Remove ``torch._assert`` guards on values computed from parameters alone (a traced
    shape condition inside an ASR branch): they held when the graph ran on the example, and
    always will; left in, they would keep the branch computing at every call."""
    found = [n for n in graph.nodes if n.op == "call_function" and n.target is torch._assert
             and not any(a in dep or a in shape_dep for a in n.all_input_nodes)]
    for n in found:
        graph.erase_node(n)
    return bool(found)


def _reads_varying_extent(gm: fx.GraphModule, n: fx.Node, dep: set[fx.Node]) -> bool:
    """Whether constant ``n`` is computed from an extent of a value-dependent tensor other than
    its batch (which :func:`~.batch_rows.collapse_batch` made one row, or the rows check
    covers) and its channels (fixed by the layers): a spatial size or a sequence length,
    which another input changes (EdgeNeXt's Fourier position encoding is computed from
    ``torch.zeros(x.shape)``). The rank, dtype and device are fixed too. A shape read whole
    counts by the items its readers take (``b, c = x.shape[:2]``), else as every extent."""
    ancestors = _shape_feeds({n}, dep) | {n}
    for r in ancestors:
        if not reads_shape_only(r) or not r.args or r.args[0] not in dep:
            continue
        shape = tensor_shape(r.args[0])
        if shape is None:
            return True
        fixed = {0} | channel_dims(gm, r.args[0], len(shape))
        if any(d not in fixed for d in _extents_read(r, len(shape), ancestors)):
            return True
    return False


def _extents_read(r: fx.Node, ndim: int, within: set[fx.Node]) -> set[int]:
    """The dims whose extents shape read ``r`` passes on to the nodes in ``within``."""
    everything = set(range(ndim))
    if r.op == "call_method" and r.target in ("dim", "ndimension", "get_device"):
        return set()
    if r.op == "call_function" and r.target is getattr and r.args[1] != "shape":
        return set()  # ndim, dtype, device, layout
    if r.op == "call_method" and r.target == "size":
        dim = size_dim(r)
        if isinstance(dim, int):
            return {dim % ndim}
        if dim is not None:
            return everything
    elif r.op == "call_function" and r.target is len:
        return {0}
    elif not (r.op == "call_function" and r.target is getattr):
        return everything  # numel and the like
    return _items_taken(r, ndim, within)


def _items_taken(shape: fx.Node, ndim: int, within: set[fx.Node]) -> set[int]:
    """The items of a whole shape value that its readers in ``within`` take."""
    out: set[int] = set()
    for u in shape.users:
        if u not in within:
            continue
        if u.op == "call_function" and u.target is operator.getitem and u.args[0] is shape:
            index = u.args[1]
            if isinstance(index, int):
                out.add(index % ndim)
                continue
            if isinstance(index, slice):
                taken = list(range(ndim))[index]
                out |= _items_of_slice(u, taken, within)
                continue
            return set(range(ndim))
        if u.op == "call_function" and u.target is one_row:
            out |= _items_taken(u, ndim, within) - {0}
            continue
        if u.op == "call_function" and u.target is len:
            continue
        return set(range(ndim))
    return out


def _items_of_slice(part: fx.Node, taken: list[int], within: set[fx.Node]) -> set[int]:
    """The dims (of the original shape) a slice ``part`` of it passes on: those its readers
    index, or all it holds."""
    sub = _items_taken(part, len(taken), within) if taken else set()
    return {taken[i] for i in sub if i < len(taken)}


def _broadcast_only(n: fx.Node) -> bool:
    return all(is_op(u, _BROADCAST_OPS) for u in n.users)


def _bake(gm: fx.GraphModule, n: fx.Node, v: Any, shape_dep: bool, rows: str | None,
          varying: bool = False) -> Site | None:
    """Replace constant ``n`` (value ``v``) by a buffer; a record when it has to stay
    (``varying``: it reads an extent of the input that another input may change)."""
    if not isinstance(v, torch.Tensor):
        return None
    path = module_path(n)
    if shape_dep:
        if varying:
            return record(f"const:{n.name}", path, "constant branch", 0,
                          reason="computed from parameters and the input's spatial size or "
                                 "length, which another input changes; kept as computed",
                          code="shape-follows-input")
        if not _broadcast_only(n):
            return record(f"const:{n.name}", path, "constant branch", 0,
                          reason="its shape follows the input's; kept as computed",
                          code="shape-follows-input")
        if v.dim() >= 1 and v.shape[0] > 1:
            if not rows_agree(v):
                why = f" ({rows})" if rows else ""
                return record(f"const:{n.name}", path, "constant branch", 0,
                              reason=f"differs across the batch{why}; kept as computed",
                              code="batch-dependent")
            v = v[:1].clone()
    name = unique_name(gm, f"{path}.asrfx_const" if path else "asrfx_const")
    set_attr_path(gm, name, v)
    with gm.graph.inserting_before(n):
        c = gm.graph.get_attr(name)
    n.replace_all_uses_with(c)
    return None
