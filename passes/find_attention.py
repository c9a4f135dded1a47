"""Finding channel-attention sites by structure.

A site is a multiply ``x * g`` where

* ``x`` has shape ``(N, C, *S)`` with more than one spatial position, and ``g`` broadcasts per
  channel: shape ``(N or 1, C, 1, ..., 1)``;
* ``g`` depends on the values of the graph inputs only through *global reductions* (a pooled
  statistic: adaptive pooling to size 1, ``mean``/``amax``/``std``... over all spatial dims);
* every node between the statistics and ``g`` works on pooled, per-sample data (no spatial extent).

Class names are never consulted: Linear vs 1x1 conv excitation, sigmoid vs hand-written
hard-sigmoid gates, module vs functional vs tensor-method spellings all look the same here.
Candidates that are close but not safe to convert are returned as refusals with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
import operator
from torch import nn

from .graph_utils import ADD_OPS, MUL_OPS, is_op, module_path, prod, tensor_shape, value_dependent

__all__ = ["AttentionSite", "find_attention_sites", "is_global_reduction", "unexpand"]

_REDUCE_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                   nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
                   nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                   nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.LPPool1d, nn.LPPool2d)
_REDUCE_FUNCTIONS = {
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
    torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.logsumexp,
    torch.norm, torch.nn.functional.lp_pool2d, torch.nn.functional.lp_pool1d,
    torch.adaptive_avg_pool1d, torch.adaptive_max_pool1d, torch.avg_pool1d, torch.max_pool1d,
    torch.max_pool2d, torch.max_pool3d,
}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin", "std", "var", "logsumexp", "norm"}


@dataclass
class AttentionSite:
    """A channel-attention site in one graph.

    Attributes:
        mul: the node combining x and the gate: ``x * g`` or, for additive (global-context)
            attention, ``x + g``.
        x: the feature map being modulated.
        gate: the per-channel gate ``g``.
        stats: the global-reduction nodes the branch reads (pooled statistics).
        branch: nodes strictly between the statistics and the gate, gate included, in graph order.
        path: module path of the site (the module the multiply was traced in).
        channels: C.
        fusion: "mul" or "add".
    """

    mul: fx.Node
    x: fx.Node
    gate: fx.Node
    stats: list[fx.Node]
    branch: list[fx.Node]
    path: str
    channels: int
    fusion: str = "mul"
    extra: dict = field(default_factory=dict)


_ADAPTIVE_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                     nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_ADAPTIVE_FUNCTIONS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                       F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
                       torch.adaptive_avg_pool1d, torch.adaptive_max_pool1d}
_MATMULS = {torch.matmul, torch.bmm, operator.matmul, "matmul", "bmm"}


def _is_adaptive_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), _ADAPTIVE_MODULES)
    return node.op == "call_function" and node.target in _ADAPTIVE_FUNCTIONS


def is_statistic(gm: fx.GraphModule, node: fx.Node, dep: set) -> bool:
    """A pooled descriptor of a feature map: what ASR replaces by psi.

    * a global reduction over all spatial dims (adaptive pooling to 1, ``mean``/``amax``/``std``
      ... over every spatial dim): ``(N, C, *S) -> (N, C[, 1...])``;
    * adaptive pooling to a fixed size (a spatial pyramid level): ``(N, C, *S) -> (N, C, *s)``,
      with ``s`` independent of the input size;
    * attention pooling by matrix product (global context): ``(N, C, L) @ (N, L, 1) -> (N, C, 1)``.
    """
    if is_global_reduction(gm, node):
        return True
    src = node.args[0] if node.args else None
    ins, outs = tensor_shape(src), tensor_shape(node)
    if ins is None or outs is None or len(ins) < 3:
        return False
    if _is_adaptive_pool(gm, node):
        return tuple(outs[:2]) == tuple(ins[:2])
    if (node.op in ("call_function", "call_method")) and node.target in _MATMULS:
        if len(outs) >= 2 and all(d == 1 for d in outs[2:]) and \
                any(isinstance(a, fx.Node) and a in dep and tensor_shape(a) is not None
                    and len(tensor_shape(a)) == 3 and tensor_shape(a)[:2] == tuple(outs[:2])
                    and tensor_shape(a)[2] > 1 for a in node.args[:2]):
            return True
    return False


def is_global_reduction(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A node that reduces all spatial dims of an ``(N, C, *S)`` tensor to 1 (or drops them)."""
    if node.op == "call_module":
        if not isinstance(gm.get_submodule(str(node.target)), _REDUCE_MODULES):
            return False
    elif node.op == "call_function":
        if node.target not in _REDUCE_FUNCTIONS:
            return False
    elif node.op == "call_method":
        if node.target not in _REDUCE_METHODS:
            return False
    else:
        return False
    src = node.args[0] if node.args else None
    ins, outs = tensor_shape(src), tensor_shape(node)
    if ins is None or outs is None or len(ins) < 3:
        return False
    if tuple(outs[:2]) == tuple(ins[:2]) and all(d == 1 for d in outs[2:]):
        return True  # channels first: (N, C, *S) -> (N, C[, 1...])
    # tokens (N, L, C) -> (N, C) or (N, 1, C): a pooling over the tokens; channels-last maps
    # (N, *S, C) -> (N, C) or (N, 1.., C) when the layout is known to be channels last
    if node.op in ("call_function", "call_method") and outs[0] == ins[0] \
            and outs[-1] == ins[-1] and prod(ins[1:-1]) > 1 and prod(outs[1:-1]) == 1 \
            and len(outs) in (2, len(ins)) and outs[-1] > 1 \
            and ((len(ins) == 3 and not channels_first(gm, src)) or channels_last(gm, src)):
        return True
    return False


