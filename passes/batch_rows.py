"""One row for a batch-independent branch: shape reads of the batch size become 1.

A constant branch (an ASR excitation fed psi, or any computation from parameters alone) may still
read the input's batch size: third-party attention writes ``b, c = x.shape[:2]`` and later
``y.view(b, c, 1, 1)``, and the branch is then computed for N identical rows. Identical in value
only up to rounding: a BLAS kernel may block N rows differently from one row, so row 0 and row 1
can differ in the last bit (this happens on AVX2 kernels with N = 2..4), and a row-by-row
comparison would take a constant for a batch-dependent value.

This pass rewrites such a branch so that it is *batch-independent by construction*: every shape
read of a value-dependent tensor whose result reaches the branch only as the batch extent of a
shape argument (``view``, ``reshape``, ``expand``, ``repeat``, ``new_zeros``...) is passed through
:func:`one_row`, which sets the batch extent to 1. The branch then computes one row, and the
elementwise op that applies it to ``x`` broadcasts that row over the batch, which is the same
value for every sample by definition (no comparison needed).

The rewrite is refused (and the branch left computing N rows) when the batch size reaches the
branch in any other way: through arithmetic (``b * c``), as a value (``torch.arange(b)``), as a
count (``x.numel()``), or when a value of the branch is read by anything other than the ops
allowed to broadcast it.
"""

from __future__ import annotations

import builtins
import operator
from typing import Any, Iterable

import torch
import torch.fx as fx

from .graph_utils import reads_shape_only, size_dim, tensor_shape

__all__ = ["one_row", "collapse_batch"]


def one_row(size: Any) -> Any:
    """The shape of one sample: ``size`` with its batch (first) extent set to 1.

    Args:
        size: a batch size (int or ``torch.SymInt``) or a full shape (``torch.Size``/tuple).

    Returns:
        ``1`` for a batch size; ``torch.Size((1, *size[1:]))`` for a shape.
    """
    if isinstance(size, fx.Proxy):  # re-traced (e.g. a pickled GraphModule loading back):
        return size.tracer.create_proxy("call_function", one_row, (size,), {})  # record it
    if isinstance(size, (int, torch.SymInt)):
        return 1
    return torch.Size((1, *size[1:]))

# methods and functions whose non-tensor arguments (after ``self`` / the input) are sizes:
# a batch extent there sets how many rows the result has and nothing else
_SIZE_METHODS = {"view", "reshape", "expand", "repeat", "new_zeros", "new_ones", "new_empty",
                 "broadcast_to"}
_SIZE_FUNCTIONS = {torch.reshape, torch.broadcast_to}
_FACTORIES = {torch.zeros, torch.ones, torch.empty}


def _batch_read(node: fx.Node, dep: set[fx.Node]) -> str | None:
    """What a shape read of a value-dependent tensor returns about the batch: ``"int"`` (the
    batch size), ``"size"`` (a shape whose first extent is the batch), ``"count"`` (a number
    that includes the batch: ``numel``), or None (nothing batch-related: rank, dtype, another
    dim's extent)."""
    if not reads_shape_only(node) or not node.args or node.args[0] not in dep:
        return None
    src = node.args[0]
    shape = tensor_shape(src)
    ndim = len(shape) if shape is not None else None
    if node.op == "call_method" and node.target == "size":
        dim = size_dim(node)
        if dim is None:
            return "size"
        if not isinstance(dim, int) or ndim is None:
            return "count"  # unknown which dim: treat as batch-dependent
        return "int" if dim % ndim == 0 else None
    if node.op == "call_function" and node.target is builtins.getattr:
        return "size" if node.args[1] == "shape" else None
    if node.op == "call_function" and node.target is builtins.len:
        return "int"
    if node.op == "call_method" and node.target in ("numel", "nelement"):
        return "count"
    return None


def _positions(node: fx.Node, target: fx.Node) -> list[Any]:
    """Where ``target`` occurs among ``node``'s arguments: argument indices and keyword names
    (nested lists/tuples count as their enclosing position)."""
    found = []

    def has(a: Any) -> bool:
        if a is target:
            return True
        if isinstance(a, (list, tuple)):
            return any(has(b) for b in a)
        return False

    for i, a in enumerate(node.args):
        if has(a):
            found.append(i)
    for k, a in node.kwargs.items():
        if has(a):
            found.append(k)
    return found


def _size_argument(user: fx.Node, value: fx.Node) -> bool:
    """``value`` (a batch size or a shape led by it) enters ``user`` only as a size."""
    where = _positions(user, value)
    if user.op == "call_method" and user.target in _SIZE_METHODS:
        return all((isinstance(p, int) and p >= 1) or p in ("size", "shape") for p in where)
    if user.op == "call_function" and user.target in _SIZE_FUNCTIONS:
        return all((isinstance(p, int) and p >= 1) or p == "shape" for p in where)
    if user.op == "call_function" and user.target in _FACTORIES:
        return all(isinstance(p, int) or p == "size" for p in where)
    return False


