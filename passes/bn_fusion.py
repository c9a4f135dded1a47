"""Conv -> BatchNorm (and Linear -> BatchNorm1d) fusion for the deploy graph.

The math is torch's own (``torch.nn.utils.fusion``); this pass only checks the preconditions:
exact layer types, a conv whose output nothing but the norm reads, a norm with running
statistics. A conv called at several places is cloned for the fused call site.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.fx as fx
from torch import nn
import torch
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from .graph_utils import clone_module, pass_record, reads_shape_only, call_sites, get_attr_path, module_path, set_attr_path, tensor_shape, \
    unique_name
from .scale_fold import CONV_TYPES, NORM_TYPES, _conv_param_nodes, set_functional_conv_params

__all__ = ["fuse_batchnorm"]


def _fused(fn: Callable, weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.Module
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's fusion math, computed in float64 and cast back to the layer's dtype."""
    f64 = lambda t: None if t is None else t.detach().to(torch.float64)  # noqa: E731
    if fn is fuse_linear_bn_weights:
        w, b = fn(f64(weight), f64(bias), f64(bn.running_mean), f64(bn.running_var), bn.eps,
                  f64(bn.weight) if bn.weight is not None else torch.ones_like(f64(bn.running_mean)),
                  f64(bn.bias) if bn.bias is not None else torch.zeros_like(f64(bn.running_mean)))
    else:
        w, b = fn(f64(weight), f64(bias), f64(bn.running_mean), f64(bn.running_var), bn.eps,
                  f64(bn.weight), f64(bn.bias))
    return w.detach().to(weight.dtype), b.detach().to(weight.dtype)


def fuse_batchnorm(gm: fx.GraphModule, select: Callable[[str], bool] = lambda key: True
                   ) -> list[dict[str, Any]]:
    """Fuse every eligible conv/linear -> BatchNorm pair of ``gm`` (which must be in eval mode).

    Returns:
        One record per BatchNorm looked at: ``{"key", "path", "channels", "action", "target",
        "reason"}``; "kept" records say why a norm stays.
    """
    records = []
    for bn_node in list(gm.graph.nodes):
        if bn_node.op != "call_module":
            continue
        bn = gm.get_submodule(str(bn_node.target))
        if type(bn) not in NORM_TYPES:
            continue
        key = f"bn:{bn_node.name}"
        if not select(key):
            continue
        rec = pass_record(key, str(bn_node.target), bn.num_features)
        records.append(rec)
        if bn.running_mean is None:
            rec["reason"] = "no running statistics (uses batch statistics in eval)"
            continue
        src = bn_node.args[0] if bn_node.args else None
        if not isinstance(src, fx.Node) or \
                sum(1 for u in src.users if not reads_shape_only(u)) != 1:
            rec["reason"] = "its input is read elsewhere too" if isinstance(src, fx.Node) \
                else "no input node"
            continue
        fused_into = None
        if src.op == "call_module":
            mod = gm.get_submodule(str(src.target))
            if type(mod) in CONV_TYPES:
                new = clone_module(mod)  # fuse_conv_bn_eval would deep-copy the conv
                w, b = _fused(fuse_conv_bn_weights, mod.weight, mod.bias, bn)
                new.weight, new.bias = nn.Parameter(w), nn.Parameter(b)
            elif type(mod) is nn.Linear and len(tensor_shape(src) or ()) == 2:
                new = clone_module(mod)
                w, b = _fused(fuse_linear_bn_weights, mod.weight, mod.bias, bn)
                new.weight, new.bias = nn.Parameter(w), nn.Parameter(b)
            else:
                new = None
            if new is not None:
                target = str(src.target)
                if call_sites(gm.graph, target) > 1:
                    target = unique_name(gm, f"{target}_site")
                    src.target = target
                set_attr_path(gm, target, new)
                fused_into = target
        else:
            params = _conv_param_nodes(gm, src)
            if params is not None:
                w_node, b_node = params
                weight = get_attr_path(gm, str(w_node.target))
                bias = None if b_node is None else get_attr_path(gm, str(b_node.target))
                w, b = _fused(fuse_conv_bn_weights, weight, bias, bn)
                fused_into = set_functional_conv_params(gm, src, w_node, b_node, w.detach(),
                                                        b.detach())
        if fused_into is None:
            rec["reason"] = "not preceded by an exact Conv/Linear"
            continue
        bn_node.replace_all_uses_with(src)
        gm.graph.erase_node(bn_node)
        rec.update(action="fused", target=fused_into, path=module_path(bn_node) or rec["path"])
    return records
