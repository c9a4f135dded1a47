"""The ASR rewrite pass on small hand-built graphs: ``apply_asr`` (psi, modes, one row, init)
and the two refusal passes that run before it, ``refuse_batch_statistic_sites`` and
``gates_before_batch_norm``.

Graphs come from :class:`asrfx.tracing.AsrTracer` with recorded shapes and the sites from
``find_attention_sites``; nothing here goes through ``asrfx.prepare``.
"""

from __future__ import annotations

import collections

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from asrfx.passes import (apply_asr, find_attention_sites, refuse_batch_statistic_sites,
                          gates_before_batch_norm, value_dependent)
from asrfx.passes.graph_utils import reads_shape_only, tensor_shape
from asrfx.passes.shapes import propagate_shapes
from helpers import asr_traced, SE, SENet, dtype_tol, randomize_bn, rel_err

TOL = dtype_tol(torch.float32)


def _sites(model: nn.Module, *inputs: torch.Tensor):
    gm = asr_traced(model, *inputs)
    sites, refusals = find_attention_sites(gm)
    assert refusals == []
    return gm, sites


def _run(gm: fx.GraphModule, *inputs: torch.Tensor) -> torch.Tensor:
    gm.recompile()
    with torch.no_grad():
        return gm(*inputs)


def _signature(graph: fx.Graph) -> list[tuple]:
    """The graph's structure: op, target and argument structure of every node."""
    index = {n: i for i, n in enumerate(graph.nodes)}
    return [(n.op, str(n.target), repr(fx.node.map_arg((n.args, n.kwargs), lambda a: index[a])))
            for n in graph.nodes]


def _assert_refused(refused: list, code: str) -> None:
    """Each refusal pairs its site with a record of it: refused, with ``code``."""
    for site, rec in refused:
        assert (rec.path, rec.channels, rec.action, rec.code) == (site.path, site.channels,
                                                                  "refused", code)
        assert rec.reason


def _senet(seed: int = 0) -> SENet:
    torch.manual_seed(seed)
    return randomize_bn(SENet(8), seed).eval()


def _backbone_with_gate(m: SENet, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """SENet's output with its SE gate replaced by ``gate``."""
    with torch.no_grad():
        return m.bn2(m.conv2(torch.relu(m.bn(m.conv(x)) * gate)))


# --- psi -----------------------------------------------------------------------------------------


def test_psi_has_the_statistic_shape_with_batch_one():
    m = _senet()
    gm, sites = _sites(m, torch.randn(3, 3, 8, 8))
    assert tensor_shape(sites[0].stats[0]) == (3, 8, 1, 1)
    created: dict = {}
    names = apply_asr(gm, sites, init=0.25, created=created)
    assert names == [["se.psi"]]
    assert list(created) == ["se.psi"]
    psi = created["se.psi"]
    assert isinstance(psi, nn.Parameter) and psi.requires_grad
    assert psi.shape == (1, 8, 1, 1) and psi.dtype == torch.float32
    assert gm.get_parameter("se.psi") is psi
    torch.testing.assert_close(psi.detach(), torch.full((1, 8, 1, 1), 0.25))


def test_branch_reads_psi_not_the_map():
    m = _senet(1)
    x = torch.randn(3, 3, 8, 8)
    gm, sites = _sites(m, x)
    (site,) = sites
    stat = site.stats[0]
    created: dict = {}
    apply_asr(gm, sites, init=0.1, created=created)
    # the gate no longer depends on the input's values; the statistic feeds nothing
    dep = value_dependent(gm.graph)
    assert site.gate not in dep and all(n not in dep for n in site.branch)
    assert not stat.users
    first = site.branch[0]
    assert first.args[0].op == "get_attr" and first.args[0].target == "se.psi"
    with torch.no_grad():
        created["se.psi"].copy_(torch.rand(1, 8, 1, 1) + 0.1)
        psi = created["se.psi"]
        gate = torch.sigmoid(m.se.fc2(torch.relu(m.se.fc1(psi))))
    for xi in (x, torch.randn(5, 3, 8, 8)):
        assert rel_err(_backbone_with_gate(m, xi, gate), _run(gm, xi)) <= TOL


def test_each_statistic_gets_its_own_psi():
    class MeanStd(nn.Module):
        def __init__(self, c: int = 8):
            super().__init__()
            self.conv = nn.Conv2d(3, c, 3, padding=1)
            self.fc = nn.Conv2d(2 * c, c, 1)

        def forward(self, x):
            y = self.conv(x)
            z = torch.cat([y.mean((2, 3), keepdim=True), y.std((2, 3), keepdim=True)], 1)
            return y * torch.sigmoid(self.fc(z))

    gm, sites = _sites(MeanStd(), torch.randn(2, 3, 8, 8))
    created: dict = {}
    assert apply_asr(gm, sites, created=created) == [["psi", "stat1_psi"]]
    assert {k: tuple(v.shape) for k, v in created.items()} == {"psi": (1, 8, 1, 1),
                                                             "stat1_psi": (1, 8, 1, 1)}
    cat = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.cat)
    assert [a.target for a in cat.args[0]] == ["psi", "stat1_psi"]


