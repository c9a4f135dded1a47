"""Scale folding (passes/scale_fold.py) on hand-built graphs whose constants are get_attr
buffers: folds into producers (conv rows, norm affines, through what the scale commutes with),
into consumers (conv / Linear columns, a BatchNorm's input side), the refusals and their codes,
pure planning (``plan_producer`` / ``plan_consumers`` change nothing until ``apply_plan``), fire
counts, and ``ctx.select``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from asrfx.passes.protocol import PassContext
from asrfx.passes.scale_fold import (Chain, _collect_chains, apply_plan, fold_scales,
                                     plan_consumers, plan_producer)
from asrfx.passes.targets import Fold, Refusal
from helpers import (REL_TOL, actions, assert_state_equal, randomize_bn, randomize_ln, rel_err,
                     run_graph, state_snapshot, traced)

C = 4


def _const(shape, lo, hi, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen) * (hi - lo) + lo


class Scaled(nn.Module):
    """``tanh(act(layer(x)) * s [+ t])``: only tanh reads the result, so only the producer side
    can take the map. ``sign``: +1 draws s from (0.5, 1.5), -1 from (-1.5, 1.5)."""

    def __init__(self, layer, *, act=None, sign=1, shift=True, shape=(1, C, 1, 1)):
        super().__init__()
        self.layer, self.act, self.shift = layer, act, shift
        self.register_buffer("s", _const(shape, 0.5, 1.5, 1) if sign > 0 else
                             _const(shape, -1.5, 1.5, 1))
        self.register_buffer("t", _const(shape, -0.5, 0.5, 2))

    def forward(self, x):
        y = self.layer(x)
        if self.act is not None:
            y = self.act(y)
        y = y * self.s
        if self.shift:
            y = y + self.t
        return torch.tanh(y)


class Feeds(nn.Module):
    """``layer(tanh(x) * s [+ t])``: tanh produces the scaled map, so only consumers can take
    it (``head``: what reads the layer's input first, e.g. pooling and flatten)."""

    def __init__(self, layer, *, head=None, shift=True, sign=-1):
        super().__init__()
        self.layer, self.head, self.shift = layer, head, shift
        self.register_buffer("s", _const((1, C, 1, 1), -1.5, 1.5, 3) if sign < 0 else
                             _const((1, C, 1, 1), 0.5, 1.5, 3))
        self.register_buffer("t", _const((1, C, 1, 1), -0.5, 0.5, 4))

    def forward(self, x):
        y = torch.tanh(x) * self.s
        if self.shift:
            y = y + self.t
        if self.head is not None:
            y = self.head(y)
        return self.layer(y)


def _randomize(model):
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        randomize_bn(model, seed=5)
    randomize_ln(model, seed=6)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.GroupNorm, nn.InstanceNorm2d)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
    return model


def _fold(model, x, ctx=None):
    """(graph, records, reference output, folded output) of fold_scales on ``model``."""
    gm = traced(_randomize(model), x)
    ref = run_graph(gm, x)
    records = fold_scales(gm, ctx)
    return gm, records, ref, run_graph(gm, x)


def _consts_left(gm):
    """Arithmetic nodes that still read a constant buffer."""
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method") and
            any(getattr(a, "op", None) == "get_attr" for a in n.args)]


# ------------------------------------------------------------------ producers

PRODUCERS = {
    "conv2d": (lambda: nn.Conv2d(3, C, 3, padding=1), "layer (output rows)"),
    "conv2d-no-bias": (lambda: nn.Conv2d(3, C, 3, padding=1, bias=False), "layer (output rows)"),
    "grouped-conv": (lambda: nn.Conv2d(C, C, 3, padding=1, groups=2), "layer (output rows)"),
    "batchnorm": (lambda: nn.BatchNorm2d(C), "layer (norm affine)"),
    "batchnorm-no-affine": (lambda: nn.BatchNorm2d(C, affine=False), "layer (norm affine)"),
    "groupnorm": (lambda: nn.GroupNorm(2, C), "layer (norm affine)"),
    "instancenorm": (lambda: nn.InstanceNorm2d(C, affine=True), "layer (norm affine)"),
    "layernorm-chw": (lambda: nn.LayerNorm([C, 5, 5]), "layer (norm affine)"),
}


