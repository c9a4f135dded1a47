"""Where a constant per-channel scale can go: through ReLU / pooling to a norm, into GroupNorm,
depthwise and grouped convs — and where it must not (unknown sign across a nonlinearity, ReLU6,
a shift across padding)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import asrfx
from asrfx.attention import SE
from helpers import check_fold, randomize_bn, randomize_psi, rel_err


class ConstGate(nn.Module):
    """An already input-independent per-channel scale: ``x * k`` with a fixed buffer ``k``."""

    def __init__(self, values):
        super().__init__()
        self.register_buffer("k", torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return x * self.k


class MBConv(nn.Module):
    """MobileNetV2/V3-style inverted residual with SE after the depthwise conv's ReLU."""

    def __init__(self, c=8, e=4):
        super().__init__()
        h = c * e
        self.expand = nn.Conv2d(c, h, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(h)
        self.dw = nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False)
        self.bn2 = nn.BatchNorm2d(h)
        self.se = SE(h, reduction=4)
        self.project = nn.Conv2d(h, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn2(self.dw(torch.relu(self.bn1(self.expand(x))))))
        return x + self.bn3(self.project(self.se(y)))


def _fold(model, x, **kw):
    randomize_bn(model, seed=1)
    deploy = asrfx.fold(model, example_inputs=(x,), **kw)
    check_fold(model, x, deploy)
    return deploy


def _muls(gm):
    return [n for n in gm.graph.nodes if "mul" in str(n.target)]


@pytest.mark.parametrize("fuse_bn", [False, True])
def test_mobilenet_block_with_se_after_relu_folds_to_no_multiply(fuse_bn):
    x = torch.randn(2, 8, 8, 8)
    prepared = asrfx.prepare(MBConv(), example_inputs=(x,))
    randomize_psi(prepared, seed=2)
    deploy = _fold(prepared, x, fuse_bn=fuse_bn)
    assert _muls(deploy) == []
    (site,) = [s for s in deploy.asrfx_report.sites if s.kind == "channel scale"]
    assert site.action == "folded" and "through relu" in site.target
    if fuse_bn:  # through the ReLU into bn2, then bn2 into the depthwise conv
        assert not any(isinstance(m, nn.BatchNorm2d) for m in deploy.modules())


def test_positive_scale_crosses_max_pool_and_relu_to_reach_the_norm():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.MaxPool2d(2), ConstGate([0.5, 2.0, 0.0, 1.5]), nn.Flatten())
    deploy = _fold(model, torch.randn(2, 3, 8, 8), fuse_bn=False)
    (site,) = [s for s in deploy.asrfx_report.sites if s.kind == "channel scale"]
    assert site.action == "folded" and site.target.startswith("1 (norm affine)")
    assert _muls(deploy) == []


@pytest.mark.parametrize("act", [nn.ReLU(), nn.LeakyReLU(0.1), nn.MaxPool2d(2)])
def test_scale_of_unknown_sign_does_not_cross_a_nonlinearity(act):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), act,
                          ConstGate([0.5, -2.0, 1.0, 1.5]), nn.Tanh())
    deploy = _fold(model, torch.randn(2, 3, 8, 8))
    (site,) = [s for s in deploy.asrfx_report.sites if s.kind == "channel scale"]
    assert (site.action, site.code) == ("kept", "negative-scale-before-nonlinearity")


def test_relu6_is_not_crossed():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU6(),
                          ConstGate([0.5, 2.0, 1.0, 1.5]), nn.Tanh())
    deploy = _fold(model, torch.randn(2, 3, 8, 8))
    (site,) = [s for s in deploy.asrfx_report.sites if s.kind == "channel scale"]
    assert site.action == "kept"


def test_average_pool_is_crossed_whatever_the_sign():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.AvgPool2d(2),
                          ConstGate([0.5, -2.0, 1.0, 1.5]), nn.Tanh())
    deploy = _fold(model, torch.randn(2, 3, 8, 8), fuse_bn=False)
    (site,) = [s for s in deploy.asrfx_report.sites if s.kind == "channel scale"]
    assert site.action == "folded" and "through AvgPool2d" in site.target


def test_group_norm_affine_takes_the_scale():
    x = torch.randn(2, 3, 8, 8)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), SE(8, reduction=2),
                          nn.Tanh())
    prepared = asrfx.prepare(model, example_inputs=(x,))
    randomize_psi(prepared, seed=3)
    with torch.no_grad():
        prepared.get_submodule("1").weight.uniform_(0.5, 1.5)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    (site,) = [s for s in deploy.asrfx_report.sites if s.kind == "channel scale"]
    assert site.target == "1 (norm affine)"
    prepared.eval()
    with torch.no_grad():
        assert rel_err(prepared(x), deploy(x)) <= 1e-4


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_scale_into_grouped_and_depthwise_convs(groups):
    # producer: a grouped conv's output rows; consumer: a grouped conv's input columns
    x = torch.randn(2, 8, 6, 6)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=groups),
                          ConstGate([0.1 * (i + 1) for i in range(8)]),
                          nn.Tanh(), ConstGate([1.0 - 0.1 * i for i in range(8)]),
                          nn.Conv2d(8, 8, 3, padding=1, groups=groups))
    deploy = asrfx.fold(model, example_inputs=(x,))
    targets = sorted(s.target for s in deploy.asrfx_report.sites if s.kind == "channel scale")
    assert targets == ["0 (output rows)", "4 (input columns)"]
    with torch.no_grad():
        assert rel_err(model(x), deploy(x)) <= 1e-5