def test_token_statistic_psi_keeps_its_rank():
    class TokenGate(nn.Module):
        def __init__(self, c: int = 8):
            super().__init__()
            self.embed = nn.Linear(5, c)
            self.fc = nn.Linear(c, c)

        def forward(self, t):
            t = self.embed(t)
            return t * torch.sigmoid(self.fc(t.mean(1))).unsqueeze(1)

    gm, sites = _sites(TokenGate(), torch.randn(2, 6, 5))
    created: dict = {}
    apply_asr(gm, sites, created=created)
    assert created["psi"].shape == (1, 8)


def test_gates_sharing_a_statistic_share_one_psi():
    class SelectiveKernel(nn.Module):
        def __init__(self, c: int = 8):
            super().__init__()
            self.a = nn.Conv2d(3, c, 3, padding=1)
            self.b = nn.Conv2d(3, c, 1)
            self.fa = nn.Conv2d(c, c, 1)
            self.fb = nn.Conv2d(c, c, 1)

        def forward(self, x):
            a, b = self.a(x), self.b(x)
            z = (a + b).mean((2, 3), keepdim=True)
            return a * torch.sigmoid(self.fa(z)) + b * torch.sigmoid(self.fb(z))

    gm, sites = _sites(SelectiveKernel(), torch.randn(2, 3, 8, 8))
    assert len(sites) == 2 and sites[0].stats == sites[1].stats
    created: dict = {}
    assert apply_asr(gm, sites, created=created) == [["psi"], ["psi"]]
    assert list(created) == ["psi"]
    readers = {n.args[0].target for s in sites for n in s.branch if n.op == "call_module"
               and n.target in ("fa", "fb")}
    assert readers == {"psi"}


# --- one row -------------------------------------------------------------------------------------


@pytest.mark.parametrize("one_row", [True, False])
def test_excitation_runs_on_one_row_unless_asked_not_to(one_row):
    m = _senet(2)
    x = torch.randn(4, 3, 8, 8)
    gm, sites = _sites(m, x)
    apply_asr(gm, sites, init=0.3, one_row=one_row)
    (site,) = sites
    assert site.rows is None
    gm.recompile()
    propagate_shapes(gm, (x,))
    assert tensor_shape(site.gate) == ((1, 8, 1, 1) if one_row else (4, 8, 1, 1))
    expanded = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "expand"]
    assert len(expanded) == (0 if one_row else 1)
    with torch.no_grad():
        gate = torch.sigmoid(m.se.fc2(torch.relu(m.se.fc1(torch.full((1, 8, 1, 1), 0.3)))))
    assert rel_err(_backbone_with_gate(m, x, gate), _run(gm, x)) <= TOL


def test_branch_using_the_batch_size_as_a_number_keeps_psi_expanded():
    class CountsRows(nn.Module):
        """An excitation that divides by the batch size: not one row's worth of shapes."""

        def __init__(self, c: int = 8):
            super().__init__()
            self.conv = nn.Conv2d(3, c, 3, padding=1)
            self.fc = nn.Conv2d(c, c, 1)

        def forward(self, x):
            y = self.conv(x)
            z = self.fc(y.mean((2, 3), keepdim=True))
            return y * torch.sigmoid(z * (y.numel() / y.shape[0] / 512))

    x = torch.randn(3, 3, 8, 8)
    gm, sites = _sites(CountsRows(), x)
    apply_asr(gm, sites)
    (site,) = sites
    assert isinstance(site.rows, str) and site.rows
    gm.recompile()
    propagate_shapes(gm, (x,))
    assert tensor_shape(site.gate) == (3, 8, 1, 1)


