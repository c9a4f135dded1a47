"""Branch merging (passes/branch_merge.py) on hand-built graphs whose BatchNorms are already
fused: summed parallel branches of one input become one conv (RepVGG, ACNet, with an identity
BatchNorm or a bare identity), a 1x1 conv followed by a conv or an average pool becomes one
conv, and sums or pairs that are not one conv are left with a code."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

from asrfx.passes.branch_merge import merge_branches, merge_sequential
from asrfx.passes.graph_utils import module_path
from asrfx.passes.protocol import PassContext
from helpers import REL_TOL, actions, node_kinds, randomize_bn, rel_err, run_graph, traced

C = 4


class Branches(nn.Module):
    """``relu(sum of branch(x))``; a branch is a module, or None for ``x`` itself."""

    def __init__(self, *branches):
        super().__init__()
        self.branches = nn.ModuleList([b for b in branches if b is not None])
        self.identity = any(b is None for b in branches)

    def forward(self, x):
        y = self.branches[0](x)
        for b in self.branches[1:]:
            y = y + b(x)
        if self.identity:
            y = y + x
        return torch.relu(y)


def _conv(k, padding=None, **kw):
    k = k if isinstance(k, tuple) else (k, k)
    padding = tuple(d // 2 for d in k) if padding is None else padding
    return nn.Conv2d(kw.pop("ci", C), kw.pop("co", C), k, padding=padding, **kw)


def _convs(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module" and
            isinstance(gm.get_submodule(str(n.target)), nn.Conv2d)]


def _run(pass_, model, x, ctx=None):
    """(graph, records, reference output, output after the pass)."""
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        randomize_bn(model, seed=1)
    gm = traced(model, x)
    ref = run_graph(gm, x)
    records = pass_(gm, ctx)
    return gm, records, ref, run_graph(gm, x)


MERGES = {
    "repvgg": (lambda: Branches(_conv(3), _conv(1), nn.BatchNorm2d(C)), (3, 3), 3),
    "repvgg-grouped": (lambda: Branches(_conv(3, groups=2), _conv(1, groups=2),
                                        nn.BatchNorm2d(C)), (3, 3), 3),
    "bare-identity": (lambda: Branches(_conv(3), _conv(1), None), (3, 3), 3),
    "acnet": (lambda: Branches(_conv(3), _conv((1, 3)), _conv((3, 1))), (3, 3), 3),
    "strided": (lambda: Branches(_conv(3, stride=2), _conv(1, padding=0, stride=2)), (3, 3), 2),
    "5x5-and-3x3": (lambda: Branches(_conv(5), _conv(3)), (5, 5), 2),
}


@pytest.mark.parametrize("name", list(MERGES))
def test_parallel_branches_become_one_conv(name):
    build, size, n_branches = MERGES[name]
    x = torch.randn(2, C, 7, 7)
    gm, records, ref, out = _run(merge_branches, build(), x)
    merge = records[0]
    assert (merge.kind, merge.action, merge.channels) == ("branch merge", "merged", C)
    assert f"({n_branches} branches, kernel {size})" in merge.target
    assert merge.key.startswith("merge:")
    # an identity BatchNorm branch is absorbed, and says so in its own record
    bn_records = [(r.kind, r.action, r.path) for r in records[1:]]
    assert bn_records == ([("conv+bn", "merged", "branches.2")] if "repvgg" in name else [])
    (conv,) = _convs(gm)
    assert gm.get_submodule(str(conv.target)).kernel_size == size
    assert not any(n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)),
                                                          nn.BatchNorm2d) for n in gm.graph.nodes)
    assert rel_err(ref, out) <= REL_TOL


def test_a_merged_block_works_at_another_input_size():
    x = torch.randn(2, C, 7, 7)
    model = Branches(_conv(3), _conv((1, 3)), nn.BatchNorm2d(C))
    gm, _, _, _ = _run(merge_branches, model, x)
    other = torch.randn(3, C, 10, 6)
    with torch.no_grad():
        assert rel_err(model(other), run_graph(gm, other)) <= REL_TOL


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = _conv(3), _conv(1), _conv(1)

    def forward(self, x):
        return self.a(x) + self.c(torch.tanh(x)) + self.b(x)


class ReadElsewhere(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = _conv(3), _conv(1)

    def forward(self, x):
        y = self.b(x)
        return self.a(x) + y, y


REFUSALS = {
    # 5x5 and 3x3, both padding 1, stride 3 on 9x9: equal output sizes, windows centred apart
    "windows-not-centred": (lambda: Branches(_conv(5, padding=1, stride=3),
                                             _conv(3, padding=1, stride=3)), (2, C, 9, 9)),
    "branches-differ": (lambda: Branches(_conv(3, groups=2), _conv(1)), (2, C, 6, 6)),
    "dilated-or-even-kernel": (lambda: Branches(_conv(3), _conv(3, padding=2, dilation=2)),
                               (2, C, 6, 6)),
    "branch-padding": (lambda: Branches(_conv(3), _conv(3, padding_mode="reflect")),
                       (2, C, 6, 6)),
    "branches-read-different-inputs": (TwoInputs, (2, C, 6, 6)),
    "branch-read-elsewhere": (ReadElsewhere, (2, C, 6, 6)),
}


@pytest.mark.parametrize("code", list(REFUSALS))
def test_sums_that_are_not_one_conv_are_left_with_a_code(code):
    build, shape = REFUSALS[code]
    x = torch.randn(*shape)
    gm = traced(build(), x)
    kinds = node_kinds(gm)
    ref = run_graph(gm, x)
    records = merge_branches(gm)
    assert [(r.kind, r.action, r.code) for r in records] == [("branch merge", "kept", code)]
    assert records[0].reason
    assert node_kinds(gm) == kinds
    out = run_graph(gm, x)
    for a, b in zip(ref if isinstance(ref, tuple) else (ref,),
                    out if isinstance(out, tuple) else (out,)):
        assert rel_err(a, b) <= REL_TOL


def test_sums_without_a_conv_of_the_shared_input_are_not_looked_at():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = _conv(3)

        def forward(self, x):
            return self.conv(x) + torch.tanh(x), x + x

    x = torch.randn(2, C, 6, 6)
    gm = traced(Plain(), x)
    kinds = node_kinds(gm)
    assert merge_branches(gm) == []
    assert node_kinds(gm) == kinds


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.b1 = Branches(_conv(3), _conv(1), nn.BatchNorm2d(C))
        self.b2 = Branches(_conv(3), _conv((1, 3)))
        self.b3 = Branches(_conv(3, groups=2), _conv(1))  # branches-differ

    def forward(self, x):
        return self.b3(self.b2(self.b1(x)))


def test_fire_counts():
    x = torch.randn(2, C, 6, 6)
    gm, records, ref, out = _run(merge_branches, TwoBlocks(), x)
    merges = [r for r in records if r.kind == "branch merge"]
    assert actions(merges) == {"merged": 2, "kept": 1}
    assert [r.code for r in merges if r.action == "kept"] == ["branches-differ"]
    assert actions(r for r in records if r.kind == "conv+bn") == {"merged": 1}
    assert len(_convs(gm)) == 2 + 2
    assert rel_err(ref, out) <= REL_TOL


def test_select_merges_only_the_chosen_sum():
    x = torch.randn(2, C, 6, 6)
    model = TwoBlocks()
    randomize_bn(model, seed=2)
    gm = traced(model, x)
    ref = run_graph(gm, x)
    (add,) = [n for n in gm.graph.nodes if n.target is operator.add and module_path(n) == "b2"]
    key = f"merge:{add.name}"
    records = merge_branches(gm, PassContext((x,), select=lambda k: k == key))
    assert [(r.key, r.action) for r in records] == [(key, "merged")]
    assert len(_convs(gm)) == 2 + 1 + 2
    assert rel_err(ref, run_graph(gm, x)) <= REL_TOL


# ------------------------------------------------------------------ sequential


class Then(nn.Module):
    """``second(first(x))``, optionally with the 1x1 conv's output read elsewhere too."""

    def __init__(self, first, second, read_twice=False):
        super().__init__()
        self.first, self.second, self.read_twice = first, second, read_twice

    def forward(self, x):
        y = self.first(x)
        z = self.second(y)
        return (z, y) if self.read_twice else z


