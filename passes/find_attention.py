"""Finding channel-attention sites by structure.

A site is a multiply ``x * g`` where

* ``x`` has shape ``(N, C, *S)`` with more than one spatial position, and ``g`` broadcasts per
  channel: shape ``(N or 1, C, 1, ..., 1)``;
* ``g`` depends on the values of the graph inputs only through *global reductions* (a pooled
  statistic: adaptive pooling to size 1, ``mean``/``amax``/``std``... over all spatial dims);
* every node between the statistics and ``g`` works on pooled, per-sample data (no spatial extent).

A statistic reduces *all* positions of the map it pools and keeps that map's channels, so psi (the
statistic's shape with batch 1) never carries a spatial or token extent and the prepared model runs
at any input size. Shapes alone cannot promise that: ``(N, L, C) @ w`` with a learned ``w`` of shape
``(C, 1)`` gives ``(N, L, 1)``, the shape of a pooled ``(N, C, 1)`` column, yet it scores each
token. So the layout of the pooled map is read from the graph (:func:`channels_first`,
:func:`channels_last`, :func:`tokens`), a reduction must name every position dim, a product counts
as pooling only when both factors depend on the input and the summed dim is every position of one
feature map (:func:`matmul_pooling`), and every site's psi is checked once more
(:func:`psi_extent`).

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

from asrfx.report import Site
from .graph_utils import (ADD_OPS, MUL_OPS, is_op, module_path, prod, submodule, tensor_shape,
                          value_dependent)

__all__ = ["AttentionSite", "find_attention_sites", "is_global_reduction", "is_statistic",
           "matmul_pooling", "psi_extent", "tokens", "unexpand"]

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
_DIM_REDUCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var,
                   torch.logsumexp, torch.norm}


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
        more_muls: further nodes applying the same gate to other tensors (one site, one psi).

    Written by the ASR rewrite (:func:`asrfx.passes.asr_rewrite.apply_asr`), read by the
    pipeline's report:
        psi_nodes: the nodes standing for psi where the statistics were (psi's get_attr,
            expanded to the batch); the one-row rewrite that follows reads and removes them.
        asr_mul: mode "both": the multiply applying the added ASR copy's gate.
        frozen_norms: paths of norms in the branch switched to their running statistics.
        rows: why the branch still runs on psi expanded to the batch, if it does.

    Written by :func:`asrfx.passes.asr_rewrite.gates_before_batch_norm`:
        after_norms: (name, node) of the BatchNorm calls whose outputs the constant gate
            scales (or shifts) instead of ``x``: a training-mode norm reading ``x * g`` would
            cancel it.
    """

    mul: fx.Node
    x: fx.Node
    gate: fx.Node
    stats: list[fx.Node]
    branch: list[fx.Node]
    path: str
    channels: int
    fusion: str = "mul"
    more_muls: list[fx.Node] = field(default_factory=list)
    psi_nodes: list[fx.Node] = field(default_factory=list)
    asr_mul: fx.Node | None = None
    frozen_norms: list[str] = field(default_factory=list)
    rows: str | None = None
    after_norms: list[tuple[str, fx.Node]] = field(default_factory=list)

    def refused(self, reason: str, code: str) -> tuple["AttentionSite", Site]:
        """This site with the record of a pass refusing it (``code``, ``reason``)."""
        return self, Site(self.path, "channel-attention", self.channels, "refused", "", reason,
                          code)


_ADAPTIVE_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                     nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_ADAPTIVE_FUNCTIONS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                       F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
                       torch.adaptive_avg_pool1d, torch.adaptive_max_pool1d}
_MATMULS = {torch.matmul, torch.bmm, operator.matmul, "matmul", "bmm"}


def _is_adaptive_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(submodule(gm, node.target), _ADAPTIVE_MODULES)
    return node.op == "call_function" and node.target in _ADAPTIVE_FUNCTIONS


def _adaptive_size(gm: fx.GraphModule, node: fx.Node) -> tuple | None:
    """The ``output_size`` of an adaptive pooling node, as a tuple (None where unknown)."""
    if node.op == "call_module":
        size = getattr(submodule(gm, node.target), "output_size", None)
    else:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
    if isinstance(size, int):
        return (size,)
    if isinstance(size, (tuple, list)):
        return tuple(size)
    return None


