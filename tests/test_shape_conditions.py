"""Python conditions on shapes while tracing: answered from the example inputs, guarded in the
graph, so attention written behind them is converted instead of left opaque."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asrfx
from helpers import REL_TOL, randomize_bn, randomize_psi, rel_err


class ResizingGate(nn.Module):
    """A gate that is resized to the map when it is not already one value per channel (the
    spelling of several timm attention modules)."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x):
        g = torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))
        if g.shape[-1] != 1:
            g = F.interpolate(g, size=x.shape[-2:])
        return x * g


class Net(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.att = ResizingGate(c)
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        return self.head(self.att(torch.relu(self.bn(self.conv(x)))))


def test_attention_behind_a_shape_condition_is_converted_and_folds():
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no submodule may be left opaque
        prepared = asrfx.prepare(Net(), example_inputs=(x,))
    assert prepared.asrfx_report.count(action="converted") == 1, prepared.asrfx_report
    randomize_bn(prepared, 1)
    randomize_psi(prepared, 2)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    assert not [s for s in deploy.asrfx_report.sites if s.action == "kept"], deploy.asrfx_report
    prepared.eval()
    with torch.no_grad():
        for xi in (x, torch.randn(3, 3, 12, 6)):
            assert rel_err(prepared(xi), deploy(xi)) <= REL_TOL


class PoolsLargeMaps(nn.Module):
    """Halves maps wider than 8 before an SE: a condition the batch does not change but the
    width does."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x):
        y = self.conv(x)
        if y.shape[-1] > 8:
            y = F.avg_pool2d(y, 2)
        return y * torch.sigmoid(self.fc(y.mean((2, 3), keepdim=True)))


def test_the_answer_is_guarded_for_other_inputs():
    model = PoolsLargeMaps().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = asrfx.trace(model, x)
    with torch.no_grad():
        for xi in (x, torch.randn(5, 3, 6, 8)):  # the answer holds: other batch, height
            assert rel_err(model(xi), gm(xi)) <= REL_TOL
        with pytest.raises(Exception, match="asrfx: the traced graph assumed"):
            gm(torch.randn(2, 3, 16, 16))  # wider: the other branch would have run


class ValueCondition(nn.Module):
    """A condition on values, not shapes: not answered (the submodule stays a leaf)."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x):
        if x.mean() > 0:
            return self.conv(x)
        return x


class WithValueCondition(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.block = ValueCondition()

    def forward(self, x):
        return self.block(self.conv(x))


def test_a_condition_on_values_is_not_answered():
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="'block'.*opaque leaf"):
        gm = asrfx.trace(WithValueCondition(), x)
    assert any(n.op == "call_module" and n.target == "block" for n in gm.graph.nodes)


class SamePadConv(nn.Conv2d):
    """TensorFlow-style "same" padding worked out from the input size at every call (the form
    timm's ``Conv2dSame`` takes): ``math.ceil`` and ``max`` on sizes, then ``F.pad`` and a
    functional conv on the module's own weight."""

    def forward(self, x):
        import math

        ih, iw = x.size()[-2:]
        kh, kw = self.weight.shape[-2:]

        def pad(i, k, s):
            return max((math.ceil(i / s) - 1) * s + k - i, 0)

        ph, pw = pad(ih, kh, self.stride[0]), pad(iw, kw, self.stride[1])
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class SameNet(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = SamePadConv(3, c, 3, stride=2)
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return y * torch.sigmoid(self.fc(y.mean((2, 3), keepdim=True)))


def test_same_padding_from_the_input_size_is_traced_and_its_norm_fused():
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepared = asrfx.prepare(SameNet(), example_inputs=(x,))
    assert prepared.asrfx_report.count(action="converted") == 1
    randomize_bn(prepared, 3)
    randomize_psi(prepared, 4)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    fused = [s for s in deploy.asrfx_report.sites if s.kind == "conv+bn"]
    assert [(s.action, s.target) for s in fused] == [("fused", "conv")], deploy.asrfx_report
    prepared.eval()
    with torch.no_grad():
        for xi in (x, torch.randn(3, 3, 21, 14)):  # other sizes, odd ones too: other padding
            assert rel_err(prepared(xi), deploy(xi)) <= REL_TOL
