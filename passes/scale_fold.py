"""Folding per-channel constants into neighbouring layers.

After constant evaluation an ASR site is ``x * v`` with ``v`` a constant buffer. This pass
collects chains of per-channel affine ops on one tensor (``x * s``, ``x + t``, ``x - t``,
``x / s``, and the residual gate ``x * g + x``) into one map ``x -> x * s + t`` and folds it:

1. into the producer of ``x`` when nothing else reads ``x``: an (exact-type) BatchNorm's affine,
   or a Conv's / Linear's output rows and bias (module or functional conv on parameters);
2. else into the consumers, when every reader of the result is an exact Conv / Linear
   (input columns; a shift only where the kernel never reads padding);
3. else the multiply by a constant buffer stays, and the report says why.

A module called at several places is cloned for the folded call site, never changed for all.
Subclasses are never targets: their forward may do more than their base class (the tracer traces
through them, so their real ops are visible to this pass instead).
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from asrfx import foldmath
from .find_attention import permute_dims
from .graph_utils import (ADD_OPS, MUL_OPS, SUB_OPS, call_sites, get_attr_path, is_op,
                          module_path, pass_record, reads_shape_only, set_attr_path,
                          tensor_shape, unique_name, value_dependent)

__all__ = ["fold_scales", "Chain", "CONV_TYPES", "NORM_TYPES", "FUNCTIONAL_CONVS",
           "module_for_call_site"]

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
FUNCTIONAL_CONVS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}
_DIV_OPS = {operator.truediv, operator.itruediv, torch.div, "div", "div_"}
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


@dataclass
class Chain:
    base: fx.Node
    scale: torch.Tensor
    shift: torch.Tensor
    members: list[fx.Node] = field(default_factory=list)
    axis: int = 1  # the channel dim: 1 (channels first) or -1 (tokens (N, L, C))

    @property
    def root(self) -> fx.Node:
        return self.members[-1]


def _exact(mod: Any, types: tuple) -> bool:
    return type(mod) in types


def _per_channel_const(gm: fx.GraphModule, node: Any, xshape: tuple, dep: set
                       ) -> torch.Tensor | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr" or node in dep:
        return None
    value = get_attr_path(gm, str(node.target))
    if not isinstance(value, torch.Tensor) or len(xshape) < 2:
        return None
    cs = tuple(value.shape)
    if len(cs) > len(xshape):
        return None
    cs = (1,) * (len(xshape) - len(cs)) + cs
    c = xshape[1]
    if cs[0] != 1 or cs[1] not in (1, c) or any(d != 1 for d in cs[2:]):
        return None
    return value.detach().reshape(-1).expand(c).to(torch.float64)


def _token_const(gm: fx.GraphModule, node: Any, xshape: tuple, dep: set) -> torch.Tensor | None:
    """The per-channel vector of a constant ``(1, .., 1, C)`` / ``(C,)`` scaling the last dim of
    tokens ``(N, L, C)`` or a channels-last map ``(N, *S, C)``, or None.

    On a rank >= 4 tensor the last dim may as well be a width: folding is exact either way,
    because the only targets of a last-dim scale are layers that act on the last dim
    (LayerNorm over it, Linear).
    """
    if not isinstance(node, fx.Node) or node.op != "get_attr" or node in dep or len(xshape) < 3:
        return None
    value = get_attr_path(gm, str(node.target))
    if not isinstance(value, torch.Tensor) or value.dim() > len(xshape):
        return None
    cs = (1,) * (len(xshape) - value.dim()) + tuple(value.shape)
    if any(d != 1 for d in cs[:-1]) or cs[-1] != xshape[-1] or xshape[-1] == 1:
        return None
    return value.detach().reshape(-1).to(torch.float64)


def _const(gm: fx.GraphModule, node: Any, xshape: tuple, dep: set
           ) -> tuple[torch.Tensor, int] | None:
    """(per-channel vector, channel axis) of a constant operand, channels first preferred."""
    v = _per_channel_const(gm, node, xshape, dep)
    if v is not None and (_token_const(gm, node, xshape, dep) is None or xshape[1] == xshape[-1]):
        return v, 1
    v = _token_const(gm, node, xshape, dep)
    return (v, -1) if v is not None else None


def _collect_chains(gm: fx.GraphModule, select: Callable[[str], bool]) -> list[Chain]:
    dep = value_dependent(gm.graph)
    chains: dict[fx.Node, Chain] = {}

    def start(x: fx.Node, axis: int, device: torch.device) -> Chain | None:
        c = tensor_shape(x)[axis]
        if x in chains and len(x.users) == 1:
            if chains[x].axis != axis:
                return None
            return chains.pop(x)
        ones = torch.ones(c, dtype=torch.float64, device=device)  # where the constants live
        return Chain(x, ones, torch.zeros_like(ones), axis=axis)

    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method") or len(n.args) != 2 or n.kwargs:
            continue
        shape = tensor_shape(n)
        if shape is None or len(shape) < 2 or n not in dep:
            continue
        a, b = n.args
        chain = None
        if _in_place(n) and isinstance(a, fx.Node) and \
                sum(1 for u in a.users if not reads_shape_only(u)) > 1:
            continue  # later readers of a would see the in-place result: not a local chain
        for x, k in ((a, b), (b, a)):
            if not (isinstance(x, fx.Node) and x in dep and tensor_shape(x) == shape):
                continue
            found = _const(gm, k, shape, dep)
            if found is not None:
                const, axis = found
                kind = ("mul" if is_op(n, MUL_OPS) else "add" if is_op(n, ADD_OPS) else
                        "sub" if is_op(n, SUB_OPS) and x is a else
                        "div" if is_op(n, _DIV_OPS) and x is a else None)
                chain = start(x, axis, const.device) if kind else None
                if chain is None:
                    break
                if kind == "mul":
                    chain.scale, chain.shift = chain.scale * const, chain.shift * const
                elif kind == "add":
                    chain.shift = chain.shift + const
                elif kind == "sub":
                    chain.shift = chain.shift - const
                else:
                    chain.scale, chain.shift = chain.scale / const, chain.shift / const
                break
            # residual gate: (x * s + t) + x
            if is_op(n, ADD_OPS) and isinstance(k, fx.Node) and x in chains and \
                    len(x.users) == 1 and chains[x].base is k:
                chain = chains.pop(x)
                chain.scale = chain.scale + 1
                break
        if chain is not None:
            chain.members.append(n)
            chains[n] = chain
    return [c for c in chains.values() if select(f"scale:{c.root.name}")]


def _in_place(n: fx.Node) -> bool:
    t = n.target
    return (isinstance(t, str) and t.endswith("_")) or t in (operator.imul, operator.iadd,
                                                             operator.isub, operator.itruediv)


def module_for_call_site(gm: fx.GraphModule, node: fx.Node) -> nn.Module:
    """The module ``node`` calls, cloned under a new name first if other nodes call it too."""
    target = str(node.target)
    mod = gm.get_submodule(target)
    if call_sites(gm.graph, target) > 1:
        name = unique_name(gm, f"{target}_site")
        mod = copy.deepcopy(mod)
        set_attr_path(gm, name, mod)
        node.target = name
    return mod


def _conv_param_nodes(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, fx.Node | None] | None:
    """(weight, bias) get_attr nodes of a functional conv, if it is foldable (sole users)."""
    if node.op != "call_function" or node.target not in FUNCTIONAL_CONVS:
        return None
    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if not (isinstance(w, fx.Node) and w.op == "get_attr" and len(w.users) == 1):
        return None
    if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr" and len(b.users) == 1):
        return None
    return w, b


def _functional_conv_arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def set_functional_conv_params(gm: fx.GraphModule, node: fx.Node, w_node: fx.Node,
                               b_node: fx.Node | None, w: torch.Tensor, b: torch.Tensor) -> str:
    """Write new weight/bias of a functional conv, creating a bias parameter if it had none."""
    old_w = get_attr_path(gm, str(w_node.target))
    set_attr_path(gm, str(w_node.target), nn.Parameter(w, requires_grad=old_w.requires_grad))
    if b_node is None:
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
            kwargs["bias"] = b_node
            node.kwargs = kwargs
            if len(node.args) == 2:
                node.args = node.args + (kwargs.pop("bias"),)
                node.kwargs = kwargs
    else:
        set_attr_path(gm, str(b_node.target), nn.Parameter(b, requires_grad=old_w.requires_grad))
    return str(w_node.target).rpartition(".")[0]


_POSITIVE_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.MaxPool1d, nn.MaxPool2d,
                                 nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                                 nn.AdaptiveMaxPool3d)
_LINEAR_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                   nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d) + _PASS_THROUGH
_POSITIVE_HOMOGENEOUS_FUNCTIONS = {F.relu, torch.relu, F.leaky_relu, F.max_pool1d, F.max_pool2d,
                                   F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                                   F.adaptive_max_pool3d, "relu", "relu_"}
_LINEAR_FUNCTIONS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                     F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.dropout}
OTHER_NORMS = (nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


_ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, F.relu, torch.relu, F.leaky_relu, "relu", "relu_",
                nn.Identity, nn.Dropout, F.dropout)


def _commutes(gm: fx.GraphModule, node: fx.Node, s: torch.Tensor, t: torch.Tensor,
              axis: int = 1) -> str | None:
    """Why ``op(z) * s == op(z * s)`` holds for this node, or None.

    A per-channel scale moves through a per-channel positively homogeneous op (ReLU,
    LeakyReLU, max pooling) when it is non-negative, and through a linear per-channel op
    (average pooling, eval-mode dropout, identity) whatever its sign. ReLU6 is not homogeneous
    (it clips at 6), and a shift does not commute with any of them. With the channels last
    (``axis=-1``) only the elementwise ones qualify: a pooling op would pool the channels.
    """
    if bool(torch.any(t != 0)):
        return None
    nonneg = bool(torch.all(s >= 0))
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if type(mod) is nn.ReLU6 or (axis != 1 and type(mod) not in _ELEMENTWISE):
            return None
        if _exact(mod, _POSITIVE_HOMOGENEOUS_MODULES):
            return type(mod).__name__ if nonneg else None
        if _exact(mod, _LINEAR_MODULES):
            return type(mod).__name__
        return None
    if node.op in ("call_function", "call_method"):
        if axis != 1 and node.target not in _ELEMENTWISE:
            return None
        name = getattr(node.target, "__name__", str(node.target))
        if node.target in _POSITIVE_HOMOGENEOUS_FUNCTIONS:
            return name if nonneg else None
        if node.target in _LINEAR_FUNCTIONS and not node.kwargs.get("training", False):
            if node.target is F.dropout and (len(node.args) > 2 and node.args[2]):
                return None
            return name
    return None


def _fold_into_producer(gm: fx.GraphModule, chain: Chain, depth: int = 0) -> str | None:
    """Fold into the producer of the chain's base; through ops the scale commutes with."""
    x = chain.base
    members = set(chain.members)
    # shape reads (x.shape, x.size()) see the same shape after the fold
    if any(u not in members and not reads_shape_only(u) for u in x.users):
        return None
    s, t = chain.scale, chain.shift
    shape = tensor_shape(x)
    dims = permute_dims(x)
    if dims is not None:
        return _fold_through_permute(gm, chain, dims, depth)
    if chain.axis == -1:
        return _fold_tokens_into_producer(gm, chain, depth)
    through = _commutes(gm, x, s, t)
    if through is not None and depth < 8 and x.args and isinstance(x.args[0], fx.Node):
        inner = Chain(x.args[0], s, t, [x], axis=chain.axis)
        if tensor_shape(x.args[0]) is not None and len(tensor_shape(x.args[0])) == len(shape) \
                and tensor_shape(x.args[0])[1] == shape[1]:
            target = _fold_into_producer(gm, inner, depth + 1)
            if target is not None:
                return f"{target} through {through}"
    if x.op == "call_module":
        other = gm.get_submodule(str(x.target))
        if _exact(other, OTHER_NORMS) and getattr(other, "affine", False) and \
                getattr(other, "weight", None) is not None and other.weight.numel() == s.numel():
            mod = module_for_call_site(gm, x)
            w, b = foldmath.fold_scale_into_norm(mod.weight, mod.bias, s, t, s.numel())
            mod.weight, mod.bias = nn.Parameter(w), nn.Parameter(b)
            return f"{x.target} (norm affine)"
    if x.op == "call_module":
        mod = gm.get_submodule(str(x.target))
        if _exact(mod, (nn.LayerNorm,)) and tuple(mod.normalized_shape) == tuple(shape[1:]):
            # LayerNorm over (C, *S) of a channels-first map: its affine is per element, the
            # channel scale repeats over the positions of each channel
            mod = module_for_call_site(gm, x)
            full = tuple(shape[1:])
            spread = lambda v: v.reshape((-1,) + (1,) * (len(full) - 1)).expand(full).reshape(-1)
            w, b = foldmath.fold_scale_into_norm(
                None if mod.weight is None else mod.weight.reshape(-1),
                None if mod.bias is None else mod.bias.reshape(-1), spread(s), spread(t))
            mod.weight, mod.bias = nn.Parameter(w.reshape(full)), nn.Parameter(b.reshape(full))
            mod.elementwise_affine = True
            return f"{x.target} (norm affine)"
        if _exact(mod, NORM_TYPES):
            if mod.running_mean is None or mod.num_features != s.numel():
                return None
            mod = module_for_call_site(gm, x)
            w, b = foldmath.fold_scale_into_norm(mod.weight, mod.bias, s, t, mod.num_features)
            w, b = w.to(mod.running_var.dtype), b.to(mod.running_var.dtype)
            if not mod.affine:
                mod.affine = True
            mod.weight = nn.Parameter(w)
            mod.bias = nn.Parameter(b)
            return f"{x.target} (norm affine)"
        if _exact(mod, CONV_TYPES) or (_exact(mod, (nn.Linear,)) and len(shape) == 2):
            if mod.weight.shape[0] != s.numel():
                return None
            mod = module_for_call_site(gm, x)
            w, b = foldmath.fold_scale_into_conv_out(mod.weight, mod.bias, s, t)
            mod.weight = nn.Parameter(w)
            mod.bias = nn.Parameter(b)
            return f"{x.target} (output rows)"
        return None
    params = _conv_param_nodes(gm, x)
    if params is not None:
        w_node, b_node = params
        weight = get_attr_path(gm, str(w_node.target))
        bias = None if b_node is None else get_attr_path(gm, str(b_node.target))
        w, b = foldmath.fold_scale_into_conv_out(weight, bias, s, t)
        owner = set_functional_conv_params(gm, x, w_node, b_node, w, b)
        return f"{owner} (output rows)"
    return None


