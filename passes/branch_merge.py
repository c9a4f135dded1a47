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

from typing import Any, Iterator

import torch
import torch.fx as fx
from torch import nn

from asrfx import foldmath
from asrfx.report import Site
from .graph_utils import (ADD_OPS, get_attr_path, is_op, module_path, value_readers,
                          safe_dce, set_attr_path, submodule, tensor_shape, unique_name)
from .layers import AVG_POOLS, BATCH_NORM_TYPES as NORM_TYPES, CONV_TYPES, batch_norm_call
from .protocol import PassContext, Step, record, run_steps

__all__ = ["merge_branches", "merge_sequential", "branch_merge_steps", "sequential_merge_steps",
           "padding_steps"]


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
    """("conv", module, input) / ("bn", module or batch_norm call, input) / ("id", None, node)
    for a summand."""
    if node.op == "call_module":
        mod = submodule(gm, node.target)
        if type(mod) in CONV_TYPES:
            return "conv", mod, node.args[0]
        if type(mod) in NORM_TYPES and not mod.training and mod.running_mean is not None:
            return "bn", mod, node.args[0]
    bn = batch_norm_call(gm, node)
    if bn is not None:
        return "bn", bn, node.args[0] if node.args else node.kwargs.get("input")
    return "id", None, node


def _candidate(gm: fx.GraphModule, add: fx.Node) -> tuple[list, list, fx.Node] | None:
    """(summands, their branches, the shared input) of a sum that is a multi-branch block: at
    least two summands read one input (a conv, a BN of it, or it), one of them a conv."""
    if add.graph is not gm.graph or not is_op(add, ADD_OPS) or len(add.args) != 2 or add.kwargs:
        return None
    ops = _operands(add)
    if not ops or len(ops) < 2:
        return None
    branches = [_branch(gm, o) for o in ops]
    inputs = [b[2] for b in branches]
    x0 = max(set(inputs), key=inputs.count)
    if inputs.count(x0) < 2 or not any(b[0] == "conv" and b[2] is x0 for b in branches):
        return None
    return ops, branches, x0