def _pw(bias):
    conv = nn.Conv2d(C, 6, 1, bias=bias)
    if bias:
        with torch.no_grad():
            conv.bias.uniform_(-0.5, 0.5)
    return conv


SEQUENTIAL = {
    "1x1-then-padded-conv": (lambda: Then(_pw(False), nn.Conv2d(6, C, 3, padding=1)), None),
    "biased-1x1-then-valid-conv": (lambda: Then(_pw(True), nn.Conv2d(6, C, 3)), None),
    "1x1-then-strided-conv": (lambda: Then(_pw(True), nn.Conv2d(6, C, 3, stride=2)), None),
    "biased-1x1-then-avg-pool": (lambda: Then(_pw(True), nn.AvgPool2d(2)), None),
    "1x1-then-padded-avg-pool": (lambda: Then(_pw(False), nn.AvgPool2d(3, 1, padding=1)),
                                 None),
    "biased-1x1-then-padded-conv": (lambda: Then(_pw(True), nn.Conv2d(6, C, 3, padding=1)),
                                    "bias-before-padded-conv"),
    "biased-1x1-then-padded-avg-pool": (lambda: Then(_pw(True), nn.AvgPool2d(3, 1, padding=1)),
                                        "bias-before-padded-pool"),
    "1x1-then-grouped-conv": (lambda: Then(_pw(False), nn.Conv2d(6, C, 3, groups=2)),
                              "second-conv-grouped"),
    "1x1-then-same-padded-conv": (lambda: Then(_pw(False), nn.Conv2d(6, C, 3, padding="same")),
                                  "second-conv-padding"),
    "1x1-read-elsewhere": (lambda: Then(_pw(False), nn.Conv2d(6, C, 3), read_twice=True),
                           "pointwise-read-elsewhere"),
}


