"""Inserting new attention into a backbone: where the paper puts ASR in attention-free networks.

Insertion points are found on the graph:

* ``"block_output"`` (the paper's placement): for every residual addition of two feature maps,
  the output of the longer ("main") branch — after the last norm of the block, before the add;
* ``"every_bn"``: after every BatchNorm whose output has spatial extent;
* a predicate ``(module path, node) -> bool`` over every node producing an ``(N, C, *S)`` map.

``every=k`` keeps every k-th point in graph order (the paper's insertion-frequency ablation).
The new module is traced and its graph inlined after the point, so the ASR rewrite sees its
structure exactly as it sees attention that was in the model from the start.
"""

from __future__ import annotations

from typing import Any, Callable

import networkx as nx
import torch.fx as fx
from torch import nn

from .graph_utils import (ADD_OPS, is_op, module_device, module_path, set_attr_path, tensor_shape,
                          to_networkx, value_dependent)

__all__ = ["insertion_points", "insert_modules", "WHERE"]

WHERE = ("block_output", "every_bn", "after_norm")


def is_token_norm(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A LayerNorm over the last dim of tokens ``(N, L, C)`` (a transformer block's norm) or of
    a channels-last map ``(N, H, W, C)`` (a ConvNeXt block's norm)."""
    if node.op != "call_module":
        return False
    mod = gm.get_submodule(str(node.target))
    shape = tensor_shape(node)
    return isinstance(mod, nn.LayerNorm) and shape is not None and len(shape) >= 3 and \
        tuple(mod.normalized_shape) == (shape[-1],)


def _is_norm(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(
        gm.get_submodule(str(node.target)),
        (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm))


def _feature_map(node: Any) -> bool:
    shape = tensor_shape(node)
    return shape is not None and len(shape) >= 3


def insertion_points(gm: fx.GraphModule, where: str | Callable[[str, fx.Node], bool] = "block_output",
                     every: int = 1) -> list[fx.Node]:
    """The nodes after which new attention goes (shape metadata required).

    Args:
        gm: the traced model.
        where: "block_output", "every_bn", "after_norm" (after every LayerNorm of tokens
            ``(N, L, C)``: transformer blocks), or a predicate ``(module path, node) -> bool``.
        every: keep every ``every``-th point, starting with the first.

    Returns:
        Nodes in graph order, each producing an ``(N, C, *S)`` feature map.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    dep = value_dependent(gm.graph)
    points: list[fx.Node] = []
    if callable(where):
        for n in gm.graph.nodes:
            if n in dep and n.op in ("call_module", "call_function", "call_method") \
                    and (_feature_map(n) or is_token_norm(gm, n)):
                path = str(n.target) if n.op == "call_module" else module_path(n)
                if where(path, n):
                    points.append(n)
    elif where == "after_norm":
        points = [n for n in gm.graph.nodes if n in dep and is_token_norm(gm, n)]
    elif where == "every_bn":
        points = [n for n in gm.graph.nodes if n in dep and _feature_map(n) and n.op ==
                  "call_module" and isinstance(gm.get_submodule(str(n.target)),
                                               nn.modules.batchnorm._BatchNorm)]
    elif where == "block_output":
        g = to_networkx(gm.graph)
        seen: set[fx.Node] = set()
        for n in gm.graph.nodes:
            if not is_op(n, ADD_OPS) or len(n.args) < 2:
                continue
            a, b = n.args[0], n.args[1]
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node) and a in dep and b in dep
                    and _feature_map(a) and tensor_shape(a) == tensor_shape(b)):
                continue
            anc_a, anc_b = nx.ancestors(g, a) | {a}, nx.ancestors(g, b) | {b}
            # the main branch has more nodes of its own since the fork than the shortcut
            main = a if len(anc_a - anc_b) >= len(anc_b - anc_a) else b
            if main not in seen:
                seen.add(main)
                points.append(main)
    else:
        raise ValueError(f"where must be one of {WHERE} or a predicate (path, node) -> bool, "
                         f"got {where!r}")
    return points[::every]


def _att_path(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{node.target}_asr"
    base = module_path(node)
    return f"{base}.{node.name}_asr" if base else f"{node.name}_asr"


def insert_modules(gm: fx.GraphModule, points: list[fx.Node],
                   factory: Callable[[int, int, bool], nn.Module], created: dict[str, Any],
                   tracer_cls: type) -> list[tuple[str, set[fx.Node]]]:
    """Inline a new module after each point; returns (module path, inlined nodes) per point.

    Args:
        factory: ``(channels, dims, tokens) -> nn.Module``; ``tokens`` is True after a token
            LayerNorm (channels = the last dim).
        created: modules already made for the other mode's graph of the same model, by path.
        tracer_cls: the tracer used to expose the new module's structure.
    """
    graph = gm.graph
    out = []
    for p in points:
        shape = tensor_shape(p)
        path = _att_path(gm, p)
        mod = created.get(path)
        if mod is None:
            tokens = is_token_norm(gm, p)
            mod = factory(int(shape[-1] if tokens else shape[1]), len(shape) - 2, tokens)
            # the new attention computes in the dtype of the map it gates, on the model's device
            # (a float64 or CUDA model: a float32 CPU module would fail on its first call)
            dtype = getattr(p.meta.get("tensor_meta"), "dtype", None)
            mod = mod.to(device=module_device(gm), dtype=dtype if dtype is not None and
                         dtype.is_floating_point else None)
            created[path] = mod
        set_attr_path(gm, path, mod)
        sub = tracer_cls().trace(mod)
        val_map: dict[fx.Node, Any] = {}
        inlined: set[fx.Node] = set()
        result = None
        stack_meta = dict(p.meta.get("nn_module_stack") or {})
        stack_meta[path] = (path, type(mod))
        with graph.inserting_before(p.next):
            for node in sub.nodes:
                if node.op == "placeholder":
                    val_map[node] = p
                    continue
                if node.op == "output":
                    result = fx.node.map_arg(node.args[0], lambda a: val_map[a])
                    break
                new = graph.node_copy(node, lambda a: val_map[a])
                if new.op in ("call_module", "get_attr"):
                    new.target = f"{path}.{node.target}"
                meta = dict(stack_meta)
                if node.op == "call_module":
                    meta[str(new.target)] = (str(new.target), type(mod.get_submodule(
                        str(node.target))))
                new.meta["nn_module_stack"] = meta
                val_map[node] = new
                inlined.add(new)
        p.replace_all_uses_with(result, delete_user_cb=lambda u: u not in inlined)
        out.append((path, inlined))
    return out
