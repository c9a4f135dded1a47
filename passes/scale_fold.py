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


def _fold_into_producer(gm: fx.GraphModule, chain: Chain, depth: int = 0,
                        dry: bool = False) -> str | None:
    """Fold into the producer of the chain's base; through ops the scale commutes with, and
    into every part of a sum or a channel concatenation. With ``dry``, only say where the
    chain would go: nothing is changed (a sum or a concat folds only when all its parts can)."""
    x = chain.base
    members = set(chain.members)
    # shape reads (x.shape, x.size()) see the same shape after the fold
    if any(u not in members and not reads_shape_only(u) for u in x.users):
        return None
    s, t = chain.scale, chain.shift
    shape = tensor_shape(x)
    dims = permute_dims(x)
    if dims is not None:
        return _fold_through_permute(gm, chain, dims, depth, dry)
    if chain.axis == -1:
        return _fold_tokens_into_producer(gm, chain, depth, dry)
    through = _commutes(gm, x, s, t)
    if through is not None and depth < 8 and x.args and isinstance(x.args[0], fx.Node):
        inner = Chain(x.args[0], s, t, [x], axis=chain.axis)
        if tensor_shape(x.args[0]) is not None and len(tensor_shape(x.args[0])) == len(shape) \
                and tensor_shape(x.args[0])[1] == shape[1]:
            target = _fold_into_producer(gm, inner, depth + 1, dry)
            if target is not None:
                return f"{target} through {through}"
    if depth < 8:
        parts = _sum_parts(x, s, t) or _cat_parts(x, s, t)
        if parts is not None:
            return _fold_into_parts(gm, x, parts, depth, dry)
    if x.op == "call_module":
        other = gm.get_submodule(str(x.target))
        if _exact(other, OTHER_NORMS) and getattr(other, "affine", False) and \
                getattr(other, "weight", None) is not None and other.weight.numel() == s.numel():
            if dry:
                return f"{x.target} (norm affine)"
            mod = module_for_call_site(gm, x)
            w, b = foldmath.fold_scale_into_norm(mod.weight, mod.bias, s, t, s.numel())
            mod.weight, mod.bias = nn.Parameter(w), nn.Parameter(b)
            return f"{x.target} (norm affine)"
    if x.op == "call_module":
        mod = gm.get_submodule(str(x.target))
        if _exact(mod, (nn.LayerNorm,)) and tuple(mod.normalized_shape) == tuple(shape[1:]):
            # LayerNorm over (C, *S) of a channels-first map: its affine is per element, the
            # channel scale repeats over the positions of each channel
            if dry:
                return f"{x.target} (norm affine)"
            mod = module_for_call_site(gm, x)
            full = tuple(shape[1:])
            spread = lambda v: v.reshape((-1,) + (1,) * (len(full) - 1)).expand(full).reshape(-1)
            w, b = foldmath.fold_scale_into_norm(
                None if mod.weight is None else mod.weight.reshape(-1),
                None if mod.bias is None else mod.bias.reshape(-1), spread(s), spread(t),
                dtype=_norm_dtype(mod, x))
            mod.weight, mod.bias = nn.Parameter(w.reshape(full)), nn.Parameter(b.reshape(full))
            mod.elementwise_affine = True
            return f"{x.target} (norm affine)"
        if _exact(mod, NORM_TYPES):
            if mod.running_mean is None or mod.num_features != s.numel():
                return None
            if dry:
                return f"{x.target} (norm affine)"
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
            if dry:
                return f"{x.target} (output rows)"
            mod = module_for_call_site(gm, x)
            w, b = foldmath.fold_scale_into_conv_out(mod.weight, mod.bias, s, t)
            mod.weight = nn.Parameter(w)
            mod.bias = nn.Parameter(b)
            return f"{x.target} (output rows)"
        return None
    params = _conv_param_nodes(gm, x)
    if params is not None:
        w_node, b_node = params
        if dry:
            return f"{str(w_node.target).rpartition('.')[0]} (output rows)"
        weight = get_attr_path(gm, str(w_node.target))
        bias = None if b_node is None else get_attr_path(gm, str(b_node.target))
        w, b = foldmath.fold_scale_into_conv_out(weight, bias, s, t)
        owner = set_functional_conv_params(gm, x, w_node, b_node, w, b)
        return f"{owner} (output rows)"
    return None


_CATS = {torch.cat, torch.concat}


