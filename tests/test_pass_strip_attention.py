"""``strip_attention`` on small hand-built graphs: every channel-attention multiply is bypassed,
its branch and the parameters only it used are gone, one record per site, and the result runs
and computes the backbone.

Graphs come from :class:`asrfx.tracing.AsrTracer` with recorded shapes; nothing here goes
through ``asrfx.prepare`` or the benchmarks.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from asrfx.passes import find_attention_sites
from asrfx.passes.shapes import propagate_shapes
from asrfx.passes.strip_attention import strip_attention
from asrfx.tracing import trace_modes
from helpers import asr_traced, SE, SharedGate, DropPathNet, SENet, dtype_tol, randomize_bn, rel_err, sigmoid_nodes

TOL = dtype_tol(torch.float32)
X = (2, 3, 8, 8)


def _assert_backbone(gm: fx.GraphModule, backbone, *inputs: torch.Tensor) -> None:
    with torch.no_grad():
        for x in inputs:
            assert rel_err(backbone(x), gm(x)) <= TOL


def test_se_is_bypassed_and_its_branch_removed():
    torch.manual_seed(0)
    m = randomize_bn(SENet(8), 0).eval()
    x = torch.randn(*X)
    gm = asr_traced(m, x)
    (site,), _ = find_attention_sites(gm)
    mul_name = site.mul.name
    records = strip_attention(gm)
    assert [(r.path, r.kind, r.channels, r.action, r.key) for r in records] == [
        ("se", "channel-attention", 8, "removed", mul_name)]
    assert find_attention_sites(gm) == ([], [])
    assert sigmoid_nodes(gm) == []
    assert not any(n.op == "call_method" and n.target == "mean" for n in gm.graph.nodes)
    names = [n for n, _ in gm.named_parameters()]
    assert names and not any(n.startswith("se.") for n in names)
    assert not hasattr(gm, "se")

    def backbone(xi):
        return m.bn2(m.conv2(torch.relu(m.bn(m.conv(xi)))))

    _assert_backbone(gm, backbone, x, torch.randn(3, 3, 8, 8))


def test_one_record_per_site():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), SE(8), nn.ReLU(), SE(8),
                          nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(*X)
    gm = asr_traced(model, x)
    records = strip_attention(gm)
    assert [r.path for r in records] == ["1", "3"]
    assert all(r.action == "removed" for r in records)
    _assert_backbone(gm, lambda xi: model[4](torch.relu(model[0](xi))), x)


def test_every_multiply_by_a_shared_gate_is_bypassed():
    torch.manual_seed(2)
    model = SharedGate().eval()
    x = torch.randn(*X)
    gm = asr_traced(model, x)
    assert len(strip_attention(gm)) == 1
    assert sigmoid_nodes(gm) == [] and not hasattr(gm, "fc")
    _assert_backbone(gm, lambda xi: model.a(xi) + model.b(xi), x)


class GlobalContext(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.mask = nn.Conv2d(c, 1, 1)
        self.t1 = nn.Conv2d(c, 4, 1)
        self.t2 = nn.Conv2d(4, c, 1)

    def forward(self, x):
        y = self.conv(x)
        n, c = y.shape[0], y.shape[1]
        w = torch.softmax(self.mask(y).flatten(2), dim=-1)
        ctx = torch.matmul(y.flatten(2), w.transpose(1, 2)).view(n, c, 1, 1)
        return torch.relu(y + self.t2(torch.relu(self.t1(ctx))))


def test_additive_context_is_bypassed():
    torch.manual_seed(3)
    model = GlobalContext().eval()
    x = torch.randn(*X)
    gm = asr_traced(model, x)
    (rec,) = strip_attention(gm)
    assert rec.action == "removed" and rec.channels == 8
    assert not any(hasattr(gm, name) for name in ("mask", "t1", "t2"))
    _assert_backbone(gm, lambda xi: torch.relu(model.conv(xi)), x)


class SpatialThenSE(nn.Module):
    """CBAM-like: a channel gate (a site) followed by a spatial gate (refused by the finder)."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.se = SE(c)
        self.sp = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        y = self.se(self.conv(x))
        return y * torch.sigmoid(self.sp(y.mean(1, keepdim=True)))


def test_spatial_attention_is_left_as_it_is():
    torch.manual_seed(4)
    model = SpatialThenSE().eval()
    x = torch.randn(*X)
    gm = asr_traced(model, x)
    (rec,) = strip_attention(gm)
    assert rec.path == "se"
    assert any(n.op == "call_module" and n.target == "sp" for n in gm.graph.nodes)
    assert [code for _, _, code in find_attention_sites(gm)[1]] == ["spatial-attention"]

    def backbone(xi):
        y = model.conv(xi)
        return y * torch.sigmoid(model.sp(y.mean(1, keepdim=True)))

    _assert_backbone(gm, backbone, x)


def test_model_without_attention_is_unchanged():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(*X)
    gm = asr_traced(model, x)
    with torch.no_grad():
        ref = model(x)
    assert strip_attention(gm) == []
    _assert_backbone(gm, lambda xi: ref, x)


def test_both_graphs_of_a_dual_mode_model_are_stripped():
    torch.manual_seed(5)
    model = randomize_bn(DropPathNet(8), 5)
    x = torch.randn(*X)
    tr = trace_modes(model, example_inputs=(x,))
    assert tr.dual
    propagate_shapes(tr.train, (x,))
    records = strip_attention(tr.modules())
    assert [r.path for r in records] == ["se", "se"]   # one per graph
    built = tr.build()
    assert not hasattr(built, "se")
    built.train()
    assert built(x).shape == (2, 8, 8, 8)
    built.eval()

    def backbone(xi):
        y = model.conv(xi)
        return torch.relu(y + model.bn(y))

    model.eval()
    _assert_backbone(built, backbone, x)


class GateFirst(nn.Module):
    """SE written ``g.expand_as(y) * y``: the gate is the first operand, expanded."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.fc = nn.Conv2d(c, c, 1)
        self.out = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        g = torch.sigmoid(self.fc(y.mean((2, 3), keepdim=True)))
        return self.out(g.expand_as(y) * y)


def test_gate_expanded_in_front_is_bypassed_to_the_map():
    torch.manual_seed(6)
    model = GateFirst().eval()
    x = torch.randn(*X)
    gm = asr_traced(model, x)
    assert len(strip_attention(gm)) == 1
    _assert_backbone(gm, lambda xi: model.out(model.conv(xi)), x)


class InPlaceSE(nn.Module):
    """SE applied in place, ``y.mul_(g)``, with ``y`` read afterwards."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.fc = nn.Conv2d(c, c, 1)
        self.out = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        g = torch.sigmoid(self.fc(y.mean((2, 3), keepdim=True)))
        y.mul_(g)
        return self.out(y)


def test_in_place_gate_is_bypassed():
    torch.manual_seed(7)
    model = InPlaceSE().eval()
    x = torch.randn(*X)
    gm = asr_traced(model, x)
    assert len(strip_attention(gm)) == 1
    assert sigmoid_nodes(gm) == []
    _assert_backbone(gm, lambda xi: model.out(model.conv(xi)), x)