def _fixed_size(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An adaptive pooling whose output size is fixed in every dim: ``AdaptiveAvgPool2d((None,
    1))`` keeps the rows, whatever the example's height is. Other nodes: True."""
    if not _is_adaptive_pool(gm, node):
        return True
    size = _adaptive_size(gm, node)
    return size is not None and all(isinstance(d, int) and not isinstance(d, bool) for d in size)


def _reduced_dims(node: fx.Node, rank: int) -> set[int] | None:
    """The dims a ``mean``/``sum``/``amax``... call reduces, or None when the call does not say
    (pooling modules and functions, a dim computed at run time)."""
    if not (node.op == "call_method" and node.target in _REDUCE_METHODS or
            node.op == "call_function" and node.target in _DIM_REDUCTIONS):
        return None  # pooling modules and functions: kernel and output sizes, no dims
    is_norm = node.target in (torch.norm, "norm")
    pos = 2 if is_norm else 1
    dim = node.kwargs.get("dim", node.args[pos] if len(node.args) > pos else None)
    if isinstance(dim, bool) or dim is None:
        return None
    dims = (dim,) if isinstance(dim, int) else dim
    if not isinstance(dims, (tuple, list)) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in dims):
        return None
    return {d % rank for d in dims}


def _reduces_all(node: fx.Node, positions: range, rank: int) -> bool:
    """The reduction names every position dim (size-1 ones too: at another input size they have
    an extent). True when the call does not name its dims (the shapes decide then)."""
    dims = _reduced_dims(node, rank)
    return dims is None or set(positions) <= dims


def is_statistic(gm: fx.GraphModule, node: fx.Node, dep: set) -> bool:
    """A pooled descriptor of a feature map: what ASR replaces by psi.

    Each kind reduces every position of the pooled map and keeps its channels, so psi has no
    spatial or token extent:

    * a global reduction over all spatial dims (adaptive pooling to 1, ``mean``/``amax``/``std``
      ... over every spatial dim): ``(N, C, *S) -> (N, C[, 1...])`` (:func:`is_global_reduction`);
    * adaptive pooling to a fixed size (a spatial pyramid level): ``(N, C, *S) -> (N, C, *s)``,
      with ``s`` fixed in every dim (no ``None``), so independent of the input size;
    * attention pooling by matrix product (global context): ``(N, C, L) @ (N, L, 1) -> (N, C, 1)``
      with input-dependent weights over every position (:func:`matmul_pooling`).
    """
    if is_global_reduction(gm, node):
        return True
    src = node.args[0] if node.args else None
    ins, outs = tensor_shape(src), tensor_shape(node)
    if _is_adaptive_pool(gm, node):
        return ins is not None and outs is not None and len(ins) >= 3 and \
            tuple(outs[:2]) == tuple(ins[:2]) and _fixed_size(gm, node) and \
            "first" in layouts(gm, src)
    return matmul_pooling(gm, node, dep) is not None


