"""Channel attention on transformer tokens (N, L, C): found, converted, folded into the
LayerNorm affine or the next Linear; insertion after the norms; self-attention untouched."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import asrfx
from asrfx.zoo import vit_tiny
from helpers import check_fold, randomize_ln, randomize_psi


def test_token_se_in_vit_is_converted_and_folded_into_layernorm():
    torch.manual_seed(0)
    model = vit_tiny(attention=True)
    x = torch.randn(2, 3, 32, 32)
    prepared = asrfx.prepare(model, example_inputs=(x,))
    report = prepared.asrfx_report
    assert report.count(action="converted") == 2
    assert {s.channels for s in report.sites} == {32}
    psis = {n: tuple(p.shape) for n, p in prepared.named_parameters() if n.endswith("psi")}
    assert psis == {"blocks.0.se.psi": (1, 32), "blocks.1.se.psi": (1, 32)}
    prepared.train()
    F.cross_entropy(prepared(x), torch.tensor([1, 2])).backward()
    assert all(prepared.get_parameter(n).grad is not None for n in psis)
    randomize_ln(prepared, 1)
    randomize_psi(prepared, 2)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    targets = sorted(s.target for s in deploy.asrfx_report.sites if s.kind == "channel scale")
    assert targets == ["blocks.0.norm2 (norm affine)", "blocks.1.norm2 (norm affine)"]
    assert not [n for n in deploy.graph.nodes if "sigmoid" in str(n.target)]
    # self-attention is a leaf nn.MultiheadAttention, untouched
    assert sum(isinstance(m, nn.MultiheadAttention) for m in deploy.modules()) == 2
    check_fold(prepared, x, deploy)


def test_insertion_after_every_token_norm():
    torch.manual_seed(0)
    model = vit_tiny()
    x = torch.randn(2, 3, 32, 32)
    prepared = asrfx.prepare(model, example_inputs=(x,), insert="se", where="after_norm")
    # two norms per block and the final norm
    assert prepared.asrfx_report.count(action="inserted") == 5
    randomize_ln(prepared, 3)
    randomize_psi(prepared, 4)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    assert deploy.asrfx_report.count(action="folded", kind="channel scale") == 5
    assert deploy.asrfx_report.count(action="kept", kind="channel scale") == 0
    plain = asrfx.fold(model, example_inputs=(x,))
    assert len(deploy.graph.nodes) == len(plain.graph.nodes)
    check_fold(prepared, x, deploy)


class TokenGateAfterGelu(nn.Module):
    """A token SE after a GELU: GELU is not homogeneous, so the scale goes to the next Linear."""

    def __init__(self, d=16):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, 4)
        self.g1, self.g2 = nn.Linear(d, 4), nn.Linear(4, d)

    def forward(self, t):
        h = F.gelu(self.fc1(t))
        g = torch.sigmoid(self.g2(torch.relu(self.g1(h.mean(1)))))
        return self.fc2(h * g[:, None, :])


def test_token_gate_after_gelu_folds_into_the_next_linear():
    torch.manual_seed(0)
    model = TokenGateAfterGelu()
    x = torch.randn(2, 7, 16)
    prepared = asrfx.prepare(model, example_inputs=(x,))
    assert prepared.asrfx_report.count(action="converted") == 1
    randomize_psi(prepared, 5)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    (site,) = [s for s in deploy.asrfx_report.sites if s.kind == "channel scale"]
    assert site.action == "folded" and site.target == "fc2 (input columns)"
    check_fold(prepared, x, deploy)


def test_a_width_gate_on_a_feature_map_is_not_taken_for_tokens():
    """(N, C, H, W) * g(N, 1, 1, W): a spatial gate over the width, never converted."""

    class WidthGate(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return y * torch.sigmoid(y.mean(dim=(1, 2), keepdim=True))

    x = torch.randn(2, 3, 6, 5)
    prepared = asrfx.prepare(WidthGate(), example_inputs=(x,))
    assert prepared.asrfx_report.count(action="converted") == 0
    assert not any(n.endswith("psi") for n, _ in prepared.named_parameters())