class ScaleOfAScaledTensor(nn.Module):
    """``a = c1(x) * k1`` read twice, once through a second scale: two chains, the second one's
    base is the first one's root (found by the fold-target sweep: it used to crash in lint)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c3 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.register_buffer("k1", torch.tensor([.5, -2., 1.5, .75]).view(1, -1, 1, 1))
        self.register_buffer("k2", torch.tensor([1.5, .5, -1., 2.]).view(1, -1, 1, 1))

    def forward(self, x):
        a = self.c1(x) * self.k1
        return a + self.c3(a * self.k2)


def test_a_scale_of_a_folded_scale_folds_too():
    model = ScaleOfAScaledTensor().eval()
    x = torch.randn(2, 4, 6, 6)
    deploy = asrfx.fold(model, example_inputs=(x,))
    targets = sorted(s.target for s in deploy.asrfx_report.sites if s.kind == "channel scale")
    assert targets == ["c1 (output rows)", "c3 (input columns)"]
    assert not _muls(deploy)
    with torch.no_grad():
        assert rel_err(model(x), deploy(x)) <= 1e-5


@pytest.mark.parametrize("padding, kernel, folds", [("valid", 3, True), ("same", 1, True),
                                                    ("same", 3, False), (0, 3, True)])
def test_a_shift_folds_into_a_conv_that_never_reads_padding(padding, kernel, folds):
    class ShiftThenConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("t", torch.tensor([0.3, -0.2, 0.5]).view(1, -1, 1, 1))
            self.conv = nn.Conv2d(3, 4, kernel, padding=padding)

        def forward(self, x):
            return self.conv(torch.tanh(x) + self.t)

    model = ShiftThenConv().eval()
    x = torch.randn(2, 3, 7, 7)
    deploy = asrfx.fold(model, example_inputs=(x,))
    (rec,) = [s for s in deploy.asrfx_report.sites if s.kind == "channel scale"]
    assert rec.action == ("folded" if folds else "kept")
    with torch.no_grad():
        assert rel_err(model(x), deploy(x)) <= 1e-5


_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class UpBlock(nn.Module):
    """Decoder-style upsampling: ConvTranspose -> BatchNorm -> ReLU, then an ASR-style SE."""

    def __init__(self, dims, groups, stride, out_pad, bias, norm=True):
        super().__init__()
        self.up = _CONV_T[dims](4, 6, 3, stride=stride, padding=1, output_padding=out_pad,
                                groups=groups, bias=bias)
        self.bn = _BN[dims](6) if norm else nn.Identity()
        self.se = SE(6, reduction=2, dims=dims)

    def forward(self, x):
        return self.se(torch.relu(self.bn(self.up(x))))


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups,stride,out_pad,bias", [(1, 1, 0, True), (2, 2, 1, False),
                                                        (2, 2, 0, True)])
def test_transposed_conv_takes_its_batchnorm_and_the_attention_scale(dims, groups, stride,
                                                                     out_pad, bias, norm):
    """A transposed conv is a producer fold target: the BatchNorm after it fuses, and the
    converted attention's constant crosses the ReLU into that BatchNorm, or into the
    transposed conv's output channels when there is none."""
    model = UpBlock(dims, groups, stride, out_pad, bias, norm)
    x = torch.randn(2, 4, *([5] * dims))
    prepared = asrfx.prepare(model, example_inputs=(x,))
    if norm:
        randomize_bn(prepared, seed=dims + groups)
    randomize_psi(prepared, seed=stride)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    check_fold(prepared, x, deploy)
    sites = {s.kind: s for s in deploy.asrfx_report.sites}
    if norm:
        assert (sites["conv+bn"].action, sites["conv+bn"].target) == ("fused", "up")
    assert (sites["channel scale"].action, sites["channel scale"].target) == \
        ("folded", "bn (norm affine) through relu" if norm else "up (output channels) through relu")
    left = [type(m).__name__ for m in deploy.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    assert left == []


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_transposed_conv_output_fold_identity(groups):
    """``fold_scale_into_conv_transpose_out`` against scaling the layer's output, in float64."""
    from asrfx import foldmath

    gen = torch.Generator().manual_seed(groups)
    conv = nn.ConvTranspose2d(6, 12, 3, stride=2, groups=groups).double()
    s = torch.randn(12, generator=gen, dtype=torch.float64)
    t = torch.randn(12, generator=gen, dtype=torch.float64)
    x = torch.randn(2, 6, 4, 4, generator=gen, dtype=torch.float64)
    w, b = foldmath.fold_scale_into_conv_transpose_out(conv.weight, conv.bias, s, t, groups)
    want = conv(x) * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1)
    got = torch.nn.functional.conv_transpose2d(x, w, b, stride=2, groups=groups)
    assert rel_err(want, got) <= 64 * torch.finfo(torch.float64).eps
