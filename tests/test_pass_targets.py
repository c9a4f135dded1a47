"""Fold targets (passes/targets.py): each registered target's ``check`` accepts or refuses with
a stable code, lookups go by exact type, ``apply`` writes what the float64 identities of
:mod:`asrfx.foldmath` give (within the dtype's tolerance), and a user's own layer type
registered with ``register_producer`` folds end to end through ``fold_scales``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from asrfx import foldmath
from asrfx.passes import targets
from asrfx.passes.layers import module_for_call_site
from asrfx.passes.scale_fold import fold_scales
from asrfx.passes.targets import (FoldTarget, Refusal, consumer_target, producer_target,
                                  register_producer)
from helpers import REL_TOL, dtype_tol, randomize_bn, rel_err, run_graph, traced

C = 4


def _vec(n, lo, hi, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(dtype)


def _site(model, x, leaves=()):
    """(graph, the first call_module / functional conv node) of ``model`` traced at ``x``."""
    gm = traced(model, x, leaves=leaves)
    node = next(n for n in gm.graph.nodes if n.op == "call_module" or
                (n.op == "call_function" and n.target in (F.conv2d, torch.conv2d)))
    return gm, node


def _check(kind, model, x, scale, shift, axis=1):
    gm, node = _site(nn.Sequential(model), x)
    target = (producer_target if kind == "producer" else consumer_target)(gm, node)
    assert target is not None
    return target.check(gm, node, scale, shift, axis)


class FunctionalConv(nn.Module):
    def __init__(self, padding=1, computed=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(C, C, 3, 3) * 0.2)
        self.bias = nn.Parameter(torch.randn(C) * 0.2)
        self.padding, self.computed = padding, computed

    def forward(self, x):
        w = self.weight * 2 if self.computed else self.weight
        return F.conv2d(x, w, self.bias, padding=self.padding)


ONES, ZEROS = torch.ones(C, dtype=torch.float64), torch.zeros(C, dtype=torch.float64)
SHIFT = _vec(C, -0.5, 0.5, 1)
X4 = (2, C, 5, 5)

# (kind, layer, input shape, scale, shift, axis, expected code or None)
CHECKS = {
    "conv-out": ("producer", lambda: nn.Conv2d(C, C, 3, padding=1), X4, ONES, SHIFT, 1, None),
    "conv-out-channels": ("producer", lambda: nn.Conv2d(C, C + 1, 3, padding=1), X4, ONES,
                          SHIFT, 1, "channels-differ"),
    "conv-out-last-dim": ("producer", lambda: nn.Conv2d(C, C, 1), X4, ONES, ZEROS, -1,
                          "channel-axis"),
    "conv-transpose-out": ("producer", lambda: nn.ConvTranspose2d(C, C, 2, stride=2), X4,
                           ONES, SHIFT, 1, None),
    "conv-transpose-channels": ("producer", lambda: nn.ConvTranspose2d(C, C + 2, 2), X4, ONES,
                                SHIFT, 1, "channels-differ"),
    "linear-out-nc": ("producer", lambda: nn.Linear(6, C), (3, 6), ONES, SHIFT, 1, None),
    "linear-out-tokens": ("producer", lambda: nn.Linear(6, C), (2, 5, 6), ONES, SHIFT, -1,
                          None),
    "linear-out-tokens-as-channels": ("producer", lambda: nn.Linear(6, C), (2, 5, 6), ONES,
                                      SHIFT, 1, "channel-axis"),
    "linear-out-channels": ("producer", lambda: nn.Linear(6, C + 1), (2, 5, 6), ONES, SHIFT,
                            -1, "channels-differ"),
    "bn-affine": ("producer", lambda: nn.BatchNorm2d(C), X4, ONES, SHIFT, 1, None),
    "bn-affine-no-stats": ("producer", lambda: nn.BatchNorm2d(C, track_running_stats=False),
                           X4, ONES, SHIFT, 1, "no-running-stats"),
    "bn-affine-channels": ("producer", lambda: nn.BatchNorm2d(C), X4,
                           torch.ones(C - 1, dtype=torch.float64), ZEROS[:C - 1], 1,
                           "channels-differ"),
    "groupnorm": ("producer", lambda: nn.GroupNorm(2, C), X4, ONES, SHIFT, 1, None),
    "groupnorm-no-affine": ("producer", lambda: nn.GroupNorm(2, C, affine=False), X4, ONES,
                            SHIFT, 1, "norm-without-affine"),
    "instancenorm-no-affine": ("producer", lambda: nn.InstanceNorm2d(C), X4, ONES, SHIFT, 1,
                               "norm-without-affine"),
    "layernorm-chw": ("producer", lambda: nn.LayerNorm([C, 5, 5]), X4, ONES, SHIFT, 1, None),
    "layernorm-last-dim-of-nchw": ("producer", lambda: nn.LayerNorm(5), X4, ONES, SHIFT, 1,
                                   "channel-axis"),
    "layernorm-tokens": ("producer", lambda: nn.LayerNorm(C), (2, 5, C), ONES, SHIFT, -1,
                         None),
    "functional-conv-out": ("producer", lambda: FunctionalConv(), X4, ONES, SHIFT, 1, None),
    "functional-conv-computed": ("producer", lambda: FunctionalConv(computed=True), X4, ONES,
                                 SHIFT, 1, "computed-weight"),
    "conv-in-scale-padded": ("consumer", lambda: nn.Conv2d(C, 3, 3, padding=1), X4,
                             _vec(C, -1, 1, 2), ZEROS, 1, None),
    "conv-in-shift-padded": ("consumer", lambda: nn.Conv2d(C, 3, 3, padding=1), X4, ONES,
                             SHIFT, 1, "shift-before-padded-conv"),
    "conv-in-shift-same": ("consumer", lambda: nn.Conv2d(C, 3, 3, padding="same"), X4, ONES,
                           SHIFT, 1, "shift-before-padded-conv"),
    "conv-in-shift-same-1x1": ("consumer", lambda: nn.Conv2d(C, 3, 1, padding="same"), X4,
                               ONES, SHIFT, 1, None),
    "conv-in-shift-valid": ("consumer", lambda: nn.Conv2d(C, 3, 3, padding="valid"), X4, ONES,
                            SHIFT, 1, None),
    "conv-in-last-dim": ("consumer", lambda: nn.Conv2d(C, 3, 1), X4, ONES, ZEROS, -1,
                         "channel-axis"),
    "linear-in-nc": ("consumer", lambda: nn.Linear(C, 3), (3, C), ONES, SHIFT, 1, None),
    "linear-in-rank4": ("consumer", lambda: nn.Linear(5, 3), X4, ONES, ZEROS, 1,
                        "channel-axis"),
    "functional-conv-in-shift-padded": ("consumer", lambda: FunctionalConv(), X4, ONES, SHIFT,
                                        1, "shift-before-padded-conv"),
    "functional-conv-in-shift-unpadded": ("consumer", lambda: FunctionalConv(padding=0), X4,
                                          ONES, SHIFT, 1, None),
    "bn-in": ("consumer", lambda: nn.BatchNorm2d(C).eval(), X4, ONES, SHIFT, 1, None),
    "bn-in-no-stats": ("consumer", lambda: nn.BatchNorm2d(C, track_running_stats=False), X4,
                       ONES, SHIFT, 1, "no-running-stats"),
}


@pytest.mark.parametrize("name", list(CHECKS))
def test_check_accepts_or_refuses_with_its_code(name):
    kind, build, shape, scale, shift, axis, code = CHECKS[name]
    got = _check(kind, build(), torch.randn(*shape), scale, shift, axis)
    if code is None:
        assert got is None
    else:
        assert isinstance(got, Refusal) and got.code == code and got.reason


def test_a_batchnorm_in_training_mode_refuses_a_map_on_its_input():
    x = torch.randn(*X4)
    gm, node = _site(nn.Sequential(nn.BatchNorm2d(C)), x)
    gm.train()
    got = consumer_target(gm, node).check(gm, node, ONES, SHIFT, 1)
    assert got is not None and got.code == "no-running-stats"


def test_check_changes_nothing():
    x = torch.randn(*X4)
    gm, node = _site(nn.Sequential(nn.Conv2d(C, C, 3, padding=1)), x)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    for lookup in (producer_target, consumer_target):
        lookup(gm, node).check(gm, node, _vec(C, -1, 1, 3), SHIFT, 1)
    after = gm.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------ lookups


class MyConv(nn.Conv2d):
    """A subclass: its forward may differ, so it is never a target itself."""


def test_lookups_go_by_exact_type():
    x = torch.randn(*X4)
    gm, node = _site(nn.Sequential(nn.Conv2d(C, C, 1)), x)
    assert type(producer_target(gm, node)).__name__ == "ConvOutput"
    assert type(consumer_target(gm, node)).__name__ == "ConvInput"
    gm, node = _site(nn.Sequential(MyConv(C, C, 1)), x, leaves=(MyConv,))
    assert node.op == "call_module"
    assert producer_target(gm, node) is None and consumer_target(gm, node) is None
    gm, node = _site(nn.Sequential(nn.GroupNorm(2, C)), x)
    assert producer_target(gm, node) is not None and consumer_target(gm, node) is None
    placeholder = next(iter(gm.graph.nodes))
    assert producer_target(gm, placeholder) is None and consumer_target(gm, placeholder) is None


def test_a_subclass_kept_whole_is_no_target_and_its_scale_stays():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = MyConv(C, C, 3, padding=1)
            self.register_buffer("s", _vec(C, 0.5, 1.5, 4, torch.float32).view(1, C, 1, 1))

        def forward(self, x):
            return torch.tanh(self.conv(x) * self.s)

    x = torch.randn(*X4)
    gm = traced(Net(), x, leaves=(MyConv,))
    records = fold_scales(gm)
    assert [(r.action, r.code) for r in records] == [("kept", "no-fold-target")]
    # traced through, the subclass is the functional conv it runs, and that takes the scale
    gm = traced(Net(), x)
    ref = run_graph(gm, x)
    records = fold_scales(gm)
    assert [r.action for r in records] == ["folded"]
    assert rel_err(ref, run_graph(gm, x)) <= REL_TOL


# ------------------------------------------------------------------ a user's own layer


class ChannelAffine(nn.Module):
    """A user layer: ``x * weight + bias`` per channel (channels first)."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(c) + 0.5)
        self.bias = nn.Parameter(torch.rand(c) - 0.5)

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.weight.view(shape) + self.bias.view(shape)


