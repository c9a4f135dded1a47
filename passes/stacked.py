"""Selective-kernel and split attention over stacked branches, as channel attention.

SKNet (Li et al., "Selective Kernel Networks", CVPR 2019) and ResNeSt (Zhang et al.,
"ResNeSt: Split-Attention Networks", 2020) weigh P branches of one block per (branch, channel):
the branches are stacked into one ``(N, P, C, *S)`` tensor -- ``torch.stack(parts, 1)``, or a
``(N, P*C, *S)`` map reshaped to it -- and multiplied by a softmax gate ``(N, P, C, 1, ..)``,
then summed over P. A gate that is one value per (branch, channel) is a channel gate of the
flat ``(N, P*C, *S)`` map: :func:`flatten_stacked_gates` rewrites

    stack(parts, 1) * g    ->  unflatten(cat(parts, 1) * g.flatten(1, 2), 1, (P, C))
    m.reshape(N, P, C, *S) * g  ->  (m * g.flatten(1, 2)).reshape(N, P, C, *S)

which computes the same values, so the attention finder sees an ordinary per-channel site and
the fold puts each branch's share of the constant gate into that branch's last layer (a
concatenation folds part by part).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .graph_utils import MUL_OPS, is_op, tensor_shape

__all__ = ["flatten_stacked_gates"]

_RESHAPES = {"reshape", "view", torch.reshape}


def _stacked_parts(x: fx.Node) -> list[fx.Node] | None:
    """The parts of ``torch.stack(parts, 1)`` (each ``(N, C, *S)``), else None."""
    if not (x.op == "call_function" and x.target is torch.stack):
        return None
    seq = x.args[0] if x.args else x.kwargs.get("tensors")
    dim = x.args[1] if len(x.args) > 1 else x.kwargs.get("dim", 0)
    if not isinstance(seq, (list, tuple)) or dim != 1 or \
            not all(isinstance(p, fx.Node) for p in seq):
        return None
    return list(seq)


def _split_map(x: fx.Node) -> fx.Node | None:
    """``m`` when ``x`` is ``m (N, P*C, *S)`` reshaped to ``(N, P, C, *S)``, else None."""
    if not (x.op in ("call_method", "call_function") and x.target in _RESHAPES and x.args):
        return None
    m, xs, ms = x.args[0], tensor_shape(x), tensor_shape(x.args[0])
    if not isinstance(m, fx.Node) or xs is None or ms is None or len(ms) != len(xs) - 1:
        return None
    if ms[0] != xs[0] or ms[1] != xs[1] * xs[2] or tuple(ms[2:]) != tuple(xs[3:]):
        return None
    return m


def _stacked_gate(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(stacked map, gate) when ``node`` multiplies ``(N, P, C, *S)`` by ``(N|1, P, C, 1..)``."""
    if not is_op(node, MUL_OPS) or len(node.args) != 2 or node.kwargs or \
            (isinstance(node.target, str) and node.target.endswith("_")):
        return None
    for x, g in (node.args, reversed(node.args)):
        if not (isinstance(x, fx.Node) and isinstance(g, fx.Node)):
            continue
        xs, gs = tensor_shape(x), tensor_shape(g)
        if xs is None or gs is None or len(xs) < 4 or len(gs) != len(xs):
            continue
        if gs[0] in (1, xs[0]) and gs[1] == xs[1] > 1 and gs[2] == xs[2] > 1 and \
                all(d == 1 for d in gs[3:]) and (_stacked_parts(x) or _split_map(x)):
            return x, g
    return None


def flatten_stacked_gates(gm: fx.GraphModule) -> int:
    """Rewrite every product of stacked branches by a per-(branch, channel) gate into a
    per-channel product of the flat map (see the module docstring), in place.

    Returns:
        How many products were rewritten; shape metadata of the new nodes is missing until
        shapes are recorded again (``asrfx.passes.shapes.propagate_shapes``).
    """
    graph = gm.graph
    done = 0
    for node in list(graph.nodes):
        found = _stacked_gate(node)
        if found is None:
            continue
        x, g = found
        xs = tensor_shape(x)
        parts = _stacked_parts(x)
        with graph.inserting_before(node):
            flat_g = graph.call_method("flatten", (g, 1, 2))
            if parts is not None:
                flat = graph.call_function(torch.cat, (list(parts), 1))
            else:
                flat = _split_map(x)
            prod = graph.call_function(operator.mul, (flat, flat_g))
            out = graph.call_method("unflatten", (prod, 1, (xs[1], xs[2])))
        for new in (flat_g, flat, prod, out):
            if new.op != "placeholder" and "nn_module_stack" in node.meta:
                new.meta["nn_module_stack"] = dict(node.meta["nn_module_stack"])
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        done += 1
    if done:
        graph.lint()
    return done
