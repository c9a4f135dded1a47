"""Fold targets: the layers a per-channel affine map ``x -> x * s + t`` can fold into.

A *producer* target absorbs the map on its output (``layer(x) * s + t`` becomes one layer: a
conv's output rows, a norm's affine parameters); a *consumer* target absorbs it on its input
(``layer(x * s + t)``: a conv's input columns, a BatchNorm's input side). Each target is a small
object with two methods:

- ``check(gm, node, scale, shift, axis)`` -> ``None`` when this call site accepts the map, else a
  :class:`Refusal` (a stable ``code`` and a sentence saying why not). It changes nothing.
- ``apply(gm, node, scale, shift)`` -> the name of what took the map, for the report. Only
  called after ``check`` accepted; it writes new parameters (the call site's module is cloned
  first when other call sites share it).

Targets are registered per exact module type and per functional op; the fold passes look them
up with :func:`producer_target` / :func:`consumer_target` and never test layer types themselves.
The identities are in :mod:`asrfx.foldmath`. ``scale`` and ``shift`` are float64 vectors of
shape ``(C,)``; ``axis`` is the channel dim of the tensor at the call site: 1 (channels first)
or -1 (tokens ``(N, L, C)`` / channels last).

Adding a target for one's own layer type::

    from asrfx.passes.targets import FoldTarget, Refusal, register_producer

    class MyConvOutput(FoldTarget):
        fuses_batchnorm = True            # Conv -> BatchNorm fusion may use it too
        def check(self, gm, node, scale, shift, axis):
            mod = gm.get_submodule(str(node.target))
            if axis != 1 or mod.weight.shape[0] != scale.numel():
                return Refusal("channels-differ", "not one output row per channel")
        def apply(self, gm, node, scale, shift):
            mod = module_for_call_site(gm, node)
            w, b = foldmath.fold_scale_into_conv_out(mod.weight, mod.bias, scale, shift)
            mod.weight, mod.bias = nn.Parameter(w), nn.Parameter(b)
            return f"{node.target} (output rows)"

    register_producer(MyConv, MyConvOutput())

The fold's output check (``asrfx.fold(check=True)``) still compares the result with the
unfolded model, so a target whose identity is wrong fails loudly rather than silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from asrfx import foldmath
from .graph_utils import get_attr_path, set_attr_path, submodule, tensor_shape
from .layers import (AFFINE_NORM_TYPES, BATCH_NORM_TYPES, CONV_TRANSPOSE_TYPES, CONV_TYPES,
                     FUNCTIONAL_BATCH_NORMS, FUNCTIONAL_CONVS, batch_norm_call,
                     conv_param_nodes, functional_conv_arg, module_for_call_site, reads_padding,
                     set_functional_conv_params)

__all__ = ["Refusal", "FoldTarget", "Fold", "register_producer", "register_consumer",
           "producer_target", "consumer_target"]


@dataclass(frozen=True)
class Refusal:
    """Why a fold did not happen: a stable machine-readable ``code`` and a sentence."""

    code: str
    reason: str


class FoldTarget:
    """One kind of layer a per-channel affine map folds into (see the module docstring)."""

    #: whether Conv -> BatchNorm fusion may fold a following BatchNorm into this layer
    fuses_batchnorm = False

    def check(self, gm: fx.GraphModule, node: fx.Node, scale: torch.Tensor,
              shift: torch.Tensor, axis: int) -> Refusal | None:
        raise NotImplementedError

    def apply(self, gm: fx.GraphModule, node: fx.Node, scale: torch.Tensor,
              shift: torch.Tensor) -> str:
        raise NotImplementedError


@dataclass
class Fold:
    """One planned fold: ``target.apply(gm, node, scale, shift)``, reached through ``via``."""

    target: FoldTarget
    node: fx.Node
    scale: torch.Tensor
    shift: torch.Tensor
    via: tuple[str, ...] = ()

    def apply(self, gm: fx.GraphModule) -> str:
        name = self.target.apply(gm, self.node, self.scale, self.shift)
        return name + (f" after {', '.join(self.via)}" if self.via else "")


_PRODUCERS: dict[Any, FoldTarget] = {}
_CONSUMERS: dict[Any, FoldTarget] = {}


def register_producer(key: type | Callable | str, target: FoldTarget) -> None:
    """Make ``target`` the producer target of calls to modules of exact type ``key`` (a class)
    or of the functional op ``key`` (a function, or a method name)."""
    _PRODUCERS[key] = target


def register_consumer(key: type | Callable | str, target: FoldTarget) -> None:
    """Make ``target`` the consumer target of calls to ``key`` (see :func:`register_producer`)."""
    _CONSUMERS[key] = target


def _lookup(table: dict, gm: fx.GraphModule, node: fx.Node) -> FoldTarget | None:
    if node.op == "call_module":
        return table.get(type(submodule(gm, node.target)))
    if node.op in ("call_function", "call_method"):
        try:
            return table.get(node.target)
        except TypeError:  # an unhashable target
            return None
    return None


def producer_target(gm: fx.GraphModule, node: fx.Node) -> FoldTarget | None:
    """The registered producer target of ``node``'s layer, or None."""
    return _lookup(_PRODUCERS, gm, node)


