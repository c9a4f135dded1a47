"""BatchNorm subclasses with a built-in activation (the form timm's ``BatchNormAct2d`` takes),
traced through in both modes: their ``F.batch_norm`` on their own parameters and statistics is
a fold and BatchNorm-fusion target, what they add (activation, drop) is ordinary graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asrfx
from helpers import SE, REL_TOL, assert_coded, randomize_bn, randomize_psi, rel_err


class NormAct(nn.BatchNorm2d):
    """BatchNorm, then an optional dropout and activation, written out as timm does: its own
    ``F.batch_norm`` call with the training flag and momentum worked out in ``forward``."""

    def __init__(self, c: int, act: bool = True, drop: float = 0.0):
        super().__init__(c)
        self.drop = nn.Dropout(drop) if drop else nn.Identity()
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x):
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(self.drop(x))


class SuperNormAct(nn.BatchNorm2d):
    """The other common spelling: ``super().forward`` (whose ``input.dim() != 4`` check the
    tracer answers from the example's shapes), then an activation."""

    def forward(self, x):
        return F.silu(super().forward(x))


class Block(nn.Module):
    """conv -> norm-act -> conv -> norm (no act) -> SE -> + shortcut -> ReLU."""

    def __init__(self, c: int = 8, norm: type = NormAct):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = norm(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = NormAct(c, act=False) if norm is NormAct else nn.BatchNorm2d(c)
        self.se = SE(c)

    def forward(self, x):
        return torch.relu(self.se(self.bn2(self.conv2(self.bn1(self.conv1(x))))) + x)


class Net(nn.Module):
    def __init__(self, norm: type = NormAct, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn = norm(c)
        self.blocks = nn.Sequential(Block(c, norm), Block(c, norm))
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        return self.head(self.blocks(self.bn(self.stem(x))).mean((2, 3)))


def _train_step(model: nn.Module, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    out = model(torch.randn(4, 3, 8, 8, generator=gen))
    loss = F.cross_entropy(out, torch.randint(0, 5, (4,), generator=gen)) if out.dim() == 2 \
        else out.square().mean()
    loss.backward()
    opt.step()
    return float(loss)


@pytest.mark.parametrize("norm", [NormAct, SuperNormAct])
def test_norm_subclasses_fuse_and_take_the_attention_scale(norm):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    prepared = asrfx.prepare(Net(norm), example_inputs=(x,))
    assert prepared.asrfx_report.count(action="converted") == 2, prepared.asrfx_report
    psi_before = prepared.get_parameter("blocks.0.se.psi").detach().clone()
    assert torch.isfinite(torch.tensor(_train_step(prepared, 1)))
    assert not torch.equal(prepared.get_parameter("blocks.0.se.psi"), psi_before)  # psi trains
    randomize_bn(prepared, 2)
    randomize_psi(prepared, 3)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    report = deploy.asrfx_report
    assert_coded(report)
    fused = [s for s in report.sites if s.kind == "conv+bn"]
    assert len(fused) == 5 and all(s.action == "fused" for s in fused), report
    scales = [s for s in report.sites if s.kind == "channel scale"]
    assert len(scales) == 2 and all(s.action == "folded" for s in scales), report
    # no norm of any kind is left: the deploy graph is convs, activations and the head
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and
                   any(n.op == "call_module" and n.target == name for n in deploy.graph.nodes)
                   for name, m in deploy.named_modules())
    assert not any(n.target is F.batch_norm for n in deploy.graph.nodes)
    prepared.eval()
    with torch.no_grad():
        for xi in (x, torch.randn(3, 3, 12, 10)):
            assert rel_err(prepared(xi), deploy(xi)) <= REL_TOL


class NormInExcitation(nn.Module):
    """An excitation with a norm-act subclass inside it (as in ReXNet's SE): fed psi, the norm
    normalises with its running statistics, in train and in eval mode."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.fc1 = nn.Conv2d(c, c // 2, 1)
        self.se_bn = NormAct(c // 2)
        self.fc2 = nn.Conv2d(c // 2, c, 1)

    def forward(self, x):
        y = self.bn(self.conv(x))
        g = torch.sigmoid(self.fc2(self.se_bn(self.fc1(y.mean((2, 3), keepdim=True)))))
        return y * g


def test_norm_subclass_inside_the_branch_is_frozen_to_its_running_statistics():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    prepared = asrfx.prepare(NormInExcitation(), example_inputs=(x,))
    report = prepared.asrfx_report
    assert report.count(action="converted") == 1, report
    assert any("se_bn" in n and "running statistics" in n for n in report.notes), report.notes
    randomize_bn(prepared, 4)
    _train_step(prepared, 5)  # one row of psi in training: no batch statistics to fail on
    grad = prepared.psi.grad
    assert grad is not None and bool((grad != 0).any())
    randomize_psi(prepared, 6)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    prepared.eval()
    with torch.no_grad():
        assert rel_err(prepared(x), deploy(x)) <= REL_TOL
    assert not [n for n in deploy.graph.nodes if n.target is F.batch_norm]


class RepBranches(nn.Module):
    """RepVGG-style block whose norms are norm-act subclasses without activation: 3x3 + 1x1 +
    identity norm, summed, then ReLU."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.k3 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.n3 = NormAct(c, act=False)
        self.k1 = nn.Conv2d(c, c, 1, bias=False)
        self.n1 = NormAct(c, act=False)
        self.nid = NormAct(c, act=False)

    def forward(self, x):
        return torch.relu(self.n3(self.k3(x)) + self.n1(self.k1(x)) + self.nid(x))


def test_norm_subclass_identity_branch_merges_into_one_conv():
    model = randomize_bn(RepBranches(), seed=7).eval()
    x = torch.randn(2, 6, 7, 7)
    deploy = asrfx.fold(model, example_inputs=(x,))
    report = deploy.asrfx_report
    merges = [s for s in report.sites if s.kind == "branch merge"]
    assert [s.action for s in merges] == ["merged"], report
    nid = [s for s in report.sites if s.path == "nid"]
    assert [(s.kind, s.action) for s in nid] == [("conv+bn", "merged")], report
    convs = [n for n in deploy.graph.nodes if n.op == "call_module"]
    assert len(convs) == 1
    with torch.no_grad():
        assert rel_err(model(x), deploy(x)) <= REL_TOL


class GateBeforeNormAct(nn.Module):
    """conv -> SE gate -> a BatchNorm subclass with a ReLU; ``eval_reader``: in eval mode the
    gated map is also added to the output (the two modes' graphs read it differently)."""

    def __init__(self, c: int = 8, eval_reader: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.fc = nn.Conv2d(c, c, 1)
        self.bn = NormAct(c)
        self.eval_reader = eval_reader

    def forward(self, x):
        y = self.conv(x)
        g = y * torch.sigmoid(self.fc(y.mean((2, 3), keepdim=True)))
        out = self.bn(g)
        return out + g if self.eval_reader and not self.training else out


def _graphs(prepared) -> list:
    return [prepared.graph] + ([prepared.eval_graph] if hasattr(prepared, "eval_graph") else [])


def test_both_modes_move_the_gate_behind_the_norm():
    """The subclass traces to a different batch_norm call per mode (training flag baked in):
    the train graph finds the gate cancelled by the norm, and both graphs apply it to the
    norm's output, so the model trains and deploys one function: ``relu(g * BN(x))``."""
    torch.manual_seed(0)
    model = GateBeforeNormAct()
    randomize_bn(model, 3)
    x = torch.randn(4, 3, 8, 8)
    prepared = asrfx.prepare(model, example_inputs=(x,))
    report = prepared.asrfx_report
    assert [(s.action, s.code) for s in report.sites if s.kind == "channel-attention"] == \
        [("converted", "gate-after-batch-norm")], report
    assert len(_graphs(prepared)) == 2
    psi = prepared.get_parameter("psi")
    g = torch.sigmoid(model.fc(psi))
    bn = model.bn
    for training in (True, False):
        prepared.train(training)
        # (the training step updates the prepared copy's running statistics: read those)
        mean, var = (prepared.get_buffer(f"bn.running_{k}").clone() for k in ("mean", "var"))
        with torch.no_grad():
            ref = torch.relu(g * F.batch_norm(model.conv(x), mean, var, bn.weight, bn.bias,
                                              training, 0.0, bn.eps))
            assert rel_err(ref, prepared(x)) <= REL_TOL
    prepared.eval()
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    assert not any(n.target is torch.sigmoid for n in deploy.graph.nodes), deploy.code


def test_both_modes_agree_on_what_is_refused():
    """When the eval graph reads the gated map with something else too, the gate cannot move
    behind the norm in both graphs: it is refused in both, with the same record, so a model
    never trains one form and deploys another."""
    x = torch.randn(4, 3, 8, 8)
    prepared = asrfx.prepare(GateBeforeNormAct(eval_reader=True), example_inputs=(x,))
    report = prepared.asrfx_report
    assert [(s.action, s.code) for s in report.sites if s.kind == "channel-attention"] == \
        [("refused", "gate-before-batch-norm")], report
    assert "eval graph" in report.sites[0].reason
    assert not [n for n, _ in prepared.named_parameters() if n.endswith("psi")]
    for g in _graphs(prepared):
        assert any(n.target is torch.sigmoid for n in g.nodes)


def test_prepare_leaves_a_traced_through_norms_statistics_and_counter_alone():
    """Recording shapes runs the train graph, whose batch_norm call has training=True baked in:
    the prepared copy's running statistics and counter must be the model's (they moved by 8e-3
    and one step before), and training then updates them as the module would."""
    model = GateBeforeNormAct().train()
    x = torch.randn(4, 3, 8, 8)
    prepared = asrfx.prepare(model, example_inputs=(x,))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(prepared.get_buffer(f"bn.{name}"), getattr(model.bn, name)), name
    prepared.train()
    prepared(x)  # one training step's update: from the conv's output (the gate moved behind)
    with torch.no_grad():
        y = model.conv(x)
    want = 0.1 * y.mean((0, 2, 3))  # momentum 0.1 from a zero mean
    assert rel_err(want, prepared.get_buffer("bn.running_mean")) <= REL_TOL
    assert int(prepared.get_buffer("bn.num_batches_tracked")) == 1