def _norm_dtype(mod: nn.Module, x: fx.Node) -> torch.dtype | None:
    """The dtype a norm's folded affine parameters take: its weight's, else the dtype of the
    values it computes (a LayerNorm without affine parameters has nothing else to go by; the
    float64 scale must not make them float64 in a float32 model)."""
    if getattr(mod, "weight", None) is not None:
        return mod.weight.dtype
    return getattr(x.meta.get("tensor_meta"), "dtype", None)


def _sum_parts(x: fx.Node, s: torch.Tensor, t: torch.Tensor
               ) -> list[tuple[fx.Node, torch.Tensor, torch.Tensor]] | None:
    """``(a + b) * s + t = (a * s + t) + b * s`` (and ``a - b`` alike): the summands with their
    share of the chain, when both have the sum's shape (no broadcasting). The shift goes to
    one summand (:func:`_fold_into_parts` picks which)."""
    sub = is_op(x, SUB_OPS)
    if not (is_op(x, ADD_OPS) or sub) or len(x.args) != 2 or x.kwargs:
        return None
    a, b = x.args
    shape = tensor_shape(x)
    if not all(isinstance(v, fx.Node) and tensor_shape(v) == shape for v in (a, b)):
        return None
    if a is b:  # x + x = 2x: fold (s, t / 2) once; x - x is constant zero: leave it
        return None if sub else [(a, s, t / 2)]
    zero = torch.zeros_like(t)
    return [(a, s, t), (b, s, zero)]


def _cat_parts(x: fx.Node, s: torch.Tensor, t: torch.Tensor
               ) -> list[tuple[fx.Node, torch.Tensor, torch.Tensor]] | None:
    """``cat([a, b], 1) * s + t = cat([a * s_a + t_a, b * s_b + t_b], 1)``: the parts of a
    concatenation over the channels, each with its slice of the chain."""
    if x.op != "call_function" or x.target not in _CATS:
        return None
    seq = x.args[0] if x.args else x.kwargs.get("tensors")
    dim = x.args[1] if len(x.args) > 1 else x.kwargs.get("dim", 0)
    shape = tensor_shape(x)
    if not isinstance(seq, (list, tuple)) or shape is None or not isinstance(dim, int) or \
            dim % len(shape) != 1:
        return None
    if not all(isinstance(p, fx.Node) and tensor_shape(p) is not None for p in seq) or \
            len(set(seq)) != len(seq):
        return None  # a part listed twice would need two scales at once
    widths = [tensor_shape(p)[1] for p in seq]
    if sum(widths) != s.numel():
        return None
    out, start = [], 0
    for p, w in zip(seq, widths):
        out.append((p, s[start:start + w], t[start:start + w]))
        start += w
    return out


def _fold_into_parts(gm: fx.GraphModule, x: fx.Node,
                     parts: list[tuple[fx.Node, torch.Tensor, torch.Tensor]], depth: int,
                     dry: bool) -> str | None:
    """Fold each part's share into that part's producer, all or none (checked dry first)."""
    if _is_sum(x):
        # one summand takes the shift: the first whose producer can
        shift = parts[0][2]
        has_shift = bool(torch.any(shift != 0))
        plans = None
        for i in range(len(parts) if has_shift else 1):
            trial = [(p, sc, shift if j == i else torch.zeros_like(shift))
                     for j, (p, sc, _) in enumerate(parts)]
            if all(_fold_into_producer(gm, Chain(p, sc, sh, [x]), depth + 1, dry=True)
                   for p, sc, sh in trial):
                plans = trial
                break
        if plans is None:
            return None
    else:
        plans = parts
        if not all(_fold_into_producer(gm, Chain(p, sc, sh, [x]), depth + 1, dry=True)
                   for p, sc, sh in plans):
            return None
    targets = []
    for p, sc, sh in plans:
        target = _fold_into_producer(gm, Chain(p, sc, sh, [x]), depth + 1, dry)
        if target is None:  # the dry run said it would fold: an inconsistency, not a choice
            raise RuntimeError(f"asrfx internal error: folding into {p.name} (a part of "
                               f"{x.name}) failed after its dry run succeeded")
        targets.append(target)
    return " + ".join(targets) if _is_sum(x) else f"cat({', '.join(targets)})"


def _is_sum(x: fx.Node) -> bool:
    return is_op(x, ADD_OPS) or is_op(x, SUB_OPS)