@pytest.mark.parametrize("sign", [1, -1], ids=["positive", "any-sign"])
@pytest.mark.parametrize("name", list(PRODUCERS))
def test_folds_into_the_producer(name, sign):
    build, target = PRODUCERS[name]
    layer = build()
    x = torch.randn(2, 3 if name.startswith("conv") else C, 5, 5)
    gm, records, ref, out = _fold(Scaled(layer, sign=sign), x)
    assert [(r.kind, r.action, r.target, r.channels) for r in records] == \
        [("channel scale", "folded", target, C)]
    assert records[0].key.startswith("scale:")
    assert _consts_left(gm) == []
    assert rel_err(ref, out) <= REL_TOL


def test_folds_into_a_linear_on_n_c_and_a_token_layernorm():
    x = torch.randn(3, 6)
    gm, records, ref, out = _fold(Scaled(nn.Linear(6, C), shape=(1, C)), x)
    assert [(r.action, r.target) for r in records] == [("folded", "layer (output rows)")]
    assert rel_err(ref, out) <= REL_TOL
    tokens = torch.randn(2, 5, C)
    gm, records, ref, out = _fold(Scaled(nn.LayerNorm(C), shape=(1, 1, C)), tokens)
    assert [(r.action, r.target) for r in records] == [("folded", "layer (norm affine)")]
    assert rel_err(ref, out) <= REL_TOL


@pytest.mark.parametrize("act", [nn.ReLU(), nn.LeakyReLU(0.1), nn.MaxPool2d(2, padding=1)],
                         ids=["relu", "leaky-relu", "max-pool"])
def test_a_non_negative_scale_crosses_a_positively_homogeneous_op(act):
    x = torch.randn(2, 3, 6, 6)
    gm, records, ref, out = _fold(Scaled(nn.Conv2d(3, C, 3, padding=1), act=act, shift=False),
                                  x)
    (rec,) = records
    assert rec.action == "folded"
    assert rec.target == f"layer (output rows) through {type(act).__name__}"
    assert rel_err(ref, out) <= REL_TOL


@pytest.mark.parametrize("act", [nn.ReLU(), nn.LeakyReLU(0.1), nn.MaxPool2d(2)],
                         ids=["relu", "leaky-relu", "max-pool"])
def test_a_negative_scale_does_not_cross_a_nonlinearity(act):
    x = torch.randn(2, 3, 6, 6)
    gm, records, ref, out = _fold(Scaled(nn.Conv2d(3, C, 3, padding=1), act=act, sign=-1,
                                         shift=False), x)
    assert [(r.action, r.code) for r in records] == \
        [("kept", "negative-scale-before-nonlinearity")]
    assert len(_consts_left(gm)) == 1
    assert rel_err(ref, out) <= REL_TOL


def test_a_shift_does_not_cross_a_nonlinearity():
    x = torch.randn(2, 3, 6, 6)
    gm, records, ref, out = _fold(Scaled(nn.Conv2d(3, C, 3, padding=1), act=nn.ReLU()), x)
    assert [(r.action, r.code) for r in records] == [("kept", "shift-before-nonlinearity")]
    assert rel_err(ref, out) <= REL_TOL


def test_relu6_is_never_crossed():
    x = torch.randn(2, 3, 6, 6)
    gm, records, ref, out = _fold(Scaled(nn.Conv2d(3, C, 3, padding=1), act=nn.ReLU6(),
                                         shift=False), x)
    assert [(r.action, r.code) for r in records] == [("kept", "no-fold-target")]
    assert len(_consts_left(gm)) == 1


def test_average_pooling_is_crossed_whatever_the_sign():
    x = torch.randn(2, C, 6, 6)
    gm, records, ref, out = _fold(Scaled(nn.BatchNorm2d(C), act=nn.AvgPool2d(2), sign=-1,
                                         shift=False), x)
    assert [(r.action, r.target) for r in records] == \
        [("folded", "layer (norm affine) through AvgPool2d")]
    assert rel_err(ref, out) <= REL_TOL


