"""Channels-last maps (N, H, W, C), as in ConvNeXt: channel attention over the last dim is found
when the graph shows the layout (a LayerNorm / Linear over the last dim, a permute moving the
channels last), converted, and folded into the LayerNorm affine, a Linear, or -- across a
permute -- into the conv on the other side; ConvNeXt's layer scale folds too."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asrfx
from asrfx.attention import SE, TokenSE
from asrfx.zoo import convnext_tiny
from helpers import check_fold, randomize_psi


def _randomize_norms(model: nn.Module, seed: int) -> None:
    """LayerNorm affine away from (1, 0), layer scale away from its tiny init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("gamma") or name.startswith("stem.1"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)


def _scale_records(deploy):
    return [s for s in deploy.asrfx_report.sites if s.kind == "channel scale"]


def test_convnext_with_channels_last_se_folds_to_the_plain_graph():
    torch.manual_seed(0)
    model = convnext_tiny(attention=True, depths=(1, 2))
    x = torch.randn(2, 3, 32, 32)
    prepared = asrfx.prepare(model, example_inputs=(x,))
    assert prepared.asrfx_report.count(action="converted") == 3
    psis = {n: tuple(p.shape) for n, p in prepared.named_parameters() if n.endswith("psi")}
    assert psis == {"stages.0.0.se.psi": (1, 16), "stages.1.2.se.psi": (1, 32),
                    "stages.1.3.se.psi": (1, 32)}
    prepared.train()
    F.cross_entropy(prepared(x), torch.tensor([1, 2])).backward()
    assert all(prepared.get_parameter(n).grad is not None for n in psis)
    _randomize_norms(prepared, 1)
    randomize_psi(prepared, 2)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    targets = sorted(s.target for s in _scale_records(deploy))
    assert targets == sorted([f"{b}.norm (norm affine)" for b in
                              ("stages.0.0", "stages.1.2", "stages.1.3")] +
                             [f"{b}.pwconv2 (output rows)" for b in
                              ("stages.0.0", "stages.1.2", "stages.1.3")])
    check_fold(prepared, x, deploy)
    # the deploy graph is the plain ConvNeXt's, layer scale folded away as well
    plain = convnext_tiny(depths=(1, 2))
    plain_deploy = asrfx.fold(plain, example_inputs=(x,))
    kinds = lambda gm: sorted(str(n.target) for n in gm.graph.nodes if n.op != "get_attr")
    assert kinds(deploy) == kinds(plain_deploy)
    assert not any(n.endswith("gamma") for n, _ in deploy.named_parameters())


def test_insertion_after_channels_last_norms():
    torch.manual_seed(0)
    model = convnext_tiny()
    x = torch.randn(2, 3, 32, 32)
    prepared = asrfx.prepare(model, example_inputs=(x,), insert="se", where="after_norm")
    inserted = [s for s in prepared.asrfx_report.sites if s.action == "inserted"]
    # the block norms (module LayerNorm over the last dim of (N, H, W, C))
    assert sorted(s.path for s in inserted) == ["stages.0.0.norm_asr", "stages.1.2.norm_asr"]
    assert isinstance(prepared.get_submodule("stages.0.0.norm_asr"), TokenSE)
    _randomize_norms(prepared, 3)
    randomize_psi(prepared, 4)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    assert not [s for s in _scale_records(deploy) if s.action == "kept"]
    check_fold(prepared, x, deploy)


class SEAfterBlock(nn.Module):
    """A channels-first SE after the block's permute back: its scale crosses the permute into
    the last Linear's output rows."""

    def __init__(self, dim=8):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)
        self.se = SE(dim, reduction=2)

    def forward(self, x):
        y = self.fc(F.gelu(self.norm(self.dwconv(x).permute(0, 2, 3, 1))))
        return x + self.se(y.permute(0, 3, 1, 2))