def _fold_tokens_into_producer(gm: fx.GraphModule, chain: Chain, depth: int) -> str | None:
    """Tokens ``(N, L, C)`` scaled per channel (last dim): into the producing Linear's output
    rows or LayerNorm's affine, through elementwise ops the scale commutes with (ReLU and
    LeakyReLU for a non-negative scale; identity and eval-mode dropout for any)."""
    x = chain.base
    s, t = chain.scale, chain.shift
    through = _commutes(gm, x, s, t, axis=-1)
    if x.op == "call_module":
        mod = gm.get_submodule(str(x.target))
        if _exact(mod, (nn.Linear,)) and mod.out_features == s.numel():
            mod = module_for_call_site(gm, x)
            w, b = foldmath.fold_scale_into_conv_out(mod.weight, mod.bias, s, t)
            mod.weight, mod.bias = nn.Parameter(w), nn.Parameter(b)
            return f"{x.target} (output rows)"
        elif _exact(mod, (nn.LayerNorm,)) and tuple(mod.normalized_shape) == (s.numel(),):
            mod = module_for_call_site(gm, x)
            w, b = foldmath.fold_scale_into_norm(mod.weight, mod.bias, s, t, s.numel())
            mod.weight, mod.bias = nn.Parameter(w), nn.Parameter(b)
            mod.elementwise_affine = True
            return f"{x.target} (norm affine)"
    if through is None or depth >= 8 or not (x.args and isinstance(x.args[0], fx.Node)):
        return None
    src = x.args[0]
    if tensor_shape(src) != tensor_shape(x) or \
            any(u is not x and not reads_shape_only(u) for u in src.users):
        return None
    target = _fold_into_producer(gm, Chain(src, s, t, [x], axis=-1), depth + 1)
    return None if target is None else f"{target} through {through}"


