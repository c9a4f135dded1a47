"""Merging parallel conv branches that are summed: multi-branch SRP from the graph.

RepVGG (kxk conv+BN, 1x1 conv+BN, identity BN), ACNet (kxk, 1xk, kx1) and similar blocks train
several branches that read the same input and are added. After BatchNorm fusion each branch is an
exact-type conv with a bias (or an identity, or a BatchNorm of the input, which is a
per-channel affine map: an identity kernel scaled). When every branch has the same stride, groups,
dilation 1, zero padding and the same window centres (``k//2 - padding`` equal per dim), their sum
is one conv: kernels padded to the largest size and summed, biases summed. Anything else is left
as it is and reported.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from asrfx import foldmath
from .graph_utils import (ADD_OPS, is_op, module_path, pass_record, reads_shape_only, safe_dce,
                          set_attr_path, tensor_shape, unique_name)
from .scale_fold import CONV_TYPES, NORM_TYPES

__all__ = ["merge_branches", "merge_sequential"]


def _operands(add: fx.Node) -> list[fx.Node] | None:
    """The summands of a tree of two-operand adds whose inner adds have no other reader."""
    out: list[fx.Node] = []
    for a in add.args[:2]:
        if not isinstance(a, fx.Node):
            return None
        if is_op(a, ADD_OPS) and len(a.args) == 2 and not a.kwargs and len(a.users) == 1:
            inner = _operands(a)
            if inner is None:
                return None
            out += inner
        else:
            out.append(a)
    return out


def _branch(gm: fx.GraphModule, node: fx.Node) -> tuple[str, Any, fx.Node] | None:
    """("conv", module, input) / ("bn", module, input) / ("id", None, node) for a summand."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if type(mod) in CONV_TYPES:
            return "conv", mod, node.args[0]
        if type(mod) in NORM_TYPES and not mod.training and mod.running_mean is not None:
            return "bn", mod, node.args[0]
    return "id", None, node


