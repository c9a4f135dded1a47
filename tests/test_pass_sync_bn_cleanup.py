"""SyncBatchNorm reversion (passes/sync_bn.py) and clean-up (passes/cleanup.py) on hand-built
graphs: what they change, how many, the codes of what stays, and what they must leave alone."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
from torch import nn

from asrfx.passes.cleanup import cleanup, drop_identities
from asrfx.passes.sync_bn import revert_sync_batchnorm
from helpers import REL_TOL, node_kinds, randomize_bn, rel_err, run_graph, traced

C = 4


class Ranks(nn.Module):
    """BatchNorms over inputs of rank 2 (features), 3 (sequences), 4 (maps) and 5 (volumes)."""

    def __init__(self):
        super().__init__()
        self.n2, self.n3 = nn.BatchNorm1d(C), nn.BatchNorm1d(C)
        self.n4, self.n5 = nn.BatchNorm2d(C), nn.BatchNorm3d(C, eps=1e-3, momentum=0.3)

    def forward(self, x):
        v = x.unsqueeze(-1)  # (N, C, H, W, 1)
        return (self.n2(x.mean((2, 3))), self.n3(x.flatten(2)), self.n4(x), self.n5(v))


def _sync(model):
    return nn.SyncBatchNorm.convert_sync_batchnorm(randomize_bn(model, seed=1))


def _outputs_close(ref, out):
    ref = ref if isinstance(ref, tuple) else (ref,)
    out = out if isinstance(out, tuple) else (out,)
    assert len(ref) == len(out)
    assert all(rel_err(a, b) <= REL_TOL for a, b in zip(ref, out))


def test_each_sync_batchnorm_becomes_the_batchnorm_of_its_input_rank():
    x = torch.randn(3, C, 5, 5)
    gm = traced(_sync(Ranks()), x)
    assert {type(m) for m in gm.children()} == {nn.SyncBatchNorm}
    params = {n: p for n, p in gm.named_parameters()}
    buffers = {n: b for n, b in gm.named_buffers()}
    ref = run_graph(gm, x)
    records = revert_sync_batchnorm(gm)
    assert {r.path: (r.kind, r.action, r.target, r.channels) for r in records} == {
        "n2": ("SyncBatchNorm", "reverted", "BatchNorm1d", C),
        "n3": ("SyncBatchNorm", "reverted", "BatchNorm1d", C),
        "n4": ("SyncBatchNorm", "reverted", "BatchNorm2d", C),
        "n5": ("SyncBatchNorm", "reverted", "BatchNorm3d", C),
    }
    assert all(r.key == f"syncbn:{r.path}" for r in records)
    # the same tensors under the same names, the same settings and mode
    assert {n: p for n, p in gm.named_parameters()}.keys() == params.keys()
    assert all(p is params[n] for n, p in gm.named_parameters())
    assert all(b is buffers[n] for n, b in gm.named_buffers())
    assert (gm.n5.eps, gm.n5.momentum, gm.n5.training) == (1e-3, 0.3, False)
    _outputs_close(ref, run_graph(gm, x))


def test_without_shapes_the_rank_is_unknown_until_example_inputs_are_given():
    x = torch.randn(3, C, 5, 5)
    model = _sync(nn.Sequential(nn.Conv2d(C, C, 1), nn.BatchNorm2d(C)))
    gm = fx.symbolic_trace(model)  # no shape metadata
    records = revert_sync_batchnorm(gm)
    assert [(r.action, r.code) for r in records] == [("kept", "rank-unknown")]
    assert type(gm.get_submodule("1")) is nn.SyncBatchNorm
    records = revert_sync_batchnorm(gm, example_inputs=(x,))
    assert [(r.action, r.target) for r in records] == [("reverted", "BatchNorm2d")]
    assert type(gm.get_submodule("1")) is nn.BatchNorm2d


class TwoRanks(nn.Module):
    """One norm called on a map and on its pooled features."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x):
        return self.bn(x), self.bn(x.mean((2, 3)))


