"""The fold identities of ``asrfx.foldmath`` against direct computations with torch.nn layers.

Every check builds the real layer (Conv1d/2d/3d, grouped and depthwise convs, Linear, BatchNorm
with and without affine), applies the per-channel map the identity is about, and compares with a
second layer carrying the folded parameters. Layers are float64 so the tolerance can be tight.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import asrfx
from asrfx import foldmath
from helpers import uniform

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)
PROPS = settings(max_examples=30, deadline=None)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=F64)


def _per_channel(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """(C,) -> (1, C, 1, ...) for an ndim-dimensional activation."""
    return v.reshape(1, -1, *([1] * (ndim - 2)))


def _snapshot(*ts):
    return [None if t is None else t.detach().clone() for t in ts]


def _assert_unchanged(before, *ts):
    for b, t in zip(before, ts):
        if t is not None:
            assert torch.equal(b, t), "foldmath must not modify its inputs"


# ---------------------------------------------------------------------------------------------
# layer factories


@dataclass
class ConvCfg:
    dims: int
    groups: int
    cin_g: int
    cout_g: int
    kernel: tuple
    stride: tuple
    padding: int
    dilation: int
    bias: bool
    size: int
    batch: int
    seed: int

    @property
    def cin(self) -> int:
        return self.groups * self.cin_g

    @property
    def cout(self) -> int:
        return self.groups * self.cout_g


def _make_conv(cfg: ConvCfg) -> nn.Module:
    torch.manual_seed(cfg.seed)
    conv = CONV[cfg.dims](cfg.cin, cfg.cout, cfg.kernel, stride=cfg.stride, padding=cfg.padding,
                          dilation=cfg.dilation, groups=cfg.groups, bias=cfg.bias).to(F64)
    return conv.eval()


def _with_params(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """A copy of ``layer`` with new weight and bias (creating the bias if it had none)."""
    new = copy.deepcopy(layer)
    new.weight = nn.Parameter(weight.detach().clone())
    new.bias = nn.Parameter(bias.detach().clone())
    return new


def _conv_input(cfg: ConvCfg, gen: torch.Generator) -> torch.Tensor:
    return _randn(gen, cfg.batch, cfg.cin, *([cfg.size] * cfg.dims))


# fixed configurations: plain, grouped, depthwise, depthwise with channel multiplier
_FIXED = {
    "plain": dict(groups=1, cin_g=4, cout_g=5),
    "grouped": dict(groups=2, cin_g=3, cout_g=2),
    "depthwise": dict(groups=4, cin_g=1, cout_g=1),
    "depthwise_x2": dict(groups=3, cin_g=1, cout_g=2),
}


def _fixed_cfg(dims: int, kind: str, *, padding: int = 1, bias: bool = True, stride: int = 1,
               kernel: int = 3, seed: int = 0) -> ConvCfg:
    return ConvCfg(dims=dims, kernel=(kernel,) * dims, stride=(stride,) * dims, padding=padding,
                   dilation=1, bias=bias, size=6 if dims < 3 else 5, batch=2, seed=seed,
                   **_FIXED[kind])


@st.composite
def conv_cfgs(draw, padding=st.integers(0, 2)):
    dims = draw(st.sampled_from([1, 2, 3]))
    kernel = tuple(draw(st.lists(st.integers(1, 3), min_size=dims, max_size=dims)))
    stride = tuple(draw(st.lists(st.integers(1, 2), min_size=dims, max_size=dims)))
    dilation = draw(st.integers(1, 2))
    pad = draw(padding)
    reach = dilation * (max(kernel) - 1) + 1  # the kernel's extent along its longest axis
    lo = max(reach - 2 * pad, 1)
    size = draw(st.integers(lo, lo + (3 if dims < 3 else 1)))
    return ConvCfg(dims=dims, groups=draw(st.integers(1, 3)), cin_g=draw(st.integers(1, 3)),
                   cout_g=draw(st.integers(1, 3)), kernel=kernel, stride=stride, padding=pad,
                   dilation=dilation, bias=draw(st.booleans()), size=size,
                   batch=draw(st.integers(1, 2)), seed=draw(st.integers(0, 2**31 - 1)))


# ---------------------------------------------------------------------------------------------
# compose_affine


def _check_compose(c: int, ndim: int, seed: int) -> None:
    g = _gen(seed)
    s1, t1, s2, t2 = (_randn(g, c) for _ in range(4))
    x = _randn(g, 2, c, *([3] * (ndim - 2)))
    s, t = foldmath.compose_affine(s1, t1, s2, t2)
    pc = lambda v: _per_channel(v, ndim)  # noqa: E731
    ref = (x * pc(s1) + pc(t1)) * pc(s2) + pc(t2)
    torch.testing.assert_close(x * pc(s) + pc(t), ref, **TOL)


@pytest.mark.parametrize("ndim", [2, 3, 4, 5])
def test_compose_affine_equals_applying_both_maps(ndim):
    _check_compose(6, ndim, seed=ndim)


@PROPS
@given(c=st.integers(1, 16), ndim=st.integers(2, 5), seed=st.integers(0, 2**31 - 1))
def test_compose_affine_property(c, ndim, seed):
    _check_compose(c, ndim, seed)


def test_compose_affine_scale_only_and_shift_only():
    s = torch.tensor([2.0, -3.0], dtype=F64)
    t = torch.tensor([0.5, 1.5], dtype=F64)
    one, zero = torch.ones(2, dtype=F64), torch.zeros(2, dtype=F64)
    # scale then shift / shift then scale: the order matters for the shift
    assert torch.equal(torch.stack(foldmath.compose_affine(s, zero, one, t)), torch.stack((s, t)))
    assert torch.equal(torch.stack(foldmath.compose_affine(one, t, s, zero)),
                       torch.stack((s, t * s)))


# ---------------------------------------------------------------------------------------------
# fold_scale_into_norm: norm(x) * s + t


def _make_bn(dims: int, c: int, affine: bool, gen: torch.Generator) -> nn.Module:
    bn = BN[dims](c, affine=affine, eps=float(uniform(gen, (1,), 1e-5, 1e-2, F64))).to(F64)
    with torch.no_grad():
        bn.running_mean.copy_(uniform(gen, (c,), -0.5, 0.5, F64))
        bn.running_var.copy_(uniform(gen, (c,), 0.5, 2.0, F64))
        if affine:
            bn.weight.copy_(uniform(gen, (c,), 0.5, 1.5, F64))
            bn.bias.copy_(uniform(gen, (c,), -0.5, 0.5, F64))
    return bn.eval()


def _check_norm(dims: int, c: int, affine: bool, with_shift: bool, seed: int,
                scale_shape: tuple | None = None) -> None:
    g = _gen(seed)
    bn = _make_bn(dims, c, affine, g)
    x = _randn(g, 2, c, *([4] * dims)) if dims > 1 else _randn(g, 3, c, 5)
    s = _randn(g, c)
    t = _randn(g, c) if with_shift else None
    s_arg = s.reshape(scale_shape) if scale_shape else s
    before = _snapshot(bn.weight, bn.bias, s_arg, t)
    w, b = foldmath.fold_scale_into_norm(bn.weight, bn.bias, s_arg, t, num_features=c)
    _assert_unchanged(before, bn.weight, bn.bias, s_arg, t)
    assert w.shape == b.shape == (c,)
    with torch.no_grad():
        ref = bn(x) * _per_channel(s, x.dim())
        if t is not None:
            ref = ref + _per_channel(t, x.dim())
        folded = BN[dims](c, affine=True, eps=bn.eps).to(F64).eval()
        folded.running_mean.copy_(bn.running_mean)
        folded.running_var.copy_(bn.running_var)
        folded.weight.copy_(w)
        folded.bias.copy_(b)
        torch.testing.assert_close(folded(x), ref, **TOL)


@pytest.mark.parametrize("with_shift", [False, True])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_fold_scale_into_norm_matches_batchnorm(dims, affine, with_shift):
    _check_norm(dims, 5, affine, with_shift, seed=10 * dims + 2 * affine + with_shift)


def test_fold_scale_into_norm_accepts_the_asr_constant_shape():
    # ASR constants arrive as (1, C, 1, 1) buffers
    _check_norm(2, 6, True, True, seed=3, scale_shape=(1, 6, 1, 1))


def test_fold_scale_into_norm_broadcasts_a_scalar_scale():
    g = _gen(4)
    bn = _make_bn(2, 4, True, g)
    w, b = foldmath.fold_scale_into_norm(bn.weight, bn.bias, torch.tensor([2.5], dtype=F64),
                                         torch.tensor([-1.0], dtype=F64), num_features=4)
    torch.testing.assert_close(w, bn.weight.detach() * 2.5, **TOL)
    torch.testing.assert_close(b, bn.bias.detach() * 2.5 - 1.0, **TOL)


def test_fold_scale_into_norm_without_affine_starts_from_identity():
    s = torch.tensor([2.0, 3.0], dtype=F64)
    t = torch.tensor([-1.0, 4.0], dtype=F64)
    w, b = foldmath.fold_scale_into_norm(None, None, s, t)
    assert torch.equal(w, s) and torch.equal(b, t)
    w, b = foldmath.fold_scale_into_norm(None, None, s)
    assert torch.equal(w, s) and torch.equal(b, torch.zeros(2, dtype=F64))


def test_fold_scale_into_norm_dtypes():
    g = _gen(5)
    w32, b32 = _randn(g, 3).float(), _randn(g, 3).float()
    s64 = _randn(g, 3)
    w, b = foldmath.fold_scale_into_norm(w32, b32, s64)
    assert w.dtype == b.dtype == torch.float32  # the weight's dtype
    # computed in float64, then rounded once
    assert torch.equal(w, (w32.double() * s64).float())
    assert torch.equal(b, (b32.double() * s64).float())
    w, b = foldmath.fold_scale_into_norm(None, None, s64.float())
    assert w.dtype == b.dtype == torch.float32  # no weight: the scale's dtype


@PROPS
@given(dims=st.sampled_from([1, 2, 3]), c=st.integers(1, 8), affine=st.booleans(),
       with_shift=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fold_scale_into_norm_property(dims, c, affine, with_shift, seed):
    _check_norm(dims, c, affine, with_shift, seed)


# ---------------------------------------------------------------------------------------------
# fold_scale_into_conv_out: conv(x) * s + t


def _check_conv_out(cfg: ConvCfg, with_shift: bool) -> None:
    g = _gen(cfg.seed)
    conv = _make_conv(cfg)
    x = _conv_input(cfg, g)
    s = _randn(g, cfg.cout)
    t = _randn(g, cfg.cout) if with_shift else None
    before = _snapshot(conv.weight, conv.bias, s, t)
    w, b = foldmath.fold_scale_into_conv_out(conv.weight, conv.bias, s, t)
    _assert_unchanged(before, conv.weight, conv.bias, s, t)
    assert w.shape == conv.weight.shape and b.shape == (cfg.cout,)
    with torch.no_grad():
        y = conv(x)
        ref = y * _per_channel(s, y.dim())
        if t is not None:
            ref = ref + _per_channel(t, y.dim())
        torch.testing.assert_close(_with_params(conv, w, b)(x), ref, **TOL)


@pytest.mark.parametrize("with_shift", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", list(_FIXED))
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_fold_scale_into_conv_out_matches_conv(dims, kind, bias, with_shift):
    _check_conv_out(_fixed_cfg(dims, kind, bias=bias, stride=2, seed=dims), with_shift)


@PROPS
@given(cfg=conv_cfgs(), with_shift=st.booleans())
def test_fold_scale_into_conv_out_property(cfg, with_shift):
    _check_conv_out(cfg, with_shift)


def test_fold_scale_into_conv_out_without_bias_returns_the_shift():
    g = _gen(6)
    w0 = _randn(g, 3, 2, 3, 3)
    s, t = _randn(g, 3), _randn(g, 3)
    _, b = foldmath.fold_scale_into_conv_out(w0, None, s, t)
    assert torch.equal(b, t)
    _, b = foldmath.fold_scale_into_conv_out(w0, None, s)
    assert torch.equal(b, torch.zeros(3, dtype=F64))


@pytest.mark.parametrize("with_shift", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_fold_scale_into_conv_out_matches_linear(bias, with_shift):
    torch.manual_seed(7)
    lin = nn.Linear(6, 4, bias=bias).to(F64)
    g = _gen(7)
    x = _randn(g, 5, 6)
    s = _randn(g, 4)
    t = _randn(g, 4) if with_shift else None
    w, b = foldmath.fold_scale_into_conv_out(lin.weight, lin.bias, s, t)
    with torch.no_grad():
        ref = lin(x) * s + (0 if t is None else t)
        torch.testing.assert_close(_with_params(lin, w, b)(x), ref, **TOL)


def test_fold_scale_into_conv_out_dtype():
    g = _gen(8)
    w32, b32, s = _randn(g, 4, 3, 3).float(), _randn(g, 4).float(), _randn(g, 4)
    w, b = foldmath.fold_scale_into_conv_out(w32, b32, s)
    assert w.dtype == b.dtype == torch.float32
    assert torch.equal(w, (w32.double() * s.reshape(4, 1, 1)).float())
    assert torch.equal(b, (b32.double() * s).float())


# ---------------------------------------------------------------------------------------------
# fold_scale_into_conv_in: conv(x * s + t)


def _check_conv_in(cfg: ConvCfg, with_shift: bool) -> None:
    assert not (with_shift and cfg.padding), "the shift identity needs padding=0 (precondition)"
    g = _gen(cfg.seed)
    conv = _make_conv(cfg)
    x = _conv_input(cfg, g)
    s = _randn(g, cfg.cin)
    t = _randn(g, cfg.cin) if with_shift else None
    before = _snapshot(conv.weight, conv.bias, s, t)
    w, b = foldmath.fold_scale_into_conv_in(conv.weight, conv.bias, s, t, groups=cfg.groups)
    _assert_unchanged(before, conv.weight, conv.bias, s, t)
    assert w.shape == conv.weight.shape and b.shape == (cfg.cout,)
    with torch.no_grad():
        xin = x * _per_channel(s, x.dim())
        if t is not None:
            xin = xin + _per_channel(t, x.dim())
        torch.testing.assert_close(_with_params(conv, w, b)(x), conv(xin), **TOL)


@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", list(_FIXED))
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_fold_scale_into_conv_in_scale_only(dims, kind, bias, padding):
    # a pure scale is exact with zero padding too: 0 * s = 0
    _check_conv_in(_fixed_cfg(dims, kind, padding=padding, bias=bias, seed=dims), False)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", list(_FIXED))
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_fold_scale_into_conv_in_with_shift_no_padding(dims, kind, bias, stride):
    _check_conv_in(_fixed_cfg(dims, kind, padding=0, bias=bias, stride=stride, seed=dims), True)


@PROPS
@given(cfg=conv_cfgs())
def test_fold_scale_into_conv_in_scale_only_property(cfg):
    _check_conv_in(cfg, False)


@PROPS
@given(cfg=conv_cfgs(padding=st.just(0)))
def test_fold_scale_into_conv_in_with_shift_property(cfg):
    _check_conv_in(cfg, True)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_fold_scale_into_conv_in_shift_breaks_at_zero_padded_border(dims):
    """Why the shift needs padding=0: the folded bias assumes every tap reads ``x*s + t``, but
    a zero-padded border reads 0. The folded conv equals the original conv on an input padded
    with ``t`` instead of 0: exact in the interior, wrong wherever a tap reads the padding."""
    cfg = _fixed_cfg(dims, "plain", padding=1, bias=True, seed=20 + dims)
    g = _gen(cfg.seed)
    conv = _make_conv(cfg)
    x = _conv_input(cfg, g)
    s = uniform(g, (cfg.cin,), 0.5, 1.5, F64)
    t = uniform(g, (cfg.cin,), 1.0, 2.0, F64)  # clearly non-zero
    w, b = foldmath.fold_scale_into_conv_in(conv.weight, conv.bias, s, t)
    with torch.no_grad():
        xin = x * _per_channel(s, x.dim()) + _per_channel(t, x.dim())
        ref = conv(xin)
        out = _with_params(conv, w, b)(x)
        interior = (slice(None), slice(None)) + (slice(1, -1),) * dims
        torch.testing.assert_close(out[interior], ref[interior], **TOL)
        assert (out - ref).abs().max() > 1e-3  # the identity does NOT hold on the border
        border = torch.ones_like(ref, dtype=torch.bool)
        border[interior] = False
        assert ((out - ref).abs() > 1e-9)[border].any()
        # precisely: the folded conv is the conv of an input padded with t (not with 0)
        pad = (1, 1) * dims
        t_padded = F.pad(xin - _per_channel(t, x.dim()), pad) + _per_channel(t, x.dim())
        unpadded = copy.deepcopy(conv)
        unpadded.padding = (0,) * dims
        torch.testing.assert_close(out, unpadded(t_padded), **TOL)


def test_fold_scale_into_conv_in_dtype():
    g = _gen(9)
    w32, b32 = _randn(g, 4, 2, 3, 3).float(), _randn(g, 4).float()
    s, t = _randn(g, 4), _randn(g, 4)  # groups=2: 4 input channels, 2 per group
    w, b = foldmath.fold_scale_into_conv_in(w32, b32, s, t, groups=2)
    assert w.dtype == b.dtype == torch.float32
    col = torch.stack([s[0:2], s[0:2], s[2:4], s[2:4]])  # rows of group g read s[2g:2g+2]
    assert torch.equal(w, (w32.double() * col.reshape(4, 2, 1, 1)).float())
    tcol = torch.stack([t[0:2], t[0:2], t[2:4], t[2:4]])
    ref_b = b32.double() + (w32.double() * tcol.reshape(4, 2, 1, 1)).sum((1, 2, 3))
    torch.testing.assert_close(b, ref_b.float(), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# fold_scale_into_linear_in: linear(x * s + t)


def _check_linear_in(fin: int, fout: int, bias: bool, with_shift: bool, batch: int,
                     seed: int) -> None:
    torch.manual_seed(seed)
    lin = nn.Linear(fin, fout, bias=bias).to(F64)
    g = _gen(seed)
    x = _randn(g, batch, fin)
    s = _randn(g, fin)
    t = _randn(g, fin) if with_shift else None
    before = _snapshot(lin.weight, lin.bias, s, t)
    w, b = foldmath.fold_scale_into_linear_in(lin.weight, lin.bias, s, t)
    _assert_unchanged(before, lin.weight, lin.bias, s, t)
    assert w.shape == (fout, fin) and b.shape == (fout,)
    with torch.no_grad():
        ref = lin(x * s + (0 if t is None else t))
        torch.testing.assert_close(_with_params(lin, w, b)(x), ref, **TOL)


@pytest.mark.parametrize("with_shift", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_fold_scale_into_linear_in_matches_linear(bias, with_shift):
    _check_linear_in(7, 3, bias, with_shift, batch=4, seed=11)


@PROPS
@given(fin=st.integers(1, 12), fout=st.integers(1, 12), bias=st.booleans(),
       with_shift=st.booleans(), batch=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_fold_scale_into_linear_in_property(fin, fout, bias, with_shift, batch, seed):
    _check_linear_in(fin, fout, bias, with_shift, batch, seed)


def test_fold_scale_into_linear_in_accepts_the_asr_constant_shape():
    g = _gen(12)
    w0, b0 = _randn(g, 3, 4), _randn(g, 3)
    s, t = _randn(g, 4), _randn(g, 4)
    w1, b1 = foldmath.fold_scale_into_linear_in(w0, b0, s, t)
    w2, b2 = foldmath.fold_scale_into_linear_in(w0, b0, s.reshape(1, 4), t.reshape(1, 4))
    assert torch.equal(w1, w2) and torch.equal(b1, b2)


# ---------------------------------------------------------------------------------------------
# composed maps fold like their parts


def test_composed_affine_folds_into_conv_in_like_the_sequence():
    cfg = _fixed_cfg(2, "grouped", padding=0, seed=13)
    g = _gen(13)
    conv = _make_conv(cfg)
    x = _conv_input(cfg, g)
    s1, t1, s2, t2 = (_randn(g, cfg.cin) for _ in range(4))
    s, t = foldmath.compose_affine(s1, t1, s2, t2)
    w, b = foldmath.fold_scale_into_conv_in(conv.weight, conv.bias, s, t, groups=cfg.groups)
    pc = lambda v: _per_channel(v, 4)  # noqa: E731
    with torch.no_grad():
        ref = conv((x * pc(s1) + pc(t1)) * pc(s2) + pc(t2))
        torch.testing.assert_close(_with_params(conv, w, b)(x), ref, **TOL)


# ---------------------------------------------------------------------------------------------
# the pass honours the padding precondition of fold_scale_into_conv_in


class _ShiftBeforeConv(nn.Module):
    """relu(x) * s + t -> conv: the affine's producer (ReLU) cannot take it, only the conv can."""

    def __init__(self, padding: int):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=padding)
        g = _gen(14)
        self.register_buffer("s", uniform(g, (1, 3, 1, 1), 0.5, 1.5, F64).float())
        self.register_buffer("t", uniform(g, (1, 3, 1, 1), 0.5, 1.5, F64).float())

    def forward(self, x):
        return self.conv(torch.relu(x) * self.s + self.t)


@pytest.mark.parametrize("padding", [0, 1])
def test_fold_refuses_a_shift_into_a_padded_conv(padding):
    torch.manual_seed(15)
    model = _ShiftBeforeConv(padding).eval()
    x = torch.randn(2, 3, 8, 8, generator=_gen(15))
    folded = asrfx.fold(model, example_inputs=(x,))
    report = folded.asrfx_report
    scales = [s for s in report.sites if s.kind == "channel scale"]
    assert len(scales) == 1
    assert scales[0].action == ("folded" if padding == 0 else "kept")
    has_affine = any(n.op == "get_attr" for n in folded.graph.nodes)
    assert has_affine == bool(padding)
    y = torch.randn(3, 3, 8, 8, generator=_gen(16))
    with torch.no_grad():
        torch.testing.assert_close(folded(y), model(y), rtol=1e-5, atol=1e-5)