class ChannelAffineOutput(FoldTarget):
    def check(self, gm, node, scale, shift, axis):
        mod = gm.get_submodule(str(node.target))
        if axis != 1:
            return Refusal("channel-axis", "the scale is not over the layer's channels")
        if mod.weight.numel() != scale.numel():
            return Refusal("channels-differ", "one weight per channel is needed")
        return None

    def apply(self, gm, node, scale, shift):
        mod = module_for_call_site(gm, node)
        w, b = foldmath.fold_scale_into_norm(mod.weight, mod.bias, scale, shift)
        mod.weight, mod.bias = nn.Parameter(w), nn.Parameter(b)
        return f"{node.target} (channel affine)"


class AffineNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.aff = ChannelAffine(C)
        self.register_buffer("s", _vec(C, -1.5, 1.5, 5, torch.float32).view(1, C, 1, 1))
        self.register_buffer("t", _vec(C, -0.5, 0.5, 6, torch.float32).view(1, C, 1, 1))

    def forward(self, x):
        return torch.tanh(self.aff(x) * self.s + self.t)


@pytest.fixture
def own_registry(monkeypatch):
    """The producer registry as a copy, restored after the test."""
    monkeypatch.setattr(targets, "_PRODUCERS", dict(targets._PRODUCERS))