class SumOfBranches(nn.Module):
    """``tanh((bn(x) + conv(x)) * s + t)`` or the same over ``cat([bn(x), conv(x)], 1)``."""

    def __init__(self, cat=False):
        super().__init__()
        self.cat = cat
        self.bn, self.conv = nn.BatchNorm2d(C), nn.Conv2d(C, C, 3, padding=1)
        width = 2 * C if cat else C
        self.register_buffer("s", _const((1, width, 1, 1), -1.5, 1.5, 8))
        self.register_buffer("t", _const((1, width, 1, 1), -0.5, 0.5, 9))

    def forward(self, x):
        a, b = self.bn(x), self.conv(x)
        y = torch.cat([a, b], 1) if self.cat else a + b
        return torch.tanh(y * self.s + self.t)


@pytest.mark.parametrize("cat, target", [(False, "bn (norm affine) + conv (output rows)"),
                                         (True, "cat(bn (norm affine), conv (output rows))")])
def test_a_scale_of_a_sum_or_concatenation_goes_into_every_part(cat, target):
    x = torch.randn(2, C, 5, 5)
    gm, records, ref, out = _fold(SumOfBranches(cat), x)
    assert [(r.action, r.target) for r in records] == [("folded", target)]
    assert _consts_left(gm) == []
    assert rel_err(ref, out) <= REL_TOL


# ------------------------------------------------------------------ consumers

CONSUMERS = {
    "conv-valid": (lambda: nn.Conv2d(C, 3, 3), None, "layer (input columns)"),
    "grouped-conv": (lambda: nn.Conv2d(C, C, 1, groups=2), None, "layer (input columns)"),
    "batchnorm": (lambda: nn.BatchNorm2d(C), None, "layer (norm input)"),
    "head-linear": (lambda: nn.Linear(C, 3), lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1),
                                                                     nn.Flatten()),
                    "layer (input columns) after AdaptiveAvgPool2d, flatten"),
}


@pytest.mark.parametrize("name", list(CONSUMERS))
def test_folds_into_the_consumer(name):
    build, head, target = CONSUMERS[name]
    x = torch.randn(2, C, 6, 6)
    gm, records, ref, out = _fold(Feeds(build(), head=None if head is None else head()), x)
    assert [(r.action, r.target) for r in records] == [("folded", target)]
    assert _consts_left(gm) == []
    assert rel_err(ref, out) <= REL_TOL


def test_a_scale_without_shift_folds_into_a_padded_conv():
    x = torch.randn(2, C, 6, 6)
    gm, records, ref, out = _fold(Feeds(nn.Conv2d(C, 3, 3, padding=1), shift=False), x)
    assert [(r.action, r.target) for r in records] == [("folded", "layer (input columns)")]
    assert rel_err(ref, out) <= REL_TOL


def test_a_shift_before_a_zero_padded_conv_is_kept():
    x = torch.randn(2, C, 6, 6)
    gm, records, ref, out = _fold(Feeds(nn.Conv2d(C, 3, 3, padding=1)), x)
    assert [(r.action, r.code) for r in records] == [("kept", "shift-before-padded-conv")]
    assert len(_consts_left(gm)) == 2
    assert rel_err(ref, out) <= REL_TOL


def test_a_non_negative_scale_moves_forward_through_relu_into_the_conv():
    x = torch.randn(2, C, 6, 6)
    gm, records, ref, out = _fold(Feeds(nn.Conv2d(C, 3, 3, padding=1), head=nn.ReLU(),
                                        shift=False, sign=1), x)
    assert [(r.action, r.target) for r in records] == \
        [("folded", "layer (input columns) after ReLU")]
    assert rel_err(ref, out) <= REL_TOL


# ------------------------------------------------------------------ refusals

class ReadTwice(nn.Module):
    """``conv(x)`` is scaled and also read unscaled; ``consumer``: whether a conv reads the
    scaled map (else tanh)."""

    def __init__(self, consumer):
        super().__init__()
        self.conv = nn.Conv2d(3, C, 3, padding=1)
        self.after = nn.Conv2d(C, C, 1) if consumer else nn.Tanh()
        self.register_buffer("s", _const((1, C, 1, 1), 0.5, 1.5, 10))

    def forward(self, x):
        y = self.conv(x)
        return self.after(y * self.s) + y


