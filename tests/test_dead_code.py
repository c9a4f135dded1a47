"""Nothing dead in a deploy graph, and nothing constant left without a word.

An EfficientNet-style excitation applies its activation in place (``t = conv_reduce(s);
t.mul_(t.sigmoid())``). The in-place op's result is unused, and once fold has evaluated the gate
nothing reads ``t`` after it either; dead-code elimination used to treat every in-place op as
observable, so psi, the reduce conv and the swish stayed in the deploy graph, computed and
thrown away. Fold's own check now also reports any computation left that depends on parameters
and buffers alone.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import asrfx
from asrfx.passes.graph_utils import has_side_effects
from helpers import REL_TOL, randomize_bn, randomize_psi, rel_err


class InPlaceSwishSE(nn.Module):
    def __init__(self, c: int, r: int = 4):
        super().__init__()
        self.conv_reduce = nn.Conv2d(c, c // r, 1)
        self.conv_expand = nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        t = x.mean((2, 3), keepdim=True)
        t = self.conv_reduce(t)
        t.mul_(t.sigmoid())
        t = self.conv_expand(t)
        return x * t.sigmoid()


class EffNetStyle(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.se = InPlaceSwishSE(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.se(F.silu(self.bn(self.conv(x)))))


def test_in_place_swish_excitation_leaves_nothing_in_the_deploy_graph():
    x = torch.randn(2, 3, 8, 8)
    prepared = asrfx.prepare(EffNetStyle(), example_inputs=(x,))
    assert prepared.asrfx_report.count(action="converted") == 1
    randomize_bn(prepared, 0)
    randomize_psi(prepared, 1)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    ops = [n.target for n in deploy.graph.nodes if n.op != "placeholder" and n.op != "output"]
    assert ops == ["conv", F.silu, "head"], deploy.code
    assert sorted(deploy.state_dict()) == ["conv.bias", "conv.weight", "head.bias",
                                           "head.weight"]
    assert all(s.action != "kept" for s in deploy.asrfx_report.sites), deploy.asrfx_report
    prepared.eval()
    with torch.no_grad():
        assert rel_err(prepared(x), deploy(x)) <= REL_TOL


def test_in_place_excitation_trains_on_one_row():
    """The in-place op hangs off the excitation, not on its data path: it is part of the constant
    branch, which computes one row (batch 1) in the training form too."""
    x = torch.randn(4, 3, 8, 8)
    prepared = asrfx.prepare(EffNetStyle(), example_inputs=(x,))
    assert not any(n.op == "call_method" and n.target == "expand"
                   for n in prepared.graph.nodes), prepared.code
    assert not any("expanded" in note for note in prepared.asrfx_report.notes)
    prepared.train()
    out = prepared(x)
    out.sum().backward()
    assert prepared.get_parameter("se.psi").grad.abs().max() > 0


def _graph(fn) -> fx.GraphModule:
    return fx.symbolic_trace(fn)


def test_in_place_op_is_observable_when_read_later_or_not_fresh():
    class ReadLater(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            t = self.conv(x)
            t.mul_(2.0)
            return t + 1  # reads the mutated value

    class OnInput(nn.Module):
        def forward(self, x):
            x.mul_(2.0)  # the caller's tensor changes
            return x.sum()

    class OnParameter(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, x):
            self.w.data.clamp_(0, 1)
            return x * self.w

    class OnView(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            t = self.conv(x)
            t.view(-1).mul_(2.0)  # a view of t: t changes too
            return t

    class Dead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            t = self.conv(x)
            t.mul_(t.sigmoid())  # nothing reads t afterwards
            return x

    expected = {ReadLater: True, OnInput: True, OnParameter: True, OnView: True, Dead: False}
    for cls, observable in expected.items():
        gm = _graph(cls())
        mutating = [n for n in gm.graph.nodes if n.op == "call_method" and
                    str(n.target).endswith("_")]
        assert len(mutating) == 1, cls
        assert has_side_effects(mutating[0], gm) is observable, cls.__name__


def test_parameter_clipped_at_every_call_is_reported():
    """A weight clipped in place at every call (a constraint written into forward) is a
    computation on parameters alone that must stay: kept, and the report says so."""

    class Clipping(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.gain = nn.Parameter(torch.full((1, 4, 1, 1), 2.0))

        def forward(self, x):
            g = self.gain.clamp_(0.0, 1.5)
            return self.bn(self.conv(x)) * g

    model = Clipping().eval()
    randomize_bn(model, 0)
    x = torch.randn(2, 3, 6, 6)
    deploy = asrfx.fold(model, example_inputs=(x,))
    sites = [s for s in deploy.asrfx_report.sites if s.kind == "constant branch"]
    assert [s.action for s in sites] == ["kept"], deploy.asrfx_report
    assert sites[0].code == "constant-computation-left" and "clamp_" in sites[0].reason
    with torch.no_grad():
        deploy.gain.fill_(3.0)
        deploy(x)
    assert float(deploy.gain.max()) == 1.5  # the clipping still happens