_ELEMENTWISE_MODULES = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Identity,
                        nn.Dropout, nn.Tanh, nn.Sigmoid)
_ELEMENTWISE_FUNCTIONS = {F.relu, torch.relu, F.gelu, F.silu, F.leaky_relu, F.dropout,
                          torch.tanh, torch.sigmoid, "relu", "gelu", "contiguous"}
_PERMUTES = {torch.permute, "permute"}


def permute_dims(node: fx.Node) -> tuple[int, ...] | None:
    """The dims of a ``permute`` node (method or function, dims spread or as one tuple)."""
    if node.op not in ("call_function", "call_method") or node.target not in _PERMUTES:
        return None
    dims = node.args[1:] if len(node.args) > 1 else node.kwargs.get("dims", ())
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    if not dims or not all(isinstance(d, int) for d in dims):
        return None
    return tuple(d % len(dims) for d in dims)


def channels_last(gm: fx.GraphModule, node, depth: int = 6) -> bool:
    """Whether a rank >= 4 tensor is known to carry its channels in the last dim.

    A shape alone cannot tell ``(N, H, W, C)`` from ``(N, C, H, W)``; the graph can: the tensor
    comes (through elementwise ops) from a LayerNorm over the last dim, a Linear, or a permute
    that moves dim 1 to the end (ConvNeXt's ``x.permute(0, 2, 3, 1)``).
    """
    shape = tensor_shape(node)
    if not isinstance(node, fx.Node) or shape is None or len(shape) < 3:
        return False
    last = shape[-1]
    for _ in range(depth):
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            if isinstance(mod, nn.LayerNorm):
                return tuple(mod.normalized_shape) == (last,)
            if isinstance(mod, nn.Linear):
                return mod.out_features == last
            if not isinstance(mod, _ELEMENTWISE_MODULES):
                return False
        elif node.op in ("call_function", "call_method"):
            dims = permute_dims(node)
            if dims is not None:
                return dims[-1] == 1
            if node.target in (F.layer_norm, F.linear):
                return True
            if node.target not in _ELEMENTWISE_FUNCTIONS and not is_op(node, MUL_OPS) \
                    and not is_op(node, ADD_OPS):
                return False
        else:
            return False
        nxt = node.args[0] if node.args else None
        if not (isinstance(nxt, fx.Node) and tensor_shape(nxt) == shape):
            return False
        node = nxt
    return False