def is_global_reduction(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A node that reduces all spatial dims of an ``(N, C, *S)`` tensor to 1 (or drops them), or
    all token / spatial dims of tokens ``(N, L, C)`` and channels-last maps ``(N, *S, C)``.

    The layout comes from the graph (:func:`layouts`): a mean over the last dim of tokens is a
    statistic *per token* (it reduces the channels), not a channel statistic.
    """
    if node.op == "call_module":
        if not isinstance(submodule(gm, node.target), _REDUCE_MODULES):
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
    if ins is None or outs is None or len(ins) < 3 or not _fixed_size(gm, node):
        return False
    lay = layouts(gm, src)
    if "first" in lay and tuple(outs[:2]) == tuple(ins[:2]) and all(d == 1 for d in outs[2:]) \
            and _reduces_all(node, range(2, len(ins)), len(ins)):
        return True  # channels first: (N, C, *S) -> (N, C[, 1...])
    # tokens (N, L, C) -> (N, C) or (N, 1, C): a pooling over the tokens; channels-last maps
    # (N, *S, C) -> (N, C) or (N, 1.., C) when the layout is known to be channels last
    if "last" in lay and node.op in ("call_function", "call_method") and outs[0] == ins[0] \
            and outs[-1] == ins[-1] and prod(ins[1:-1]) > 1 and prod(outs[1:-1]) == 1 \
            and len(outs) in (2, len(ins)) and outs[-1] > 1 \
            and _reduces_all(node, range(1, len(ins) - 1), len(ins)):
        return True
    return False


# --- layouts and where dims come from ----------------------------------------------------------

_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze"}
_RESHAPE_FUNCTIONS = {torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze,
                      torch.unflatten}
_TRANSPOSE_METHODS = {"transpose", "swapaxes", "swapdims"}
_TRANSPOSE_FUNCTIONS = {torch.transpose, torch.swapaxes, torch.swapdims}
_SAME_METHODS = {"contiguous", "clone"}


def _transpose_perm(node: fx.Node, rank: int) -> tuple[int, ...] | None:
    """The permutation a ``transpose``/``permute`` node applies, or None."""
    dims = permute_dims(node)
    if dims is not None:
        return dims if len(dims) == rank else None
    if (node.op == "call_method" and node.target in _TRANSPOSE_METHODS) or \
            (node.op == "call_function" and node.target in _TRANSPOSE_FUNCTIONS):
        a = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim0")
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim1")
        if not (isinstance(a, int) and isinstance(b, int)):
            return None
        perm = list(range(rank))
        perm[a % rank], perm[b % rank] = perm[b % rank], perm[a % rank]
        return tuple(perm)
    return None


def _layout_op(gm: fx.GraphModule, node: fx.Node):
    """("reshape",), ("perm", dims) or ("same",) for a node that only rearranges its first
    argument (view, flatten, unsqueeze, transpose, permute, contiguous...); else None."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    shape, ins = tensor_shape(node), tensor_shape(node.args[0])
    if shape is None or ins is None or prod(shape) != prod(ins):
        return None
    if node.op == "call_module":
        mod = submodule(gm, node.target)
        if isinstance(mod, (nn.Flatten, nn.Unflatten)):
            return ("reshape",)
        if isinstance(mod, nn.Identity):
            return ("same",)
        return None
    if node.op == "call_method" and node.target in _RESHAPE_METHODS or \
            node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS:
        return ("reshape",)
    if node.op == "call_method" and node.target in _SAME_METHODS:
        return ("same",)
    perm = _transpose_perm(node, len(ins))
    if perm is not None:
        return ("perm", perm)
    return None


def _layout_chain(gm: fx.GraphModule, node: fx.Node, depth: int = 8):
    """Walk back over rearranging nodes: (source node, [(op, input shape, output shape)...] in
    forward order)."""
    ops = []
    for _ in range(depth):
        op = _layout_op(gm, node)
        if op is None:
            break
        src = node.args[0]
        ops.append((op, tensor_shape(src), tensor_shape(node)))
        node = src
    return node, ops[::-1]


_SPLIT = ("split", -1)  # a label saying "only part of these dims"


def _reshape_labels(ins: tuple, outs: tuple, labels: list) -> list | None:
    """Carry per-dim labels through a reshape: merged dims take the union of their labels, a
    dim split into several carries its labels and a mark that it is only part of them."""
    out: list = [frozenset()] * len(outs)
    i = j = 0
    while True:
        while i < len(ins) and ins[i] == 1:
            i += 1
        while j < len(outs) and outs[j] == 1:
            j += 1
        if i == len(ins) or j == len(outs):
            return out if i == len(ins) and j == len(outs) else None
        gi, gj, pi, pj = [i], [j], ins[i], outs[j]
        while pi != pj:
            if pi < pj:
                i += 1
                if i == len(ins):
                    return None
                gi.append(i)
                pi *= ins[i]
            else:
                j += 1
                if j == len(outs):
                    return None
                gj.append(j)
                pj *= outs[j]
        merged = frozenset().union(*(labels[k] for k in gi))
        if len(gj) > 1:
            merged = merged | {_SPLIT}
        for k in gj:
            out[k] = merged if outs[k] > 1 else frozenset()
        i += 1
        j += 1


def _base_labels(shape: tuple, layout: str) -> list:
    """Per-dim labels of a feature map: ("n", 0) batch, ("c", d) channels, ("p", d) positions
    (dims of size 1 carry none)."""
    chan = 1 if layout == "first" else len(shape) - 1
    labels = []
    for d, size in enumerate(shape):
        kind = "n" if d == 0 else "c" if d == chan else "p"
        labels.append(frozenset({(kind, d)}) if size > 1 else frozenset())
    return labels


def _labels(shape: tuple, layout: str, ops: list) -> list | None:
    labels = _base_labels(shape, layout)
    for op, ins, outs in ops:
        if op[0] == "reshape":
            labels = _reshape_labels(ins, outs, labels)
            if labels is None:
                return None
        elif op[0] == "perm":
            labels = [labels[d] for d in op[1]]
    return labels


def matmul_pooling(gm: fx.GraphModule, node: fx.Node, dep: set) -> tuple[fx.Node, str] | None:
    """(pooled map, its layout) when ``node`` is attention pooling written as a matrix product.

    Global context: ``(N, [1,] C, L) @ (N, [1,] L, 1) -> (N, [1,] C, 1)``, or for tokens
    ``(N, 1, L) @ (N, L, C) -> (N, 1, C)``. Both factors depend on the input (a product with a
    learned, constant weight, ``(N, L, C) @ w(C, 1)``, scores positions, it does not pool them),
    and the summed dim is, through views, flattens and transposes, every position of one feature
    map, the other dim of that factor its channels.
    """
    if node.op not in ("call_function", "call_method") or node.target not in _MATMULS or \
            len(node.args) < 2:
        return None
    a, b = node.args[0], node.args[1]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node) and a in dep and b in dep):
        return None
    sa, sb, so = tensor_shape(a), tensor_shape(b), tensor_shape(node)
    if sa is None or sb is None or so is None or len(so) < 3 or len(sa) < 2 or len(sb) < 2:
        return None
    if any(d != 1 for d in so[1:-2]):
        return None  # one pooled vector per sample
    if so[-1] == 1 and so[-2] > 1 and sb[-1] == 1:
        pooled, summed, chan = a, -1, -2      # (.., C, L) @ (.., L, 1)
    elif so[-2] == 1 and so[-1] > 1 and sa[-2] == 1:
        pooled, summed, chan = b, -2, -1      # (.., 1, L) @ (.., L, C)
    else:
        return None
    if tensor_shape(pooled)[summed] <= 1:
        return None
    src, ops = _layout_chain(gm, pooled)
    shape = tensor_shape(src)
    for layout in layouts(gm, src):
        labels = _labels(shape, layout, ops)
        if labels is None:
            continue
        base = _base_labels(shape, layout)
        positions = frozenset().union(*(lab for lab in base if any(k == "p" for k, _ in lab)))
        channels = frozenset().union(*(lab for lab in base if any(k == "c" for k, _ in lab)))
        if positions and labels[summed] == positions and labels[chan] == channels:
            return src, layout
    return None