class SEAfterPermute(nn.Module):
    """A channels-last gate right after ``permute(0, 2, 3, 1)``: across the permute into the
    depthwise conv's output rows."""

    def __init__(self, dim=8):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4), nn.Linear(4, dim)
        self.out = nn.Linear(dim, 3)

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        g = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((1, 2), keepdim=True)))))
        return self.out(F.gelu(y * g)).mean((1, 2))


@pytest.mark.parametrize("cls, target", [(SEAfterBlock, "fc (output rows) through permute"),
                                         (SEAfterPermute, "dw (output rows) through permute")])
def test_scale_crosses_a_permute(cls, target):
    torch.manual_seed(0)
    model = cls()
    x = torch.randn(2, 8, 6, 6)
    prepared = asrfx.prepare(model, example_inputs=(x,))
    assert prepared.asrfx_report.count(action="converted") == 1
    randomize_psi(prepared, 5)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    assert target in [s.target for s in _scale_records(deploy)]
    assert not [n for n in deploy.graph.nodes if "sigmoid" in str(n.target)]
    check_fold(prepared, x, deploy)


def test_permute_to_a_non_channel_dim_is_not_crossed():
    """``permute(0, 2, 1, 3)`` puts H at dim 1: a scale of that dim is not the conv's channel."""

    class Swap(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.register_buffer("k", torch.rand(1, 6, 1, 1) + 0.5)

        def forward(self, x):
            return self.conv(x).permute(0, 2, 1, 3) * self.k

    model = Swap()
    x = torch.randn(2, 3, 6, 5)
    deploy = asrfx.fold(model, example_inputs=(x,))
    (rec,) = _scale_records(deploy)
    assert rec.action == "kept"
    check_fold(model, x, deploy)


def test_width_gate_next_to_a_linear_over_width_is_a_last_dim_gate():
    """Without a channels-last signal a (N, 1, 1, W) gate stays a spatial gate (see
    test_tokens); a Linear over the last dim is such a signal, and the gate is then one value
    per feature of that Linear, which is exactly what folds into it."""

    class MixerLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = nn.Linear(5, 5)
            self.g = nn.Linear(5, 5)

        def forward(self, x):
            y = self.mix(x)
            return y * torch.sigmoid(self.g(y.mean(dim=(1, 2), keepdim=True)))

    x = torch.randn(2, 3, 6, 5)
    prepared = asrfx.prepare(MixerLike(), example_inputs=(x,))
    assert prepared.asrfx_report.count(action="converted") == 1
    randomize_psi(prepared, 6)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    assert [s.target for s in _scale_records(deploy)] == ["mix (output rows)"]
    check_fold(prepared, x, deploy)


@pytest.mark.parametrize("bias", [True, False])
def test_channel_scale_into_a_layernorm_over_channels_and_positions(bias):
    """LayerNorm((C, H, W)) on an NCHW map has one affine weight per element: a channel scale
    (and shift) after it repeats over each channel's positions."""

    class LNGate(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.ln = nn.LayerNorm((4, 6, 5), bias=bias)
            self.se = SE(4, reduction=2)
            self.register_buffer("t", torch.rand(1, 4, 1, 1) - 0.5)

        def forward(self, x):
            return torch.tanh(self.se(self.ln(self.conv(x))) + self.t)

    torch.manual_seed(0)
    model = LNGate()
    with torch.no_grad():
        model.ln.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 6, 5)
    prepared = asrfx.prepare(model, example_inputs=(x,))
    assert prepared.asrfx_report.count(action="converted") == 1
    randomize_psi(prepared, 7)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    assert [s.target for s in _scale_records(deploy)] == ["ln (norm affine)"]
    assert deploy.get_submodule("ln").bias is not None
    assert not [n for n in deploy.graph.nodes if n.op != "get_attr" and
                str(n.target) in ("<built-in function mul>", "<built-in function add>")]
    check_fold(prepared, x, deploy)
