"""Sizes the graph fixes: shape reads whose value no input the model accepts can change.

A channel-attention branch reads sizes from the map it gates (``b, c = x.shape[:2]`` ...
``y.view(b, c, 1, 1)``). After the ASR rewrite the branch computes its gate from parameters
alone, and of the sizes it reads, the channel count is fixed by the layers (the map's BatchNorm
or conv, psi and the excitation's weights all have that many channels: a graph that read
another count would fail its ``view``), and the batch extent :func:`~.batch_rows.one_row` made
1 is 1. Such a size need not be read at every call: :func:`pin_sizes` writes it into the
branch as a number, and the shape reads nobody else uses go. A ResNet-164 with SE loses six
nodes per site (324 of 1,310), which every later pass, the generated code and each training
step no longer pay for. Sizes that vary with the input (a height, a sequence length, a batch
size read for anything but a shape) stay read.
"""

from __future__ import annotations

import operator
from typing import Any, Iterable

import torch
import torch.fx as fx

from .batch_rows import one_row
from .find_attention import channels_last, layouts
from .graph_utils import reads_shape_only, size_dim, tensor_shape

__all__ = ["VARIES", "channel_dims", "fixed_size", "input_dependence", "is_size", "pin_sizes"]


def channel_dims(gm: fx.GraphModule, x: fx.Node, ndim: int) -> set[int]:
    """The dim of ``x`` that holds its channels, where the graph tells: 1, or the last for
    channels-last maps and tokens. A rank-3 tensor whose layout the graph does not show
    (:func:`~.find_attention.layouts`: ``(N, C, L)`` or tokens ``(N, L, C)``) has none known:
    either of its dims 1 and 2 may be a length (XCiT's ``pos_embedding[:, :n]`` with ``n`` read
    from tokens that an einops ``pack`` returned)."""
    if ndim <= 2:
        return {ndim - 1}
    if ndim == 3:
        lay = layouts(gm, x)
        return {1} if lay == ("first",) else {2} if lay == ("last",) else set()
    return {ndim - 1} if channels_last(gm, x) else {1}


def input_dependence(graph: fx.Graph) -> tuple[set[fx.Node], set[fx.Node]]:
    """(the nodes that read an input in any way, its shape included; those whose values
    depend on it, :func:`~.graph_utils.value_dependent`) of ``graph``, in one walk over its
    nodes."""
    dep: set[fx.Node] = set()
    vdep: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op == "placeholder":
            dep.add(n)
            vdep.add(n)
            continue
        ins = n.all_input_nodes
        if any(a in dep for a in ins):
            dep.add(n)
            if n.op in _CALLS and not reads_shape_only(n) and any(a in vdep for a in ins):
                vdep.add(n)
    return dep, vdep


_CALLS = frozenset({"call_function", "call_method", "call_module"})


_SIZE_FUNCTIONS = {operator.getitem, operator.add, operator.sub, operator.mul,
                   operator.truediv, operator.floordiv, one_row}


def is_size(n: fx.Node, dep: set[fx.Node], vdep: set[fx.Node]) -> bool:
    """``n`` is a size read from an input's shape (``x.shape[1]``, ``one_row(x.shape)[0]``,
    arithmetic on such sizes only): not a tensor, and not computed from the input's values."""
    if n not in dep or n in vdep:
        return False
    if reads_shape_only(n):
        return True
    return n.op == "call_function" and n.target in _SIZE_FUNCTIONS and \
        all(is_size(a, dep, vdep) for a in n.all_input_nodes)


#: the value of a size that another input may change (see :func:`fixed_size`), and of a
#: whole shape whose rank is not known either
VARIES = object()
_VARIES_SHAPE = object()
_ARITHMETIC = {operator.add: operator.add, operator.sub: operator.sub,
               operator.mul: operator.mul, operator.floordiv: operator.floordiv,
               operator.truediv: operator.truediv}