def consumer_target(gm: fx.GraphModule, node: fx.Node) -> FoldTarget | None:
    """The registered consumer target of ``node``'s layer, or None."""
    return _lookup(_CONSUMERS, gm, node)


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module:
    return submodule(gm, node.target)


def _set_params(mod: nn.Module, w: torch.Tensor, b: torch.Tensor) -> None:
    mod.weight, mod.bias = nn.Parameter(w), nn.Parameter(b)


def _channels(what: str, have: int, scale: torch.Tensor) -> Refusal | None:
    if have != scale.numel():
        return Refusal("channels-differ", f"{what} has {have} channels, the scale "
                                          f"{scale.numel()}")
    return None


def _nonzero(shift: torch.Tensor) -> torch.Tensor | None:
    """``shift``, or None where it is all zeros (the input-side identities then skip it)."""
    return shift if bool(torch.any(shift != 0)) else None


def _norm_dtype(mod: nn.Module, x: fx.Node) -> torch.dtype | None:
    """The dtype a norm's folded affine parameters take: its weight's, else the dtype of the
    values it computes (a LayerNorm without affine parameters has nothing else to go by; the
    float64 scale must not make them float64 in a float32 model)."""
    if getattr(mod, "weight", None) is not None:
        return mod.weight.dtype
    return getattr(x.meta.get("tensor_meta"), "dtype", None)


# ---------------------------------------------------------------- producers: output side

class ConvOutput(FoldTarget):
    """``conv(x) * s + t`` (or ``linear(x)`` of ``(N, C)``): output rows and bias."""

    fuses_batchnorm = True

    def check(self, gm, node, scale, shift, axis):
        mod = _module(gm, node)
        if axis != 1 or (isinstance(mod, nn.Linear) and len(tensor_shape(node) or ()) != 2):
            return Refusal("channel-axis", "the scale is not over this layer's output channels")
        return _channels(str(node.target), mod.weight.shape[0], scale)

    def apply(self, gm, node, scale, shift):
        mod = module_for_call_site(gm, node)
        _set_params(mod, *foldmath.fold_scale_into_conv_out(mod.weight, mod.bias, scale, shift))
        return f"{node.target} (output rows)"


class ConvTransposeOutput(FoldTarget):
    """``conv_transpose(x) * s + t``: the output channels (weight dim 1, per group) and bias."""

    fuses_batchnorm = True

    def check(self, gm, node, scale, shift, axis):
        if axis != 1:
            return Refusal("channel-axis", "the scale is not over this layer's output channels")
        return _channels(str(node.target), _module(gm, node).out_channels, scale)

    def apply(self, gm, node, scale, shift):
        mod = module_for_call_site(gm, node)
        _set_params(mod, *foldmath.fold_scale_into_conv_transpose_out(
            mod.weight, mod.bias, scale, shift, mod.groups))
        return f"{node.target} (output channels)"