def test_a_producer_read_elsewhere_is_refused_by_the_planner():
    x = torch.randn(2, 3, 5, 5)
    gm = traced(ReadTwice(consumer=False), x)
    (chain,) = _collect_chains(gm)
    plan = plan_producer(gm, chain)
    assert isinstance(plan, Refusal) and plan.code == "producer-read-elsewhere"
    ref = run_graph(gm, x)
    records = fold_scales(gm)
    assert [(r.action, r.code) for r in records] == [("kept", "no-fold-target")]
    assert rel_err(ref, run_graph(gm, x)) <= REL_TOL


def test_a_producer_read_elsewhere_leaves_the_map_to_the_consumer():
    x = torch.randn(2, 3, 5, 5)
    model = ReadTwice(consumer=True)
    weight = model.conv.weight.detach().clone()
    gm, records, ref, out = _fold(model, x)
    assert [(r.action, r.target) for r in records] == [("folded", "after (input columns)")]
    assert rel_err(ref, out) <= REL_TOL
    assert torch.equal(gm.get_submodule("conv").weight, weight)  # the producer is untouched
    assert _consts_left(gm) == []


class InPlaceReread(nn.Module):
    """``y.mul_(s)`` where ``y`` is read again afterwards: not a local chain."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 1)
        self.register_buffer("s", _const((1, C, 1, 1), 0.5, 1.5, 11))

    def forward(self, x):
        y = torch.tanh(x)
        y.mul_(self.s)
        return self.conv(y)


def test_an_in_place_scale_of_a_tensor_read_again_is_kept():
    x = torch.randn(2, C, 5, 5)
    gm, records, ref, out = _fold(InPlaceReread(), x)
    assert [(r.kind, r.action, r.code) for r in records] == \
        [("channel scale", "kept", "in-place-reread")]
    assert any(n.target == "mul_" for n in gm.graph.nodes)
    assert rel_err(ref, out) <= REL_TOL


def test_a_map_neither_side_takes_is_kept_as_no_fold_target():
    x = torch.randn(2, C, 5, 5)
    gm, records, ref, out = _fold(Feeds(nn.Tanh()), x)
    assert [(r.kind, r.action, r.code, r.channels) for r in records] == \
        [("channel scale", "kept", "no-fold-target", C)]
    assert len(_consts_left(gm)) == 2
    assert rel_err(ref, out) <= REL_TOL


class Nothing(nn.Module):
    """Scalars and an input-dependent gate: no per-channel constant."""

    def forward(self, x):
        return torch.tanh(x * 2.0 + 1.0) * torch.sigmoid(x.mean((2, 3), keepdim=True))


def test_nothing_to_fold_gives_no_record_and_no_change():
    x = torch.randn(2, C, 5, 5)
    gm = traced(Nothing(), x)
    code = gm.code
    assert fold_scales(gm) == []
    gm.recompile()
    assert gm.code == code


# ------------------------------------------------------------------ pure planning

PLANNED = {
    "producer": (lambda: Scaled(nn.Conv2d(3, C, 3, padding=1)), (2, 3, 5, 5), plan_producer),
    "through-relu": (lambda: Scaled(nn.BatchNorm2d(C), act=nn.ReLU(), shift=False),
                     (2, C, 5, 5), plan_producer),
    "parts": (lambda: SumOfBranches(), (2, C, 5, 5), plan_producer),
    "consumer": (lambda: Feeds(nn.BatchNorm2d(C)), (2, C, 5, 5), plan_consumers),
}


@pytest.mark.parametrize("name", list(PLANNED))
def test_a_plan_changes_nothing_until_applied(name):
    build, shape, planner = PLANNED[name]
    x = torch.randn(*shape)
    gm = traced(_randomize(build()), x)
    gm.recompile()
    code, state = gm.code, state_snapshot(gm)
    nodes = [(n.name, n.op, n.target, n.args) for n in gm.graph.nodes]
    ref = run_graph(gm, x)
    (chain,) = _collect_chains(gm)
    plan = planner(gm, chain)
    plan_producer(gm, chain), plan_consumers(gm, chain)  # planning either side, twice
    assert not isinstance(plan, Refusal)
    gm.recompile()
    assert gm.code == code
    assert [(n.name, n.op, n.target, n.args) for n in gm.graph.nodes] == nodes
    assert_state_equal(state, state_snapshot(gm))
    # applied, and the chain's ops bypassed, the plan computes what the graph computed
    target = apply_plan(gm, plan)
    assert target
    chain.root.replace_all_uses_with(chain.base)
    for m in reversed(chain.members):
        gm.graph.erase_node(m)
    assert rel_err(ref, run_graph(gm, x)) <= REL_TOL


def test_a_chain_built_by_hand_plans_and_applies():
    x = torch.randn(2, 3, 5, 5)
    model = Scaled(nn.Conv2d(3, C, 3, padding=1), sign=-1, shift=False)
    gm = traced(model, x)
    ref = run_graph(gm, x)
    conv = next(n for n in gm.graph.nodes if n.op == "call_module")
    (mul,) = conv.users
    scale = model.s.reshape(-1).double()
    chain = Chain(conv, scale, torch.zeros_like(scale), members=[mul])
    assert chain.root is mul and chain.axis == 1
    plan = plan_producer(gm, chain)
    assert isinstance(plan, Fold) and plan.node is conv
    assert apply_plan(gm, plan) == "layer (output rows)"
    mul.replace_all_uses_with(conv)
    gm.graph.erase_node(mul)
    assert rel_err(ref, run_graph(gm, x)) <= REL_TOL


# ------------------------------------------------------------------ counts and selection

class ThreeSites(nn.Module):
    """Three chains: into bn1 (producer), into conv2 (consumer), and one nothing takes."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, C, 3, padding=1), nn.BatchNorm2d(C)
        self.conv2 = nn.Conv2d(C, C, 1)
        for i in range(3):
            self.register_buffer(f"s{i}", _const((1, C, 1, 1), -1.5, 1.5, 20 + i))

    def forward(self, x):
        a = self.bn1(self.conv1(x)) * self.s0
        b = self.conv2(torch.tanh(a) * self.s1)
        return torch.tanh(torch.tanh(b) * self.s2)