def _fixed_size(gm: fx.GraphModule, n: fx.Node, dep: set[fx.Node], memo: dict) -> Any:
    """The value of size ``n`` (see :func:`is_size`) when it is the same for every input the
    model accepts, else ``VARIES``. Fixed are the extents the layers set (a map's channels,
    :func:`channel_dims`), the rank, and the batch extent :func:`one_row` sets to
    1; a batch size read otherwise, a spatial size or a sequence length varies. A shape may be
    partly fixed (``one_row(x.shape)[:2]`` of a conv's output is ``(1, C)`` at every size).

    Such a size needs no reading at every call: :func:`pin_sizes` writes it into the branch,
    the batched excitation takes it as a constant, and the per-site check that the batch used
    each site's own sizes (:func:`~.batch_excitations.excitation_row`) is settled once, here."""
    if n in memo:
        return memo[n]
    v: Any = VARIES
    if reads_shape_only(n) and n.args and n.args[0] in dep:
        v = _read_extents(gm, n, tensor_shape(n.args[0]))
    elif n.op == "call_function" and n.target is one_row and len(n.args) == 1 and \
            isinstance(n.args[0], fx.Node):
        s = _fixed_size(gm, n.args[0], dep, memo)
        # a shape gets batch extent 1; a number (a batch size, fixed or not) is 1
        v = (1, *s[1:]) if isinstance(s, tuple) and s else VARIES if isinstance(s, tuple) \
            else _VARIES_SHAPE if s is _VARIES_SHAPE else 1
    elif n.op == "call_function" and n.target is operator.getitem and len(n.args) == 2 and \
            isinstance(n.args[0], fx.Node) and isinstance(n.args[1], (int, slice)):
        s = _fixed_size(gm, n.args[0], dep, memo)
        if isinstance(s, tuple):
            try:
                v = s[n.args[1]]
            except IndexError:
                v = VARIES
        elif s is _VARIES_SHAPE and isinstance(n.args[1], slice):
            v = _VARIES_SHAPE
    elif n.op == "call_function" and n.target in _ARITHMETIC and len(n.args) == 2 and \
            not n.kwargs:
        a, b = (_fixed_size(gm, x, dep, memo) if isinstance(x, fx.Node) else x for x in n.args)
        if type(a) in (int, float) and type(b) in (int, float):
            try:
                v = _ARITHMETIC[n.target](a, b)
            except ZeroDivisionError:
                v = VARIES
    memo[n] = v
    return v


def _read_extents(gm: fx.GraphModule, n: fx.Node, shape: tuple[int, ...] | None) -> Any:
    """What shape read ``n`` of a tensor of ``shape`` (None: not recorded) returns, its varying
    extents ``VARIES``; a whole shape as a tuple (``torch.Size`` once no item of it varies),
    ``_VARIES_SHAPE`` where even its rank is unknown."""
    whole = n.op == "call_function" and n.target is getattr and n.args[1] == "shape" or \
        n.op == "call_method" and n.target == "size" and size_dim(n) is None
    if shape is None:
        return _VARIES_SHAPE if whole else VARIES
    ndim = len(shape)
    fixed = channel_dims(gm, n.args[0], ndim) - {0}  # dim 0: a batch, or a rank-1 length
    extents = tuple(e if d in fixed else VARIES for d, e in enumerate(shape))
    if whole:
        return extents
    if n.op == "call_function" and n.target is getattr and n.args[1] == "ndim" or \
            n.op == "call_method" and n.target in ("dim", "ndimension"):
        return ndim
    if n.op == "call_method" and n.target == "size":
        dim = size_dim(n)
        return extents[dim] if isinstance(dim, int) and -ndim <= dim < ndim else VARIES
    return VARIES  # numel, len (the batch), dtype, device


def _constant(v: Any) -> Any:
    """A fixed size as the program holds it (a shape as ``torch.Size``), or :data:`VARIES`."""
    if isinstance(v, tuple):
        return VARIES if any(e is VARIES for e in v) else torch.Size(v)
    return VARIES if v is _VARIES_SHAPE else v


def fixed_size(gm: fx.GraphModule, n: fx.Node, dep: set[fx.Node], memo: dict) -> Any:
    """The value of size ``n`` (see :func:`is_size`) as the program holds it (an ``int``, a
    whole shape as ``torch.Size``) when every input the model accepts gives it, else
    :data:`VARIES`. ``dep``: the first set of :func:`input_dependence`; ``memo``: a dict shared
    by the calls on one graph."""
    return _constant(_fixed_size(gm, n, dep, memo))


def pin_sizes(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> int:
    """Write the fixed sizes that ``nodes`` (a branch computed from parameters) read as numbers
    into their arguments, and erase the shape reads left unused. In place; the graph's code is
    not regenerated. Returns how many arguments became numbers.

    Only arguments of ``nodes`` change: a size the rest of the graph reads too stays read
    there. A size that varies (:func:`fixed_size`) stays an argument."""
    graph = gm.graph
    dep, vdep = input_dependence(graph)
    memo: dict[fx.Node, Any] = {}
    pinned = 0
    reads: set[fx.Node] = set()
    for u in nodes:
        if u in vdep or u.op in ("placeholder", "output") or is_size(u, dep, vdep):
            continue
        for a in u.all_input_nodes:
            if not is_size(a, dep, vdep):
                continue
            v = fixed_size(gm, a, dep, memo)
            if v is VARIES:
                continue
            u.replace_input_with(a, v)
            reads.add(a)
            pinned += 1
    # the shape reads nothing reads any more (a size is a pure read), consumers first
    chains: set[fx.Node] = set()
    todo = list(reads)
    while todo:
        n = todo.pop()
        if n not in chains and is_size(n, dep, vdep):
            chains.add(n)
            todo.extend(n.all_input_nodes)
    for n in reversed(list(graph.nodes)):
        if n in chains and not n.users:
            graph.erase_node(n)
    return pinned