def _fold_tokens_into_producer(gm: fx.GraphModule, chain: Chain, depth: int,
                               dry: bool = False) -> str | None:
    """Tokens ``(N, L, C)`` scaled per channel (last dim): into the producing Linear's output
    rows or LayerNorm's affine, through elementwise ops the scale commutes with (ReLU and
    LeakyReLU for a non-negative scale; identity and eval-mode dropout for any)."""
    x = chain.base
    s, t = chain.scale, chain.shift
    through = _commutes(gm, x, s, t, axis=-1)
    if x.op == "call_module":
        mod = gm.get_submodule(str(x.target))
        if _exact(mod, (nn.Linear,)) and mod.out_features == s.numel():
            if dry:
                return f"{x.target} (output rows)"
            mod = module_for_call_site(gm, x)
            w, b = foldmath.fold_scale_into_conv_out(mod.weight, mod.bias, s, t)
            mod.weight, mod.bias = nn.Parameter(w), nn.Parameter(b)
            return f"{x.target} (output rows)"
        elif _exact(mod, (nn.LayerNorm,)) and tuple(mod.normalized_shape) == (s.numel(),):
            if dry:
                return f"{x.target} (norm affine)"
            mod = module_for_call_site(gm, x)
            w, b = foldmath.fold_scale_into_norm(mod.weight, mod.bias, s, t, s.numel(),
                                                 dtype=_norm_dtype(mod, x))
            mod.weight, mod.bias = nn.Parameter(w), nn.Parameter(b)
            mod.elementwise_affine = True
            return f"{x.target} (norm affine)"
    if through is None or depth >= 8 or not (x.args and isinstance(x.args[0], fx.Node)):
        return None
    src = x.args[0]
    if tensor_shape(src) != tensor_shape(x) or \
            any(u is not x and not reads_shape_only(u) for u in src.users):
        return None
    target = _fold_into_producer(gm, Chain(src, s, t, [x], axis=-1), depth + 1, dry)
    return None if target is None else f"{target} through {through}"


def _fold_through_permute(gm: fx.GraphModule, chain: Chain, dims: tuple[int, ...],
                          depth: int, dry: bool = False) -> str | None:
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
                                 depth + 1, dry)
    return None if target is None else f"{target} through permute"


def _consumer(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """Follow pass-through modules (Identity, eval-mode Dropout) to the consuming layer."""
    while node.op == "call_module" and _exact(gm.get_submodule(str(node.target)), _PASS_THROUGH) \
            and len(node.users) == 1:
        node = next(iter(node.users))
    return node


def _fold_into_consumers(gm: fx.GraphModule, chain: Chain) -> str | None:
    """Fold into the layers that read the chain's result: every reader must take it.

    Channels first, the scale (and shift) also moves forward through what it commutes with --
    pass-through modules, ReLU / pooling (:func:`_commutes`), averages over the positions,
    the flatten of a pooled ``(N, C, 1, ...)`` map to ``(N, C)``, a channel concatenation (the
    other parts scaled by one) -- to Conv / Linear input columns or a BatchNorm's input side.
    """
    if chain.axis == -1:
        return _fold_tokens_into_consumers(gm, chain)
    sinks = _forward_sinks(gm, chain.root, chain.scale, chain.shift, 0, set())
    if not sinks:
        return None
    targets = []
    for kind, c, s, t, via in sinks:
        has_shift = bool(torch.any(t != 0))
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
            name = f"{c.target} (input columns)"
        elif kind == "bn":
            mod = module_for_call_site(gm, c)
            _fold_scale_into_norm_input(mod, s, t)
            name = f"{c.target} (norm input)"
        else:
            w_node, b_node = _conv_param_nodes(gm, c)
            weight = get_attr_path(gm, str(w_node.target))
            bias = None if b_node is None else get_attr_path(gm, str(b_node.target))
            groups = _functional_conv_arg(c, 6, "groups", 1)
            w, b = foldmath.fold_scale_into_conv_in(weight, bias, s, t if has_shift else None,
                                                    groups)
            name = f"{set_functional_conv_params(gm, c, w_node, b_node, w, b)} (input columns)"
        targets.append(name + (f" after {', '.join(via)}" if via else ""))
    return ", ".join(targets)


def _fold_scale_into_norm_input(mod: nn.Module, s: torch.Tensor, t: torch.Tensor) -> None:
    """An eval-mode BatchNorm of ``x * s + t``: ``a (x s + t - m) + b`` with ``a = g / sd`` is
    the same norm with running mean 0, weight ``g s`` and bias ``b + a (t - m)``.

    Nothing is changed in place: ``.to(float64)`` of a float64 buffer is the buffer itself, so
    zeroing the running mean in place would zero ``m`` too (and any module sharing the buffer);
    a new zero buffer is assigned instead."""
    f64 = torch.float64
    sd = torch.sqrt(mod.running_var.detach().to(f64) + mod.eps)
    g = mod.weight.detach().to(f64) if mod.weight is not None else torch.ones_like(sd)
    b = mod.bias.detach().to(f64) if mod.bias is not None else torch.zeros_like(sd)
    m = mod.running_mean.detach().to(f64)
    dtype = mod.running_var.dtype
    weight, bias = (g * s).to(dtype), (b + g / sd * (t - m)).to(dtype)
    mod.running_mean = torch.zeros_like(mod.running_mean)
    mod.affine = True
    mod.weight = nn.Parameter(weight)
    mod.bias = nn.Parameter(bias)


_GLOBAL_AVG_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_GLOBAL_AVG_FUNCTIONS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                         torch.adaptive_avg_pool1d, torch.mean, "mean"}
_FLATTENS = {torch.flatten, "flatten", "view", "reshape", torch.reshape, "squeeze",
             torch.squeeze}


