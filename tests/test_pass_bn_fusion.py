"""BatchNorm fusion (passes/bn_fusion.py) on hand-built graphs: what fuses (conv of any rank,
Linear -> BatchNorm1d on (N, C), functional convs), the codes of what stays, a conv called twice
(cloned for the fused call site), fire counts and ``ctx.select``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from asrfx.passes.bn_fusion import fuse_batchnorm
from asrfx.passes.protocol import PassContext
from helpers import (REL_TOL, actions, bn_call_nodes, randomize_bn, rel_err, run_graph,
                     state_snapshot, traced)

C = 4
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
NORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _fuse(model, x, ctx=None):
    """(graph, records, reference output, fused output)."""
    gm = traced(randomize_bn(model, seed=1), x)
    ref = run_graph(gm, x)
    records = fuse_batchnorm(gm, ctx)
    return gm, records, ref, run_graph(gm, x)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("bias, affine", [(True, True), (False, False)])
def test_conv_then_batchnorm_fuses(dims, bias, affine):
    model = nn.Sequential(CONVS[dims](3, C, 3, padding=1, bias=bias),
                          NORMS[dims](C, affine=affine), nn.ReLU())
    x = torch.randn(2, 3, *([5] * dims))
    gm, records, ref, out = _fuse(model, x)
    assert [(r.kind, r.action, r.target, r.channels) for r in records] == \
        [("conv+bn", "fused", "0", C)]
    assert records[0].key.startswith("bn:")
    assert bn_call_nodes(gm) == []
    assert gm.get_submodule("0").bias is not None  # the norm's shift lives in the conv now
    assert rel_err(ref, out) <= REL_TOL


def test_linear_then_batchnorm1d_on_n_c_fuses():
    x = torch.randn(5, 6)
    gm, records, ref, out = _fuse(nn.Sequential(nn.Linear(6, C), nn.BatchNorm1d(C),
                                                nn.Linear(C, 2)), x)
    assert [(r.action, r.target) for r in records] == [("fused", "0")]
    assert bn_call_nodes(gm) == []
    assert rel_err(ref, out) <= REL_TOL


def test_a_batchnorm1d_over_the_tokens_of_a_linear_is_not_fused():
    # Linear on (N, L, C) -> BatchNorm1d(L): the norm's channels are not the Linear's rows
    x = torch.randn(2, 5, 6)
    gm, records, ref, out = _fuse(nn.Sequential(nn.Linear(6, C), nn.BatchNorm1d(5)), x)
    assert [(r.action, r.code) for r in records] == [("kept", "no-conv-producer")]
    assert len(bn_call_nodes(gm)) == 1
    assert rel_err(ref, out) <= REL_TOL


class LinearNorm(nn.Module):
    """LeViT's Linear + BatchNorm over tokens (Graham et al., "LeViT", ICCV 2021): the tokens'
    rows normalised, ``bn(linear(x).flatten(0, 1)).reshape_as(linear(x))``. ``how``: that, a
    reshape to ``(-1, C)``, or a Conv1d over ``(N, C, L)`` flattened the same way (its rows are
    positions, not channels: no fusion). ``also``: the layer's output is read by another op."""

    def __init__(self, how: str = "flatten", also: bool = False):
        super().__init__()
        self.how, self.also = how, also
        self.layer = nn.Conv1d(6, 5, 1) if how == "conv" else nn.Linear(6, C, bias=False)
        self.bn = nn.BatchNorm1d(5 if how == "conv" else C)

    def forward(self, x):
        y = self.layer(x)
        rows = y.reshape(-1, y.shape[-1]) if self.how == "reshape" else y.flatten(0, 1)
        out = self.bn(rows).reshape_as(y)
        return out + y if self.also else out


@pytest.mark.parametrize("how", ["flatten", "reshape"])
def test_a_batchnorm1d_over_a_linears_token_rows_fuses_into_it(how):
    x = torch.randn(2, 5, 6)
    gm, records, ref, out = _fuse(LinearNorm(how), x)
    assert [(r.action, r.target) for r in records] == [("fused", "layer")], records
    assert bn_call_nodes(gm) == []
    assert gm.layer.bias is not None  # (a bias-free Linear gains the norm's shift)
    assert rel_err(ref, out) <= REL_TOL