@pytest.mark.parametrize("name", list(SEQUENTIAL))
def test_a_1x1_conv_and_what_follows_it(name):
    build, code = SEQUENTIAL[name]
    x = torch.randn(2, C, 7, 7)
    gm = traced(build(), x)
    kinds = node_kinds(gm)
    ref = run_graph(gm, x)
    records = merge_sequential(gm)
    (rec,) = records
    assert rec.kind == "sequential merge" and rec.key.startswith("seq:")
    if code is None:
        assert rec.action == "merged"
        calls = [n for n in gm.graph.nodes if n.op == "call_module"]
        assert len(calls) == 1 and isinstance(gm.get_submodule(str(calls[0].target)),
                                              nn.Conv2d)
    else:
        assert (rec.action, rec.code) == ("kept", code) and rec.reason
        assert node_kinds(gm) == kinds
    out = run_graph(gm, x)
    for a, b in zip(ref if isinstance(ref, tuple) else (ref,),
                    out if isinstance(out, tuple) else (out,)):
        assert rel_err(a, b) <= REL_TOL


def test_a_1x1_conv_with_stride_or_groups_is_not_a_pair():
    x = torch.randn(2, C, 7, 7)
    for first in (nn.Conv2d(C, 6, 1, stride=2), nn.Conv2d(C, 6, 1, groups=2),
                  nn.Conv2d(C, 6, 3, padding=1)):
        gm = traced(Then(first, nn.Conv2d(6, C, 3, padding=1)), x)
        assert merge_sequential(gm) == []


def test_a_pool_that_excludes_padding_is_refused_for_that_reason():
    x = torch.randn(2, C, 7, 7)
    gm = traced(Then(_pw(False), nn.AvgPool2d(3, 1, padding=1, count_include_pad=False)), x)
    ref = run_graph(gm, x)
    (rec,) = merge_sequential(gm)
    assert rel_err(ref, run_graph(gm, x)) <= REL_TOL
    assert (rec.action, rec.code) == ("kept", "pool-excludes-padding")