def _only_first_arg(u: fx.Node, node: fx.Node) -> bool:
    """``node`` is ``u``'s first argument and none of its others."""
    if not u.args or u.args[0] is not node:
        return False
    others: list = []
    fx.node.map_arg((u.args[1:], u.kwargs), lambda n: others.append(n) or n)
    return node not in others


def _forward_sinks(gm: fx.GraphModule, node: fx.Node, s: torch.Tensor, t: torch.Tensor,
                   depth: int, seen: set) -> list | None:
    """The layers that take ``node``'s per-channel scale ``s`` and shift ``t`` (channels first)
    if every (value) reader of ``node`` leads to one: ``[(kind, layer node, s, t, via)]`` with
    kind conv / fconv / linear / bn, or None."""
    shape = tensor_shape(node)
    if shape is None or len(shape) < 2 or depth > 8:
        return None
    has_shift = bool(torch.any(t != 0))
    out = []
    for u in list(node.users):
        if reads_shape_only(u):
            continue  # the shape is the same after the fold
        if u in seen:
            return None  # reached twice: the two paths would need one combined scale
        seen.add(u)
        if u.op == "call_module":
            mod = gm.get_submodule(str(u.target))
            if not _only_first_arg(u, node):
                return None
            if _exact(mod, _PASS_THROUGH) and (type(mod) is nn.Identity or not mod.training):
                more = _forward_sinks(gm, u, s, t, depth + 1, seen)
                if more is None:
                    return None
                out += more
                continue
            if _exact(mod, CONV_TYPES):
                if has_shift and _reads_padding(mod.padding, mod.kernel_size):
                    return None
                out.append(("conv", u, s, t, []))
                continue
            if _exact(mod, (nn.Linear,)) and len(shape) == 2:
                out.append(("linear", u, s, t, []))
                continue
            if _exact(mod, NORM_TYPES) and not mod.training and mod.running_mean is not None \
                    and mod.num_features == s.numel():
                out.append(("bn", u, s, t, []))
                continue
        elif _conv_param_nodes(gm, u) is not None and _only_first_arg(u, node):
            pad = _functional_conv_arg(u, 4, "padding", 0)
            ksize = tuple(get_attr_path(gm, str(_conv_param_nodes(gm, u)[0].target)).shape[2:])
            if has_shift and _reads_padding(pad, ksize):
                return None
            out.append(("fconv", u, s, t, []))
            continue
        step = _forward_step(gm, u, node, s, t)
        if step is None:
            return None
        s2, t2, what = step
        more = _forward_sinks(gm, u, s2, t2, depth + 1, seen)
        if more is None:
            return None
        out += [(k, c, sc, sh, [what] + via) for k, c, sc, sh, via in more]
    return out or None


def _mutates_its_input(gm: fx.GraphModule, u: fx.Node) -> bool:
    """An in-place call (``nn.ReLU(inplace=True)``, ``F.relu(x, inplace=True)``, ``x.relu_()``):
    after a consumer fold it would write into the unscaled tensor, which others may read."""
    if u.op == "call_module":
        return bool(getattr(gm.get_submodule(str(u.target)), "inplace", False))
    if u.op == "call_method":
        return isinstance(u.target, str) and u.target.endswith("_")
    if u.op == "call_function":
        if u.kwargs.get("inplace") or _in_place(u):
            return True
        return u.target in _POSITIVE_HOMOGENEOUS_FUNCTIONS | _LINEAR_FUNCTIONS and \
            any(a is True for a in u.args[1:])  # a positional inplace=True
    return False