# --- modes ---------------------------------------------------------------------------------------


def test_mode_both_adds_a_fresh_copy_in_front_of_the_attention():
    m = _senet(3)
    x = torch.randn(3, 3, 8, 8)
    gm, sites = _sites(m, x)
    (site,) = sites
    created: dict = {}
    names = apply_asr(gm, sites, init=0.2, created=created, root=m, site_modes=["both"])
    assert names == [["se.psi"]]
    assert set(created) == {"se.psi", "se.asr.fc1", "se.asr.fc2"}
    for name in ("fc1", "fc2"):
        asr_mod, orig = created[f"se.asr.{name}"], getattr(m.se, name)
        assert type(asr_mod) is type(orig) and asr_mod is not orig
        assert asr_mod.weight.shape == orig.weight.shape
        assert not torch.equal(asr_mod.weight, orig.weight)  # re-initialised, not copied
    # the original attention stays input-dependent and now reads x * A(psi)
    dep = value_dependent(gm.graph)
    assert site.gate in dep and site.asr_mul is not None
    assert site.asr_mul.args[0] is site.x
    assert site.stats[0].args[0] is site.asr_mul and site.mul.args[0] is site.asr_mul
    assert all(u is site.asr_mul or reads_shape_only(u) for u in site.x.users)
    with torch.no_grad():
        psi = created["se.psi"]
        asr_gate = torch.sigmoid(created["se.asr.fc2"](torch.relu(created["se.asr.fc1"](psi))))
        ref = m.bn2(m.conv2(torch.relu(m.se(m.bn(m.conv(x)) * asr_gate))))
    assert rel_err(ref, _run(gm, x)) <= TOL


def test_mode_keep_leaves_the_site_but_names_it():
    m = _senet(4)
    x = torch.randn(2, 3, 8, 8)
    gm, sites = _sites(m, x)
    before = _signature(gm.graph)
    with torch.no_grad():
        ref = m(x)
    created: dict = {}
    assert apply_asr(gm, sites, created=created, site_modes=["keep"]) == [["se.psi"]]
    assert created == {} and sites[0].psi_nodes == []
    assert _signature(gm.graph) == before
    assert rel_err(ref, _run(gm, x)) <= TOL


def test_site_modes_apply_per_site_and_names_count_every_site():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), SE(8), nn.ReLU(), SE(8)).eval()
    x = torch.randn(2, 3, 8, 8)
    gm, sites = _sites(model, x)
    created: dict = {}
    names = apply_asr(gm, sites, created=created, root=model, site_modes=["keep", "both"])
    assert names == [["1.psi"], ["3.psi"]]
    assert set(created) == {"3.psi", "3.asr.fc1", "3.asr.fc2"}
    dep = value_dependent(gm.graph)
    assert sites[0].gate in dep and sites[0].asr_mul is None
    assert sites[1].gate in dep and sites[1].asr_mul is not None


def test_unknown_mode_raises():
    gm, sites = _sites(_senet(), torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError):
        apply_asr(gm, sites, site_modes=["swap"])


def test_created_parameters_are_reused_for_the_other_graph():
    """Train and eval graphs of one model share psi and the ASR copy."""
    m = _senet(6)
    x = torch.randn(2, 3, 8, 8)
    created: dict = {}
    for _ in range(2):
        gm, sites = _sites(m, x)
        apply_asr(gm, sites, created=created, root=m, site_modes=["both"])
        assert gm.get_parameter("se.psi") is created["se.psi"]
        assert gm.get_submodule("se.asr.fc1") is created["se.asr.fc1"]
    assert set(created) == {"se.psi", "se.asr.fc1", "se.asr.fc2"}


# --- norms inside the branch ---------------------------------------------------------------------


class NormedSE(nn.Module):
    """An SE whose hidden units are normalised: with running statistics, with batch statistics
    only (module), or by a hand-written ``batch_norm(training=True)`` without statistics."""

    def __init__(self, c: int = 8, norm: str = "running"):
        super().__init__()
        self.fc1 = nn.Conv2d(c, 4, 1)
        self.fc2 = nn.Conv2d(4, c, 1)
        self.norm = norm
        if norm == "running":
            self.bn = nn.BatchNorm2d(4)
        elif norm == "batch-only":
            self.bn = nn.BatchNorm2d(4, track_running_stats=False)
        self.beta = nn.Parameter(torch.zeros(4))

    def forward(self, x):
        h = self.fc1(x.mean((2, 3), keepdim=True))
        if self.norm == "functional":
            h = F.batch_norm(h, None, None, None, self.beta, training=True)
        else:
            h = self.bn(h)
        return x * torch.sigmoid(self.fc2(torch.relu(h)))