def test_a_registered_user_layer_takes_the_scale(own_registry):
    x = torch.randn(*X4)
    gm = traced(AffineNet(), x, leaves=(ChannelAffine,))
    assert [(r.action, r.code) for r in fold_scales(gm)] == [("kept", "no-fold-target")]

    register_producer(ChannelAffine, ChannelAffineOutput())
    gm = traced(AffineNet(), x, leaves=(ChannelAffine,))
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert isinstance(producer_target(gm, node), ChannelAffineOutput)
    ref = run_graph(gm, x)
    records = fold_scales(gm)
    assert [(r.action, r.target) for r in records] == [("folded", "aff (channel affine)")]
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [torch.tanh]
    assert rel_err(ref, run_graph(gm, x)) <= REL_TOL


def test_a_registered_user_target_can_refuse(own_registry):
    register_producer(ChannelAffine, ChannelAffineOutput())

    class Wider(AffineNet):
        def __init__(self):
            super().__init__()
            self.aff = ChannelAffine(1)  # one weight broadcast over every channel

    x = torch.randn(*X4)
    gm = traced(Wider(), x, leaves=(ChannelAffine,))
    records = fold_scales(gm)
    assert [(r.action, r.code) for r in records] == [("kept", "channels-differ")]


# ------------------------------------------------------------------ apply vs foldmath


