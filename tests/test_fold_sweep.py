"""Property-based sweep over where ``asrfx.fold`` puts a constant per-channel scale (and shift).

A constant per-channel affine map ``x -> x * k + t`` (``k``, ``t`` registered buffers of shape
``(1, C, 1, ...)``, spelled ``x * k`` / ``k * x`` / ``x / (1/k)`` and ``+ t`` / ``t + x`` /
``- (-t)``) is placed next to randomly drawn layers; each example folds the model with
``asrfx.fold(model, example_inputs=(x,))`` and checks

* equivalence: the eval-mode outputs of the eager model and of the folded GraphModule agree to
  the tolerance of the example's dtype (max |ref - out| / max |ref|; ``helpers.REL_TOL`` in
  float32, :func:`helpers.dtype_tol` in float64) on the example input and on a fresh input of
  another batch size, and ``asrfx.fold``'s own check runs at that tolerance;
* the report: exactly one "channel scale" site, its action ("folded" / "kept") and target as the
  rules below demand, and the graph agrees with it (a folded site leaves no multiply / add / sub /
  div; a kept one leaves it in the graph with a reason).

What is swept:

1. Producer side: Conv1d/2d/3d (in/out channels 1..12, groups dividing both, depthwise included;
   kernel 1..5, stride 1..3, padding 0..2 or "same" / "valid", dilation 1..2, per axis or
   uniform, bias or not, any padding mode; called as a module or as ``F.convNd`` on its
   parameters, positional or keyword) followed by the scale (and shift): always folds into the
   conv's output rows.
2. Consumer side: a producer that takes nothing (the input itself, tanh, gelu), the scale (and
   shift), then one or two Convs (random geometry, padding modes, ``"same"`` / ``"valid"``), a
   Conv and an eval-mode BatchNorm (which takes scale and shift on its input side), or Linears on
   ``(N, C)``. A scale alone folds into the consumers' input columns for any padding; a shift
   folds only where no kernel reads zero padding, and is kept where one does. A second reader of
   the scaled tensor that is not a Conv / Linear / BatchNorm keeps it.
3. Through ops: Conv -> BN -> one or two of ReLU / LeakyReLU / MaxPool / AvgPool / ReLU6 (module
   or functional) -> scale. A shift-free scale reaches the BN when every op commutes with it:
   AvgPool for any sign, ReLU / LeakyReLU / MaxPool only when it is non-negative, ReLU6 never;
   otherwise it goes into a consuming 1x1 conv or is kept.
4. Norm targets: BatchNorm1d/2d/3d (randomised statistics, affine or not), GroupNorm (random
   groups dividing C), InstanceNorm1d/2d/3d with ``affine=True``; a Linear producer on ``(N, C)``.

Every tensor (input, weights, statistics, scale, shift) derives from a seed that hypothesis draws,
through ``torch.Generator``; BatchNorm statistics are always randomised (``helpers.randomize_bn``).
Every test also draws the dtype, float32 or float64 (the model is built, initialised, then cast
with ``.to(dtype)``): a float64 model must fold as exactly as a float32 one, where conversions to
float64 inside the fold return their input itself.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, given, settings, strategies as st
from torch import nn

import asrfx
from helpers import divisors, dtype_tol, randomize_bn, rel_err, uniform

PROPS = settings(max_examples=150, deadline=None)

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
FCONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
IN = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
POOL = {"maxpool": {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d},
        "avgpool": {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}}
FPOOL = {"maxpool": {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d},
         "avgpool": {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}}

#: the per-channel affine ops a folded site must leave no trace of
_AFFINE_TARGETS = {operator.mul, operator.imul, torch.mul, "mul", "mul_", torch.Tensor.mul,
                   operator.add, operator.iadd, torch.add, "add", "add_", torch.Tensor.add,
                   operator.sub, operator.isub, torch.sub, "sub", "sub_",
                   operator.truediv, operator.itruediv, torch.div, "div", "div_"}

seeds = st.integers(0, 2**31 - 1)
dtypes = st.sampled_from([torch.float32, torch.float64])
mul_spellings = st.sampled_from(["mul", "rmul", "div"])
add_spellings = st.sampled_from(["add", "radd", "sub"])


# ---------------------------------------------------------------------------------------------
# tensors from a seed


def _signed(gen: torch.Generator, c: int, lo: float, hi: float) -> torch.Tensor:
    """Magnitudes U(lo, hi), random signs."""
    sign = torch.where(torch.rand(c, generator=gen) < 0.5, -1.0, 1.0)
    return uniform(gen, (c,), lo, hi) * sign


def _scale(gen: torch.Generator, c: int, sign: str) -> torch.Tensor:
    """A per-channel scale, magnitudes U(0.25, 2). ``sign``: "any" (random signs), "positive",
    "nonneg" (positive with one zero when c > 1), "negative" (random signs, at least one < 0)."""
    s = uniform(gen, (c,), 0.25, 2.0)
    if sign == "any":
        return s * torch.where(torch.rand(c, generator=gen) < 0.5, -1.0, 1.0)
    if sign == "nonneg" and c > 1:
        s[int(torch.randint(c, (1,), generator=gen))] = 0.0
    if sign == "negative":
        s = s * torch.where(torch.rand(c, generator=gen) < 0.5, -1.0, 1.0)
        i = int(torch.randint(c, (1,), generator=gen))
        s[i] = -s[i].abs()
    return s


def _shift(gen: torch.Generator, c: int) -> torch.Tensor:
    return _signed(gen, c, 0.1, 1.0)


def _init(model: nn.Module, seed: int) -> nn.Module:
    """Random weights (and norm statistics) for every layer of ``model``, from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                bound = 1.0 / math.sqrt(m.weight[0].numel())
                m.weight.copy_(uniform(gen, m.weight.shape, -bound, bound))
                if m.bias is not None:
                    m.bias.copy_(uniform(gen, m.bias.shape, -0.5, 0.5))
            elif isinstance(m, (nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)):
                if m.weight is not None:
                    m.weight.copy_(uniform(gen, m.weight.shape, 0.5, 1.5))
                    m.bias.copy_(uniform(gen, m.bias.shape, -0.5, 0.5))
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.copy_(uniform(gen, m.running_mean.shape, -0.5, 0.5))
                    m.running_var.copy_(uniform(gen, m.running_var.shape, 0.5, 2.0))
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        randomize_bn(model, seed + 1)
    return model