def _normed(norm: str) -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(collections.OrderedDict(stem=nn.Conv2d(3, 8, 3, padding=1),
                                                 att=NormedSE(8, norm)))


def test_norm_in_branch_normalises_with_its_running_statistics():
    model = _normed("running")
    randomize_bn(model, 7)
    model.train()  # the BatchNorm would use batch statistics here
    x = torch.randn(4, 3, 8, 8)
    gm, sites = _sites(model, x)
    created: dict = {}
    apply_asr(gm, sites, created=created)
    (site,) = sites
    assert site.frozen_norms == ["att.bn"]
    assert not any(n.op == "call_module" and n.target == "att.bn" for n in gm.graph.nodes)
    frozen = [n for n in site.branch if n.op == "call_function" and n.target is F.batch_norm]
    assert len(frozen) == 1 and frozen[0].args[5] is False
    bn = model.att.bn
    stats = (bn.running_mean.clone(), bn.running_var.clone())
    with torch.no_grad():
        h = F.batch_norm(model.att.fc1(created["att.psi"]), bn.running_mean, bn.running_var,
                         bn.weight, bn.bias, False, 0.0, bn.eps)
        ref = model.stem(x) * torch.sigmoid(model.att.fc2(torch.relu(h)))
    out = _run(gm, x)  # in train mode
    assert rel_err(ref, out) <= TOL
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])


@pytest.mark.parametrize("norm, named", [("batch-only", "att.bn"), ("functional", "att")])
def test_branch_normalising_with_batch_statistics_is_refused(norm, named):
    gm, sites = _sites(_normed(norm), torch.randn(4, 3, 8, 8))
    keep, refused = refuse_batch_statistic_sites(gm, sites)
    assert keep == []
    assert [s for s, _ in refused] == sites
    _assert_refused(refused, "batch-stats-norm-in-branch")
    assert f"{named} (" in refused[0][1].reason  # the norm is named


def test_branch_norm_with_running_statistics_is_not_refused():
    model = _normed("running").train()
    gm, sites = _sites(model, torch.randn(4, 3, 8, 8))
    assert refuse_batch_statistic_sites(gm, sites) == (sites, [])


@pytest.mark.parametrize("which", ["refused", "moved"])
def test_the_analyses_leave_the_graph_as_it_is(which):
    model = _normed("batch-only") if which == "refused" else GateThenNorm().train()
    gm, sites = _sites(model, torch.randn(4, 3, 8, 8))
    before = _signature(gm.graph)
    refuse_batch_statistic_sites(gm, sites)
    gates_before_batch_norm(gm, sites)
    assert _signature(gm.graph) == before


# --- gates right before a BatchNorm --------------------------------------------------------------