class Rank6(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm3d(C)

    def forward(self, x):
        return self.bn(x.unsqueeze(-1).unsqueeze(-1))


@pytest.mark.parametrize("build, code", [(TwoRanks, "ranks-differ"),
                                         (Rank6, "rank-unsupported")])
def test_a_norm_no_one_batchnorm_class_takes_is_kept(build, code):
    x = torch.randn(3, C, 5, 5)
    gm = traced(_sync(build()), x)
    ref = run_graph(gm, x)
    records = revert_sync_batchnorm(gm)
    assert [(r.action, r.code) for r in records] == [("kept", code)]
    assert records[0].reason
    assert type(gm.get_submodule("bn")) is nn.SyncBatchNorm
    _outputs_close(ref, run_graph(gm, x))


class MySync(nn.SyncBatchNorm):
    """A subclass: its forward may differ; left alone."""


def test_subclasses_and_plain_batchnorms_are_left_alone():
    x = torch.randn(3, C, 5, 5)
    model = nn.Sequential(MySync(C), nn.BatchNorm2d(C))
    gm = traced(randomize_bn(model, seed=2), x, leaves=(MySync,))
    kinds = node_kinds(gm)
    assert revert_sync_batchnorm(gm) == []
    assert node_kinds(gm) == kinds
    assert type(gm.get_submodule("0")) is MySync


# ------------------------------------------------------------------ identities


class Identities(nn.Module):
    def __init__(self):
        super().__init__()
        self.id, self.drop, self.drop2d = nn.Identity(), nn.Dropout(0.5), nn.Dropout2d(0.5)
        self.alpha = nn.AlphaDropout(0.5)
        self.conv = nn.Conv2d(C, C, 1)

    def forward(self, x):
        return self.conv(self.alpha(self.drop2d(self.drop(self.id(x)))))


def test_identities_and_eval_dropouts_are_bypassed():
    x = torch.randn(2, C, 5, 5)
    gm = traced(Identities(), x)
    ref = run_graph(gm, x)
    assert drop_identities(gm) == 4
    assert [str(n.target) for n in gm.graph.nodes if n.op == "call_module"] == ["conv"]
    assert rel_err(ref, run_graph(gm, x)) <= REL_TOL
    assert drop_identities(gm) == 0


class MyIdentity(nn.Identity):
    """A subclass: it may do more than return its input."""


def test_a_training_dropout_and_an_identity_subclass_stay():
    x = torch.randn(2, C, 5, 5)
    model = nn.Sequential(nn.Dropout(0.5), MyIdentity(), nn.Identity(), nn.Conv2d(C, C, 1))
    gm = traced(model, x, leaves=(MyIdentity,))
    gm.get_submodule("0").train()
    assert drop_identities(gm) == 1  # the nn.Identity only
    assert [str(n.target) for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1", "3"]


# ------------------------------------------------------------------ cleanup


class Leftovers(nn.Module):
    """Modules, parameters and buffers some of which the graph stops reading."""

    def __init__(self):
        super().__init__()
        self.used = nn.Conv2d(C, C, 1)
        self.block = nn.Module()
        self.block.unused = nn.Conv2d(C, C, 1)
        self.block.kept = nn.Conv2d(C, C, 1)
        self.scale = nn.Parameter(torch.ones(1, C, 1, 1))
        self.register_buffer("shift", torch.zeros(1, C, 1, 1))
        self.register_buffer("counter", torch.zeros(1))

    def forward(self, x):
        y = self.block.kept(self.used(x)) * self.scale + self.shift
        self.block.unused(x) * 2  # computed, never read: a dead node
        self.counter.add_(x.new_ones(1))  # an in-place update of a buffer: a side effect
        return y


def test_cleanup_removes_dead_nodes_and_what_only_they_read():
    x = torch.randn(2, C, 5, 5)
    gm = traced(Leftovers(), x)
    assert any(n.op == "call_module" and n.target == "block.unused" for n in gm.graph.nodes)
    ref = run_graph(gm, x)
    # the graph stops reading ``shift`` (as a pass that folded it would leave it)
    add = next(n for n in gm.graph.nodes if n.target is operator.add)
    add.replace_all_uses_with(add.args[0])
    cleanup(gm)
    names = {n for n, _ in gm.named_modules()}
    assert "block.unused" not in names
    assert {"used", "block", "block.kept"} <= names
    state = set(gm.state_dict())
    assert "shift" not in state
    assert {"scale", "counter", "used.weight", "block.kept.weight"} <= state
    assert any(n.target == "add_" for n in gm.graph.nodes)  # the side effect stays
    assert not any(n.op == "call_module" and n.target == "block.unused" for n in gm.graph.nodes)
    with torch.no_grad():
        out = gm(x)  # cleanup recompiles
    assert rel_err(ref, out) <= REL_TOL  # the shift it dropped was zero


def test_cleanup_removes_an_unread_layer_without_bias():
    """A bias-free conv keeps a ``bias: None`` entry once its weight goes: it holds nothing and
    goes too (a merge that replaced it left it behind before)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.Conv2d(4, 4, 3))
    gm = traced(model, torch.randn(2, 3, 6, 6))
    first = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "0")
    first.replace_all_uses_with(first.args[0])  # as a merge leaves it: nothing reads "0"
    cleanup(gm)
    assert {n for n, _ in gm.named_modules()} == {"", "1"}


def test_cleanup_keeps_what_another_graph_reads():
    x = torch.randn(2, C, 5, 5)
    gm = traced(Leftovers(), x)
    other = fx.symbolic_trace(Leftovers()).graph  # reads block.unused too
    cleanup(gm, other_graphs=(other,))
    assert "block.unused" in {n for n, _ in gm.named_modules()}


def test_cleanup_of_a_clean_graph_changes_nothing():
    x = torch.randn(2, C, 5, 5)
    model = nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C), nn.ReLU())
    gm = traced(randomize_bn(model, seed=3), x)
    kinds, state = node_kinds(gm), gm.state_dict()
    ref = run_graph(gm, x)
    cleanup(gm)
    assert node_kinds(gm) == kinds
    assert gm.state_dict().keys() == state.keys()
    with torch.no_grad():
        assert rel_err(ref, gm(x)) <= REL_TOL