def _f64(t):
    return None if t is None else t.detach().double()


# (side, layer, input shape, axis, {parameter: expected from the float64 original, s, t})
APPLIES = {
    "conv-out": ("producer", lambda: nn.Conv2d(3, C, 3, padding=1, groups=1), (2, 3, 5, 5), 1,
                 lambda m, s, t: dict(zip(("weight", "bias"), foldmath.fold_scale_into_conv_out(
                     _f64(m.weight), _f64(m.bias), s, t)))),
    "conv-transpose-out": ("producer", lambda: nn.ConvTranspose2d(C, C, 2, groups=2),
                           (2, C, 4, 4), 1,
                           lambda m, s, t: dict(zip(("weight", "bias"),
                                                    foldmath.fold_scale_into_conv_transpose_out(
                               _f64(m.weight), _f64(m.bias), s, t, 2)))),
    "bn-affine": ("producer", lambda: nn.BatchNorm2d(C), (2, C, 5, 5), 1,
                  lambda m, s, t: dict(zip(("weight", "bias"), foldmath.fold_scale_into_norm(
                      _f64(m.weight), _f64(m.bias), s, t, C)))),
    "groupnorm": ("producer", lambda: nn.GroupNorm(2, C), (2, C, 5, 5), 1,
                  lambda m, s, t: dict(zip(("weight", "bias"), foldmath.fold_scale_into_norm(
                      _f64(m.weight), _f64(m.bias), s, t, C)))),
    "layernorm-tokens": ("producer", lambda: nn.LayerNorm(C), (2, 3, C), -1,
                         lambda m, s, t: dict(zip(("weight", "bias"),
                                                  foldmath.fold_scale_into_norm(
                             _f64(m.weight), _f64(m.bias), s, t, C)))),
    "linear-out": ("producer", lambda: nn.Linear(6, C), (3, 6), 1,
                   lambda m, s, t: dict(zip(("weight", "bias"), foldmath.fold_scale_into_conv_out(
                       _f64(m.weight), _f64(m.bias), s, t)))),
    "conv-in-grouped": ("consumer", lambda: nn.Conv2d(C, 6, 3, groups=2), (2, C, 5, 5), 1,
                        lambda m, s, t: dict(zip(("weight", "bias"),
                                                 foldmath.fold_scale_into_conv_in(
                            _f64(m.weight), _f64(m.bias), s, t, 2)))),
    "linear-in": ("consumer", lambda: nn.Linear(C, 3), (3, C), 1,
                  lambda m, s, t: dict(zip(("weight", "bias"), foldmath.fold_scale_into_linear_in(
                      _f64(m.weight), _f64(m.bias), s, t)))),
    "bn-in": ("consumer", lambda: nn.BatchNorm2d(C), (2, C, 5, 5), 1,
              lambda m, s, t: dict(zip(("weight", "bias", "running_mean"),
                                       foldmath.fold_scale_into_batchnorm_input(
                  _f64(m.weight), _f64(m.bias), _f64(m.running_mean), _f64(m.running_var),
                  m.eps, s, t)))),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(APPLIES))