def test_fire_counts():
    x = torch.randn(2, 3, 5, 5)
    gm, records, ref, out = _fold(ThreeSites(), x)
    assert actions(records) == {"folded": 2, "kept": 1}
    assert sorted(r.target for r in records if r.action == "folded") == \
        ["bn1 (norm affine)", "conv2 (input columns)"]
    assert [r.code for r in records if r.action == "kept"] == ["no-fold-target"]
    assert len({r.key for r in records}) == 3
    assert len(_consts_left(gm)) == 1
    assert rel_err(ref, out) <= REL_TOL


def test_select_folds_only_the_chosen_chain():
    x = torch.randn(2, 3, 5, 5)
    gm = traced(_randomize(ThreeSites()), x)
    keys = [f"scale:{c.root.name}" for c in _collect_chains(gm)]
    assert len(keys) == 3
    ref = run_graph(gm, x)
    bn1 = {k: v for k, v in state_snapshot(gm).items() if k.startswith("bn1.")}
    chosen = keys[1]
    records = fold_scales(gm, PassContext((x,), select=lambda k: k == chosen))
    assert [(r.key, r.action, r.target) for r in records] == \
        [(chosen, "folded", "conv2 (input columns)")]
    assert len(_consts_left(gm)) == 2  # the others' multiplies stay
    assert_state_equal(bn1, {k: v for k, v in state_snapshot(gm).items()
                             if k.startswith("bn1.")})  # bn1 untouched
    assert rel_err(ref, run_graph(gm, x)) <= REL_TOL


def test_select_nothing_changes_nothing():
    x = torch.randn(2, 3, 5, 5)
    gm = traced(_randomize(ThreeSites()), x)
    state = state_snapshot(gm)
    assert fold_scales(gm, PassContext((x,), select=lambda k: False)) == []
    assert_state_equal(state, state_snapshot(gm))
    assert len(_consts_left(gm)) == 3