# ---------------------------------------------------------------------------------------------
# building blocks


class ScaleShift(nn.Module):
    """``x * k (+ t)`` with constant buffers of shape (1, C, 1, ...), in several spellings.

    ``scale`` / ``shift`` are the map's meaning; "div" stores 1/scale and divides, "sub" stores
    -shift and subtracts.
    """

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor | None, ndim: int,
                 mul: str = "mul", add: str = "add"):
        super().__init__()
        shape = (1, -1) + (1,) * (ndim - 2)
        if mul == "div" and bool((scale == 0).any()):
            mul = "mul"
        self.mul, self.add = mul, add
        self.register_buffer("k", (1.0 / scale if mul == "div" else scale).reshape(shape).clone())
        self.has_shift = shift is not None
        if shift is not None:
            self.register_buffer("t", (-shift if add == "sub" else shift).reshape(shape).clone())

    def forward(self, x):
        if self.mul == "mul":
            y = x * self.k
        elif self.mul == "rmul":
            y = self.k * x
        else:
            y = x / self.k
        if self.has_shift:
            if self.add == "add":
                y = y + self.t
            elif self.add == "radd":
                y = self.t + y
            else:
                y = y - self.t
        return y


def _per_axis(v, dim: int) -> tuple:
    return tuple(v) if isinstance(v, tuple) else (v,) * dim


@dataclass(frozen=True)
class ConvSpec:
    dim: int
    cin: int
    cout: int
    groups: int
    kernel: int | tuple
    stride: int | tuple
    padding: int | tuple | str
    dilation: int | tuple
    bias: bool
    padding_mode: str
    size: tuple  # the input's spatial size

    def module(self) -> nn.Module:
        return CONV[self.dim](self.cin, self.cout, self.kernel, stride=self.stride,
                              padding=self.padding, dilation=self.dilation, groups=self.groups,
                              bias=self.bias, padding_mode=self.padding_mode)

    @property
    def zero_padding(self) -> bool:
        """Padding given as zeros (ints / tuples): the kernel never reads outside the input."""
        return not isinstance(self.padding, str) and all(p == 0 for p in
                                                         _per_axis(self.padding, self.dim))

    @property
    def reads_zero_padding(self) -> bool:
        """The kernel reads zero-filled padding (where a shift of the input would differ)."""
        if self.padding_mode != "zeros" or self.padding == "valid":
            return False
        if self.padding == "same":
            k, d = _per_axis(self.kernel, self.dim), _per_axis(self.dilation, self.dim)
            return any(di * (ki - 1) > 0 for ki, di in zip(k, d))
        return not self.zero_padding