def layouts(gm: fx.GraphModule, node) -> tuple[str, ...]:
    """The layouts a feature map may have: ``"first"`` (``(N, C, *S)``), ``"last"`` (tokens
    ``(N, L, C)``, channels-last maps ``(N, *S, C)``), or both when the graph does not tell.

    Rank >= 4 is channels first unless :func:`channels_last` shows otherwise; rank 3 is what
    :func:`channels_first` or :func:`tokens` shows, else either.
    """
    shape = tensor_shape(node)
    if shape is None or len(shape) < 3:
        return ()
    if len(shape) > 3:
        return ("last",) if channels_last(gm, node) else ("first",)
    if channels_first(gm, node):
        return ("first",)
    found = _rank3_layout(gm, node)
    return (found,) if found is not None else ("first", "last")


def tokens(gm: fx.GraphModule, node) -> bool:
    """Whether a rank-3 tensor is known to be tokens ``(N, L, C)``: it comes (through elementwise
    ops) from a LayerNorm over the last dim, a Linear, or a view/transpose that puts the channels
    of a map of known layout last (ViT's ``conv(x).flatten(2).transpose(1, 2)``)."""
    return layouts(gm, node) == ("last",)


def _only(labels: frozenset, kind: str) -> bool:
    return all(k == kind for k, _ in labels)


