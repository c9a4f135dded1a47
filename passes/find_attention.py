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

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .graph_utils import MUL_OPS, is_op, module_path, prod, tensor_shape, value_dependent

__all__ = ["AttentionSite", "find_attention_sites", "is_global_reduction"]

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
        mul: the node computing ``x * g``.
        x: the feature map being modulated.
        gate: the per-channel gate ``g``.
        stats: the global-reduction nodes the branch reads (pooled statistics).
        branch: nodes strictly between the statistics and the gate, gate included, in graph order.
        path: module path of the site (the module the multiply was traced in).
        channels: C.
    """

    mul: fx.Node
    x: fx.Node
    gate: fx.Node
    stats: list[fx.Node]
    branch: list[fx.Node]
    path: str
    channels: int
    extra: dict = field(default_factory=dict)


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
    if tuple(outs[:2]) != tuple(ins[:2]):
        return False
    return all(d == 1 for d in outs[2:])


def _per_channel(xs: tuple, gs: tuple) -> bool:
    if len(xs) < 3 or len(gs) != len(xs):
        return False
    return gs[1] == xs[1] and gs[0] in (1, xs[0]) and all(d == 1 for d in gs[2:])


def _trace_branch(gm: fx.GraphModule, gate: fx.Node, dep: set[fx.Node]
                  ) -> tuple[list[fx.Node], set[fx.Node]] | str:
    """Walk back from the gate over input-dependent nodes, stopping at global reductions.

    Returns (stats, branch nodes) or a string saying why this is not a channel-attention branch.
    """
    stats: list[fx.Node] = []
    branch: set[fx.Node] = set()
    stack = [gate]
    while stack:
        n = stack.pop()
        if n in branch or n in stats:
            continue
        if is_global_reduction(gm, n):
            stats.append(n)
            continue
        if n.op == "placeholder":
            return "reads the model input directly"
        shape = tensor_shape(n)
        if shape is not None and len(shape) >= 3 and prod(shape[2:]) > 1:
            return "reads a feature map with spatial extent (not a global statistic)"
        branch.add(n)
        stack.extend(a for a in n.all_input_nodes if a in dep)
    if not stats:
        return "no global reduction found"
    return stats, branch


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
    for node in gm.graph.nodes:
        if not is_op(node, MUL_OPS) or len(node.args) < 2:
            continue
        a, b = node.args[0], node.args[1]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        for x, g in ((a, b), (b, a)):
            xs, gs = tensor_shape(x), tensor_shape(g)
            if xs is None or gs is None or not _per_channel(xs, gs):
                continue
            if g not in dep:
                break  # already input-independent: a constant scale (fold's business)
            if prod(xs[2:]) == 1 and not isinstance(_trace_branch(gm, x, dep), str):
                break  # x is itself pooled data (e.g. a swish inside an excitation branch)
            found = _trace_branch(gm, g, dep)
            if isinstance(found, str):
                if "spatial extent" not in found:
                    refusals.append((module_path(node), f"per-channel multiply whose gate {found}"))
                break
            stats, branch = found
            if x in branch:
                refusals.append((module_path(node), "the gate depends on x other than by pooling"))
                break
            if node.op == "call_method" and node.target == "mul_" and node.args[0] is g:
                refusals.append((module_path(node), "in-place multiply into the gate"))
                break
            if g in by_gate:  # one gate scaling several tensors: one site, one psi
                by_gate[g].extra.setdefault("more_muls", []).append(node)
                break
            stats.sort(key=order.__getitem__)
            sites.append(AttentionSite(mul=node, x=x, gate=g, stats=stats,
                                       branch=sorted(branch, key=order.__getitem__),
                                       path=module_path(node), channels=int(xs[1])))
            by_gate[g] = sites[-1]
            break
    return sites, refusals