class Difference(nn.Module):
    """``tanh((relu(conv(x)) - bn(x)) * s + t)`` with ``s > 0``: the shift cannot cross the
    ReLU, so it has to go to the subtrahend's producer -- with its sign flipped."""

    def __init__(self, swap=False):
        super().__init__()
        self.swap = swap
        self.conv, self.bn = nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C)
        self.register_buffer("s", _const((1, C, 1, 1), 0.5, 1.5, 30))
        self.register_buffer("t", _const((1, C, 1, 1), 0.5, 1.0, 31))

    def forward(self, x):
        a, b = torch.relu(self.conv(x)), self.bn(x)
        return torch.tanh(((b - a) if self.swap else (a - b)) * self.s + self.t)


def test_a_difference_whose_minuend_takes_the_shift_folds():
    x = torch.randn(2, C, 5, 5)
    gm, records, ref, out = _fold(Difference(swap=True), x)
    assert [(r.action, r.target) for r in records] == \
        [("folded", "bn (norm affine) + conv (output rows) through relu")]
    assert rel_err(ref, out) <= REL_TOL


def test_a_difference_whose_subtrahend_takes_the_shift_folds_with_its_sign():
    x = torch.randn(2, C, 5, 5)
    gm, records, ref, out = _fold(Difference(), x)
    assert [r.action for r in records] in (["folded"], ["kept"])
    assert rel_err(ref, out) <= REL_TOL


class ShiftThroughIdentity(nn.Module):
    """``tanh(drop(conv(x)) * s + t)`` with ``drop`` returning its input in eval mode: the shift
    moves through it like the scale does (the identity commutes with any affine map)."""

    def __init__(self, functional: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, C, 3, padding=1)
        self.functional = functional
        self.drop = nn.Dropout(0.3)
        self.register_buffer("s", _const((1, C, 1, 1), -1.5, 1.5, 11))
        self.register_buffer("t", _const((1, C, 1, 1), -0.5, 0.5, 12))

    def forward(self, x):
        y = self.conv(x)
        y = nn.functional.dropout(y, 0.3, False) if self.functional else self.drop(y)
        return torch.tanh(y * self.s + self.t)


@pytest.mark.parametrize("functional", [False, True])
def test_a_shift_crosses_an_identity_into_the_producer(functional):
    x = torch.randn(2, 3, 6, 6)
    gm, records, ref, out = _fold(ShiftThroughIdentity(functional).eval(), x)
    assert [r.action for r in records] == ["folded"], records
    assert records[0].target.startswith("conv (output rows) through")
    assert _consts_left(gm) == []
    assert rel_err(ref, out) <= REL_TOL


# ------------------------------------------------------------------ parts of a channel split

class SplitScaled(nn.Module):
    """``conv(x)`` (7 channels) split into parts of ``sizes`` along the channels (``how``:
    ``torch.split`` with sizes, the ``split`` method with one size, ``chunk``, ``tensor_split``
    at indices); part ``k`` times a constant (plus a shift), the others as they are, then
    concatenated back in another order so every part is read. ``also``: the conv's output is
    read by something else too."""

    def __init__(self, how: str, k: int, also: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 7, 3, padding=1)
        self.how, self.k, self.also = how, k, also
        widths = {"sizes": [2, 4, 1], "method": [3, 3, 1], "chunk": [3, 3, 1],
                  "tensor_split": [1, 4, 2]}[how]
        self.register_buffer("s", _const((1, widths[k], 1, 1), -1.5, 1.5, 8))
        self.register_buffer("t", _const((1, widths[k], 1, 1), -0.5, 0.5, 9))

    def forward(self, x):
        y = self.conv(x)
        split = {"sizes": lambda: torch.split(y, [2, 4, 1], dim=1),
                 "method": lambda: y.split(3, 1),
                 "chunk": lambda: torch.chunk(y, 3, dim=1),
                 "tensor_split": lambda: torch.tensor_split(y, [1, 5], dim=1)}[self.how]()
        parts = [split[0], split[1], split[2]]
        parts[self.k] = parts[self.k] * self.s + self.t
        out = torch.cat(parts[::-1], 1)
        return out + y.mean() if self.also else out


