"""The same channel attention written many ways: every spelling must be found by structure,
converted, trained and folded away exactly. Plus look-alikes that must not fire."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asrfx
from helpers import assert_prepare_changes_nothing, randomize_bn, randomize_psi, rel_err

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class ModuleSE(nn.Module):
    """nn.AdaptiveAvgPool -> flatten -> Linear -> ReLU -> Linear -> Sigmoid -> view."""

    def __init__(self, c, dims):
        super().__init__()
        self.pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[dims](1)
        self.fc = nn.Sequential(nn.Linear(c, 4), nn.ReLU(), nn.Linear(4, c), nn.Sigmoid())
        self.dims = dims

    def forward(self, x):
        b, c = x.shape[:2]
        return x * self.fc(self.pool(x).flatten(1)).view(b, c, *([1] * self.dims))


class FunctionalSE(nn.Module):
    """torch.mean over spatial dims, F.linear on parameters, torch.sigmoid, unsqueeze chain."""

    def __init__(self, c, dims):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4, c) * 0.3)
        self.w2 = nn.Parameter(torch.randn(c, 4) * 0.3)
        self.dims = dims

    def forward(self, x):
        s = torch.mean(x, dim=tuple(range(2, 2 + self.dims)))
        g = torch.sigmoid(F.linear(F.relu(F.linear(s, self.w1)), self.w2))
        for _ in range(self.dims):
            g = g.unsqueeze(-1)
        return torch.mul(x, g)


class MethodConvSE(nn.Module):
    """x.mean(keepdim) -> 1x1 convs -> hand-written hard-sigmoid relu6(z + 3) / 6; g * x."""

    def __init__(self, c, dims):
        super().__init__()
        self.reduce = CONV[dims](c, 4, 1)
        self.expand = CONV[dims](4, c, 1)
        self.dims = dims

    def forward(self, x):
        s = x.mean(dim=tuple(range(2, 2 + self.dims)), keepdim=True)
        z = self.expand(F.relu(self.reduce(s)))
        return F.relu6(z + 3.0) / 6.0 * x


class MaxSqueezeSE(nn.Module):
    """amax statistic, squeeze/reshape in between, a tanh-shifted gate, x.mul(g)."""

    def __init__(self, c, dims):
        super().__init__()
        self.fc = nn.Linear(c, c)
        self.dims = dims

    def forward(self, x):
        s = x.amax(dim=tuple(range(2, 2 + self.dims)), keepdim=True)
        for _ in range(self.dims):
            s = s.squeeze(-1)
        g = 1 + torch.tanh(self.fc(s))
        return x.mul(g.reshape(x.shape[0], -1, *([1] * self.dims)))


SPELLINGS = [ModuleSE, FunctionalSE, MethodConvSE, MaxSqueezeSE]


class Host(nn.Module):
    """conv -> BN -> attention -> ReLU -> conv -> BN -> ReLU -> attention (after ReLU) -> conv."""

    def __init__(self, att, dims, c=8):
        super().__init__()
        self.conv1 = CONV[dims](3, c, 3, padding=1, bias=False)
        self.bn1 = BN[dims](c)
        self.att1 = att(c, dims)
        self.conv2 = CONV[dims](c, c, 3, padding=1, bias=False)
        self.bn2 = BN[dims](c)
        self.att2 = att(c, dims)
        self.head = CONV[dims](c, 5, 1)

    def forward(self, x):
        x = F.relu(self.att1(self.bn1(self.conv1(x))))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(self.att2(x))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("att", SPELLINGS, ids=lambda a: a.__name__)
def test_spelling_is_found_converted_and_folded(att, dims):
    torch.manual_seed(0)
    model = Host(att, dims)
    size = {1: 16, 2: 8, 3: 5}[dims]
    x = torch.randn(2, 3, *([size] * dims))
    # psi ~ N(0, 1): with the reference's constant 0.1 a 4-unit ReLU hidden layer can be all
    # inactive for some seeds, and then psi rightly gets no gradient
    prepared = asrfx.prepare(model, example_inputs=(x,), init="normal")
    assert prepared.asrfx_report.count(action="converted") == 2
    assert sorted(n for n, _ in prepared.named_parameters() if n.endswith("psi")) == \
        ["att1.psi", "att2.psi"]
    prepared.train()
    opt = torch.optim.SGD(prepared.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in prepared.named_parameters() if n.endswith("psi")}
    F.mse_loss(prepared(x), torch.randn_like(prepared(x))).backward()
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in prepared.named_parameters()
               if n.endswith("psi"))
    randomize_bn(prepared, seed=1)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    report = deploy.asrfx_report
    # att1 folds into bn1 (producer); att2 sits after a ReLU: its non-negative gate crosses the
    # ReLU into bn2 (a gate of unknown sign would have gone into the head conv instead)
    targets = {s.path: s.target for s in report.sites if s.kind == "channel scale"}
    assert targets["att1"].startswith("bn1") or targets["att1"].startswith("conv1")
    assert targets["att2"] == "bn2 (norm affine) through relu"
    assert report.count(action="kept", kind="channel scale") == 0
    ops = {str(n.target) for n in deploy.graph.nodes}
    assert not any(k in o for o in ops for k in ("sigmoid", "relu6", "tanh", "mean", "amax"))
    prepared.eval()
    with torch.no_grad():
        for xi in (x, torch.randn(3, *x.shape[1:])):
            assert rel_err(prepared(xi), deploy(xi)) <= 1e-4


class SpatialGate(nn.Module):
    """A spatial attention map: per position, not per channel. Must not fire."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, 1, 3, padding=1)

    def forward(self, x):
        return x * torch.sigmoid(self.conv(x))