def _chain_layout(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The layout of a rank-3 view / transpose of a map whose layout the graph shows."""
    src, ops = _layout_chain(gm, node)
    shape = tensor_shape(src)
    if not ops or shape is None or len(shape) < 3:
        return None
    found = set()
    for layout in layouts(gm, src):
        labels = _labels(shape, layout, ops)
        if labels is None or len(labels) != 3 or not _only(labels[0], "n"):
            continue
        if _only(labels[1], "c") and _only(labels[2], "p") and labels[1]:
            found.add("first")
        if _only(labels[2], "c") and _only(labels[1], "p") and labels[2]:
            found.add("last")
    return found.pop() if len(found) == 1 else None


def _rank3_layout(gm: fx.GraphModule, node, depth: int = 6) -> str | None:
    """"last" (tokens) when a rank-3 tensor comes, through elementwise ops, from a LayerNorm
    over its last dim or a Linear; the layout a view / transpose chain gives it
    (:func:`_chain_layout`); else None."""
    shape = tensor_shape(node)
    if not isinstance(node, fx.Node) or shape is None or len(shape) != 3:
        return None
    last = shape[-1]
    for _ in range(depth):
        if _layout_op(gm, node) is not None and node.op != "call_module":
            return _chain_layout(gm, node)
        if node.op == "call_function" and node.target in (torch.cat, torch.concat):
            return _cat_layout(gm, node)
        if node.op == "call_module":
            mod = submodule(gm, node.target)
            if isinstance(mod, nn.LayerNorm):
                return "last" if tuple(mod.normalized_shape) == (last,) else None
            if isinstance(mod, nn.Linear):
                return "last" if mod.out_features == last else None
            if isinstance(mod, (nn.Flatten, nn.Unflatten)):
                return _chain_layout(gm, node)
            if not isinstance(mod, _ELEMENTWISE_MODULES):
                return None
        elif node.op in ("call_function", "call_method"):
            if node.target in (F.layer_norm, F.linear):
                return "last"
            if node.target not in _ELEMENTWISE_FUNCTIONS and not is_op(node, MUL_OPS) \
                    and not is_op(node, ADD_OPS):
                return None
        else:
            return None
        nxt = node.args[0] if node.args else None
        if not (isinstance(nxt, fx.Node) and tensor_shape(nxt) == shape):
            return None
        node = nxt
    return None


def _cat_layout(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The layout of a concatenation of rank-3 tensors: the one its parts of known layout
    share, whatever the dim (a class token and register tokens put before the patch tokens,
    ``torch.cat([cls, reg, tokens], dim=1)``, are tokens); None when none is known or they
    disagree."""
    parts = node.args[0] if node.args else node.kwargs.get("tensors", ())
    if not isinstance(parts, (list, tuple)):
        return None
    known = set()
    for a in parts:
        if isinstance(a, fx.Node) and (s := tensor_shape(a)) is not None and len(s) == 3:
            lay = layouts(gm, a)
            if len(lay) == 1:
                known.add(lay[0])
    return known.pop() if len(known) == 1 else None


def _stat_source(gm: fx.GraphModule, stat: fx.Node, dep: set):
    """(pooled map, its possible layouts, fixed pooled size) of a statistic."""
    found = matmul_pooling(gm, stat, dep)
    if found is not None:
        return found[0], (found[1],), 1
    src = stat.args[0] if stat.args else None
    if _is_adaptive_pool(gm, stat):
        size = _adaptive_size(gm, stat) or ()
        spatial = max(len(tensor_shape(src) or ()) - 2, 0)
        grid = size if len(size) == spatial else size * spatial  # AdaptiveAvgPool2d(2): 2 x 2
        return src, ("first",), prod(grid)
    return src, layouts(gm, src), 1


def psi_extent(gm: fx.GraphModule, stat: fx.Node, dep: set) -> str | None:
    """Why psi for ``stat`` would carry a spatial or token extent (fix the input size), or None.

    psi has the statistic's shape with batch 1; its size must be the pooled map's channel count
    (times the fixed grid of an adaptive pooling), nothing of the map's positions.
    """
    shape = tensor_shape(stat)
    src, lay, fixed = _stat_source(gm, stat, dep)
    src_shape = tensor_shape(src)
    if shape is None or src_shape is None:
        return "has no known shape"
    size = prod(shape[1:])
    for layout in lay:
        chans = src_shape[1] if layout == "first" else src_shape[-1]
        if size == chans * fixed:
            return None
    return (f"keeps a spatial/token extent: psi of shape {(1, *shape[1:])} would only fit "
            f"inputs of the example's size")


_ELEMENTWISE_MODULES = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Identity,
                        nn.Dropout, nn.Tanh, nn.Sigmoid)
_ELEMENTWISE_FUNCTIONS = {F.relu, torch.relu, F.gelu, F.silu, F.leaky_relu, F.dropout,
                          torch.tanh, torch.sigmoid, "relu", "gelu", "contiguous",
                          # casts and copies keep the layout (a block computed in float64, as
                          # an orthogonal residual update does)
                          "double", "float", "half", "bfloat16", "to", "type", "type_as",
                          "clone", "detach", torch.clone,
                          # shape-preserving along the channels: the layout stays
                          F.normalize}
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
            mod = submodule(gm, node.target)
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
            mod = submodule(gm, n.target)
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


def _token_gate(xs: tuple | None, gs: tuple | None) -> bool:
    """``g`` is one value per token (``(N, L, 1)``) over tokens ``(N, L, C)``."""
    if xs is None or gs is None or len(xs) != 3 or len(gs) > 3:
        return False
    gs = (1,) * (3 - len(gs)) + tuple(gs)
    return gs[0] in (1, xs[0]) and gs[1] == xs[1] > 1 and gs[2] == 1 and xs[2] > 1


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