@pytest.mark.parametrize("how, also", [("conv", False), ("flatten", True)])
def test_a_batchnorm1d_over_token_rows_stays_unless_a_linear_alone_feeds_it(how, also):
    x = torch.randn(2, 6, 5) if how == "conv" else torch.randn(2, 5, 6)
    gm, records, ref, out = _fuse(LinearNorm(how, also), x)
    assert [r.action for r in records] == ["kept"] and records[0].code, records
    assert len(bn_call_nodes(gm)) == 1
    assert rel_err(ref, out) <= REL_TOL


class FunctionalConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(C, 3, 3, 3) * 0.3)
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x):
        return self.bn(F.conv2d(x, self.weight, padding=1))


def test_a_functional_conv_takes_the_norm_and_gains_a_bias():
    x = torch.randn(2, 3, 5, 5)
    gm, records, ref, out = _fuse(FunctionalConvBN(), x)
    assert [r.action for r in records] == ["fused"]
    assert bn_call_nodes(gm) == []
    conv = next(n for n in gm.graph.nodes if n.target in (F.conv2d, torch.conv2d))
    assert len(conv.args) > 2 and conv.args[2] is not None
    assert rel_err(ref, out) <= REL_TOL


class Stays(nn.Module):
    """One BatchNorm per reason to keep it."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn_read_twice = nn.Conv2d(3, C, 3, padding=1), nn.BatchNorm2d(C)
        self.conv2 = nn.Conv2d(3, C, 1)
        self.bn_batch_stats = nn.BatchNorm2d(C, track_running_stats=False)
        self.bn_after_relu = nn.BatchNorm2d(C)
        self.bn_of_input = nn.BatchNorm2d(3)

    def forward(self, x, z):
        y = self.conv1(x)
        a = self.bn_read_twice(y) + y
        b = self.bn_batch_stats(self.conv2(x))
        c = self.bn_after_relu(torch.relu(y))
        return a + b + c, self.bn_of_input(z)


def test_norms_that_must_stay_say_why():
    x, z = torch.randn(3, 3, 5, 5), torch.randn(3, 3, 4, 4)
    gm = traced(randomize_bn(Stays(), seed=2), x, z)
    state = state_snapshot(gm)
    ref = run_graph(gm, x, z)
    records = fuse_batchnorm(gm)
    assert {r.path: (r.action, r.code) for r in records} == {
        "bn_read_twice": ("kept", "producer-read-elsewhere"),
        "bn_batch_stats": ("kept", "no-running-stats"),
        "bn_after_relu": ("kept", "no-conv-producer"),
        "bn_of_input": ("kept", "no-conv-producer"),
    }
    assert all(r.reason for r in records)
    assert len(bn_call_nodes(gm)) == 4
    assert state_snapshot(gm).keys() == state.keys()
    out = run_graph(gm, x, z)
    assert all(rel_err(a, b) <= REL_TOL for a, b in zip(ref, out))


class ConvTwice(nn.Module):
    """One conv called twice; only the first call is followed by a BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(torch.tanh(x))


def test_a_conv_called_twice_is_cloned_for_the_fused_call_site():
    x = torch.randn(2, C, 5, 5)
    model = ConvTwice()
    weight = model.conv.weight.detach().clone()
    gm, records, ref, out = _fuse(model, x)
    (rec,) = records
    assert rec.action == "fused" and rec.target != "conv"
    calls = sorted(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
    assert calls == sorted(["conv", rec.target])
    assert torch.equal(gm.get_submodule("conv").weight, weight)  # the other call is unchanged
    assert rel_err(ref, out) <= REL_TOL


def test_call_site_counts_follow_every_change_to_the_graph():
    """call_sites answers from counts kept as nodes are added, erased and retargeted; they
    always equal a scan of the graph."""
    from asrfx.passes.graph_utils import call_sites

    gm = traced(ConvTwice(), torch.randn(2, C, 5, 5))
    graph = gm.graph

    def scan(target):
        return sum(1 for n in graph.nodes if n.op == "call_module" and n.target == target)

    def agree():
        for target in ("conv", "bn", "conv_site", "tanh"):
            assert call_sites(graph, target) == scan(target), target

    agree()  # the first question installs the counts
    first, second = [n for n in graph.nodes if n.op == "call_module" and n.target == "conv"]
    first.target = "conv_site"  # retargeted
    agree()
    with graph.inserting_after(second):
        extra = graph.call_module("conv", (second,))  # added
    agree()
    graph.erase_node(extra)  # erased
    bn = next(n for n in graph.nodes if n.target == "bn")
    bn.replace_all_uses_with(bn.args[0])
    graph.erase_node(bn)
    agree()
    second.op = "call_function"  # (an op change goes through the table too)
    second.target = torch.tanh
    agree()


class ThreePairs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, C, 3, padding=1), nn.BatchNorm2d(C)
        self.c2, self.b2 = nn.Conv2d(C, C, 1), nn.BatchNorm2d(C)
        self.b3 = nn.BatchNorm2d(C)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        return self.b3(torch.relu(self.b2(self.c2(y))))