class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class InputScale(nn.Module):
    """A per-channel gate computed from a second model input, not from x: must not fire."""

    def __init__(self, c):
        super().__init__()
        self.fc = nn.Linear(4, c)

    def forward(self, x, cond):
        return x * torch.sigmoid(self.fc(cond))[:, :, None, None]


@pytest.mark.parametrize("block", [SpatialGate, Swish])
def test_look_alikes_do_not_fire(block):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                          block(8) if block is SpatialGate else block())
    x = torch.randn(2, 3, 8, 8)
    assert_prepare_changes_nothing(model, x)


def test_gate_from_another_input_is_refused_with_reason():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.gate = InputScale(8)

        def forward(self, x, cond):
            return self.gate(self.conv(x), cond)

    x, cond = torch.randn(2, 3, 8, 8), torch.randn(2, 4)
    prepared = asrfx.prepare(Net(), example_inputs=(x, cond))
    assert prepared.asrfx_report.count(action="converted") == 0
    refused = [s for s in prepared.asrfx_report.sites if s.action == "refused"]
    assert len(refused) == 1 and refused[0].code == "gate-reads-input"


class _InPlaceSE(nn.Module):
    """``a.mul_(g)`` whose result is unused: the mutation must survive prepare and fold."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 8)
        self.c2 = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        a = torch.relu(self.b1(self.c1(x)))
        g = torch.sigmoid(self.fc(a.mean((2, 3))))[:, :, None, None]
        a.mul_(g)
        return self.c2(a) + a


class _SharedGate(nn.Module):
    """One gate scaling two feature maps: one site, one psi, two folds."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        a, b = self.b1(self.c1(x)), self.b2(self.c2(x))
        g = torch.sigmoid(self.fc(a.mean((2, 3))))[:, :, None, None]
        return a * g + b * g


def test_in_place_multiply_survives_and_is_reported():
    torch.manual_seed(0)
    model = _InPlaceSE()
    x = torch.randn(2, 3, 8, 8)
    prepared = asrfx.prepare(model, example_inputs=(x,))
    assert any(n.target == "mul_" for n in prepared.graph.nodes)
    # the prepared model's eval output equals the eager model with the gate fixed to A(psi)
    prepared.eval()
    model.eval()
    psi = prepared.get_parameter("psi")
    with torch.no_grad():
        a = torch.relu(model.b1(model.c1(x)))
        a = a * torch.sigmoid(model.fc(psi))[:, :, None, None]
        assert rel_err(model.c2(a) + a, prepared(x)) <= 1e-6
    randomize_bn(prepared, seed=2)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    kept = [s for s in deploy.asrfx_report.sites if s.action == "kept"]
    assert len(kept) == 1 and kept[0].code == "in-place-reread"
    with torch.no_grad():
        assert rel_err(prepared(x), deploy(x)) <= 1e-4


def test_one_gate_on_two_tensors_is_one_site():
    model = _SharedGate()
    x = torch.randn(2, 3, 8, 8)
    prepared = asrfx.prepare(model, example_inputs=(x,))
    assert prepared.asrfx_report.count(action="converted") == 1
    assert [n for n, _ in prepared.named_parameters() if n.endswith("psi")] == ["psi"]
    randomize_bn(prepared, seed=3)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    assert deploy.asrfx_report.count(action="folded", kind="channel scale") == 2
    prepared.eval()
    with torch.no_grad():
        assert rel_err(prepared(x), deploy(x)) <= 1e-4


class GlobalContextRank4(nn.Module):
    """Global-context pooling written with unit dims on both factors (timm's spelling):
    ``x.reshape(n, c, h*w).unsqueeze(1) @ softmax(logits).unsqueeze(3)`` gives ``(N, 1, C, 1)``,
    the same weighted sum over every position per channel as the rank-3 product."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.attn = nn.Conv2d(c, 1, 1)
        self.mlp = nn.Conv2d(c, c, 1)

    def forward(self, x):
        y = self.bn(self.conv(x))
        n, c, h, w = y.shape
        logits = self.attn(y).reshape(n, 1, h * w)
        weights = torch.softmax(logits, dim=-1).unsqueeze(3)          # (N, 1, HW, 1)
        context = y.reshape(n, c, h * w).unsqueeze(1) @ weights       # (N, 1, C, 1)
        return y * torch.sigmoid(self.mlp(context.view(n, c, 1, 1)))


def test_rank4_global_context_pooling_is_found_and_folds():
    x = torch.randn(2, 3, 8, 8)
    prepared = asrfx.prepare(GlobalContextRank4(), example_inputs=(x,))
    (site,) = [s for s in prepared.asrfx_report.sites if s.kind == "channel-attention"]
    assert (site.action, site.channels, site.form) == ("converted", 8, "sigmoid gate")
    randomize_bn(prepared, 1)
    randomize_psi(prepared, 2)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    assert not any(n.target in (torch.softmax, operator.matmul) for n in deploy.graph.nodes)
    prepared.eval()
    with torch.no_grad():
        for xi in (x, torch.randn(3, 3, 6, 10)):
            assert rel_err(prepared(xi), deploy(xi)) <= 1e-4