@pytest.mark.parametrize("how", ["sizes", "method", "chunk", "tensor_split"])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_a_scale_on_a_part_of_a_channel_split_folds_into_its_rows(how, k):
    """``split(z)[k] * s + t`` is part ``k`` of ``split(z * s' + t')`` (``s'`` = 1 and ``t'`` = 0
    on the other parts' channels): the conv producing ``z`` takes it in part ``k``'s rows."""
    x = torch.randn(2, 3, 5, 5)
    gm, records, ref, out = _fold(SplitScaled(how, k), x)
    assert [(r.action, r.target) for r in records] == \
        [("folded", "conv (output rows) through split")], records
    assert _consts_left(gm) == []
    assert rel_err(ref, out) <= REL_TOL


def test_a_scale_on_a_split_part_stays_when_the_whole_is_read_elsewhere():
    x = torch.randn(2, 3, 5, 5)
    gm, records, ref, out = _fold(SplitScaled("sizes", 1, also=True), x)
    assert [r.action for r in records] == ["kept"] and records[0].code, records
    assert rel_err(ref, out) <= REL_TOL


class SplitFeeds(nn.Module):
    """``tanh(x) * s + t`` split into channel parts of 3 and 4, each read by its own conv (a
    mixed depthwise convolution, MixNet's ``MixedConv2d``), the outputs concatenated.
    ``plain_part``: the second part is read by a tanh instead (no consumer target)."""

    def __init__(self, plain_part: bool = False):
        super().__init__()
        # unpadded: a shift would meet zero padding (see the padded-conv refusals)
        self.a = nn.Conv2d(3, 3, 3, groups=3)
        self.b = nn.Conv2d(4, 8, 3, groups=2)
        self.plain_part = plain_part
        self.register_buffer("s", _const((1, 7, 1, 1), -1.5, 1.5, 10))
        self.register_buffer("t", _const((1, 7, 1, 1), -0.5, 0.5, 11))

    def forward(self, x):
        y = torch.tanh(x) * self.s + self.t
        parts = torch.split(y, [3, 4], dim=1)
        second = torch.tanh(parts[1][:, :, 1:-1, 1:-1]) if self.plain_part else self.b(parts[1])
        return torch.cat([self.a(parts[0]), second], 1)


def test_a_scale_before_a_channel_split_goes_into_each_parts_consumer():
    x = torch.randn(2, 7, 6, 6)
    gm, records, ref, out = _fold(SplitFeeds(), x)
    assert [(r.action, sorted(r.target.split(", "))) for r in records] == \
        [("folded", ["a (input columns) after split", "b (input columns) after split"])], records
    assert _consts_left(gm) == []
    assert rel_err(ref, out) <= REL_TOL


def test_a_scale_before_a_split_stays_when_a_part_reaches_no_consumer_target():
    x = torch.randn(2, 7, 6, 6)
    gm, records, ref, out = _fold(SplitFeeds(plain_part=True), x)
    assert [r.action for r in records] == ["kept"] and records[0].code, records
    assert rel_err(ref, out) <= REL_TOL


class TokenRowsScaled(nn.Module):
    """A Linear over tokens ``(N, L, C)``, its rows ``(N * L, C)`` times a per-channel
    constant (plus a shift), then a tanh (no consumer target)."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(6, C)
        self.register_buffer("s", _const((C,), -1.5, 1.5, 12))
        self.register_buffer("t", _const((C,), -0.5, 0.5, 13))

    def forward(self, x):
        return torch.tanh(self.layer(x).flatten(0, 1) * self.s + self.t)


def test_a_scale_on_token_rows_folds_into_the_linear():
    x = torch.randn(2, 5, 6)
    gm, records, ref, out = _fold(TokenRowsScaled(), x)
    assert [(r.action, r.target) for r in records] == \
        [("folded", "layer (output rows) through flatten")], records
    assert _consts_left(gm) == []
    assert rel_err(ref, out) <= REL_TOL