_CHANNELS_FIRST_MODULES = (nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d, nn.InstanceNorm1d,
                           nn.GroupNorm, nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d,
                           nn.AdaptiveMaxPool1d, nn.LPPool1d)
_CHANNELS_FIRST_FUNCTIONS = {F.conv1d, torch.conv1d, F.conv_transpose1d, F.batch_norm,
                             F.instance_norm, F.group_norm, F.max_pool1d, F.avg_pool1d,
                             F.adaptive_avg_pool1d, F.adaptive_max_pool1d, F.lp_pool1d,
                             torch.max_pool1d, torch.avg_pool1d, torch.adaptive_avg_pool1d,
                             torch.adaptive_max_pool1d}


def channels_first(gm: fx.GraphModule, node, depth: int = 8) -> bool:
    """Whether a rank-3 tensor is known to be a channels-first 1-D map ``(N, C, L)``.

    Rank-3 tensors are taken for tokens ``(N, L, C)`` unless the graph shows otherwise: the
    tensor comes (through elementwise ops, sums and products of same-shape tensors, or a concat
    over dim 1) from a Conv1d, a norm over dim 1 (BatchNorm1d, InstanceNorm1d, GroupNorm) or a
    1-D pooling. A per-position gate ``(N, 1, L)`` of such a map is spatial attention, not a
    channel gate over tokens.
    """
    shape = tensor_shape(node)
    if not isinstance(node, fx.Node) or shape is None or len(shape) != 3:
        return False
    seen: set = set()
    stack = [(node, 0)]
    while stack:
        n, d = stack.pop()
        if n in seen or d > depth:
            continue
        seen.add(n)
        if n.op == "call_module":
            mod = gm.get_submodule(str(n.target))
            if isinstance(mod, _CHANNELS_FIRST_MODULES):
                return True
            if not isinstance(mod, _ELEMENTWISE_MODULES):
                continue
        elif n.op in ("call_function", "call_method"):
            if n.target in _CHANNELS_FIRST_FUNCTIONS:
                return True
            if n.target in (torch.cat, torch.concat):
                dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
                parts = n.args[0] if n.args else ()
                if dim in (1, -2) and isinstance(parts, (list, tuple)):
                    stack.extend((a, d + 1) for a in parts if isinstance(a, fx.Node))
                continue
            if n.target not in _ELEMENTWISE_FUNCTIONS and not is_op(n, MUL_OPS) and \
                    not is_op(n, ADD_OPS):
                continue
        else:
            continue
        here = tensor_shape(n)
        stack.extend((a, d + 1) for a in n.all_input_nodes
                     if here is not None and tensor_shape(a) is not None
                     and len(tensor_shape(a)) == 3 and tensor_shape(a)[1] == here[1])
    return False


def channel_axis(xs: tuple | None, gs: tuple | None, last: bool = False,
                 first: bool = False) -> int | None:
    """1 when ``g`` scales ``x`` per channel in channels-first layout, -1 for tokens
    ``(N, L, C)`` or channels-last maps ``(N, *S, C)`` scaled per channel (the last dim),
    None otherwise.

    Channels-last is assumed for rank-3 tensors (tokens) unless ``first`` says the graph shows a
    channels-first 1-D map (:func:`channels_first`) and, for rank >= 4, only when ``last`` says
    the graph shows that layout (:func:`channels_last`): on a 4-D map, ``(N, 1, 1, W)`` would as
    well describe a spatial gate over the width.
    """
    if xs is None or gs is None or len(xs) < 3 or len(gs) > len(xs):
        return None
    gs = (1,) * (len(xs) - len(gs)) + tuple(gs)
    if gs[1] == xs[1] and gs[0] in (1, xs[0]) and all(d == 1 for d in gs[2:]) and \
            not (last and len(xs) > 3):
        return 1
    if ((len(xs) == 3 and not first) or last) and gs[-1] == xs[-1] and gs[0] in (1, xs[0]) and \
            all(d == 1 for d in gs[1:-1]) and prod(xs[1:-1]) > 1 and xs[-1] > 1:
        return -1
    return None


