"""The layer vocabulary of the fold passes: which module types and functional ops they know,
and how to read and write the parameters of one call site.

Everything the fold passes (:mod:`.scale_fold`, :mod:`.bn_fusion`, :mod:`.branch_merge`) and the
fold targets (:mod:`.targets`) need to know about layers lives here, so that adding a layer type
means one entry in one place. Types are matched *exactly* (``type(mod) is ...``): a subclass's
forward may do more than its base class, and the tracer traces through subclasses anyway, so
their real ops are what the passes see.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .graph_utils import (call_sites, get_attr_path, reads_shape_only, set_attr_path, submodule,
                          unique_name)

__all__ = ["CONV_TYPES", "CONV_TRANSPOSE_TYPES", "BATCH_NORM_TYPES", "AFFINE_NORM_TYPES",
           "FUNCTIONAL_CONVS", "PASS_THROUGH", "POSITIVE_HOMOGENEOUS_MODULES", "LINEAR_MODULES",
           "POSITIVE_HOMOGENEOUS_FUNCTIONS", "LINEAR_FUNCTIONS", "ELEMENTWISE",
           "GLOBAL_AVG_MODULES", "GLOBAL_AVG_FUNCTIONS", "FLATTENS", "CATS", "DIV_OPS",
           "AVG_POOLS", "exact", "module_for_call_site", "conv_param_nodes",
           "functional_conv_arg", "set_functional_conv_params", "reads_padding", "in_place",
           "mutates_its_input", "as_tuple", "FUNCTIONAL_BATCH_NORMS", "BatchNormCall",
           "batch_norm_call", "batch_norm_args"]

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
BATCH_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# norms whose affine parameters are per channel (when ``affine=True``)
AFFINE_NORM_TYPES = (nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
FUNCTIONAL_CONVS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}
FUNCTIONAL_BATCH_NORMS = {F.batch_norm}
DIV_OPS = {operator.truediv, operator.itruediv, torch.div, "div", "div_"}
PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)

# per channel and positively homogeneous: op(x * s) = op(x) * s for s >= 0
POSITIVE_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.MaxPool1d, nn.MaxPool2d,
                                nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                                nn.AdaptiveMaxPool3d)
# per channel and linear: op(x * s) = op(x) * s for any s
LINEAR_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                  nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d) + PASS_THROUGH
POSITIVE_HOMOGENEOUS_FUNCTIONS = {F.relu, torch.relu, F.leaky_relu, F.max_pool1d, F.max_pool2d,
                                  F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                                  F.adaptive_max_pool3d, "relu", "relu_"}
LINEAR_FUNCTIONS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.dropout}
# of those, the ones acting on each element alone (they commute with a last-dim scale too)
ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, F.relu, torch.relu, F.leaky_relu, "relu", "relu_",
               nn.Identity, nn.Dropout, F.dropout)
GLOBAL_AVG_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
GLOBAL_AVG_FUNCTIONS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                        torch.adaptive_avg_pool1d, torch.mean, "mean"}
FLATTENS = {torch.flatten, "flatten", "view", "reshape", torch.reshape, "squeeze", torch.squeeze}
CATS = {torch.cat, torch.concat}
# ops splitting a tensor into parts along a dim (args: tensor, sizes / chunks / sections, dim)
SPLITS = {torch.split, torch.chunk, torch.tensor_split, "split", "chunk", "tensor_split",
          "split_with_sizes"}


def exact(mod: Any, types: tuple) -> bool:
    """``type(mod)`` is one of ``types`` (no subclasses)."""
    return type(mod) in types


def as_tuple(v: Any) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def module_for_call_site(gm: fx.GraphModule, node: fx.Node) -> nn.Module:
    """The module ``node`` calls, cloned under a new name first if other nodes call it too (a
    fold changes one call site, never all of them)."""
    target = str(node.target)
    mod = submodule(gm, target)
    if call_sites(gm.graph, target) > 1:
        name = unique_name(gm, f"{target}_site")
        mod = copy.deepcopy(mod)
        set_attr_path(gm, name, mod)
        node.target = name
    return mod


def conv_param_nodes(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, fx.Node | None] | None:
    """(weight, bias) get_attr nodes of a functional conv whose parameters only it reads, or
    None (not a functional conv, or its parameters are computed or shared)."""
    if node.op != "call_function" or node.target not in FUNCTIONAL_CONVS:
        return None
    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if not _only_reader(gm, w) or (b is not None and not _only_reader(gm, b)):
        return None
    return w, b


def _only_reader(gm: fx.GraphModule, a: Any) -> bool:
    """``a`` is a get_attr node whose value one node reads, and no other get_attr node's
    value is read from the same attribute (fx makes one node per read of a buffer); reads of
    the shape alone (``weight.shape[-2:]`` in timm's "same" padding) do not count."""
    if not (isinstance(a, fx.Node) and a.op == "get_attr"):
        return False
    readers = [u for n in gm.graph.nodes if n.op == "get_attr" and n.target == a.target
               for u in n.users if not reads_shape_only(u)]
    return len(readers) == 1


def functional_conv_arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    """Argument ``name`` (position ``index``) of a functional conv call."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def set_functional_conv_params(gm: fx.GraphModule, node: fx.Node, w_node: fx.Node,
                               b_node: fx.Node | None, w: torch.Tensor, b: torch.Tensor) -> str:
    """Write new weight/bias of a functional conv, creating a bias parameter if it had none.

    Returns:
        The path of the module owning the weight (what a report names as the target).
    """
    old_w = get_attr_path(gm, str(w_node.target))
    set_attr_path(gm, str(w_node.target), nn.Parameter(w, requires_grad=old_w.requires_grad))
    if b_node is not None:
        set_attr_path(gm, str(b_node.target), nn.Parameter(b, requires_grad=old_w.requires_grad))
        return str(w_node.target).rpartition(".")[0] or str(w_node.target)
    owner = str(w_node.target).rpartition(".")[0]
    name = unique_name(gm, f"{owner}.bias" if owner else "bias")
    set_attr_path(gm, name, nn.Parameter(b, requires_grad=old_w.requires_grad))
    with gm.graph.inserting_before(node):
        b_node = gm.graph.get_attr(name)
    if len(node.args) > 2:
        args = list(node.args)
        args[2] = b_node
        node.args = tuple(args)
    else:
        kwargs = dict(node.kwargs)
        kwargs.pop("bias", None)
        if len(node.args) == 2:
            node.args = node.args + (b_node,)
        else:
            kwargs["bias"] = b_node
        node.kwargs = kwargs
    return owner or str(w_node.target)


def reads_padding(padding: Any, kernel_size: tuple) -> bool:
    """Whether a conv's kernel ever reads zero padding ("valid" never; "same" only for
    kernels wider than 1)."""
    if padding == "valid":
        return False
    if padding == "same":
        return any(k > 1 for k in as_tuple(kernel_size))
    return any(p != 0 for p in as_tuple(padding))


def in_place(n: fx.Node) -> bool:
    """An in-place arithmetic call (``x.mul_(s)``, ``x *= s``)."""
    t = n.target
    return (isinstance(t, str) and t.endswith("_")) or t in (operator.imul, operator.iadd,
                                                             operator.isub, operator.itruediv)


def mutates_its_input(gm: fx.GraphModule, u: fx.Node) -> bool:
    """An in-place call (``nn.ReLU(inplace=True)``, ``F.relu(x, inplace=True)``, ``x.relu_()``):
    after a consumer fold it would write into the unscaled tensor, which others may read."""
    if u.op == "call_module":
        return bool(getattr(submodule(gm, u.target), "inplace", False))
    if u.op == "call_method":
        return isinstance(u.target, str) and u.target.endswith("_")
    if u.op == "call_function":
        if u.kwargs.get("inplace") or in_place(u):
            return True
        return u.target in POSITIVE_HOMOGENEOUS_FUNCTIONS | LINEAR_FUNCTIONS and \
            any(a is True for a in u.args[1:])  # a positional inplace=True
    return False


_BATCH_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training",
                    "momentum", "eps")
_BATCH_NORM_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1,
                        "eps": 1e-5}


@dataclass
class BatchNormCall:
    """An eval-mode ``F.batch_norm`` call on get_attr statistics (what a traced-through
    BatchNorm subclass, e.g. timm's ``BatchNormAct2d``, leaves in the graph): its argument nodes
    and values. The attribute names mirror a BatchNorm module's, so code written for the
    module reads it alike."""

    node: fx.Node
    nodes: dict  # argument name -> get_attr node (running_mean, running_var, weight, bias)
    running_mean: torch.Tensor
    running_var: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float

    @property
    def num_features(self) -> int:
        return self.running_mean.numel()

    @property
    def owner(self) -> str:
        """The path of the module holding the statistics (the norm's name in reports)."""
        return str(self.nodes["running_mean"].target).rpartition(".")[0]

    def sole_reader(self, gm: fx.GraphModule, *names: str) -> bool:
        """The call is the only reader of each of those attributes (present ones)."""
        return all(self.nodes.get(k) is None or _only_reader(gm, self.nodes[k]) for k in names)


def batch_norm_args(node: fx.Node) -> dict[str, Any] | None:
    """The arguments of an ``F.batch_norm`` call by name (``input``, ``running_mean``,
    ``running_var``, ``weight``, ``bias``, ``training``, ``momentum``, ``eps``), defaults
    filled in; None for any other node."""
    if node.op != "call_function" or node.target not in FUNCTIONAL_BATCH_NORMS:
        return None
    return dict(_BATCH_NORM_DEFAULTS, **dict(zip(_BATCH_NORM_ARGS, node.args)), **node.kwargs)


def batch_norm_call(gm: fx.GraphModule, node: fx.Node) -> BatchNormCall | None:
    """``node`` as an eval-mode ``F.batch_norm`` whose statistics (and weight and bias, when
    given) are get_attr tensors, else None."""
    args = batch_norm_args(node)
    if args is None or args["training"] is not False or \
            not isinstance(args["eps"], (int, float)):
        return None
    nodes = {k: args[k] for k in ("running_mean", "running_var", "weight", "bias")}
    values = {}
    for k, a in nodes.items():
        if a is None and k in ("weight", "bias"):
            values[k] = None
            continue
        if not (isinstance(a, fx.Node) and a.op == "get_attr"):
            return None
        values[k] = get_attr_path(gm, str(a.target))
        if not isinstance(values[k], torch.Tensor):
            return None
    return BatchNormCall(node, nodes, values["running_mean"], values["running_var"],
                         values["weight"], values["bias"], float(args["eps"]))