def test_fire_counts():
    x = torch.randn(2, 3, 5, 5)
    gm, records, ref, out = _fuse(ThreePairs(), x)
    assert actions(records) == {"fused": 2, "kept": 1}
    assert [r.path for r in records if r.action == "kept"] == ["b3"]
    assert len(bn_call_nodes(gm)) == 1
    assert rel_err(ref, out) <= REL_TOL


def test_select_fuses_only_the_chosen_norm():
    x = torch.randn(2, 3, 5, 5)
    gm = traced(randomize_bn(ThreePairs(), seed=3), x)
    ref = run_graph(gm, x)
    key = next(f"bn:{n.name}" for n in bn_call_nodes(gm) if n.target == "b2")
    records = fuse_batchnorm(gm, PassContext((x,), select=lambda k: k == key))
    assert [(r.key, r.action, r.target) for r in records] == [(key, "fused", "c2")]
    assert sorted(str(n.target) for n in bn_call_nodes(gm)) == ["b1", "b3"]
    assert rel_err(ref, run_graph(gm, x)) <= REL_TOL


class MyBN(nn.BatchNorm2d):
    """A subclass: never fused (its forward may differ)."""


def test_only_exact_batchnorms_are_looked_at():
    x = torch.randn(2, 3, 5, 5)
    model = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), MyBN(C), nn.Conv2d(C, C, 1),
                          nn.GroupNorm(2, C))
    gm = traced(randomize_bn(model, seed=4), x, leaves=(MyBN,))
    state = state_snapshot(gm)
    assert fuse_batchnorm(gm) == []
    after = state_snapshot(gm)
    assert all(torch.equal(state[k], after[k]) for k in state)


class SharedBufferConvBN(nn.Module):
    """A fixed (buffer) kernel that two functional calls read, the first one followed by a
    BatchNorm: fx gives each read its own get_attr node of the same buffer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randn(C, C, 3, 3) * 0.3)
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x):
        return torch.tanh(self.bn(F.conv2d(x, self.w, padding=1))) + \
            F.conv2d(x, self.w, padding=1)


def test_a_weight_buffer_read_by_another_call_is_not_changed_under_it():
    x = torch.randn(2, C, 5, 5)
    gm, records, ref, out = _fuse(SharedBufferConvBN(), x)
    assert [r.action for r in records] in (["fused"], ["kept"])
    assert rel_err(ref, out) <= REL_TOL


class _CatThenNorm(nn.Module):
    """``BN(cat([conv_a(x), conv_b(x), other(x)], 1))``: mixed kernel sizes as in MixNet;
    ``other`` another conv, a max-pooling (no layer to take the map) or a conv whose output is
    also read elsewhere."""

    def __init__(self, other: str = "conv"):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.c = nn.Conv2d(3, 3, 5, padding=2) if other != "pool" else nn.MaxPool2d(3, 1, 1)
        self.other = other
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        c = self.c(x)
        y = self.bn(torch.cat([self.a(x), self.b(x), c], 1))
        return y + c.sum() if self.other == "read" else y


def test_batchnorm_after_a_concatenation_of_convs_fuses_into_each():
    x = torch.randn(2, 3, 6, 6)
    gm, records, ref, out = _fuse(_CatThenNorm(), x)
    assert [(r.action, r.target) for r in records] == \
        [("fused", "cat(a (output rows), b (output rows), c (output rows))")]
    assert bn_call_nodes(gm) == []
    assert rel_err(ref, out) <= REL_TOL
    # a bias-free conv gains the bias its slice of the norm's shift needs
    assert gm.get_submodule("b").bias is not None


@pytest.mark.parametrize("other, code", [("pool", "no-conv-producer"),
                                         ("read", "no-conv-producer")])
def test_batchnorm_after_a_concatenation_stays_unless_every_part_is_a_layer_it_alone_feeds(
        other, code):
    x = torch.randn(2, 3, 6, 6)
    gm, records, ref, out = _fuse(_CatThenNorm(other), x)
    assert [(r.action, r.code) for r in records] == [("kept", code)]
    assert len(bn_call_nodes(gm)) == 1
    assert rel_err(ref, out) <= REL_TOL