def merge_branches(gm: fx.GraphModule, select: Callable[[str], bool] = lambda key: True
                   ) -> list[dict[str, Any]]:
    """Merge every sum of parallel conv/BN/identity branches of one input into one conv.

    Returns:
        One record per sum of at least two branches with a conv among them.
    """
    records = []
    # outermost sums first, so a three-branch block becomes one conv in one step
    for add in reversed(list(gm.graph.nodes)):
        if add.graph is not gm.graph or not is_op(add, ADD_OPS) or len(add.args) != 2 or \
                add.kwargs:
            continue
        ops = _operands(add)
        if not ops or len(ops) < 2:
            continue
        branches = [_branch(gm, o) for o in ops]
        convs = [b for b in branches if b[0] == "conv"]
        if not convs:
            continue
        # a multi-branch block: at least two summands read one input (a conv, a BN of it, or it)
        inputs = [b[2] for b in branches]
        x0 = max(set(inputs), key=inputs.count)
        if inputs.count(x0) < 2 or not any(b[0] == "conv" and b[2] is x0 for b in branches):
            continue
        convs = [b for b in convs if b[2] is x0] + [b for b in convs if b[2] is not x0]
        key = f"merge:{add.name}"
        if not select(key):
            continue
        x = convs[0][2]
        rec = pass_record(key, module_path(add), convs[0][1].out_channels)
        records.append(rec)
        why = _mergeable(gm, ops, branches, x)
        if why:
            rec["reason"] = why
            continue
        ref = convs[0][1]
        size = tuple(max(b[1].kernel_size[d] for b in convs) for d in range(len(ref.kernel_size)))
        offset = tuple(ref.kernel_size[d] // 2 - ref.padding[d] for d in range(len(size)))
        weights, biases = [], []
        for kind, mod, _ in branches:
            if kind == "conv":
                weights.append(mod.weight.detach())
                biases.append(None if mod.bias is None else mod.bias.detach())
            else:
                eye = foldmath.identity_kernel(ref.out_channels, ref.groups, (1,) * len(size),
                                               ref.weight.dtype, ref.weight.device)
                if kind == "bn":
                    # read-only float64 views (``.double()`` of a float64 tensor is the tensor
                    # itself): every value below is computed into new tensors
                    std = torch.sqrt(mod.running_var.detach().double() + mod.eps)
                    g = mod.weight.detach().double() if mod.weight is not None \
                        else torch.ones_like(std)
                    beta = mod.bias.detach().double() if mod.bias is not None \
                        else torch.zeros_like(std)
                    eye = (eye.double() * (g / std).view(-1, *([1] * (eye.dim() - 1))))
                    biases.append((beta - mod.running_mean.detach().double() * g / std).to(
                        ref.weight.dtype))
                    eye = eye.to(ref.weight.dtype)
                else:
                    biases.append(None)
                weights.append(eye)
        w, b = foldmath.merge_parallel_convs(weights, biases)
        merged = type(ref)(ref.in_channels, ref.out_channels, size, stride=ref.stride,
                           padding=tuple(size[d] // 2 - offset[d] for d in range(len(size))),
                           groups=ref.groups, bias=True).to(device=ref.weight.device,
                                                            dtype=ref.weight.dtype)
        merged.weight = nn.Parameter(w)
        merged.bias = nn.Parameter(b)
        merged.train(False)
        name = unique_name(gm, f"{module_path(add) or 'merged'}.merged_conv"
                           if module_path(add) else "merged_conv")
        set_attr_path(gm, name, merged)
        with gm.graph.inserting_before(add):
            new = gm.graph.call_module(name, (x,))
        new.meta = dict(add.meta)
        add.replace_all_uses_with(new)
        rec.update(action="merged", target=f"{name} ({len(ops)} branches, kernel {size})",
                   absorbed=[str(o.target) for o, b in zip(ops, branches) if b[0] == "bn"])
        safe_dce(gm)  # the old branches, before the next sum is looked at
    return records


def _mergeable(gm: fx.GraphModule, ops: list[fx.Node], branches: list, x: fx.Node) -> str:
    """'' when the branches sum to one conv, else why not."""
    convs = [b for b in branches if b[0] == "conv"]
    ref = convs[0][1]
    for o, (kind, mod, inp) in zip(ops, branches):
        if inp is not x:
            return "the branches do not read the same input"
        if kind != "id" and sum(1 for u in o.users if not reads_shape_only(u)) != 1:
            return "a branch's output is read elsewhere too"
        if kind == "conv":
            if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
                return f"a branch pads with {mod.padding_mode!r} / {mod.padding!r}"
            if any(d != 1 for d in mod.dilation) or any(k % 2 == 0 for k in mod.kernel_size):
                return "a dilated or even-sized kernel is not a centred part of one kernel"
            if (mod.stride, mod.groups, mod.in_channels, mod.out_channels) != \
                    (ref.stride, ref.groups, ref.in_channels, ref.out_channels):
                return "branches differ in stride, groups or channels"
            off = [mod.kernel_size[d] // 2 - mod.padding[d] for d in range(len(mod.kernel_size))]
            ref_off = [ref.kernel_size[d] // 2 - ref.padding[d] for d in range(len(off))]
            if off != ref_off:
                return "branches' windows are not centred alike (kernel//2 - padding differs)"
        else:
            if any(s != 1 for s in ref.stride) or ref.in_channels != ref.out_channels:
                return "an identity branch needs stride 1 and equal channels"
            if kind == "bn" and mod.num_features != ref.out_channels:
                return "an identity BatchNorm of another width"
            if any(k // 2 - p != 0 for k, p in zip(ref.kernel_size, ref.padding)):
                return "an identity branch needs 'same' padding on the convs"
    shape = tensor_shape(ops[0])
    if shape is None or any(tensor_shape(o) != shape for o in ops):
        return "branch outputs differ in shape"
    return ""


_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)


def _pointwise(mod: Any) -> bool:
    return (type(mod) in CONV_TYPES and all(k == 1 for k in mod.kernel_size)
            and all(s == 1 for s in mod.stride) and not isinstance(mod.padding, str)
            and all(p == 0 for p in mod.padding) and mod.groups == 1
            and all(d == 1 for d in mod.dilation))


def merge_sequential(gm: fx.GraphModule, select: Callable[[str], bool] = lambda key: True
                     ) -> list[dict[str, Any]]:
    """Merge a 1x1 conv followed directly by a kxk conv, or by an average pool, into one conv
    (DBB's sequential branches), where that is exact; report where it is not."""
    records = []
    for node in list(gm.graph.nodes):
        if node.graph is not gm.graph or node.op != "call_module":
            continue
        second = gm.get_submodule(str(node.target))
        src = node.args[0] if node.args else None
        # an nn.Identity in between (an optional norm switched off) changes nothing
        while isinstance(src, fx.Node) and src.op == "call_module" and \
                type(gm.get_submodule(str(src.target))) is nn.Identity and len(src.users) == 1:
            src = src.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module"):
            continue
        first = gm.get_submodule(str(src.target))
        if not _pointwise(first):
            continue
        is_conv = type(second) in CONV_TYPES and len(second.kernel_size) == len(first.kernel_size)
        is_pool = type(second) in _AVG_POOLS and second.ceil_mode is False
        if not (is_conv or is_pool):
            continue
        key = f"seq:{node.name}"
        if not select(key):
            continue
        rec = pass_record(key, str(node.target), first.out_channels)
        records.append(rec)
        if sum(1 for u in src.users if not reads_shape_only(u)) != 1:
            rec["reason"] = "the 1x1 conv's output is read elsewhere too"
            continue
        b1 = first.bias
        has_b1 = b1 is not None and bool(torch.any(b1 != 0))
        if is_conv:
            if second.groups != 1 or second.padding_mode != "zeros" or \
                    isinstance(second.padding, str):
                rec["reason"] = "the second conv is grouped or not zero-padded"
                continue
            if has_b1 and any(p != 0 for p in second.padding):
                rec["reason"] = ("1x1 conv with bias -> zero-padded conv is not one conv: the "
                                 "padding would have to hold the bias")
                continue
            w, b = foldmath.merge_sequential_convs(first.weight.detach(), None if b1 is None
                                                   else b1.detach(), second.weight.detach(),
                                                   None if second.bias is None
                                                   else second.bias.detach())
            new = type(second)(first.in_channels, second.out_channels, second.kernel_size,
                               second.stride, second.padding, second.dilation, bias=True)
        else:
            k = second.kernel_size if isinstance(second.kernel_size, tuple) else \
                (second.kernel_size,) * len(first.kernel_size)
            stride = second.stride if isinstance(second.stride, tuple) else \
                (second.stride,) * len(k)
            pad = second.padding if isinstance(second.padding, tuple) else \
                (second.padding,) * len(k)
            if any(p != 0 for p in pad) and (not second.count_include_pad or has_b1):
                rec["reason"] = ("average pool with padding: the padded positions would hold "
                                 "the 1x1 conv's bias, not 0")
                continue
            if getattr(second, "divisor_override", None):
                rec["reason"] = "average pool with a divisor override"
                continue
            w = foldmath.avg_pool_kernel(first.weight.detach(), k)
            # a copy: the merged conv must not share its bias with the 1x1 conv it replaces
            b = first.bias.detach().clone() if first.bias is not None else \
                torch.zeros(first.out_channels, dtype=w.dtype, device=w.device)
            new = type(first)(first.in_channels, first.out_channels, k, stride, pad, bias=True)
        new = new.to(device=first.weight.device, dtype=first.weight.dtype).train(False)
        new.weight, new.bias = nn.Parameter(w), nn.Parameter(b)
        name = unique_name(gm, f"{node.target}_merged")
        set_attr_path(gm, name, new)
        with gm.graph.inserting_before(node):
            merged = gm.graph.call_module(name, (src.args[0],))
        merged.meta = dict(node.meta)
        node.replace_all_uses_with(merged)
        safe_dce(gm)
        rec.update(action="merged", target=f"{name} (1x1 -> {type(second).__name__})")
    return records