def _forward_step(gm: fx.GraphModule, u: fx.Node, node: fx.Node, s: torch.Tensor,
                  t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str] | None:
    """``u(node * s + t) = u(node) * s' + t'`` for a reader ``u`` of ``node``: (s', t', what u
    is), or None."""
    shape, ushape = tensor_shape(node), tensor_shape(u)
    if ushape is None or u.op == "output" or _mutates_its_input(gm, u):
        return None
    if u.op == "call_function" and u.target in _CATS:
        seq = u.args[0] if u.args else u.kwargs.get("tensors")
        dim = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim", 0)
        if not isinstance(seq, (list, tuple)) or not isinstance(dim, int) or \
                dim % len(ushape) != 1 or sum(1 for p in seq if p is node) != 1 or \
                not all(isinstance(p, fx.Node) and tensor_shape(p) is not None for p in seq):
            return None
        s2, t2 = [], []
        for p in seq:
            w = tensor_shape(p)[1]
            s2.append(s if p is node else torch.ones(w, dtype=s.dtype, device=s.device))
            t2.append(t if p is node else torch.zeros(w, dtype=t.dtype, device=t.device))
        return torch.cat(s2), torch.cat(t2), "cat"
    if not _only_first_arg(u, node) or len(ushape) < 2 or tuple(ushape[:2]) != tuple(shape[:2]):
        return None  # every step below keeps (N, C) in place
    through = _commutes(gm, u, s, t)
    if through is not None and len(ushape) == len(shape):
        return s, t, through
    # an average over the positions (any scale, any shift): a global pooling or mean
    spatial_gone = all(d == 1 for d in ushape[2:])
    if spatial_gone and len(ushape) in (2, len(shape)):
        if u.op == "call_module" and _exact(gm.get_submodule(str(u.target)), _GLOBAL_AVG_MODULES):
            return s, t, type(gm.get_submodule(str(u.target))).__name__
        if u.op in ("call_function", "call_method") and u.target in _GLOBAL_AVG_FUNCTIONS:
            return s, t, str(getattr(u.target, "__name__", u.target))
    # (N, C, 1, ...) -> (N, C): channels map one to one
    if len(ushape) == 2 and all(d == 1 for d in shape[2:]):
        if (u.op in ("call_function", "call_method") and u.target in _FLATTENS) or \
                (u.op == "call_module" and _exact(gm.get_submodule(str(u.target)),
                                                  (nn.Flatten,))):
            return s, t, "flatten"
    return None


def _fold_tokens_into_consumers(gm: fx.GraphModule, chain: Chain) -> str | None:
    """Tokens / channels last: only a Linear reads the channel (last) dim."""
    root = chain.root
    s, t = chain.scale, chain.shift
    has_shift = bool(torch.any(t != 0))
    plans = []
    for user in root.users:
        if reads_shape_only(user):
            continue
        c = _consumer(gm, user)
        if c is None:
            return None
        if c is not user and user.args[0] is not root:
            return None
        first = c.args[0] if c.args else None
        if c is user and (first is not root or root in c.args[1:]):
            return None
        if c.op == "call_module" and _exact(gm.get_submodule(str(c.target)), (nn.Linear,)):
            plans.append(c)
            continue
        return None
    if not plans:
        return None
    targets = []
    for c in plans:
        mod = module_for_call_site(gm, c)
        w, b = foldmath.fold_scale_into_linear_in(mod.weight, mod.bias, s,
                                                  t if has_shift else None)
        mod.weight = nn.Parameter(w)
        mod.bias = nn.Parameter(b)
        targets.append(f"{c.target} (input columns)")
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


def _chain_paths(chain: Chain) -> list[str]:
    """The module paths a chain's records are reported under: the root's, or -- when the chain
    joins the constants of several evaluated attention branches (two attention sites, or two
    calls of one attention module, scaling one tensor in a row) -- one per site, in graph order,
    so that no site's multiply is folded or kept unreported under another site's record."""
    paths = [module_path(m) for m in chain.members
             if any(isinstance(a, fx.Node) and a.op == "get_attr" and
                    str(a.target).rpartition(".")[2].startswith("asrfx_const") for a in m.args)]
    return paths if len(paths) > 1 else [module_path(chain.root)]


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
        recs = [pass_record(f"scale:{root.name}", path, chain.scale.numel())
                for path in _chain_paths(chain)]
        target = _fold_into_producer(gm, chain)
        if target is None:
            target = _fold_into_consumers(gm, chain)
        if target is None:
            for rec in recs:
                rec.update(action="kept", target="",
                           reason="no exact BatchNorm/Conv/Linear producer or consumer takes it")
            records.extend(recs)
            continue
        root.replace_all_uses_with(chain.base)
        replaced[root] = chain.base
        for m in reversed(chain.members):
            if not m.users:
                gm.graph.erase_node(m)
        for rec in recs:
            rec.update(action="folded", target=target, reason="")
        records.extend(recs)
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