class LinearOutput(ConvOutput):
    """A Linear's output rows: ``(N, C)`` channels first, or tokens ``(N, L, C)``."""

    def check(self, gm, node, scale, shift, axis):
        mod = _module(gm, node)
        if axis == -1:
            return _channels(str(node.target), mod.out_features, scale)
        return super().check(gm, node, scale, shift, axis)


class FunctionalConvOutput(FoldTarget):
    """``F.conv2d(x, w, b) * s + t`` with ``w``, ``b`` parameters only this call reads."""

    fuses_batchnorm = True

    def check(self, gm, node, scale, shift, axis):
        params = conv_param_nodes(gm, node)
        if params is None:
            return Refusal("computed-weight", "its weight or bias is computed or shared")
        if axis != 1:
            return Refusal("channel-axis", "the scale is not over the conv's output channels")
        return _channels(str(params[0].target),
                         get_attr_path(gm, str(params[0].target)).shape[0], scale)

    def apply(self, gm, node, scale, shift):
        w_node, b_node = conv_param_nodes(gm, node)
        weight = get_attr_path(gm, str(w_node.target))
        bias = None if b_node is None else get_attr_path(gm, str(b_node.target))
        w, b = foldmath.fold_scale_into_conv_out(weight, bias, scale, shift)
        return f"{set_functional_conv_params(gm, node, w_node, b_node, w, b)} (output rows)"


class NormAffine(FoldTarget):
    """``norm(x) * s + t``: a per-channel norm's affine parameters. A BatchNorm (which must
    have running statistics: it is folded in eval mode) gains them if it had none; a GroupNorm /
    InstanceNorm must have them."""

    def __init__(self, batch_norm: bool):
        self.batch_norm = batch_norm

    def check(self, gm, node, scale, shift, axis):
        mod = _module(gm, node)
        if axis != 1:
            return Refusal("channel-axis", "the scale is not over the norm's channels")
        if self.batch_norm and mod.running_mean is None:
            return Refusal("no-running-stats", f"{node.target} has no running statistics")
        if not self.batch_norm and (not getattr(mod, "affine", False) or mod.weight is None):
            return Refusal("norm-without-affine", f"{node.target} has no affine parameters")
        return _channels(str(node.target), mod.num_features if self.batch_norm else
                         mod.weight.numel(), scale)

    def apply(self, gm, node, scale, shift):
        mod = module_for_call_site(gm, node)
        dtype = mod.running_var.dtype if self.batch_norm else None
        w, b = foldmath.fold_scale_into_norm(mod.weight, mod.bias, scale, shift, scale.numel(),
                                             dtype=dtype)
        mod.affine = True
        _set_params(mod, w, b)
        return f"{node.target} (norm affine)"


class FunctionalBatchNormAffine(FoldTarget):
    """``F.batch_norm(x, mean, var, w, b) * s + t`` in eval mode, on attributes only this call
    reads (a traced-through BatchNorm subclass): ``w`` and ``b`` take the map."""

    def check(self, gm, node, scale, shift, axis):
        return _check_batch_norm_call(gm, node, scale, axis, ("weight", "bias"))

    def apply(self, gm, node, scale, shift):
        bn = batch_norm_call(gm, node)
        w, b = foldmath.fold_scale_into_norm(bn.weight, bn.bias, scale, shift, bn.num_features,
                                             dtype=bn.running_var.dtype)
        _set_attr_tensor(gm, bn.nodes["weight"], w)
        _set_attr_tensor(gm, bn.nodes["bias"], b)
        return f"{bn.owner or bn.nodes['weight'].target} (norm affine)"