@st.composite
def conv_specs(draw, dim: int | None = None, cin: int | None = None, size: tuple | None = None,
               padding_modes: tuple = ("zeros",), strings: bool = False) -> ConvSpec:
    """A valid conv geometry: channels 1..12, groups dividing both (depthwise one time in four),
    kernel 1..5, stride 1..3, padding 0..2 (or "same"/"valid" when ``strings``), dilation 1..2,
    each per axis or one int; the input's spatial size 5..9 per axis (or ``size``)."""
    dim = draw(st.integers(1, 3)) if dim is None else dim
    if draw(st.integers(0, 3)) == 0:
        c = draw(st.integers(1, 12)) if cin is None else cin
        cin = cout = groups = c
    else:
        cin = draw(st.integers(1, 12)) if cin is None else cin
        cout = draw(st.integers(1, 12))
        groups = draw(st.sampled_from(divisors(math.gcd(cin, cout))))

    def axes(lo: int, hi: int):
        if draw(st.booleans()):
            return draw(st.integers(lo, hi))
        return tuple(draw(st.integers(lo, hi)) for _ in range(dim))

    kernel, stride, dilation = axes(1, 5), axes(1, 3), axes(1, 2)
    choice = draw(st.integers(0, 5)) if strings else 0
    if choice == 1 and all(s == 1 for s in _per_axis(stride, dim)):
        padding = "same"
    elif choice == 2:
        padding = "valid"
    else:
        padding = axes(0, 2)
    pads = (0,) * dim if isinstance(padding, str) else _per_axis(padding, dim)
    ks, ds = _per_axis(kernel, dim), _per_axis(dilation, dim)
    if size is None:
        size = tuple(max(draw(st.integers(5, 9)), d * (k - 1) + 1 - 2 * p)
                     for k, d, p in zip(ks, ds, pads))
    elif padding != "same" and any(d * (k - 1) + 1 - 2 * p > n
                                   for k, d, p, n in zip(ks, ds, pads, size)):
        dilation = 1  # kernel <= 5 <= size: always fits undilated
    return ConvSpec(dim, cin, cout, groups, kernel, stride, padding, dilation,
                    draw(st.booleans()), draw(st.sampled_from(padding_modes)), tuple(size))


class ConvCall(nn.Module):
    """A conv layer called as a module, or as ``F.convNd`` on its own parameters."""

    def __init__(self, spec: ConvSpec, spelling: str = "module"):
        super().__init__()
        assert spelling == "module" or spec.padding_mode == "zeros"
        self.conv = spec.module()
        self.spelling = spelling
        self.fn = FCONV[spec.dim]  # a plain attribute: tracing sees no tensor here

    def forward(self, x):
        c = self.conv
        if self.spelling == "module":
            return c(x)
        fn = self.fn
        if self.spelling == "positional":
            return fn(x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)
        kw = {} if c.bias is None else {"bias": c.bias}
        return fn(x, c.weight, stride=c.stride, padding=c.padding, dilation=c.dilation,
                  groups=c.groups, **kw)


conv_spellings = st.sampled_from(["module", "positional", "keyword"])
padding_modes = ("zeros", "zeros", "reflect", "replicate", "circular")
#: torch warns (once) that such a conv copies its input; harmless here
_SAME_EVEN = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")


# ---------------------------------------------------------------------------------------------
# checks