def _scores_positions(node: fx.Node, dep: set) -> bool:
    """A product shaped like a pooled column, ``(N, L, C) @ w(C, 1) -> (N, L, 1)``, whose other
    factor is input-independent: one score per position (what shapes alone took for pooling)."""
    if node.op not in ("call_function", "call_method") or node.target not in _MATMULS or \
            len(node.args) < 2:
        return False
    outs = tensor_shape(node)
    if outs is None or len(outs) < 3 or any(d != 1 for d in outs[2:]):
        return False
    a, b = node.args[0], node.args[1]
    for m, w in ((a, b), (b, a)):
        ms = tensor_shape(m)
        if isinstance(m, fx.Node) and m in dep and not (isinstance(w, fx.Node) and w in dep) \
                and ms is not None and len(ms) == 3 and tuple(ms[:2]) == tuple(outs[:2]) \
                and ms[2] > 1:
            return True
    return False


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
            return ("reaches the model input with no global statistic on the way (it is not "
                    "computed from pooled values)")
        if _scores_positions(n, dep):
            return ("reads a product with an input-independent weight: it scores positions, "
                    "it does not pool them (psi would carry the input's spatial/token extent)")
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


_CONTEXT_MODULES = _REDUCE_MODULES + (nn.Upsample, nn.UpsamplingNearest2d,
                                       nn.UpsamplingBilinear2d)
_CONTEXT_FUNCTIONS = _REDUCE_FUNCTIONS | {F.interpolate, F.upsample, F.upsample_nearest,
                                          F.upsample_bilinear}
_CONSTANT_OPS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add,
                 torch.sub, torch.mul, "add", "sub", "mul", "div"}


def _gate_core(gm: fx.GraphModule, g: fx.Node, dep: set) -> fx.Node | None:
    """The sigmoid-like node (sigmoid, hard sigmoid, softmax, tanh, in any spelling) ``g`` is
    made of, through reshapes and arithmetic with input-independent operands (``1 + s``,
    ``s / 6``), else None."""
    for _ in range(8):
        if g.op == "call_module":
            return g if type(submodule(gm, g.target)) in _MODULE_FORMS else None
        if g.op not in ("call_function", "call_method"):
            return None
        try:
            if g.target in _FORMS:
                return g
        except TypeError:  # an unhashable target
            return None
        ins = [a for a in g.all_input_nodes if a in dep]
        if len(ins) != 1 or not (g.target in _SHAPE_OPS or g.target in _CONSTANT_OPS):
            return None
        g = ins[0]
    return None


def _ancestors(node: fx.Node) -> set[fx.Node]:
    """``node`` and every node it is computed from."""
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def _is_context(gm: fx.GraphModule, n: fx.Node, dep: set) -> bool:
    """A node that gathers values across positions: pooling (global or not), a reduction, an
    interpolation / upsampling."""
    if n.op == "call_module":
        return isinstance(submodule(gm, n.target), _CONTEXT_MODULES)
    if n.op == "call_method":
        return n.target in _REDUCE_METHODS
    try:
        return n.op == "call_function" and n.target in _CONTEXT_FUNCTIONS or \
            is_statistic(gm, n, dep)
    except TypeError:
        return False


def _element_gate(gm: fx.GraphModule, x: fx.Node, g: fx.Node, dep: set, xs: tuple,
                  gs: tuple) -> bool:
    """``x * g`` is element-wise attention: ``g`` has ``x``'s channels and varies over some of
    its positions (``x``'s full shape, or a coordinate attention's ``(N, C, H, 1)``), is
    sigmoid-like (:func:`_gate_core`), and the part of its computation that
    ``x`` does not share pools, reduces or resamples (BAM's ``1 + sigmoid(channel * spatial)``,
    a self-calibrated convolution's ``sigmoid(x + up(down(x)))``, the soft mask of a residual
    attention network). A self-gating activation (``x * sigmoid(x)``, a GLU) has no such
    context, and is not attention."""
    if len(xs) < 3 or len(gs) != len(xs) or xs[1] < 2 or gs[1] != xs[1] or \
            gs[0] not in (1, xs[0]) or prod(gs[2:]) < 2 or \
            any(a not in (1, b) for a, b in zip(gs[2:], xs[2:])):
        return False
    core = _gate_core(gm, g, dep)
    if core is None:
        return False
    shared = _ancestors(x)
    seen: set[fx.Node] = set()
    todo = [core]
    while todo and len(seen) < 2000:
        n = todo.pop()
        if n in seen or n in shared or n not in dep:
            continue
        seen.add(n)
        if n is not core and _is_context(gm, n, dep):
            return True
        todo.extend(n.all_input_nodes)
    return False