class FunctionalBatchNormInput(FoldTarget):
    """``F.batch_norm(x * s + t, mean, var, w, b)`` in eval mode: running mean 0 and a new
    affine, on attributes only this call reads."""

    def check(self, gm, node, scale, shift, axis):
        return _check_batch_norm_call(gm, node, scale, axis, ("running_mean", "weight", "bias"))

    def apply(self, gm, node, scale, shift):
        bn = batch_norm_call(gm, node)
        w, b, mean = foldmath.fold_scale_into_batchnorm_input(
            bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps, scale, shift)
        _set_attr_tensor(gm, bn.nodes["weight"], w)
        _set_attr_tensor(gm, bn.nodes["bias"], b)
        _set_attr_tensor(gm, bn.nodes["running_mean"], mean)
        return f"{bn.owner or bn.nodes['weight'].target} (norm input)"


def _check_batch_norm_call(gm: fx.GraphModule, node: fx.Node, scale: torch.Tensor, axis: int,
                           written: tuple[str, ...]) -> Refusal | None:
    """Whether an ``F.batch_norm`` call takes a per-channel map: eval mode on get_attr
    statistics, channels first, affine, the one reader of the attributes a fold rewrites."""
    bn = batch_norm_call(gm, node)
    if bn is None:
        return Refusal("no-running-stats", "a batch_norm call on batch or computed statistics")
    if axis != 1:
        return Refusal("channel-axis", "the scale is not over the norm's channels")
    if bn.weight is None or bn.bias is None:
        return Refusal("norm-without-affine", f"{bn.owner} has no affine parameters")
    if not bn.sole_reader(gm, *written):
        return Refusal("computed-weight", f"{bn.owner}'s {', '.join(written)} are read "
                                          f"elsewhere too")
    return _channels(bn.owner, bn.num_features, scale)


def _set_attr_tensor(gm: fx.GraphModule, attr: fx.Node, value: torch.Tensor) -> None:
    """Give the attribute ``attr`` reads a new tensor: a Parameter (keeping requires_grad)
    where it was one, else a buffer."""
    old = get_attr_path(gm, str(attr.target))
    new = nn.Parameter(value, requires_grad=old.requires_grad) \
        if isinstance(old, nn.Parameter) else value
    set_attr_path(gm, str(attr.target), new)


class LayerNormAffine(FoldTarget):
    """LayerNorm over ``(C,)`` of tokens, or over ``(C, *S)`` of a channels-first map (its
    affine is per element: the channel scale repeats over each channel's positions)."""

    def check(self, gm, node, scale, shift, axis):
        mod, shape = _module(gm, node), tensor_shape(node) or ()
        want = (scale.numel(),) if axis == -1 else tuple(shape[1:])
        if tuple(mod.normalized_shape) != want:
            return Refusal("channel-axis", f"{node.target} normalises over "
                                           f"{tuple(mod.normalized_shape)}, not the channels")
        return None

    def apply(self, gm, node, scale, shift):
        mod = module_for_call_site(gm, node)
        full = tuple(mod.normalized_shape)
        spread = lambda v: v.reshape((-1,) + (1,) * (len(full) - 1)).expand(full).reshape(-1)  # noqa: E731
        w, b = foldmath.fold_scale_into_norm(
            None if mod.weight is None else mod.weight.reshape(-1),
            None if mod.bias is None else mod.bias.reshape(-1), spread(scale), spread(shift),
            dtype=_norm_dtype(mod, node))
        _set_params(mod, w.reshape(full), b.reshape(full))
        mod.elementwise_affine = True
        return f"{node.target} (norm affine)"


# ---------------------------------------------------------------- consumers: input side

class ConvInput(FoldTarget):
    """``conv(x * s + t)``: the conv's input columns; a shift only where the kernel never
    reads zero padding (the border would see 0, not ``t``)."""

    def check(self, gm, node, scale, shift, axis):
        mod = _module(gm, node)
        if axis != 1:
            return Refusal("channel-axis", f"{node.target} does not read the scaled dim as "
                                           f"channels")
        if _nonzero(shift) is not None and reads_padding(mod.padding, mod.kernel_size):
            return Refusal("shift-before-padded-conv", f"a shift before {node.target}, whose "
                                                       f"kernel reads zero padding")
        return None

    def apply(self, gm, node, scale, shift):
        mod = module_for_call_site(gm, node)
        _set_params(mod, *foldmath.fold_scale_into_conv_in(
            mod.weight, mod.bias, scale, _nonzero(shift),
            mod.groups))
        return f"{node.target} (input columns)"