def _fold(model: nn.Module, x: torch.Tensor, seed: int, fuse_bn: bool = True,
          dtype: torch.dtype = torch.float32):
    """Cast ``model`` and ``x`` to ``dtype``, fold (its check at the dtype's tolerance), then
    compare eval-mode outputs on ``x`` and on a fresh batch of 3."""
    model.to(dtype)
    x = x.to(dtype)
    tol = dtype_tol(dtype)
    deploy = asrfx.fold(model, example_inputs=(x,), fuse_bn=fuse_bn, tol=tol)
    model.eval()
    gen = torch.Generator().manual_seed(seed + 2)
    fresh = torch.randn(3, *x.shape[1:], generator=gen).to(dtype)
    with torch.no_grad():
        for xi in (x, fresh):
            ref, out = model(xi), deploy(xi)
            assert ref.dtype == out.dtype == dtype, (ref.dtype, out.dtype)
            err = rel_err(ref, out)
            assert err <= tol, f"{dtype}: rel err {err:.2e}\n{deploy.asrfx_report}\n{deploy.code}"
    event(f"dtype: {dtype}")
    return deploy


def _affine_ops(gm) -> list:
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")
            and n.target in _AFFINE_TARGETS]


def _scale_site(deploy, channels: int):
    """The one channel-scale site, checked against the graph."""
    sites = [s for s in deploy.asrfx_report.sites if s.kind == "channel scale"]
    assert len(sites) == 1, deploy.asrfx_report
    (site,) = sites
    assert site.channels == channels, site
    left = _affine_ops(deploy)
    if site.action == "folded":
        assert site.target and not site.reason, site
        assert left == [], f"folded, yet {left} remain\n{deploy.code}"
    else:
        assert site.action == "kept" and site.reason and site.code and not site.target, site
        assert left, f"kept, yet no multiply/add remains\n{deploy.code}"
    return site


def _input(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 3))


# ---------------------------------------------------------------------------------------------
# 1. producer side: a conv's output rows


class Chain(nn.Module):
    def __init__(self, *layers: nn.Module, tail: str = "none"):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.tail = tail

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return torch.tanh(x) if self.tail == "tanh" else x


@_SAME_EVEN
@PROPS
@given(spec=conv_specs(padding_modes=padding_modes, strings=True), spelling=conv_spellings,
       sign=st.sampled_from(["any", "negative"]), with_shift=st.booleans(), mul=mul_spellings,
       add=add_spellings, tail=st.sampled_from(["none", "tanh"]), seed=seeds, dtype=dtypes)
def test_conv_producer_takes_scale_and_shift_in_its_output_rows(spec, spelling, sign, with_shift,
                                                                mul, add, tail, seed, dtype):
    if spelling != "module":  # F.convNd pads with zeros only
        spec = ConvSpec(**{**spec.__dict__, "padding_mode": "zeros"})
    gen = torch.Generator().manual_seed(seed)
    scale = _scale(gen, spec.cout, sign)
    shift = _shift(gen, spec.cout) if with_shift else None
    model = _init(Chain(ConvCall(spec, spelling),
                        ScaleShift(scale, shift, spec.dim + 2, mul, add), tail=tail), seed)
    deploy = _fold(model, _input(seed, 2, spec.cin, *spec.size), seed, dtype=dtype)
    site = _scale_site(deploy, spec.cout)
    assert (site.action, site.target) == ("folded", "layers.0.conv (output rows)"), site


# ---------------------------------------------------------------------------------------------
# 2. consumer side: the input columns of convs and linears


class ConsumerNet(nn.Module):
    """``pre(x)`` (nothing foldable) -> scale/shift -> consumers, plus maybe another reader."""

    def __init__(self, pre: str, affine: nn.Module, consumers: list[nn.Module],
                 extra_reader: bool):
        super().__init__()
        self.pre, self.affine, self.extra_reader = pre, affine, extra_reader
        self.consumers = nn.ModuleList(consumers)

    def forward(self, x):
        if self.pre == "tanh":
            x = torch.tanh(x)
        elif self.pre == "gelu":
            x = F.gelu(x)
        y = self.affine(x)
        outs = [c(y).flatten(1) for c in self.consumers]
        if self.extra_reader:
            outs.append(y.flatten(1))
        return outs[0] if len(outs) == 1 else torch.cat(outs, 1)


pres = st.sampled_from(["input", "tanh", "gelu"])