def _examine(gm: fx.GraphModule, node: fx.Node, x: fx.Node, g: fx.Node, dep: set,
             pooled: Callable[[], set]) -> Any:
    """What ``node`` (``x * g`` or ``x + g``) is, read with ``x`` the map and ``g`` the gate:
    None (not this way round), False (nothing to report), a refusal ``(path, reason,
    code)``, or an :class:`AttentionSite`."""
    is_mul = is_op(node, MUL_OPS)
    xs, gs = tensor_shape(x), tensor_shape(g)
    last = xs is not None and len(xs) > 3 and channels_last(gm, x)
    first = xs is not None and len(xs) == 3 and layouts(gm, x) == ("first",)
    path = module_path(node)
    if is_mul and not last and _spatial_gate(xs, gs) and \
            channel_axis(xs, gs, first=first) is None and g in dep and x in dep:
        return (path, "spatial attention (an input-dependent gate per position, not per "
                      "channel): it stays as it is", "spatial-attention")
    if not first and _token_gate(xs, gs) and tokens(gm, x):
        # (N, L, C) * (N, L, 1) on tokens: one value per token, whatever the shapes say
        if is_mul and g in dep and x in dep:
            return (path, "spatial attention (an input-dependent gate per token, not per "
                          "channel): it stays as it is", "spatial-attention")
        return False
    if xs is None or gs is None or not _per_channel(xs, gs, last, first):
        if is_mul and g in dep and x in dep and _element_gate(gm, x, g, dep, xs, gs):
            return (path, "element-wise attention (an input-dependent gate per channel and "
                          "position, computed from pooled or resampled context): not channel "
                          "attention, it stays as it is", "element-attention")
        return None
    if not is_mul and (_spatial_size(xs, last) == 1 or x not in dep):
        return None  # an additive site modulates a feature map
    if g not in dep:
        return False  # already input-independent: a constant scale (fold's business)
    if _spatial_size(xs, last) == 1 and not isinstance(_trace_branch(gm, x, dep), str):
        return False  # x is itself pooled data (e.g. a swish inside an excitation branch)
    found = _trace_branch(gm, g, dep, xs, last, first, pooled)
    if isinstance(found, str) and _spatial_size(xs, last) == 1 and tuple(gs) == tuple(xs):
        # two maps of one position each, multiplied: only the example's size makes the product
        # look per channel, and nothing pooled the gate: not attention at all
        return False
    if isinstance(found, str):
        code = ("gate-reads-input" if "reaches the model input" in found else
                "gate-scores-positions" if "scores positions" in found else "gate-not-pooled")
        return (path, f"per-channel multiply whose gate {found}", code)
    stats, branch = found
    if x in branch:
        return (path, "the gate depends on x other than by pooling", "gate-reads-map")
    extent = next((r for r in (psi_extent(gm, st, dep) for st in stats) if r), None)
    if extent is not None:
        return (path, f"per-channel multiply whose statistic {extent}", "statistic-extent")
    if node.op == "call_method" and node.target in ("mul_", "add_") and node.args[0] is g:
        return (path, "in-place op into the gate", "in-place-gate")
    if is_mul and not first and _token_gate(xs, gs):
        # (N, A, 1) * (N, A, B) where nothing shows a channels-first 1-D map: rank-3 tensors
        # are tokens unless the graph shows otherwise, and this is one value per token (a
        # per-token norm after a class token is concatenated, Sapiens2's RMSNorm)
        return (path, "spatial attention (an input-dependent gate per token, not per channel; "
                      "nothing in the graph shows an (N, C, L) map, such as a Conv1d or a 1-D "
                      "norm before it): it stays as it is", "spatial-attention")
    return AttentionSite(mul=node, x=x, gate=g, stats=stats, branch=list(branch), path=path,
                         channels=int(xs[channel_axis(xs, gs, last, first) or 1]),
                         fusion="mul" if is_mul else "add")