def _fold_through_permute(gm: fx.GraphModule, chain: Chain, dims: tuple[int, ...],
                          depth: int) -> str | None:
    """``permute(z, dims) * s`` scales dim ``dims[axis]`` of ``z``: continue on ``z`` when that
    is its channel dim (1, channels first) or its last dim (channels last / tokens).
    ConvNeXt's ``x.permute(0, 3, 1, 2)`` turns a channels-first scale after the block into a
    last-dim scale of its final Linear."""
    x = chain.base
    src = x.args[0] if x.args else None
    shape = tensor_shape(src) if isinstance(src, fx.Node) else None
    if depth >= 8 or shape is None or len(shape) != len(dims):
        return None
    moved = dims[1 if chain.axis == 1 else len(dims) - 1]
    axis = 1 if moved == 1 else -1 if moved == len(dims) - 1 else None
    if axis is None:
        return None
    target = _fold_into_producer(gm, Chain(src, chain.scale, chain.shift, [x], axis=axis),
                                 depth + 1)
    return None if target is None else f"{target} through permute"


def _consumer(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """Follow pass-through modules (Identity, eval-mode Dropout) to the consuming layer."""
    while node.op == "call_module" and _exact(gm.get_submodule(str(node.target)), _PASS_THROUGH) \
            and len(node.users) == 1:
        node = next(iter(node.users))
    return node


def _fold_into_consumers(gm: fx.GraphModule, chain: Chain) -> str | None:
    root = chain.root
    s, t = chain.scale, chain.shift
    has_shift = bool(torch.any(t != 0))
    shape = tensor_shape(root)
    plans = []
    for user in root.users:
        c = _consumer(gm, user)
        if c is None:
            return None
        if c is not user and user.args[0] is not root:
            return None
        first = c.args[0] if c.args else None
        if c is user and (first is not root or root in c.args[1:]):
            return None
        if chain.axis == -1:  # tokens: only a Linear reads the channel (last) dim
            if c.op == "call_module" and _exact(gm.get_submodule(str(c.target)), (nn.Linear,)):
                plans.append(("linear", c))
                continue
            return None
        if c.op == "call_module":
            mod = gm.get_submodule(str(c.target))
            if _exact(mod, CONV_TYPES):
                if has_shift and _reads_padding(mod.padding, mod.kernel_size):
                    return None
                plans.append(("conv", c))
            elif _exact(mod, (nn.Linear,)) and len(shape) == 2:
                plans.append(("linear", c))
            else:
                return None
        elif _conv_param_nodes(gm, c) is not None:
            pad = _functional_conv_arg(c, 4, "padding", 0)
            w_node = _conv_param_nodes(gm, c)[0]
            ksize = tuple(get_attr_path(gm, str(w_node.target)).shape[2:])
            if has_shift and _reads_padding(pad, ksize):
                return None
            plans.append(("fconv", c))
        else:
            return None
    if not plans:
        return None
    targets = []
    for kind, c in plans:
        if kind in ("conv", "linear"):
            mod = module_for_call_site(gm, c)
            if kind == "conv":
                w, b = foldmath.fold_scale_into_conv_in(mod.weight, mod.bias, s,
                                                        t if has_shift else None, mod.groups)
            else:
                w, b = foldmath.fold_scale_into_linear_in(mod.weight, mod.bias, s,
                                                          t if has_shift else None)
            mod.weight = nn.Parameter(w)
            mod.bias = nn.Parameter(b)
            targets.append(f"{c.target} (input columns)")
        else:
            w_node, b_node = _conv_param_nodes(gm, c)
            weight = get_attr_path(gm, str(w_node.target))
            bias = None if b_node is None else get_attr_path(gm, str(b_node.target))
            groups = _functional_conv_arg(c, 6, "groups", 1)
            w, b = foldmath.fold_scale_into_conv_in(weight, bias, s, t if has_shift else None,
                                                    groups)
            owner = set_functional_conv_params(gm, c, w_node, b_node, w, b)
            targets.append(f"{owner} (input columns)")
    return ", ".join(targets)


def _reads_padding(padding: Any, kernel_size: tuple) -> bool:
    """Whether a conv's kernel ever reads zero padding ("valid" never; "same" only for
    kernels wider than 1)."""
    if padding == "valid":
        return False
    if padding == "same":
        return any(k > 1 for k in _tuple(kernel_size))
    return any(p != 0 for p in _tuple(padding))


def _tuple(v: Any) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def fold_scales(gm: fx.GraphModule, select: Callable[[str], bool] = lambda key: True
                ) -> list[dict[str, Any]]:
    """Fold every per-channel affine chain of ``gm`` (eval mode) into a neighbouring layer.

    Args:
        gm: a GraphModule with shape metadata, whose constants are get_attr buffers
            (run :func:`evaluate_constants` first).
        select: called with each chain's key (``"scale:<node name>"``); only chains it accepts
            are folded (used to isolate the site behind a failed check).

    Returns:
        One record per chain: ``{"key", "path", "channels", "action", "target"}``.
    """
    records = []
    covered: set[str] = set()
    replaced: dict[fx.Node, fx.Node] = {}  # folded chain root -> the node that now stands for it
    for chain in _collect_chains(gm, select):
        while chain.base in replaced:  # this chain scales the result of a chain folded before
            chain.base = replaced[chain.base]
        covered.update(m.name for m in chain.members)
        root = chain.root
        rec = pass_record(f"scale:{root.name}", module_path(root), chain.scale.numel())
        target = _fold_into_producer(gm, chain)
        if target is None:
            target = _fold_into_consumers(gm, chain)
        if target is None:
            rec.update(action="kept", target="",
                       reason="no exact BatchNorm/Conv/Linear producer or consumer takes it")
            records.append(rec)
            continue
        root.replace_all_uses_with(chain.base)
        replaced[root] = chain.base
        for m in reversed(chain.members):
            if not m.users:
                gm.graph.erase_node(m)
        rec.update(action="folded", target=target, reason="")
        records.append(rec)
    # nothing is skipped silently: report every per-channel constant op still in the graph
    dep = value_dependent(gm.graph)
    for n in gm.graph.nodes:
        if n.name in covered or not select(f"scale:{n.name}") or n.op not in ("call_function", "call_method") \
                or len(n.args) != 2 or n not in dep:
            continue
        if not (is_op(n, MUL_OPS) or is_op(n, ADD_OPS) or is_op(n, SUB_OPS) or is_op(n, _DIV_OPS)):
            continue
        shape = tensor_shape(n)
        if shape is None or len(shape) < 2:
            continue
        found = next((f for f in (_const(gm, k, shape, dep) for k in n.args) if f), None)
        if found is None:
            continue
        reason = ("in-place op on a tensor that is read again later" if _in_place(n)
                  else "no exact BatchNorm/Conv/Linear producer or consumer takes it")
        records.append(pass_record(f"scale:{n.name}", module_path(n), shape[found[1]],
                                   reason=reason))
    return records