class GateThenNorm(nn.Module):
    """conv -> gate (sigmoid SE, tanh gate, or additive context) -> ``between`` -> BatchNorm;
    ``residual``: the gated map is also added to the output."""

    def __init__(self, c: int = 8, gate: str = "sigmoid", between: str = "none",
                 residual: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.fc = nn.Conv2d(c, c, 1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.full = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.gate, self.between, self.residual = gate, between, residual

    def forward(self, x):
        y = self.conv(x)
        z = self.fc(y.mean((2, 3), keepdim=True))
        if self.gate == "sigmoid":
            g = y * torch.sigmoid(z)
        elif self.gate == "tanh":
            g = y * torch.tanh(z)
        else:
            g = y + z
        if self.between == "relu":
            h = torch.relu(g)
        elif self.between == "dw":
            h = self.dw(g)
        elif self.between == "conv":
            h = self.full(g)
        else:
            h = g
        out = self.bn(h)
        return out + g if self.residual else out


def _norm_names(site) -> list[str]:
    return [name for name, _ in site.after_norms]


@pytest.mark.parametrize("kw", [
    dict(),                                  # SE right before the block's norm
    dict(gate="tanh"),                       # any gate, directly
    dict(gate="add"),                        # an additive context: a shift the norm removes
    dict(between="relu"),                    # a positive gate crosses ReLU
    dict(between="dw"),                      # any gate crosses a depthwise conv
], ids=lambda kw: "-".join(f"{v}" for v in kw.values()) or "sigmoid")
def test_gate_read_only_by_a_training_batch_norm_moves_behind_it(kw):
    model = GateThenNorm(**kw).train()
    gm, sites = _sites(model, torch.randn(4, 3, 8, 8))
    moved, refused = gates_before_batch_norm(gm, sites)
    assert refused == []
    assert moved == {("", 8, 0): ("bn (BatchNorm2d)",)}  # the norm is named
    assert _norm_names(sites[0]) == ["bn (BatchNorm2d)"]
    assert sites[0].after_norms[0][1].target == "bn"


@pytest.mark.parametrize("kw", [
    dict(gate="tanh", between="relu"),       # a gate of either sign does not cross ReLU
    dict(between="conv"),                    # a full conv mixes channels
    dict(residual=True),                     # the gated map is also read by the sum
], ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_gate_read_by_anything_else_stays_in_front(kw):
    model = GateThenNorm(**kw).train()
    gm, sites = _sites(model, torch.randn(4, 3, 8, 8))
    assert gates_before_batch_norm(gm, sites) == ({}, [])
    assert sites[0].after_norms == []


def test_gate_before_an_eval_mode_batch_norm_stays_in_front():
    model = GateThenNorm().train()
    model.bn.eval()  # frozen statistics: the norm does not cancel a constant scale
    gm, sites = _sites(model, torch.randn(4, 3, 8, 8))
    assert gates_before_batch_norm(gm, sites) == ({}, [])


def test_gate_before_a_batch_norm_subclass_moves_once_traced_through():
    """A BatchNorm subclass is traced through (with example inputs, which answer its
    ``input.dim() != 4`` check): its training-mode batch_norm call cancels a constant gate
    like the module would, so the gate moves behind the call."""
    from asrfx.capture import capture

    class MyNorm(nn.BatchNorm2d):
        pass

    model = GateThenNorm().train()
    model.bn = MyNorm(8)
    x = torch.randn(4, 3, 8, 8)
    gm = capture(model, (x,)).train
    propagate_shapes(gm, (x,))
    sites, _ = find_attention_sites(gm)
    assert not any(n.op == "call_module" and n.target == "bn" for n in gm.graph.nodes)
    moved, refused = gates_before_batch_norm(gm, sites)
    assert refused == [] and list(moved.values()) == [("bn (batch_norm)",)]
    assert sites[0].after_norms[0][1].target is F.batch_norm


class TwoThenNorm(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.se1, self.se2 = SE(c), SE(c)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(self.se2(self.se1(self.conv(x))))


def test_two_gates_in_a_row_before_a_norm_both_move():
    """The second site's product is a constant scale once converted: the first gate crosses
    it on its way to the norm."""
    gm, sites = _sites(TwoThenNorm().train(), torch.randn(4, 3, 8, 8))
    assert [s.path for s in sites] == ["se1", "se2"]
    moved, refused = gates_before_batch_norm(gm, sites)
    assert refused == []
    assert moved == {("se1", 8, 0): ("bn (BatchNorm2d)",), ("se2", 8, 0): ("bn (BatchNorm2d)",)}


class SharedGateThenNorms(nn.Module):
    """One gate scales two maps, each read only by a training-mode BatchNorm."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(3, c, 1)
        self.fc = nn.Conv2d(c, c, 1)
        self.bn1, self.bn2 = nn.BatchNorm2d(c), nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.a(x)
        g = torch.sigmoid(self.fc(y.mean((2, 3), keepdim=True)))
        return self.bn1(y * g) + self.bn2(self.b(x) * g)


def test_a_gate_of_two_maps_before_norms_is_refused():
    gm, sites = _sites(SharedGateThenNorms().train(), torch.randn(4, 3, 8, 8))
    assert len(sites) == 1 and sites[0].more_muls
    moved, refused = gates_before_batch_norm(gm, sites)
    assert moved == {}
    _assert_refused(refused, "gate-before-batch-norm")
    assert "more than one map" in refused[0][1].reason


def test_eval_graph_moves_what_the_train_graph_moves():
    """In a model whose modes trace differently, the eval graph's norms run on running
    statistics: a gate moves there when it moves in the train graph and the same norms read it,
    and is refused when they differ (both graphs must compute the same function)."""
    gm, sites = _sites(GateThenNorm().eval(), torch.randn(4, 3, 8, 8))
    assert gates_before_batch_norm(gm, sites) == ({}, [])  # eval mode alone: nothing to do
    moved, refused = gates_before_batch_norm(gm, sites, {("", 8, 0): ("bn (BatchNorm2d)",)})
    assert refused == [] and moved == {("", 8, 0): ("bn (BatchNorm2d)",)}
    gm, sites = _sites(GateThenNorm().eval(), torch.randn(4, 3, 8, 8))
    moved, refused = gates_before_batch_norm(gm, sites, {("", 8, 0): ("other (BatchNorm2d)",)})
    assert moved == {} and sites[0].after_norms == []
    _assert_refused(refused, "gate-before-batch-norm")


def test_moved_gate_scales_the_norm_output_in_training():
    """After the rewrite the norm reads the map itself and its output is scaled by the
    constant gate: ``g(psi) * BN(x)`` in train mode, equal to a hand-written form, and psi gets
    a real gradient (before the norm it would be cancelled)."""
    torch.manual_seed(0)
    model = GateThenNorm().train()
    x = torch.randn(4, 3, 8, 8)
    gm, sites = _sites(model, x)
    gates_before_batch_norm(gm, sites)
    created: dict = {}
    apply_asr(gm, sites, init=0.5, created=created)
    gm.recompile()
    psi = created["psi"]
    ref_bn = nn.BatchNorm2d(8).train()
    ref_bn.load_state_dict(model.bn.state_dict())
    want = ref_bn(model.conv(x)) * torch.sigmoid(model.fc(psi))
    got = gm(x)
    assert rel_err(want, got) <= dtype_tol(torch.float32)
    (got * torch.randn(got.shape)).sum().backward()
    assert psi.grad.abs().max() > 1e-3 * model.fc.weight.grad.abs().max()
    assert sites[0].mul.args[0] is sites[0].after_norms[0][1]  # the site's multiply is behind


def test_senet_moves_nothing():
    model = SENet(8).train()
    gm, sites = _sites(model, torch.randn(4, 3, 8, 8))
    assert refuse_batch_statistic_sites(gm, sites) == (sites, [])
    assert gates_before_batch_norm(gm, sites) == ({}, [])


# --- psi init ------------------------------------------------------------------------------------


def _psi(init, **kw) -> torch.Tensor:
    gm, sites = _sites(_senet(), torch.randn(2, 3, 8, 8))
    created: dict = {}
    apply_asr(gm, sites, init=init, created=created, **kw)
    return created["se.psi"].detach()


def test_init_float():
    assert torch.equal(_psi(0.7), torch.full((1, 8, 1, 1), 0.7))


@pytest.mark.parametrize("shape", [(8,), (1, 8, 1, 1), (8, 1, 1)])
def test_init_tensor_of_the_statistic_size_is_reshaped(shape):
    value = torch.arange(8.0).reshape(shape)
    assert torch.equal(_psi(value), torch.arange(8.0).reshape(1, 8, 1, 1))


def test_init_tensor_is_broadcast_and_copied():
    value = torch.tensor(0.4)
    psi = _psi(value)
    value.fill_(9.0)
    assert torch.equal(psi, torch.full((1, 8, 1, 1), 0.4))


def test_init_dict_by_psi_name():
    assert torch.equal(_psi({"se.psi": 0.3}), torch.full((1, 8, 1, 1), 0.3))
    assert torch.equal(_psi({"se.psi": torch.ones(8)}), torch.ones(1, 8, 1, 1))


def test_init_normal_is_non_negative():
    torch.manual_seed(0)
    psi = _psi("normal")
    assert psi.shape == (1, 8, 1, 1) and (psi >= 0).all() and psi.std() > 0


def test_init_keeps_the_statistic_dtype():
    m = SENet(8).double().eval()
    gm, sites = _sites(m, torch.randn(2, 3, 8, 8, dtype=torch.float64))
    created: dict = {}
    apply_asr(gm, sites, init=torch.ones(8), created=created)
    assert created["se.psi"].dtype == torch.float64


@pytest.mark.parametrize("init, error", [
    ("zeros", ValueError),                   # not a known init name
    (torch.ones(3), ValueError),             # does not fit (1, 8, 1, 1)
    ({"other.psi": 0.1}, KeyError),          # no value for se.psi
])
def test_bad_init_raises(init, error):
    with pytest.raises(error):
        _psi(init)