def _spatial_gate(xs: tuple | None, gs: tuple | None) -> bool:
    """``g`` is one value per position (``(N, 1, *S)``) over a feature map ``(N, C, *S)``."""
    return (xs is not None and gs is not None and len(xs) >= 3 and len(gs) == len(xs)
            and gs[1] == 1 and xs[1] > 1 and tuple(gs[2:]) == tuple(xs[2:]) and prod(xs[2:]) > 1)


def _per_channel(xs: tuple, gs: tuple, last: bool = False, first: bool = False) -> bool:
    if len(xs) >= 3 and len(gs) == len(xs) and channel_axis(xs, gs, last, first) == -1 and \
            not (gs[1] == xs[1] and all(d == 1 for d in gs[2:]) and not last):
        return True  # channels last
    if len(xs) < 3 or len(gs) != len(xs) or (last and len(xs) > 3):
        return False
    return gs[1] == xs[1] and gs[0] in (1, xs[0]) and all(d == 1 for d in gs[2:])


def _spatial_size(xs: tuple, last: bool) -> int:
    return prod(xs[1:-1]) if last else prod(xs[2:])


def _pooled_nodes(gm: fx.GraphModule, dep: set[fx.Node]) -> set[fx.Node]:
    """Input-dependent nodes that see the input only through pooled statistics: a statistic, or
    a node whose input-dependent arguments are all such nodes (graph order is topological)."""
    pooled: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n not in dep or n.op == "placeholder":
            continue
        if is_statistic(gm, n, dep):
            pooled.add(n)
            continue
        ins = [a for a in n.all_input_nodes if a in dep]
        if ins and all(a in pooled for a in ins):
            pooled.add(n)
    return pooled


def _trace_branch(gm: fx.GraphModule, gate: fx.Node, dep: set[fx.Node],
                  xs: tuple | None = None, last: bool = False, first: bool = False,
                  pooled: Callable[[], set[fx.Node]] | None = None
                  ) -> tuple[list[fx.Node], set[fx.Node]] | str:
    """Walk back from the gate over input-dependent nodes, stopping at pooled statistics.

    ``xs`` (the shape of the modulated feature map) lets the walk stop early at a node of the
    same resolution: the gate then reads the feature map itself, not a statistic of it. A shape
    can coincide by chance (ECA's ``(N, 1, C)`` descriptor of a 1-D map ``(N, C, L)`` with
    ``L == C``): ``pooled`` (the nodes :func:`_pooled_nodes` finds, computed on first use) tells
    pooled data from the feature map.

    Returns (stats, branch nodes) or a string saying why this is not a channel-attention branch.
    """
    stats: list[fx.Node] = []
    branch: set[fx.Node] = set()
    stack = [gate]
    while stack:
        n = stack.pop()
        if n in branch or n in stats:
            continue
        if is_statistic(gm, n, dep):
            stats.append(n)
            continue
        if n.op == "placeholder":
            return "reads the model input directly"
        shape = tensor_shape(n)
        if xs is not None and shape is not None and len(shape) == len(xs):
            sp = (slice(1, -1) if channel_axis(xs, tuple(shape), last, first) == -1
                  else slice(2, None))
            if prod(xs[sp]) > 1 and tuple(shape[sp]) == tuple(xs[sp]) and \
                    (pooled is None or n not in pooled()):
                return "reads a feature map with spatial extent (not a global statistic)"
        branch.add(n)
        stack.extend(a for a in n.all_input_nodes if a in dep)
    if not stats:
        return "no global reduction found"
    return stats, branch