def test_apply_writes_the_float64_identity(name, dtype):
    side, build, shape, axis, expected = APPLIES[name]
    layer = build()
    if isinstance(layer, nn.BatchNorm2d):
        randomize_bn(layer, seed=7)
    elif isinstance(layer, (nn.GroupNorm, nn.LayerNorm)):
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)
    layer = layer.to(dtype).eval()
    x = torch.randn(*shape, dtype=dtype)
    original = copy.deepcopy(layer).double()
    s, t = _vec(C, -1.5, 1.5, 8), _vec(C, -0.5, 0.5, 9)
    gm, node = _site(nn.Sequential(layer), x)
    target = (producer_target if side == "producer" else consumer_target)(gm, node)
    assert target.check(gm, node, s, t, axis) is None
    assert target.apply(gm, node, s, t)
    mod = gm.get_submodule(str(node.target))
    tol = dtype_tol(dtype)
    for pname, want in expected(original, s, t).items():
        got = getattr(mod, pname)
        assert got.dtype == dtype, pname
        assert rel_err(want, got) <= tol, pname
    # the layer now computes the map in float64 up to the dtype's tolerance
    view = (1, C) + (1,) * (len(shape) - 2) if axis == 1 else (C,)
    s_, t_ = s.view(view), t.view(view)
    with torch.no_grad():
        want = original(x.double()) * s_ + t_ if side == "producer" else \
            original(x.double() * s_ + t_)
        assert rel_err(want, mod(x)) <= tol


def test_apply_clones_a_module_called_at_another_site_too():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(C, C, 3, padding=1)

        def forward(self, x):
            return self.conv(x), self.conv(torch.tanh(x))

    x = torch.randn(*X4)
    gm = traced(Twice(), x)
    first = next(n for n in gm.graph.nodes if n.op == "call_module")
    weight = gm.conv.weight.detach().clone()
    name = producer_target(gm, first).apply(gm, first, _vec(C, 0.5, 1.5, 10), SHIFT)
    assert first.target != "conv" and name.startswith(str(first.target))
    assert torch.equal(gm.conv.weight, weight)  # the other call site keeps the original


# ------------------------------------------------------------------ a shared weight buffer


class SharedBufferConv(nn.Module):
    """A fixed (buffer) kernel that two functional calls read: fx gives each read its own
    get_attr node of the same buffer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randn(C, C, 3, 3) * 0.3)
        self.register_buffer("b", torch.randn(C) * 0.3)
        self.register_buffer("s", _vec(C, 0.5, 1.5, 11, torch.float32).view(1, C, 1, 1))

    def forward(self, x):
        y = F.conv2d(x, self.w, self.b, padding=1) * self.s
        return torch.tanh(y) + F.conv2d(x, self.w, self.b, padding=1)


def test_a_weight_buffer_read_by_another_call_is_not_changed_under_it():
    x = torch.randn(*X4)
    gm = traced(SharedBufferConv(), x)
    assert len([n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "w"]) == 2
    ref = run_graph(gm, x)
    records = fold_scales(gm)
    assert [r.action for r in records] in (["folded"], ["kept"])
    assert rel_err(ref, run_graph(gm, x)) <= REL_TOL