@st.composite
def consumer_convs(draw):
    """One or two consumers of the same input, the first a conv, the second (one time in three)
    another conv or (one time in six) the string "bn", an eval-mode BatchNorm: (specs,
    spellings)."""
    first = draw(conv_specs(padding_modes=padding_modes, strings=True))
    specs = [first]
    second = draw(st.integers(0, 5))
    if second < 2:
        specs.append(draw(conv_specs(dim=first.dim, cin=first.cin, size=first.size,
                                     padding_modes=padding_modes, strings=True)))
    elif second == 2:
        specs.append("bn")
    spellings = [draw(conv_spellings) if s != "bn" and s.padding_mode == "zeros" else "module"
                 for s in specs]
    return specs, spellings


@_SAME_EVEN
@PROPS
@given(convs=consumer_convs(), pre=pres, sign=st.sampled_from(["any", "negative", "positive"]),
       with_shift=st.booleans(), extra_reader=st.integers(0, 5).map(lambda i: i == 0),
       mul=mul_spellings, add=add_spellings, seed=seeds, dtype=dtypes)
def test_conv_consumer_takes_scale_for_any_padding_and_shift_only_without(
        convs, pre, sign, with_shift, extra_reader, mul, add, seed, dtype):
    specs, spellings = convs
    c, dim = specs[0].cin, specs[0].dim
    gen = torch.Generator().manual_seed(seed)
    scale = _scale(gen, c, sign)
    shift = _shift(gen, c) if with_shift else None
    model = _init(ConsumerNet(pre, ScaleShift(scale, shift, dim + 2, mul, add),
                              [BN[dim](c) if s == "bn" else ConvCall(s, sp)
                               for s, sp in zip(specs, spellings)],
                              extra_reader), seed)
    deploy = _fold(model, _input(seed, 2, c, *specs[0].size), seed, dtype=dtype)
    site = _scale_site(deploy, c)
    into = ", ".join(f"consumers.{i} (norm input)" if s == "bn" else
                     f"consumers.{i}.conv (input columns)" for i, s in enumerate(specs))
    convs = [s for s in specs if s != "bn"]  # a BatchNorm takes a shift on its input side too
    event(f"conv consumer{' + bn' if 'bn' in specs else ''}: {site.action}")
    if extra_reader or (with_shift and any(s.reads_zero_padding for s in convs)):
        assert site.action == "kept", site  # another reader / a kernel reading zero padding
    elif not with_shift or all(s.zero_padding for s in convs):
        assert (site.action, site.target) == ("folded", into), site
    else:
        # a shift before "valid" / kernel-1 "same" / reflect-like padding: folding it would be
        # exact too, keeping it is allowed; either way it must be right
        assert site.action == "kept" or site.target == into, site


@PROPS
@given(cin=st.integers(1, 12), outs=st.lists(st.integers(1, 12), min_size=1, max_size=2),
       bias=st.booleans(), pre=pres, sign=st.sampled_from(["any", "negative"]),
       with_shift=st.booleans(), extra_reader=st.integers(0, 5).map(lambda i: i == 0),
       mul=mul_spellings, add=add_spellings, seed=seeds, dtype=dtypes)