def unexpand(g: Any, x: Any) -> Any:
    """``g0`` when ``g`` is ``g0.expand_as(x)`` or ``g0.expand(...)`` to ``x``'s shape: a multiply
    (or add) by ``x`` broadcasts ``g0`` to the same values (the common SE spelling
    ``x * y.expand_as(x)``). Else ``g`` itself."""
    if isinstance(g, fx.Node) and g.op == "call_method" and g.target in ("expand_as", "expand") \
            and g.args and isinstance(g.args[0], fx.Node) and isinstance(x, fx.Node):
        if g.target == "expand_as" and len(g.args) == 2 and g.args[1] is x and not g.kwargs:
            return g.args[0]
        shape, inner = tensor_shape(g), tensor_shape(g.args[0])
        if g.target == "expand" and shape is not None and shape == tensor_shape(x) and \
                inner is not None and len(inner) <= len(shape):
            return g.args[0]
    return g


def find_attention_sites(gm: fx.GraphModule) -> tuple[list[AttentionSite], list[tuple[str, str]]]:
    """Find every channel-attention site in ``gm`` (shape metadata required).

    Returns:
        (sites, refusals) where refusals are ``(module path, reason)`` for per-channel multiplies
        that look like attention but cannot be converted safely.
    """
    dep = value_dependent(gm.graph)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    sites: list[AttentionSite] = []
    refusals: list[tuple[str, str]] = []
    by_gate: dict[fx.Node, AttentionSite] = {}
    cache: dict[str, set[fx.Node]] = {}

    def pooled() -> set[fx.Node]:
        if "pooled" not in cache:
            cache["pooled"] = _pooled_nodes(gm, dep)
        return cache["pooled"]

    for node in gm.graph.nodes:
        is_mul = is_op(node, MUL_OPS)
        if not (is_mul or is_op(node, ADD_OPS)) or len(node.args) < 2:
            continue
        a, b = node.args[0], node.args[1]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        for x, g in ((a, b), (b, a)):
            xs = tensor_shape(x)
            g = unexpand(g, x)  # x * g.expand_as(x) multiplies like x * g
            gs = tensor_shape(g)
            last = xs is not None and len(xs) > 3 and channels_last(gm, x)
            first = xs is not None and len(xs) == 3 and channels_first(gm, x)
            if is_mul and not last and _spatial_gate(xs, gs) and \
                    channel_axis(xs, gs, first=first) is None and g in dep and x in dep:
                refusals.append((module_path(node), "spatial attention (an input-dependent gate "
                                 "per position, not per channel): it stays as it is"))
                break
            if xs is None or gs is None or not _per_channel(xs, gs, last, first):
                continue
            if not is_mul and (_spatial_size(xs, last) == 1 or x not in dep):
                continue  # an additive site modulates a feature map
            if g not in dep:
                break  # already input-independent: a constant scale (fold's business)
            if _spatial_size(xs, last) == 1 and not isinstance(_trace_branch(gm, x, dep), str):
                break  # x is itself pooled data (e.g. a swish inside an excitation branch)
            found = _trace_branch(gm, g, dep, xs, last, first, pooled)
            if isinstance(found, str):
                if "spatial extent" not in found:
                    refusals.append((module_path(node), f"per-channel multiply whose gate {found}"))
                break
            stats, branch = found
            if x in branch:
                refusals.append((module_path(node), "the gate depends on x other than by pooling"))
                break
            if node.op == "call_method" and node.target in ("mul_", "add_") and \
                    node.args[0] is g:
                refusals.append((module_path(node), "in-place op into the gate"))
                break
            if g in by_gate:  # one gate scaling several tensors: one site, one psi
                by_gate[g].extra.setdefault("more_muls", []).append(node)
                break
            stats.sort(key=order.__getitem__)
            sites.append(AttentionSite(mul=node, x=x, gate=g, stats=stats,
                                       branch=sorted(branch, key=order.__getitem__),
                                       path=module_path(node),
                                       channels=int(xs[channel_axis(xs, gs, last, first) or 1]),
                                       fusion="mul" if is_mul else "add"))
            by_gate[g] = sites[-1]
            break
    return sites, refusals