def _getitem_kind(index: Any, ndim: int | None) -> str | None:
    """The batch content of ``shape[index]`` for a shape led by the batch extent: "int" (the
    batch size), "size" (a shape still led by it), "count" (unknown), None (no batch)."""
    if isinstance(index, int):
        if ndim is None:
            return "int" if index == 0 else "count" if index < 0 else None
        return "int" if index % ndim == 0 else None
    if isinstance(index, slice) and ndim is not None and \
            all(isinstance(i, (int, type(None))) for i in (index.start, index.stop, index.step)):
        start, stop, step = index.start or 0, index.stop, index.step or 1
        if step > 0 and start % ndim == 0 and (stop is None or stop > 0 or -ndim < stop < 0):
            return "size"
        return None
    return "count"


def collapse_batch(gm: fx.GraphModule, nodes: Iterable[fx.Node], outs: Iterable[fx.Node],
                   dep: set[fx.Node]) -> tuple[bool, str | None]:
    """Make the input-independent subgraph ``nodes`` compute one row instead of N.

    Args:
        gm: the graph module (edited in place when the rewrite applies).
        nodes: the branch: nodes computed from parameters, buffers and shapes only (not in
            ``dep``).
        outs: the nodes allowed to read values of the branch from outside it; each must combine
            a branch value with a batch-N tensor by broadcasting (``x * g``, ``x + g``,
            ``g.expand_as(x)``), which is the caller's promise.
        dep: the value-dependent nodes of the graph (:func:`graph_utils.value_dependent`).

    Returns:
        (changed, reason): ``(True, None)`` when the branch now computes one row, ``(False,
        None)`` when it never read the batch size, ``(False, reason)`` when it was left as it is
        and why.
    """
    nodes, outs = set(nodes), set(outs)
    why = _close_branch(nodes, outs, dep)
    if why:
        return False, why
    feeds = _shape_feeds(nodes, dep)
    reads = {r: k for r in feeds if (k := _batch_read(r, dep)) is not None}
    if not reads:
        return False, None
    region = _batch_region(reads, nodes, feeds)
    if isinstance(region, str):
        return False, region
    # rewrite: the branch reads copies of the scalar chain that start from one_row(read)
    graph = gm.graph
    mapping: dict[fx.Node, fx.Node] = {}
    for r in reads:
        with graph.inserting_after(r):
            mapping[r] = graph.call_function(one_row, (r,))
    for c in sorted(region):  # in graph order (fx nodes compare by position)
        with graph.inserting_after(c):
            mapping[c] = graph.node_copy(c, lambda a: mapping.get(a, a))
    changed = False
    for n in nodes:
        for old in [a for a in n.all_input_nodes if a in mapping]:
            n.replace_input_with(old, mapping[old])
            changed = True
    for o in reversed(list(mapping.values())):
        if not o.users:
            graph.erase_node(o)
    return changed, None  # unchanged: the branch read only non-batch extents of the shape


def _close_branch(nodes: set[fx.Node], outs: set[fx.Node], dep: set[fx.Node]) -> str | None:
    """Add to ``nodes`` the constant computations hanging off the branch (an in-place op on a
    branch value, ``t.mul_(t.sigmoid())``, is not on the data path from psi to the gate but
    changes it); why not, when a branch value has a reader outside it and ``outs``."""
    stack = list(nodes)
    while stack:
        n = stack.pop()
        for u in n.users:
            if u not in nodes and u not in outs and u not in dep and u.op != "output":
                nodes.add(u)
                stack.append(u)
    for n in nodes:
        for u in n.users:
            if u not in nodes and u not in outs:
                return f"a value of the branch is also read by {u.name}"
    return None


def _shape_feeds(nodes: set[fx.Node], dep: set[fx.Node]) -> set[fx.Node]:
    """Shape-derived scalars feeding the branch: walked back from its arguments."""
    feeds: set[fx.Node] = set()
    stack = [a for n in nodes for a in n.all_input_nodes if a not in nodes]
    while stack:
        a = stack.pop()
        if a in feeds or a in nodes or a.op in ("get_attr", "placeholder") or a in dep:
            continue
        feeds.add(a)
        if not reads_shape_only(a):
            stack.extend(a.all_input_nodes)
    return feeds


def _batch_region(reads: dict[fx.Node, str], nodes: set[fx.Node], feeds: set[fx.Node]
                  ) -> set[fx.Node] | str:
    """The scalars carrying the batch size from ``reads`` to the branch (each use must be a
    size argument), or why the batch size reaches it otherwise."""
    # value -> (what it says about the batch, rank of the shape it is / slices)
    kinds: dict[fx.Node, tuple[str, int | None]] = {}
    for r, k in reads.items():
        shape = tensor_shape(r.args[0])
        kinds[r] = (k, len(shape) if shape is not None else None)
    stack = list(reads)
    region: set[fx.Node] = set()
    while stack:
        v = stack.pop()
        kind, ndim = kinds[v]
        if kind == "count":
            return f"{v.name} counts the batch (numel) and reaches the branch"
        for u in v.users:
            if u in nodes:
                if not _size_argument(u, v):
                    return f"the batch size reaches {u.name} other than as a size"
                continue
            if u not in feeds:
                continue  # a use outside the branch (e.g. x.view(b, -1)) keeps the real size
            if not (u.op == "call_function" and u.target is operator.getitem and
                    u.args[0] is v and kind == "size"):
                return f"the batch size reaches the branch through {u.name} ({u.target})"
            k = _getitem_kind(u.args[1], ndim)
            if k is None:
                continue  # a non-batch extent: unaffected by the rewrite
            kinds[u] = (k, ndim)
            region.add(u)
            stack.append(u)
    return region