def find_attention_sites(gm: fx.GraphModule
                         ) -> tuple[list[AttentionSite], list[tuple[str, str, str]]]:
    """Find every channel-attention site in ``gm`` (shape metadata required).

    Returns:
        (sites, refusals) where refusals are ``(module path, reason, code)`` for multiplies
        that look like attention but cannot be converted safely. Codes: ``spatial-attention``
        (a gate per position or token), ``element-attention`` (a gate per channel and
        position from pooled or resampled context), ``gate-reads-input``, ``gate-scores-positions``, ``gate-not-pooled`` (no global
        reduction), ``gate-reads-map`` (the gate depends on x other than by pooling),
        ``statistic-extent`` (a statistic that is not one value per channel),
        ``in-place-gate``.
    """
    dep = value_dependent(gm.graph)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    sites: list[AttentionSite] = []
    refusals: list[tuple[str, str, str]] = []
    by_gate: dict[fx.Node, AttentionSite] = {}
    cache: dict[str, set[fx.Node]] = {}
    spatial: dict[fx.Node, int] = {}  # per-position multiplies refused: index in refusals

    def pooled() -> set[fx.Node]:
        if "pooled" not in cache:
            cache["pooled"] = _pooled_nodes(gm, dep)
        return cache["pooled"]

    for node in gm.graph.nodes:
        if not (is_op(node, MUL_OPS) or is_op(node, ADD_OPS)) or len(node.args) < 2:
            continue
        a, b = node.args[0], node.args[1]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        for x, g in ((a, b), (b, a)):
            verdict = _examine(gm, node, x, unexpand(g, x), dep, pooled)
            if verdict is None:
                continue  # try the operands the other way round
            if isinstance(verdict, tuple):
                if verdict[2] == "spatial-attention":
                    spatial[node] = len(refusals)
                refusals.append(verdict)
            elif isinstance(verdict, AttentionSite):
                g = verdict.gate
                if g in by_gate:  # one gate scaling several tensors: one site, one psi
                    by_gate[g].more_muls.append(node)
                else:
                    verdict.stats.sort(key=order.__getitem__)
                    verdict.branch = sorted(verdict.branch, key=order.__getitem__)
                    sites.append(verdict)
                    by_gate[g] = verdict
            break
    # a per-position weighting read only by the statistics of converted sites is part of an
    # attention pooling (``(x * a).sum(1)``) psi replaces: nothing of it stays to report
    pooled_by_sites = {st for site in sites for st in site.stats}
    drop = {i for n, i in spatial.items() if n.users and set(n.users) <= pooled_by_sites}
    return sites, [r for i, r in enumerate(refusals) if i not in drop]


_SHAPE_OPS = {"view", "reshape", "flatten", "unflatten", "unsqueeze", "expand", "expand_as",
              "permute", "transpose", "contiguous", torch.reshape, torch.unsqueeze,
              torch.flatten, torch.permute, torch.transpose}
_FORMS = {torch.sigmoid: "sigmoid gate", F.sigmoid: "sigmoid gate", "sigmoid": "sigmoid gate",
          F.hardsigmoid: "hard-sigmoid gate", torch.softmax: "softmax gate",
          F.softmax: "softmax gate", "softmax": "softmax gate", torch.tanh: "tanh gate",
          "tanh": "tanh gate", F.relu6: "hard-sigmoid gate"}
_MODULE_FORMS = {nn.Sigmoid: "sigmoid gate", nn.Hardsigmoid: "hard-sigmoid gate",
                 nn.Softmax: "softmax gate", nn.Tanh: "tanh gate", nn.ReLU6: "hard-sigmoid gate"}


def gate_form(gm: fx.GraphModule, site: AttentionSite) -> str:
    """What ``site``'s gate is, read from the op that makes it (through reshapes and a
    constant ``/ 6`` of a hard sigmoid): ``"sigmoid gate"``, ``"hard-sigmoid gate"``,
    ``"softmax gate"``, ``"tanh gate"``, ``"additive context"`` (``x + g``), or
    ``"unbounded gate"`` (anything else, e.g. a response normalisation ``x * (g(x) + 1)``,
    whose conversion changes what a norm computes)."""
    if site.fusion == "add":
        return "additive context"
    g = site.gate
    for _ in range(8):
        if g.op == "call_module":
            return _MODULE_FORMS.get(type(submodule(gm, g.target)), "unbounded gate")
        if g.op not in ("call_function", "call_method"):
            break
        try:
            form = _FORMS.get(g.target)
        except TypeError:
            form = None
        if form is not None:
            return form
        hard = g.target in (operator.truediv, "div") and len(g.args) == 2 and g.args[1] == 6
        # g[:, :, None, None]: an index of full slices and new axes only reshapes
        unsqueeze = g.target is operator.getitem and len(g.args) == 2 and \
            isinstance(g.args[1], tuple) and all(
                i is None or i == slice(None) or i is Ellipsis for i in g.args[1])
        if (g.target in _SHAPE_OPS or hard or unsqueeze) and g.args and \
                isinstance(g.args[0], fx.Node):
            g = g.args[0]
            continue
        break
    return "unbounded gate"