def test_linear_consumer_takes_scale_and_shift(cin, outs, bias, pre, sign, with_shift,
                                               extra_reader, mul, add, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    scale = _scale(gen, cin, sign)
    shift = _shift(gen, cin) if with_shift else None
    model = _init(ConsumerNet(pre, ScaleShift(scale, shift, 2, mul, add),
                              [nn.Linear(cin, o, bias=bias) for o in outs], extra_reader), seed)
    deploy = _fold(model, _input(seed, 2, cin), seed, dtype=dtype)
    site = _scale_site(deploy, cin)
    if extra_reader:
        assert site.action == "kept", site
    else:
        into = ", ".join(f"consumers.{i} (input columns)" for i in range(len(outs)))
        assert (site.action, site.target) == ("folded", into), site


# ---------------------------------------------------------------------------------------------
# 3. through activations and pooling to a BatchNorm


class Op(nn.Module):
    """ReLU / LeakyReLU / MaxPool / AvgPool / ReLU6 as a module or a functional call."""

    def __init__(self, kind: str, dim: int, functional: bool, slope: float):
        super().__init__()
        self.kind, self.dim, self.functional, self.slope = kind, dim, functional, slope
        self.mod = None if functional else {
            "relu": lambda: nn.ReLU(), "leaky": lambda: nn.LeakyReLU(slope),
            "relu6": lambda: nn.ReLU6(), "maxpool": lambda: POOL["maxpool"][dim](2),
            "avgpool": lambda: POOL["avgpool"][dim](2)}[kind]()

    def forward(self, x):
        if self.mod is not None:
            return self.mod(x)
        if self.kind == "relu":
            return torch.relu(x)
        if self.kind == "leaky":
            return F.leaky_relu(x, self.slope)
        if self.kind == "relu6":
            return F.relu6(x)
        return FPOOL[self.kind][self.dim](x, 2)


class ThroughNet(nn.Module):
    def __init__(self, dim: int, c: int, ops: list[nn.Module], affine: nn.Module, tail: str):
        super().__init__()
        self.conv = CONV[dim](3, c, 3, padding=1)
        self.bn = BN[dim](c)
        self.ops = nn.ModuleList(ops)
        self.affine = affine
        self.tail_kind = tail
        self.tail = CONV[dim](c, 4, 1) if tail == "conv" else None

    def forward(self, x):
        y = self.bn(self.conv(x))
        for op in self.ops:
            y = op(y)
        y = self.affine(y)
        if self.tail is not None:
            return self.tail(y)
        return torch.tanh(y) if self.tail_kind == "tanh" else y


_HOMOGENEOUS = {"relu", "leaky", "maxpool"}  # commute with a non-negative scale
_LINEAR = {"avgpool"}  # commutes with any scale


@PROPS
@given(dim=st.integers(1, 3), c=st.integers(1, 8), size=st.integers(5, 9),
       ops=st.lists(st.tuples(st.sampled_from(["relu", "leaky", "maxpool", "avgpool", "relu6"]),
                              st.booleans()), min_size=1, max_size=2),
       slope=st.sampled_from([0.01, 0.1, 0.3]),
       sign=st.sampled_from(["positive", "nonneg", "negative"]),
       with_shift=st.integers(0, 3).map(lambda i: i == 0), mul=mul_spellings,
       tail=st.sampled_from(["none", "tanh", "conv"]), fuse_bn=st.booleans(), seed=seeds,
       dtype=dtypes)
def test_scale_crosses_only_the_ops_it_commutes_with(dim, c, size, ops, slope, sign, with_shift,
                                                     mul, tail, fuse_bn, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    scale = _scale(gen, c, sign)
    shift = _shift(gen, c) if with_shift else None
    nonneg = bool((scale >= 0).all())
    layers = [Op(kind, dim, functional, slope) for kind, functional in ops]
    model = _init(ThroughNet(dim, c, layers, ScaleShift(scale, shift, dim + 2, mul), tail), seed)
    deploy = _fold(model, _input(seed, 2, 3, *(size,) * dim), seed, fuse_bn=fuse_bn, dtype=dtype)
    site = _scale_site(deploy, c)
    crosses = shift is None and all(k in _LINEAR or (k in _HOMOGENEOUS and nonneg)
                                    for k, _ in ops)
    event(f"through ops: crosses={crosses}, {site.action}")
    if crosses:
        assert site.action == "folded" and site.target.startswith("bn (norm affine)"), site
        assert site.target.count(" through ") == len(ops), site
    else:
        assert "through" not in site.target and "norm affine" not in site.target, site
        if tail == "conv":
            assert (site.action, site.target) == ("folded", "tail (input columns)"), site
        else:
            assert site.action == "kept", site


# ---------------------------------------------------------------------------------------------
# 4. norm targets and a linear producer


class NormNet(nn.Module):
    def __init__(self, pre: nn.Module | None, norm: nn.Module, affine: nn.Module, tail: str):
        super().__init__()
        self.pre, self.norm, self.affine, self.tail = pre, norm, affine, tail

    def forward(self, x):
        if self.pre is not None:
            x = self.pre(x)
        y = self.affine(self.norm(x))
        return torch.tanh(y) if self.tail == "tanh" else y


@PROPS
@given(dim=st.integers(0, 3), c=st.integers(1, 12), size=st.integers(5, 9),
       pre=st.booleans(), bn_affine=st.booleans(),
       track=st.integers(0, 4).map(lambda i: i != 0), sign=st.sampled_from(["any", "negative"]),
       with_shift=st.booleans(), mul=mul_spellings, add=add_spellings,
       tail=st.sampled_from(["none", "tanh"]), fuse_bn=st.booleans(), seed=seeds,
       dtype=dtypes)
def test_batchnorm_takes_scale_and_shift_in_its_affine(dim, c, size, pre, bn_affine, track, sign,
                                                       with_shift, mul, add, tail, fuse_bn, seed,
                                                       dtype):
    # dim 0: BatchNorm1d on (N, C), after a Linear; else BatchNorm{dim}d, after a conv
    gen = torch.Generator().manual_seed(seed)
    scale = _scale(gen, c, sign)
    shift = _shift(gen, c) if with_shift else None
    norm = BN[max(dim, 1)](c, affine=bn_affine, track_running_stats=track)
    first = (nn.Linear(5, c) if dim == 0 else CONV[dim](3, c, 3, padding=1)) if pre else None
    cin = c if not pre else 5 if dim == 0 else 3
    ndim = 2 if dim == 0 else dim + 2
    model = _init(NormNet(first, norm, ScaleShift(scale, shift, ndim, mul, add), tail), seed)
    deploy = _fold(model, _input(seed, 2, cin, *(size,) * dim), seed, fuse_bn=fuse_bn, dtype=dtype)
    site = _scale_site(deploy, c)
    if track:
        assert (site.action, site.target) == ("folded", "norm (norm affine)"), site
    else:  # batch statistics in eval mode too: taking the scale is allowed, not required
        assert site.action == "kept" or site.target == "norm (norm affine)", site


@PROPS
@given(kind=st.sampled_from(["group", "instance"]), dim=st.integers(1, 3),
       c=st.integers(1, 12), data=st.data(), size=st.integers(5, 9), pre=st.booleans(),
       track=st.booleans(), sign=st.sampled_from(["any", "negative"]), with_shift=st.booleans(),
       mul=mul_spellings, add=add_spellings, tail=st.sampled_from(["none", "tanh"]), seed=seeds,
       dtype=dtypes)
def test_group_and_instance_norm_take_scale_and_shift_in_their_affine(
        kind, dim, c, data, size, pre, track, sign, with_shift, mul, add, tail, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    scale = _scale(gen, c, sign)
    shift = _shift(gen, c) if with_shift else None
    if kind == "group":
        norm = nn.GroupNorm(data.draw(st.sampled_from(divisors(c)), label="groups"), c)
    else:
        norm = IN[dim](c, affine=True, track_running_stats=track)
    first = CONV[dim](3, c, 3, padding=1) if pre else None
    model = _init(NormNet(first, norm, ScaleShift(scale, shift, dim + 2, mul, add), tail), seed)
    deploy = _fold(model, _input(seed, 2, 3 if pre else c, *(size,) * dim), seed, dtype=dtype)
    site = _scale_site(deploy, c)
    assert (site.action, site.target) == ("folded", "norm (norm affine)"), site


@PROPS
@given(cin=st.integers(1, 12), c=st.integers(1, 12), bias=st.booleans(),
       sign=st.sampled_from(["any", "negative"]), with_shift=st.booleans(), mul=mul_spellings,
       add=add_spellings, tail=st.sampled_from(["none", "tanh", "linear"]), seed=seeds,
       dtype=dtypes)
def test_linear_producer_takes_scale_and_shift_in_its_output_rows(cin, c, bias, sign, with_shift,
                                                                  mul, add, tail, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    scale = _scale(gen, c, sign)
    shift = _shift(gen, c) if with_shift else None
    layers = [nn.Linear(cin, c, bias=bias), ScaleShift(scale, shift, 2, mul, add)]
    if tail == "linear":  # a consumer too: the producer is tried first
        layers.append(nn.Linear(c, 3))
    model = _init(Chain(*layers, tail=tail), seed)
    deploy = _fold(model, _input(seed, 2, cin), seed, dtype=dtype)
    site = _scale_site(deploy, c)
    assert (site.action, site.target) == ("folded", "layers.0 (output rows)"), site
