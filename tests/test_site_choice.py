"""What a user controls and reads: ``prepare(sites=...)`` chooses the sites that convert, the
report names each site's gate form, and constant scales that are not attention are one line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import asrfx
from helpers import SE, REL_TOL, randomize_bn, randomize_psi, rel_err


class ResponseNorm(nn.Module):
    """A global response normalisation (ConvNeXt-V2's GRN, channels first): the per-channel
    factor is computed from the map's own global statistics, so it is found as a channel gate;
    converting it changes what the norm computes."""

    def __init__(self, c: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(1, c, 1, 1))
        self.beta = nn.Parameter(torch.rand(1, c, 1, 1))

    def forward(self, x):
        gx = x.pow(2).sum((2, 3), keepdim=True).sqrt()
        nx = gx / (gx.mean(1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class Net(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.se = SE(c)
        self.grn = ResponseNorm(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(1, c, 1, 1) + 0.5)  # a layer scale, not attention

    def forward(self, x):
        y = self.grn(self.se(torch.relu(self.bn(self.conv(x)))))
        return torch.tanh(self.conv2(y) * self.scale)


def _forms(report):
    return {s.path: (s.action, s.form, s.code) for s in report.sites
            if s.kind == "channel-attention"}


def test_the_report_names_each_gate_form():
    x = torch.randn(2, 3, 8, 8)
    report = asrfx.prepare(Net(), example_inputs=(x,)).asrfx_report
    assert _forms(report) == {"se": ("converted", "sigmoid gate", ""),
                              "grn": ("converted", "unbounded gate", "")}
    assert "sigmoid gate" in str(report)


@pytest.mark.parametrize("sites", ["se", ["se", "other.*"],
                                   lambda path, form: form != "unbounded gate"])
def test_sites_chooses_what_converts(sites):
    x = torch.randn(2, 3, 8, 8)
    prepared = asrfx.prepare(Net(), example_inputs=(x,), sites=sites)
    assert _forms(prepared.asrfx_report) == {
        "se": ("converted", "sigmoid gate", ""),
        "grn": ("kept", "unbounded gate", "not-selected")}
    assert [n for n, _ in prepared.named_parameters() if n.endswith("psi")] == ["se.psi"]
    randomize_bn(prepared, 1)
    randomize_psi(prepared, 2)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    prepared.eval()
    with torch.no_grad():
        assert rel_err(prepared(x), deploy(x)) <= REL_TOL


def test_bad_sites_argument_is_an_input_error():
    with pytest.raises(asrfx.InputError, match="sites must be"):
        asrfx.prepare(Net(), example_inputs=(torch.randn(2, 3, 8, 8),), sites=3)


class LayerScales(nn.Module):
    """Six blocks, each ending in a learned per-channel layer scale before a tanh: constants
    that are not attention, left as multiplies (nothing takes them)."""

    def __init__(self, c: int = 4, n: int = 6):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(n))
        signs = torch.tensor([-1.0, 1.0] * (c // 2)).view(1, c, 1, 1)  # mixed: no ReLU crossing
        self.gammas = nn.ParameterList(nn.Parameter(signs * (0.5 + 0.1 * i)) for i in range(n))

    def forward(self, x):
        for conv, g in zip(self.convs, self.gammas):
            x = torch.tanh(torch.relu(conv(x)) * g)
        return x


def test_constant_scales_that_are_not_attention_are_one_report_line():
    model = LayerScales().eval()
    x = torch.randn(2, 4, 6, 6)
    deploy = asrfx.fold(model, example_inputs=(x,))
    report = deploy.asrfx_report
    scales = [s for s in report.sites if s.kind == "channel scale"]
    assert len(scales) == 6 and all(s.action == "kept" and s.code for s in scales)
    assert {s.group for s in scales} == {"constant scales that are not attention"}
    text = str(report)
    lines = [ln for ln in text.splitlines() if "constant scales that are not attention" in ln]
    assert len(lines) == 1 and "6 kept" in lines[0], text
    with torch.no_grad():
        assert rel_err(model(x), deploy(x)) <= REL_TOL