def _merged_kernel(branches: list, ref: nn.Module, size: tuple
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The one kernel and bias the branches sum to (identities and BatchNorms of the input
    as scaled identity kernels)."""
    weights, biases = [], []
    for kind, mod, _ in branches:
        if kind == "conv":
            weights.append(mod.weight.detach())
            biases.append(None if mod.bias is None else mod.bias.detach())
            continue
        eye = foldmath.identity_kernel(ref.out_channels, ref.groups, (1,) * len(size),
                                       ref.weight.dtype, ref.weight.device)
        if kind == "bn":
            scale, shift = foldmath.batchnorm_affine(mod.running_mean, mod.running_var,
                                                     mod.eps, mod.weight, mod.bias)
            eye, bias = foldmath.fold_scale_into_conv_out(eye, None, scale, shift)
            biases.append(bias)
        else:
            biases.append(None)
        weights.append(eye)
    return foldmath.merge_parallel_convs(weights, biases)


def _merge(gm: fx.GraphModule, add: fx.Node, ops: list, branches: list, x: fx.Node
           ) -> list[Site]:
    convs = [b for b in branches if b[0] == "conv"]
    convs = [b for b in convs if b[2] is x] + [b for b in convs if b[2] is not x]
    rec = record(f"merge:{add.name}", module_path(add), "branch merge",
                 convs[0][1].out_channels)
    why = _mergeable(gm, ops, branches, x)
    if why:
        rec.code, rec.reason = why
        return [rec]
    ref = convs[0][1]
    size = tuple(max(b[1].kernel_size[d] for b in convs) for d in range(len(ref.kernel_size)))
    offset = tuple(ref.kernel_size[d] // 2 - ref.padding[d] for d in range(len(size)))
    w, b = _merged_kernel(branches, ref, size)
    merged = type(ref)(ref.in_channels, ref.out_channels, size, stride=ref.stride,
                       padding=tuple(size[d] // 2 - offset[d] for d in range(len(size))),
                       groups=ref.groups, bias=True).to(device=ref.weight.device,
                                                        dtype=ref.weight.dtype)
    merged.weight, merged.bias = nn.Parameter(w), nn.Parameter(b)
    merged.train(False)
    name = unique_name(gm, f"{module_path(add) or 'merged'}.merged_conv"
                       if module_path(add) else "merged_conv")
    set_attr_path(gm, name, merged)
    with gm.graph.inserting_before(add):
        new = gm.graph.call_module(name, (x,))
    new.meta = dict(add.meta)
    add.replace_all_uses_with(new)
    rec.action, rec.target = "merged", f"{name} ({len(ops)} branches, kernel {size})"
    # an identity BatchNorm branch is absorbed here: its own record says so (a later record of
    # a site supersedes the "kept" one BatchNorm fusion gave it)
    absorbed = [record(f"merge:{add.name}", str(o.target) if o.op == "call_module" else
                       module_path(o) or br[1].owner, "conv+bn", br[1].num_features, "merged",
                       rec.target) for o, br in zip(ops, branches) if br[0] == "bn"]
    safe_dce(gm)  # the old branches, before the next sum is looked at
    return [rec] + absorbed


def branch_merge_steps(gm: fx.GraphModule) -> Iterator[Step]:
    """One step per sum of parallel branches with a conv (key ``"merge:<add node>"``);
    outermost sums first, so a three-branch block becomes one conv in one step."""
    for add in reversed(list(gm.graph.nodes)):
        found = _candidate(gm, add)
        if found is not None:
            yield Step(f"merge:{add.name}", lambda add=add, found=found: _merge(gm, add, *found))


def merge_branches(gm: fx.GraphModule, ctx: PassContext | None = None) -> list[Site]:
    """Merge every sum of parallel conv/BN/identity branches of one input into one conv.

    Returns:
        One "branch merge" record per sum of at least two branches with a conv among them
        (kept ones with a code), and a "conv+bn" record per BatchNorm branch merged.
    """
    return run_steps(branch_merge_steps(gm), ctx)


def _mergeable(gm: fx.GraphModule, ops: list[fx.Node], branches: list, x: fx.Node
               ) -> tuple[str, str] | None:
    """None when the branches sum to one conv, else (code, why not)."""
    convs = [b for b in branches if b[0] == "conv"]
    ref = convs[0][1]
    for o, (kind, mod, inp) in zip(ops, branches):
        if inp is not x:
            return "branches-read-different-inputs", "the branches do not read the same input"
        if kind != "id" and value_readers(o) != 1:
            return "branch-read-elsewhere", "a branch's output is read elsewhere too"
        if kind == "conv":
            if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
                return "branch-padding", f"a branch pads with {mod.padding_mode!r} / {mod.padding!r}"
            if any(d != 1 for d in mod.dilation) or any(k % 2 == 0 for k in mod.kernel_size):
                return ("dilated-or-even-kernel",
                        "a dilated or even-sized kernel is not a centred part of one kernel")
            if (mod.stride, mod.groups, mod.in_channels, mod.out_channels) != \
                    (ref.stride, ref.groups, ref.in_channels, ref.out_channels):
                return "branches-differ", "branches differ in stride, groups or channels"
            off = [mod.kernel_size[d] // 2 - mod.padding[d] for d in range(len(mod.kernel_size))]
            ref_off = [ref.kernel_size[d] // 2 - ref.padding[d] for d in range(len(off))]
            if off != ref_off:
                return ("windows-not-centred",
                        "branches' windows are not centred alike (kernel//2 - padding differs)")
        else:
            if any(s != 1 for s in ref.stride) or ref.in_channels != ref.out_channels:
                return ("identity-needs-stride-1",
                        "an identity branch needs stride 1 and equal channels")
            if kind == "bn" and mod.num_features != ref.out_channels:
                return "channels-differ", "an identity BatchNorm of another width"
            if any(k // 2 - p != 0 for k, p in zip(ref.kernel_size, ref.padding)):
                return ("identity-needs-same-padding",
                        "an identity branch needs 'same' padding on the convs")
    shape = tensor_shape(ops[0])
    if shape is None or any(tensor_shape(o) != shape for o in ops):
        return "branch-shapes-differ", "branch outputs differ in shape"
    return None


def _pointwise(mod: Any, groups: bool = False) -> bool:
    """A 1x1 conv of stride 1 with explicit zero padding (of any width: its border outputs are
    its bias); ungrouped unless ``groups``."""
    return (type(mod) in CONV_TYPES and all(k == 1 for k in mod.kernel_size)
            and all(s == 1 for s in mod.stride) and not isinstance(mod.padding, str)
            and mod.padding_mode == "zeros" and (groups or mod.groups == 1)
            and all(d == 1 for d in mod.dilation))


def _padding_of(node: fx.Node, rank: int) -> tuple[int, ...] | None:
    """The per-dimension widths of ``F.pad(y, pads)`` (constant zeros, the same on both sides
    of each of the ``rank`` spatial dims), in conv order, else None."""
    if node.op != "call_function" or node.target is not torch.nn.functional.pad:
        return None
    pads = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
    if not (isinstance(pads, (list, tuple)) and len(pads) == 2 * rank and
            all(isinstance(p, int) and p >= 0 for p in pads) and mode == "constant" and
            value in (None, 0, 0.0)):
        return None
    if any(pads[2 * i] != pads[2 * i + 1] for i in range(rank)):
        return None
    return tuple(pads[2 * (rank - 1 - i)] for i in range(rank))


def _fill_chain(node: fx.Node) -> tuple[list[tuple[Any, Any]], fx.Node]:
    """The item assignments (index, value) applied in turn to ``node``'s result (each step
    read by nothing else), and the last result."""
    from asrfx.tracing import set_items

    fills, end = [], node
    while len(end.users) == 1:
        (u,) = end.users
        if not (u.op == "call_function" and u.target is set_items and u.args[0] is end):
            break
        fills.append((u.args[1], u.args[2]))
        end = u
    return fills, end


def _border_fill(gm: fx.GraphModule, shape: tuple[int, ...], pad: tuple[int, ...],
                 fills: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """What the fills write into a padded map of ``shape`` (one sample, float64): (the values,
    where they write, the border of widths ``pad``); None when a value is not a constant."""
    values = torch.zeros((1, *shape[1:]), dtype=torch.float64)
    mask = torch.zeros((1, *shape[1:]), dtype=torch.bool)
    for index, v in fills:
        if isinstance(v, fx.Node):
            if v.op != "get_attr":
                return None
            v = get_attr_path(gm, str(v.target))
        if not isinstance(v, (int, float, torch.Tensor)):
            return None
        try:
            values[index] = torch.as_tensor(v).detach().to(torch.float64)
            mask[index] = True
        except (IndexError, RuntimeError, TypeError):
            return None
    border = torch.ones_like(mask)
    border[(slice(None), slice(None), *(slice(p, n - p) for p, n in zip(pad, shape[2:])))] = False
    return values, mask, border


def _absorb_padding(gm: fx.GraphModule, node: fx.Node, src: fx.Node, conv: nn.Module,
                    pad: tuple[int, ...]) -> list[Site]:
    """``F.pad`` of a 1x1 conv's output whose border is then filled with the conv's bias (or
    left zero for a conv without one) is that conv with padding ``pad``: its border outputs are
    its bias. The pad-with-the-norm's-shift of diverse-branch blocks (Ding et al., CVPR 2021,
    ``BNAndPad``) is this once its BatchNorm is fused into the 1x1 conv."""
    rec = record(f"pad:{node.name}", module_path(node) or str(src.target), "padding absorbed",
                 conv.out_channels)
    fills, end = _fill_chain(node)
    shape = tensor_shape(node)
    found = _border_fill(gm, shape, pad, fills) if shape is not None else None
    bias = conv.bias.detach().to(torch.float64) if conv.bias is not None else \
        torch.zeros(conv.out_channels, dtype=torch.float64)
    if found is None or not (torch.equal(found[1], found[2]) or
                             (not fills and not bool(torch.any(bias != 0)))):
        rec.code, rec.reason = "padding-not-bias", (
            "the padded border is not filled exactly, with constants: no conv's padding holds it")
        return [rec]
    values, _, border = found
    want = bias.view(1, -1, *([1] * len(pad))).expand_as(values)
    # the fill is computed from the norm's parameters as the fused bias is, in another order
    tol = 64 * torch.finfo(conv.weight.dtype).eps * max(1.0, float(bias.abs().max()))
    if fills and bool(torch.any((values - want).abs()[border] > tol)):
        rec.code, rec.reason = "padding-not-bias", (
            "the padded border holds values other than the 1x1 conv's bias: it is not that "
            "conv's padding")
        return [rec]
    new = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, pad,
                     conv.dilation, conv.groups, bias=conv.bias is not None)
    name = _install(gm, new, conv.weight.detach().clone(),
                    None if conv.bias is None else conv.bias.detach().clone(),
                    f"{src.target}_padded", node, end, src.args[0])
    rec.action, rec.target = "merged", f"{name} (padding {pad})"
    return [rec]


def _install(gm: fx.GraphModule, new: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None,
             base: str, before: fx.Node, replaced: fx.Node, source: Any) -> str:
    """Give ``new`` (a conv) ``weight`` and ``bias`` on their device and dtype, add it to ``gm``
    under a free name from ``base``, call it on ``source`` in place of ``replaced``; its name."""
    new = new.to(device=weight.device, dtype=weight.dtype).train(False)
    new.weight = nn.Parameter(weight)
    if bias is not None:
        new.bias = nn.Parameter(bias)
    name = unique_name(gm, base)
    set_attr_path(gm, name, new)
    with gm.graph.inserting_before(before):
        call = gm.graph.call_module(name, (source,))
    call.meta = dict(replaced.meta)
    replaced.replace_all_uses_with(call)
    safe_dce(gm)
    return name


def padding_steps(gm: fx.GraphModule) -> Iterator[Step]:
    """One step per ``F.pad`` of a 1x1 conv's output that nothing else reads (key
    ``"pad:<pad node>"``)."""
    for node in list(gm.graph.nodes):
        src = node.args[0] if node.op == "call_function" and node.args else None
        if not (isinstance(src, fx.Node) and src.op == "call_module"):
            continue
        conv = submodule(gm, src.target)
        if not _pointwise(conv, groups=True) or any(p != 0 for p in conv.padding):
            continue
        pad = _padding_of(node, len(conv.kernel_size))
        if pad is None or value_readers(src) != 1:
            continue
        yield Step(f"pad:{node.name}", lambda node=node, src=src, conv=conv, pad=pad:
                   _absorb_padding(gm, node, src, conv, pad))


def _sequential_pair(gm: fx.GraphModule, node: fx.Node) -> tuple | None:
    """(1x1 conv node, 1x1 conv, second layer) when ``node`` is a conv or average pool reading
    a pointwise conv directly (an ``nn.Identity`` in between, an optional norm switched off,
    changes nothing)."""
    if node.graph is not gm.graph or node.op != "call_module":
        return None
    second = submodule(gm, node.target)
    src = node.args[0] if node.args else None
    while isinstance(src, fx.Node) and src.op == "call_module" and \
            type(submodule(gm, src.target)) is nn.Identity and len(src.users) == 1:
        src = src.args[0]
    if not (isinstance(src, fx.Node) and src.op == "call_module"):
        return None
    first = submodule(gm, src.target)
    if not _pointwise(first):
        return None
    is_conv = type(second) in CONV_TYPES and len(second.kernel_size) == len(first.kernel_size)
    is_pool = type(second) in AVG_POOLS and second.ceil_mode is False
    return (src, first, second) if is_conv or is_pool else None


def _then_conv(first: nn.Module, second: nn.Module, has_b1: bool) -> tuple:
    """(code, reason) or (weight, bias, new conv) of 1x1 conv -> kxk conv."""
    if second.groups != 1:
        return "second-conv-grouped", "the second conv is grouped"
    if second.padding_mode != "zeros" or isinstance(second.padding, str):
        return "second-conv-padding", (f"the second conv pads with {second.padding_mode!r} / "
                                       f"{second.padding!r}, not explicit zeros")
    if has_b1 and any(p != 0 for p in second.padding):
        return "bias-before-padded-conv", ("1x1 conv with bias -> zero-padded conv is not one "
                                           "conv: the padding would have to hold the bias")
    b1 = first.bias
    w, b = foldmath.merge_sequential_convs(first.weight.detach(), None if b1 is None
                                           else b1.detach(), second.weight.detach(),
                                           None if second.bias is None else second.bias.detach())
    # the 1x1 conv's own padding (its border outputs are its bias, which the merged bias holds
    # too) and the second conv's zeros both become zeros around the input
    pad = tuple(p1 + p2 for p1, p2 in zip(first.padding, second.padding))
    return w, b, type(second)(first.in_channels, second.out_channels, second.kernel_size,
                              second.stride, pad, second.dilation, bias=True)


def _then_pool(first: nn.Module, second: nn.Module, has_b1: bool) -> tuple:
    """(code, reason) or (weight, bias, new conv) of 1x1 conv -> average pool."""
    n = len(first.kernel_size)
    k, stride, pad = (v if isinstance(v, tuple) else (v,) * n
                      for v in (second.kernel_size, second.stride, second.padding))
    if any(p != 0 for p in pad) and not second.count_include_pad:
        return "pool-excludes-padding", ("average pool with padding that it leaves out of the "
                                         "count: its divisor varies at the border, no kernel's does")
    if any(p != 0 for p in pad) and has_b1:
        return "bias-before-padded-pool", ("average pool with padding: the padded positions "
                                           "would hold the 1x1 conv's bias, not 0")
    if getattr(second, "divisor_override", None):
        return "pool-divisor-override", "average pool with a divisor override"
    w = foldmath.avg_pool_kernel(first.weight.detach(), k)
    # a copy: the merged conv must not share its bias with the 1x1 conv it replaces
    b = first.bias.detach().clone() if first.bias is not None else \
        torch.zeros(first.out_channels, dtype=w.dtype, device=w.device)
    pad = tuple(p1 + p2 for p1, p2 in zip(first.padding, pad))  # as in _then_conv
    return w, b, type(first)(first.in_channels, first.out_channels, k, stride, pad, bias=True)


#: the report group of 1x1 conv -> conv / pool pairs that stay two layers (printed as one line:
#: every pointwise -> depthwise pair of a MobileNet is one)
PAIRS_KEPT = "1x1 -> kxk pairs left as two layers"


def _merge_pair(gm: fx.GraphModule, node: fx.Node, src: fx.Node, first: nn.Module,
                second: nn.Module) -> list[Site]:
    rec = record(f"seq:{node.name}", str(node.target), "sequential merge", first.out_channels)
    rec.group = PAIRS_KEPT  # cleared below when the pair merges
    if value_readers(src) != 1:
        rec.code, rec.reason = "pointwise-read-elsewhere", \
            "the 1x1 conv's output is read elsewhere too"
        return [rec]
    has_b1 = first.bias is not None and bool(torch.any(first.bias != 0))
    made = (_then_conv if type(second) in CONV_TYPES else _then_pool)(first, second, has_b1)
    if len(made) == 2:
        rec.code, rec.reason = made
        return [rec]
    w, b, new = made
    name = _install(gm, new, w.to(first.weight.device, first.weight.dtype),
                    b.to(first.weight.device, first.weight.dtype), f"{node.target}_merged", node,
                    node, src.args[0])
    rec.action, rec.target = "merged", f"{name} (1x1 -> {type(second).__name__})"
    rec.group = ""
    return [rec]


def sequential_merge_steps(gm: fx.GraphModule) -> Iterator[Step]:
    """One step per 1x1 conv -> conv / average pool pair (key ``"seq:<second node>"``)."""
    for node in list(gm.graph.nodes):
        found = _sequential_pair(gm, node)
        if found is not None:
            yield Step(f"seq:{node.name}", lambda node=node, found=found:
                       _merge_pair(gm, node, *found))


def merge_sequential(gm: fx.GraphModule, ctx: PassContext | None = None) -> list[Site]:
    """Merge a 1x1 conv followed directly by a kxk conv, or by an average pool, into one conv
    (DBB's sequential branches, Ding et al., CVPR 2021), where that is exact; a "sequential
    merge" record per pair, kept ones with a code. First, a 1x1 conv's output padded and filled
    with its bias becomes the conv with that padding (a "padding absorbed" record each)."""
    return run_steps(padding_steps(gm), ctx) + run_steps(sequential_merge_steps(gm), ctx)