class LinearInput(FoldTarget):
    """``linear(x * s + t)``: input columns of a Linear reading ``(N, C)`` or tokens."""

    def check(self, gm, node, scale, shift, axis):
        if axis == 1 and len(tensor_shape(node.args[0]) or ()) != 2:
            return Refusal("channel-axis", f"{node.target} reads the last dim, not the "
                                           f"channels")
        return None

    def apply(self, gm, node, scale, shift):
        mod = module_for_call_site(gm, node)
        _set_params(mod, *foldmath.fold_scale_into_linear_in(
            mod.weight, mod.bias, scale, _nonzero(shift)))
        return f"{node.target} (input columns)"


class FunctionalConvInput(FoldTarget):
    """``F.conv2d(x * s + t, w, b)`` with parameters only this call reads."""

    def check(self, gm, node, scale, shift, axis):
        params = conv_param_nodes(gm, node)
        if params is None:
            return Refusal("computed-weight", "its weight or bias is computed or shared")
        if axis != 1:
            return Refusal("channel-axis", "the conv does not read the scaled dim as channels")
        pad = functional_conv_arg(node, 4, "padding", 0)
        ksize = tuple(get_attr_path(gm, str(params[0].target)).shape[2:])
        if _nonzero(shift) is not None and reads_padding(pad, ksize):
            return Refusal("shift-before-padded-conv", "a shift before a conv whose kernel "
                                                       "reads zero padding")
        return None

    def apply(self, gm, node, scale, shift):
        w_node, b_node = conv_param_nodes(gm, node)
        weight = get_attr_path(gm, str(w_node.target))
        bias = None if b_node is None else get_attr_path(gm, str(b_node.target))
        w, b = foldmath.fold_scale_into_conv_in(
            weight, bias, scale, _nonzero(shift),
            functional_conv_arg(node, 6, "groups", 1))
        return f"{set_functional_conv_params(gm, node, w_node, b_node, w, b)} (input columns)"


class BatchNormInput(FoldTarget):
    """``bn(x * s + t)`` in eval mode: the same norm with running mean 0 and a new affine."""

    def check(self, gm, node, scale, shift, axis):
        mod = _module(gm, node)
        if axis != 1:
            return Refusal("channel-axis", "the scale is not over the norm's channels")
        if mod.training or mod.running_mean is None:
            return Refusal("no-running-stats", f"{node.target} normalises with batch "
                                               f"statistics")
        return _channels(str(node.target), mod.num_features, scale)

    def apply(self, gm, node, scale, shift):
        mod = module_for_call_site(gm, node)
        w, b, mean = foldmath.fold_scale_into_batchnorm_input(
            mod.weight, mod.bias, mod.running_mean, mod.running_var, mod.eps, scale, shift)
        mod.running_mean = mean  # a new buffer: the old one may be shared
        mod.affine = True
        _set_params(mod, w, b)
        return f"{node.target} (norm input)"


for _t in CONV_TYPES:
    register_producer(_t, ConvOutput())
    register_consumer(_t, ConvInput())
for _t in CONV_TRANSPOSE_TYPES:
    register_producer(_t, ConvTransposeOutput())
for _t in BATCH_NORM_TYPES:
    register_producer(_t, NormAffine(batch_norm=True))
    register_consumer(_t, BatchNormInput())
for _t in AFFINE_NORM_TYPES:
    register_producer(_t, NormAffine(batch_norm=False))
for _f in FUNCTIONAL_CONVS:
    register_producer(_f, FunctionalConvOutput())
    register_consumer(_f, FunctionalConvInput())
for _f in FUNCTIONAL_BATCH_NORMS:
    register_producer(_f, FunctionalBatchNormAffine())
    register_consumer(_f, FunctionalBatchNormInput())
register_producer(nn.Linear, LinearOutput())
register_consumer(nn.Linear, LinearInput())
register_producer(nn.LayerNorm, LayerNormAffine())
