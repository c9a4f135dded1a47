"""Tracing and the edges of the public API: untraceable code, leaves, shape metadata, norm
subclasses, idempotence, bad inputs, shared modules, and the fold check."""

from __future__ import annotations

import copy
import operator
import re
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import asrfx
from helpers import (REL_TOL, SE, DropPathNet, SENet, TypeCheck, pickled_copy, psi_names,
                     randomize_bn, randomize_psi, rel_err)
import asrfx.foldmath


# --------------------------------------------------------------------------------------------
# private helpers


def _call_module_targets(gm: fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]


# SE (1x1-conv squeeze-excitation), SENet (conv -> BN -> SE -> ReLU -> conv -> BN) and
# DropPathNet (stochastic depth: two graphs) come from helpers.


# --------------------------------------------------------------------------------------------
# untraceable code


class TopLevelBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:
            return self.bn(self.conv(x))
        return self.bn(self.conv(-x))


@pytest.mark.parametrize("entry", ["trace", "prepare", "fold"])
def test_top_level_data_dependent_control_flow_is_a_trace_error(entry):
    model = TopLevelBranch()
    x = torch.randn(2, 3, 8, 8)
    call = {"trace": lambda: asrfx.trace(model, x),
            "prepare": lambda: asrfx.prepare(model, example_inputs=(x,)),
            "fold": lambda: asrfx.fold(model, example_inputs=(x,))}[entry]
    with pytest.raises(asrfx.TraceError) as info:
        call()
    err = info.value
    assert isinstance(err, asrfx.ASRError)
    assert type(err) is asrfx.TraceError
    assert not isinstance(err, torch.fx.proxy.TraceError)
    assert err.module_path == ""
    msg = str(err)
    assert "control flow" in msg  # the reason
    assert "leaf_modules" in msg  # the fix
    assert "TopLevelBranch" in msg
    # no raw fx exception chained underneath
    assert err.__cause__ is None and err.__suppress_context__


class Gate(nn.Module):
    """Data-dependent branch: cannot be traced symbolically."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x):
        if x.mean() > 0:
            return self.conv(x)
        return x * 0.5


class NestedGate(nn.Module):
    def __init__(self, c: int = 6):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.body = nn.Sequential(nn.ReLU(), Gate(c))
        self.se = SE(c)

    def forward(self, x):
        return self.se(self.body(self.bn(self.stem(x))))


def test_nested_untraceable_submodule_becomes_a_leaf_with_a_warning():
    model = NestedGate().eval()
    randomize_bn(model, 1)
    with pytest.warns(UserWarning, match=r"'body\.1'") as rec:
        gm = asrfx.trace(model, torch.randn(2, 3, 8, 8))
    assert any("Gate" in str(w.message) for w in rec)
    assert "body.1" in _call_module_targets(gm)
    # nothing inside the leaf was traced through
    assert not any(t.startswith("body.1.") for t in _call_module_targets(gm))
    gm.eval()
    with torch.no_grad():
        for sign in (1.0, -1.0):  # both branches of the gate
            x = sign * (torch.rand(2, 3, 8, 8) + 0.1)
            ref = model(x)
            torch.testing.assert_close(gm(x), ref)
    # the model's mode is left alone
    assert not model.training


class Unpacks(nn.Module):
    """Unpacks a traced shape at one call site reached many times, and at sites of other
    lengths; its child iterates a traced tensor, which does not trace."""

    def __init__(self):
        super().__init__()
        self.iterates = Iterates()

    def forward(self, x):
        for _ in range(3):  # the same unpacking site, three times
            n, c = x.shape[:2]
            x = x.view(n, c, -1).view_as(x) + 1
        n, c, h, w = x.shape
        return self.iterates(x.reshape(n, c, h * w).view(n, c, h, w))


class Iterates(nn.Module):
    def forward(self, x):
        return sum(row for row in x)


def test_unpacking_traced_shapes_traces_and_iterating_a_tensor_makes_a_leaf():
    model = Unpacks()
    with pytest.warns(UserWarning, match=r"'iterates'"):
        gm = asrfx.trace(model, torch.randn(2, 3, 4, 4))
    assert _call_module_targets(gm) == ["iterates"]
    x = torch.randn(5, 3, 2, 6)
    torch.testing.assert_close(gm(x), model(x))
    assert fx.Proxy.__iter__.__module__ == "torch.fx.proxy"  # fx's own again after the trace


class _MixConv(nn.Module):
    """A mixed depthwise convolution (Tan & Le, BMVC 2019) as pytorchcv writes it: the channel
    groups of ``torch.split`` iterated in Python, each with its own kernel size."""

    def __init__(self, c: int = 8, splits: tuple[int, ...] = (4, 2, 2)):
        super().__init__()
        self.splits = list(splits)
        self.convs = nn.ModuleList(nn.Conv2d(k, k, 2 * i + 1, padding=i, groups=k)
                                   for i, k in enumerate(splits))

    def forward(self, x):
        parts = [conv(p) for p, conv in zip(torch.split(x, self.splits, dim=1), self.convs)]
        return torch.cat(tuple(parts), dim=1)


class _MixNet(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.mix, self.bn2 = _MixConv(c), nn.BatchNorm2d(c)
        self.se = SE(c)

    def forward(self, x):
        return self.se(self.bn2(self.mix(torch.relu(self.bn(self.stem(x))))))


def test_iterating_the_parts_of_a_split_traces_from_example_values():
    """Iterating a split (zip with the convs) used to make the module an opaque leaf: its parts
    are now as many as the example makes, guarded in the graph."""
    model = randomize_bn(_MixNet(), 5).eval()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm = asrfx.trace(model, x)
        prepared = asrfx.prepare(model, example_inputs=(x,))
    assert {"mix.convs.0", "mix.convs.1", "mix.convs.2"} <= set(_call_module_targets(gm))
    assert not any(s.code == "untraceable-module" for s in prepared.asrfx_report.sites)
    assert prepared.asrfx_report.count(action="converted") == 1
    other = torch.randn(3, 3, 12, 10)
    torch.testing.assert_close(gm(other), model(other))
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    prepared.eval()
    with torch.no_grad():
        assert rel_err(prepared(other), deploy(other)) <= REL_TOL


class _Resize(nn.Module):
    """pytorchcv's ``InterpolationBlock``: the output size as a tuple built by iterating the
    traced shape."""

    def forward(self, x):
        return F.interpolate(x, size=tuple(2 * s for s in x.shape[2:]), mode="nearest")


def test_iterating_a_traced_shape_keeps_its_sizes_computed_from_the_input():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _Resize())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm = asrfx.trace(model, torch.randn(1, 3, 4, 6))
    assert "1" not in _call_module_targets(gm)  # traced through, not a leaf
    x = torch.randn(2, 3, 5, 3)
    assert gm(x).shape == (2, 4, 10, 6)
    torch.testing.assert_close(gm(x), model(x))


class _RowSplit(nn.Module):
    def forward(self, x):
        return torch.cat([p * (i + 1) for i, p in enumerate(x.split(4, dim=2))], dim=2)


def test_a_split_into_another_number_of_parts_fails_loudly():
    """Split along the height in rows of 4: two parts at height 8, three at 12. The graph
    traced at 8 refuses the 12 with the reason, never computes something else."""
    gm = asrfx.trace(_RowSplit(), torch.randn(1, 2, 8, 8))
    x = torch.randn(3, 2, 8, 5)
    torch.testing.assert_close(gm(x), _RowSplit()(x))
    with pytest.raises(AssertionError, match="iterates over the 2 parts"):
        gm(torch.randn(1, 2, 12, 8))


def test_untraceable_leaf_does_not_block_conversion_elsewhere():
    model = NestedGate()
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"'body\.1'"):
        prepared = asrfx.prepare(model, example_inputs=(x,))
    assert prepared.asrfx_report.count(action="converted") == 1
    assert psi_names(prepared) == ["se.psi"]
    randomize_bn(prepared, 2)
    randomize_psi(prepared, 3)
    prepared.eval()
    folded = asrfx.fold(prepared, example_inputs=(x,))  # a GraphModule: not traced again
    assert "body.1" in _call_module_targets(folded)
    with torch.no_grad():
        for sign in (1.0, -1.0):
            xi = sign * (torch.rand(3, 3, 8, 8) + 0.1)
            assert rel_err(prepared(xi), folded(xi)) <= REL_TOL


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.gate = Gate(c)
        self.se = SE(c)

    def forward(self, x):
        return self.se(self.gate(self.conv(x)))


class DeepNet(nn.Module):
    def __init__(self, c: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.body = nn.Sequential(Block(c), Block(c))

    def forward(self, x):
        return self.body(self.stem(x))


def test_deeply_nested_untraceable_modules_become_leaves_innermost():
    model = DeepNet().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning) as rec:
        prepared = asrfx.prepare(model, example_inputs=(x,))
    messages = " ".join(str(w.message) for w in rec)
    assert "'body.0.gate'" in messages and "'body.1.gate'" in messages
    targets = _call_module_targets(prepared)
    assert "body.0.gate" in targets and "body.1.gate" in targets
    assert "body.0" not in targets  # only the innermost offender is opaque
    assert sorted(psi_names(prepared)) == ["body.0.se.psi", "body.1.se.psi"]


class NestedTypeCheck(nn.Module):
    def __init__(self, c: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.body = nn.Sequential(nn.ReLU(), TypeCheck(c))

    def forward(self, x):
        return self.body(self.stem(x))


def test_silently_wrong_trace_is_never_returned():
    """With example inputs, a graph that traces but computes something else is either repaired
    or refused with an ASRError; it is never handed back."""
    model = NestedTypeCheck().eval()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            gm = asrfx.trace(model, x)
        except asrfx.ASRError as e:
            assert "leaf_modules" in str(e)
            return
    gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


def test_nested_module_that_traces_wrongly_becomes_a_leaf():
    model = NestedTypeCheck().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"'body\.1'"):
        gm = asrfx.trace(model, x)
    assert "body.1" in _call_module_targets(gm)
    gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


class TwoSE(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.se = SE(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.se2 = SE(c)

    def forward(self, x):
        return self.se2(self.conv2(self.se(self.conv(x))))


def test_leaf_modules_by_name_keeps_that_module_opaque():
    model = TwoSE()
    gm = asrfx.trace(model, torch.randn(2, 3, 8, 8), leaf_modules=["se"])
    targets = _call_module_targets(gm)
    assert "se" in targets
    assert not any(t.startswith("se.") for t in targets)
    assert "se2.fc1" in targets and "se2" not in targets  # only the named one
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
    prepared = asrfx.prepare(model, example_inputs=(x,), leaf_modules=["se"])
    assert psi_names(prepared) == ["se2.psi"]
    assert "se" in _call_module_targets(prepared)


def test_leaf_modules_by_type_keeps_every_instance_opaque():
    model = TwoSE()
    x = torch.randn(2, 3, 8, 8)
    gm = asrfx.trace(model, x, leaf_modules=[SE])
    targets = _call_module_targets(gm)
    assert "se" in targets and "se2" in targets
    assert not any(t.startswith(("se.", "se2.")) for t in targets)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
    prepared = asrfx.prepare(model, example_inputs=(x,), leaf_modules=[SE])
    assert psi_names(prepared) == []
    assert prepared.asrfx_report.count(action="converted") == 0


# --------------------------------------------------------------------------------------------
# shape metadata


@pytest.mark.parametrize("model_cls", [SENet, DropPathNet])
def test_trace_with_example_inputs_records_tensor_meta_on_every_call_node(model_cls):
    model = model_cls()
    x = torch.randn(2, 3, 8, 8)
    gm = asrfx.trace(model, x)
    graphs = [gm.graph]
    if model_cls is DropPathNet:
        assert isinstance(gm, asrfx.DualModeGraphModule)
        assert gm.eval_graph is not gm.graph
        graphs.append(gm.eval_graph)
    for g in graphs:
        calls = [n for n in g.nodes if n.op in ("call_module", "call_function", "call_method")]
        assert calls
        for n in calls + [n for n in g.nodes if n.op == "placeholder"]:
            tm = n.meta.get("tensor_meta")
            assert tm is not None, f"{n.format_node()} has no tensor_meta"
            assert tuple(tm.shape)[0] in (1, 2)
        out = next(n for n in g.nodes if n.op == "output").args[0]
        assert tuple(out.meta["tensor_meta"].shape) == (2, 8, 8, 8)
    # the model keeps its mode
    assert model.training


def test_trace_without_example_inputs_has_no_shape_metadata_and_shares_parameters():
    model = SENet()
    gm = asrfx.trace(model)
    assert not any("tensor_meta" in n.meta for n in gm.graph.nodes)
    assert gm.get_parameter("conv.weight") is model.conv.weight


# --------------------------------------------------------------------------------------------
# BatchNorm subclasses


class ShiftedReluBN(nn.BatchNorm2d):
    """A BatchNorm whose forward does more than BatchNorm: relu, then a shift."""

    def forward(self, x):
        return torch.relu(super().forward(x)) - 0.1


class SubclassBNNet(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn = ShiftedReluBN(c)
        self.se = SE(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn2(self.conv2(self.se(self.bn(self.conv(x)))))


def test_batchnorm_subclass_is_traced_through_and_its_batch_norm_fused():
    """A BatchNorm subclass (here: batch norm, then relu, then a shift) is traced through in
    both modes: its ``F.batch_norm`` on its own statistics fuses into the conv before it, what
    it adds stays as ordinary ops, and the SE after it folds; the fold is exact."""
    model = SubclassBNNet()
    x = torch.randn(2, 3, 8, 8)
    gm = asrfx.trace(model, x)
    assert not [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "bn"]
    assert any(n.op == "call_function" and n.target is F.batch_norm for n in gm.graph.nodes)
    assert any(n.op == "call_function" and n.target is operator.sub for n in gm.graph.nodes)

    prepared = asrfx.prepare(model, example_inputs=(x,))
    assert psi_names(prepared) == ["se.psi"]
    randomize_bn(prepared, 4)
    randomize_psi(prepared, 5)
    prepared.eval()
    folded = asrfx.fold(prepared, example_inputs=(x,))
    sites = {(s.path, s.kind): s for s in folded.asrfx_report.sites}
    assert (sites[("bn", "conv+bn")].action, sites[("bn", "conv+bn")].target) == ("fused", "conv")
    assert sites[("se", "channel scale")].action == "folded"
    assert not any(n.op == "call_function" and n.target is F.batch_norm
                   for n in folded.graph.nodes)
    assert "bn2" not in _call_module_targets(folded)  # the plain BN after conv2 is fused
    with torch.no_grad():
        for xi in (x, torch.randn(3, 3, 8, 8)):
            assert rel_err(prepared(xi), folded(xi)) <= REL_TOL


# --------------------------------------------------------------------------------------------
# idempotence


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_prepare_without_attention_returns_an_equivalent_model_and_says_so():
    model = Plain()
    randomize_bn(model, 6)
    x = torch.randn(2, 3, 8, 8)
    prepared = asrfx.prepare(model, example_inputs=(x,))
    rep = prepared.asrfx_report
    assert rep.sites == []
    assert rep.count() == 0 and rep.count(action="converted") == 0
    assert rep.params_before == rep.params_after
    assert any("no channel attention" in n for n in rep.notes)
    assert "nothing to do" in str(rep)
    assert psi_names(prepared) == []
    assert prepared.training == model.training
    model.eval()
    prepared.eval()
    with torch.no_grad():
        for xi in (x, torch.randn(5, 3, 8, 8)):
            torch.testing.assert_close(prepared(xi), model(xi))


@pytest.mark.parametrize("mode", ["replace", "both"])
def test_prepare_twice_returns_the_prepared_model_unchanged(mode):
    model = SENet()
    x = torch.randn(2, 3, 8, 8)
    once = asrfx.prepare(model, example_inputs=(x,), mode=mode)
    n_psi = len(psi_names(once))
    assert n_psi == 1
    randomize_bn(once, 7)
    randomize_psi(once, 8)
    twice = asrfx.prepare(once, example_inputs=(x,), mode=mode)
    assert len(psi_names(twice)) == n_psi
    assert sorted(psi_names(twice)) == sorted(psi_names(once))
    assert sum(p.numel() for p in twice.parameters()) == sum(p.numel() for p in once.parameters())
    once.eval()
    twice.eval()
    with torch.no_grad():
        torch.testing.assert_close(twice(x), once(x))


def test_fold_twice_returns_the_same_graph():
    model = SENet()
    x = torch.randn(2, 3, 8, 8)
    prepared = asrfx.prepare(model, example_inputs=(x,))
    randomize_bn(prepared, 9)
    randomize_psi(prepared, 10)
    folded = asrfx.fold(prepared, example_inputs=(x,))
    again = asrfx.fold(folded, example_inputs=(x,))
    assert again.code == folded.code
    assert [(n.op, str(n.target)) for n in again.graph.nodes] == \
        [(n.op, str(n.target)) for n in folded.graph.nodes]
    assert again.state_dict().keys() == folded.state_dict().keys()
    for k, v in folded.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    assert not again.training
    with torch.no_grad():
        xi = torch.randn(3, 3, 8, 8)
        torch.testing.assert_close(again(xi), folded(xi))


# --------------------------------------------------------------------------------------------
# bad inputs


def test_prepare_rejects_unknown_mode():
    with pytest.raises(asrfx.InputError, match="bogus"):
        asrfx.prepare(SENet(), example_inputs=(torch.randn(2, 3, 8, 8),), mode="bogus")


@pytest.mark.parametrize("entry", ["prepare", "fold", "trace"])
def test_non_module_is_an_input_error(entry):
    fn = getattr(asrfx, entry)
    with pytest.raises(asrfx.InputError, match="str"):
        fn("not a module")
    assert issubclass(asrfx.InputError, asrfx.ASRError)


def test_other_bad_arguments_are_input_errors():
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(asrfx.InputError):
        asrfx.prepare(SENet(), example_inputs="x")
    with pytest.raises(asrfx.InputError):
        asrfx.prepare(SENet(), example_inputs=(x,), init="bogus")


@pytest.mark.parametrize("entry", ["trace", "prepare", "fold"])
def test_wrong_channel_count_is_an_asr_error_naming_the_shape(entry):
    model = SENet()
    bad = torch.randn(2, 5, 8, 8)  # the model takes 3 channels
    call = {"trace": lambda: asrfx.trace(model, bad),
            "prepare": lambda: asrfx.prepare(model, example_inputs=(bad,)),
            "fold": lambda: asrfx.fold(model, example_inputs=(bad,))}[entry]
    with pytest.raises(asrfx.ASRError) as info:
        call()
    err = info.value
    assert type(err) is not RuntimeError
    assert "(2, 5, 8, 8)" in str(err)


def test_wrong_channel_count_error_says_what_was_expected():
    with pytest.raises(asrfx.ASRError) as info:
        asrfx.prepare(SENet(), example_inputs=(torch.randn(2, 5, 8, 8),))
    assert re.search(r"3 channels|\[8, 3, 3, 3\]", str(info.value)), str(info.value)


# --------------------------------------------------------------------------------------------
# a module called at two places


class SharedConv(nn.Module):
    """One conv object applied twice, each call followed by a different BatchNorm."""

    def __init__(self, c: int = 6, se_after: str = "bn_b"):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(c)
        self.bn_b = nn.BatchNorm2d(c)
        self.se = SE(c)
        self.se_after = se_after

    def forward(self, x):
        a = self.bn_a(self.conv(x))
        h = self.conv(torch.relu(a))
        if self.se_after == "conv":  # SE straight on the second conv call: scale into conv rows
            return self.bn_b(self.se(h)) + a
        return self.se(self.bn_b(h)) + a


@pytest.mark.parametrize("se_after", ["bn_b", "conv"])
def test_module_called_twice_is_not_wrongly_fused(se_after):
    model = SharedConv(se_after=se_after)
    x = torch.randn(2, 6, 8, 8)
    randomize_bn(model, 11)
    model.eval()
    deploy = asrfx.fold(model, example_inputs=(x,))
    with torch.no_grad():
        for xi in (x, torch.randn(3, 6, 8, 8)):
            assert rel_err(model(xi), deploy(xi)) <= REL_TOL

    prepared = asrfx.prepare(model, example_inputs=(x,))
    assert psi_names(prepared) == ["se.psi"]
    randomize_bn(prepared, 12)
    randomize_psi(prepared, 13)
    prepared.eval()
    folded = asrfx.fold(prepared, example_inputs=(x,))
    with torch.no_grad():
        for xi in (x, torch.randn(3, 6, 8, 8)):
            assert rel_err(prepared(xi), folded(xi)) <= REL_TOL
    # the shared conv is not altered in the model that was folded
    assert torch.equal(prepared.get_submodule("conv").weight, model.conv.weight)


# --------------------------------------------------------------------------------------------
# the fold check


class _Doubled:
    def __init__(self, fn):
        self.fn = fn
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        w, b = self.fn(*args, **kwargs)
        return w * 1.5, b  # wrong: gamma scaled, beta not


def test_fold_check_raises_fold_mismatch_naming_the_site(monkeypatch):
    model = SENet()
    x = torch.randn(2, 3, 8, 8)
    prepared = asrfx.prepare(model, example_inputs=(x,))
    randomize_bn(prepared, 14)
    randomize_psi(prepared, 15)
    wrong = _Doubled(asrfx.foldmath.fold_scale_into_norm)
    # passes/scale_fold.py calls it as foldmath.fold_scale_into_norm (module attribute)
    monkeypatch.setattr(asrfx.foldmath, "fold_scale_into_norm", wrong)
    with pytest.raises(asrfx.FoldMismatch) as info:
        asrfx.fold(prepared, example_inputs=(x,))
    assert wrong.calls >= 1
    err = info.value
    assert isinstance(err, asrfx.ASRError)
    assert err.rel_error > REL_TOL
    assert err.site is not None and err.site.startswith("se ")
    assert "se -> bn" in str(err)
    # without the check the (wrong) result comes back, and the report still names the site
    folded = asrfx.fold(prepared, example_inputs=(x,), check=False)
    assert any(s.path == "se" and s.action == "folded" for s in folded.asrfx_report.sites)
    monkeypatch.undo()
    good = asrfx.fold(prepared, example_inputs=(x,))
    prepared.eval()
    with torch.no_grad():
        assert rel_err(prepared(x), good(x)) <= REL_TOL


def test_fold_check_names_a_consumer_side_site(monkeypatch):
    """The SE after a BatchNorm subclass folds into conv2's input columns; break that."""
    model = SubclassBNNet()
    x = torch.randn(2, 3, 8, 8)
    prepared = asrfx.prepare(model, example_inputs=(x,))
    randomize_bn(prepared, 16)
    randomize_psi(prepared, 17)
    orig = asrfx.foldmath.fold_scale_into_conv_in

    def wrong(weight, bias, scale, shift=None, groups=1):
        return orig(weight, bias, scale.flip(0), shift, groups)

    monkeypatch.setattr(asrfx.foldmath, "fold_scale_into_conv_in", wrong)
    with pytest.raises(asrfx.FoldMismatch, match=r"worst site: se -> conv2"):
        asrfx.fold(prepared, example_inputs=(x,))


class _RankAwareSE(nn.Module):
    """SE whose view size is built from len(x.shape), as MONAI's drop-connect does."""

    def __init__(self, c):
        super().__init__()
        self.fc1 = nn.Linear(c, c // 2)
        self.fc2 = nn.Linear(c // 2, c)

    def forward(self, x):
        nd = len(x.shape) - 2
        g = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean(dim=(2, 3))))))
        return x * g.view(x.shape[0], x.shape[1], *([1] * nd))


class _RankNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.se = _RankAwareSE(8)

    def forward(self, x):
        return self.se(self.bn(self.conv(x)))


def test_len_of_shape_is_answered_from_example_values():
    model = _RankNet()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepared = asrfx.prepare(model, example_inputs=(x,))
    assert prepared.asrfx_report.count(action="converted") == 1
    # the graph does not bake the batch size: other batch sizes work
    prepared.eval()
    randomize_bn(prepared, 5)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    with torch.no_grad():
        for xi in (torch.randn(1, 3, 8, 8), torch.randn(5, 3, 8, 8)):
            ref = prepared(xi)
            assert (ref - deploy(xi)).abs().max() <= 1e-4 * ref.abs().max()
    # without example inputs the rank is unknown: the SE becomes an opaque leaf, with a warning
    with pytest.warns(UserWarning, match="'se'"):
        asrfx.trace(model)


def test_mixed_train_eval_flags_survive_trace_and_prepare():
    """A frozen BatchNorm (eval) inside a training model keeps its flag, in the caller's model
    and in the prepared copy."""
    from asrfx.zoo import cifar_resnet

    model = cifar_resnet(8, attention="se", block="basic", num_classes=10).train()
    model.bn1.eval()
    x = torch.randn(2, 3, 8, 8)
    asrfx.trace(model, x)
    assert model.training and not model.bn1.training and model.layer1[0].bn1.training
    prepared = asrfx.prepare(model, example_inputs=(x,))
    assert model.training and not model.bn1.training
    assert prepared.training and not prepared.bn1.training and prepared.get_submodule("layer1.0.bn1").training


def test_prepared_and_folded_models_pickle_whole():
    """Models written under ``from __future__ import annotations`` (the zoo) annotate forward
    inputs with strings; fx used to keep them on the placeholders, and ``torch.save(model)``
    then failed. (Loading a whole pickled model is the user's choice; asrfx itself only ever
    loads state_dicts with weights_only=True.)"""
    from asrfx.zoo import cifar_resnet

    x = torch.randn(2, 3, 32, 32)
    prepared = asrfx.prepare(cifar_resnet(20, block="basic", attention="se", num_classes=10),
                             example_inputs=(x,))
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    for model in (prepared, deploy):
        back = pickled_copy(model)
        model.eval()
        back.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), back(x))


# ------------------------------------------------------------- custom autograd Functions


class _GradReverse(torch.autograd.Function):
    """Identity forward, negated gradient (the gradient-reversal layer of domain-adversarial
    training, Ganin & Lempitsky, 2015)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -g


class _Reverse(nn.Module):
    def forward(self, x):
        return _GradReverse.apply(x)


class _ReversedSE(nn.Module):
    """conv -> BN -> SE, then two heads, each behind its own gradient reversal (two modules of
    one class; one reversal on every path, so a lost reversal flips every gradient)."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.fc = nn.Conv2d(c, c, 1)
        self.rev1, self.rev2 = _Reverse(), _Reverse()
        self.head, self.head2 = nn.Linear(c, 2), nn.Linear(c, 2)

    def forward(self, x):
        y = self.bn(self.conv(x))
        y = y * torch.sigmoid(self.fc(y.mean((2, 3), keepdim=True)))
        return self.head(torch.relu(self.rev1(y)).mean((2, 3))) + \
            self.head2(self.rev2(y).amax((2, 3)))


def test_a_module_applying_an_autograd_function_stays_opaque_and_keeps_its_backward():
    """fx would record the Function's forward (an identity here) and train with autograd's
    backward of it: the gradient's sign silently flipped. Its module becomes a leaf instead
    (one warning for the class), and prepare trains with the Function's own backward."""
    import warnings

    torch.manual_seed(0)
    model = _ReversedSE()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepared = asrfx.prepare(model, example_inputs=(x,))
    said = [str(w.message) for w in caught if "autograd Function" in str(w.message)]
    assert len(said) == 1 and "2 submodule(s) of type _Reverse" in said[0], said
    called = {str(n.target) for n in prepared.graph.nodes if n.op == "call_module"}
    assert {"rev1", "rev2"} <= called
    assert prepared.asrfx_report.count(action="converted") == 1
    # the traced graph trains with the eager model's gradients (not their negation)
    traced = asrfx.trace(copy.deepcopy(model), (x,))
    grads = []
    for m in (model, traced):
        m.train()
        m(x).sum().backward()
        grads.append(m.get_submodule("conv").weight.grad)
    assert rel_err(grads[0], grads[1]) <= 1e-5 and grads[0].abs().max() > 0
    # and the prepared form: psi's gradient is minus the finite-difference slope
    prepared.train()
    psi = [p for n, p in prepared.named_parameters() if n.endswith("psi")][0]
    loss = prepared(x).sum()
    loss.backward()
    bump = torch.zeros_like(psi)
    bump.view(-1)[0] = 1e-2
    with torch.no_grad():
        psi += bump
        up = prepared(x).sum()
        psi -= 2 * bump
        down = prepared(x).sum()
        psi += bump
    slope = float(up - down) / 2e-2
    assert abs(slope) > 1e-3  # the test can see a sign flip
    assert abs(float(psi.grad.view(-1)[0]) + slope) <= 0.05 * abs(slope)


def test_an_autograd_function_in_the_top_level_forward_is_refused_with_the_fix():
    class Top(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return _GradReverse.apply(self.conv(x))

    with pytest.raises(asrfx.TraceError, match="(?s)autograd Function .*_GradReverse.*"
                                               "apply the Function inside a submodule"):
        asrfx.trace(Top(), (torch.randn(1, 3, 4, 4),))


class _Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * x

    @staticmethod
    def backward(ctx, g):
        return g


def test_an_autograd_function_runs_while_example_values_are_computed():
    """An opaque submodule that applies a Function runs it on real tensors when a later
    question (``len(y.shape)``) needs its example value: the guard on Function.apply must call
    the Function then (in every torch release: apply is a classmethod in some, a C
    classmethod_descriptor without ``__func__`` in others)."""
    class Inner(nn.Module):
        def forward(self, x):
            if x.sum() > -1e9:  # control flow on a value: an opaque leaf
                return _Square.apply(x)
            return x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.conv, self.bn = Inner(), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.inner(x)
            return self.bn(self.conv(y)).flatten(len(y.shape) - 3)

    model = randomize_bn(Net(), 3).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="'inner'"):
        deploy = asrfx.fold(model, example_inputs=(x,))
    assert deploy.asrfx_report.count(action="fused") == 1
    with torch.no_grad():
        assert rel_err(model(x), deploy(x)) <= REL_TOL


class _StarChunkAttention(nn.Module):
    """Self-attention whose keys and values come from one projection, unpacked with a star in
    a tuple display (``q, k, v = (q, *kv.chunk(2, dim=-1))``: CaiT, CvT, CrossViT, Twins in
    vit-pytorch), after a conv + BatchNorm that fold should fuse."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv, self.bn = nn.Conv1d(c, c, 3, padding=1), nn.BatchNorm1d(c)
        self.q, self.kv = nn.Linear(c, c), nn.Linear(c, 2 * c)

    def forward(self, x):
        t = self.bn(self.conv(x)).transpose(1, 2)
        q, k, v = (self.q(t), *self.kv(t).chunk(2, dim=-1))
        return torch.softmax(q @ k.transpose(1, 2), -1) @ v


def test_a_star_unpacked_chunk_is_traced():
    """``(q, *t.chunk(2, -1))`` asks ``len()`` of the traced tuple before iterating it: both
    are answered from the example value (with one guard on the count), so the module is traced
    and its conv + BatchNorm fused, exact at another length."""
    model = randomize_bn(nn.Sequential(_StarChunkAttention()), 4).eval()
    x = torch.randn(2, 8, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no opaque-module warning
        deploy = asrfx.fold(model, example_inputs=(x,))
    assert deploy.asrfx_report.count(action="fused") == 1
    guards = [n for n in deploy.graph.nodes if n.target is torch._assert]
    assert len(guards) <= 1
    with torch.no_grad():
        for xi in (x, torch.randn(3, 8, 17)):
            assert rel_err(model(xi), deploy(xi)) <= REL_TOL


class _ShrinkingWindow(nn.Module):
    """A forward that stores a value computed from the input's shape in the module (Swin in
    transformers: ``self.window_size = min(input_resolution)`` for small inputs), with a
    train-only branch so that both modes are traced."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.window = 8
        self.conv, self.bn = nn.Conv1d(c, c, 1), nn.BatchNorm1d(c)

    def forward(self, x):
        if x.shape[-1] <= self.window:
            self.window = x.shape[-1]
        y = self.bn(self.conv(x))
        if self.training:
            y = y * 0.5
        return y * self.window


def test_a_traced_value_stored_in_the_model_does_not_outlive_its_trace():
    """The train-mode trace stored a proxy in ``window``; the eval-mode trace then read it and
    failed, and the block became an opaque call. The attribute gets its value back after each
    trace: the block traces in both modes, its conv + norm fuse, and the model keeps its int."""
    model = randomize_bn(nn.Sequential(_ShrinkingWindow()), 5)
    x = torch.randn(2, 8, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no opaque-module warning
        prepared = asrfx.prepare(model, example_inputs=(x,))
        deploy = asrfx.fold(prepared, example_inputs=(x,))
    assert model[0].window == 8 and type(model[0].window) is int
    assert deploy.asrfx_report.count(action="fused") == 1
    model.eval()
    with torch.no_grad():
        assert rel_err(model(x), deploy(x)) <= REL_TOL


# --------------------------------------------------------------------------------------------
# opaque submodules are reported, with what they hide


class _TfSamePadBlock(nn.Module):
    """Pads with ``int()`` of the input's width, as TF-style "same" padding does in
    transformers' MobileNetV2: fx cannot trace ``int()`` of a traced value, so the block is
    kept opaque, and the BatchNorm and SE inside it with it."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3)
        self.bn = nn.BatchNorm2d(c)
        self.se = SE(c)

    def forward(self, x):
        pad = 2 - int(x.shape[-1]) % 2
        x = F.pad(x, (1, pad - 1, 1, pad - 1))
        return self.se(torch.relu(self.bn(self.conv(x))))


class _NetWithOpaqueBlock(nn.Module):
    def __init__(self, c: int = 6):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.block = _TfSamePadBlock(c)
        self.head = nn.Conv2d(c, 5, 1)

    def forward(self, x):
        return self.head(self.block(torch.relu(self.bn(self.stem(x)))))


def _opaque(report) -> list:
    return [s for s in report.sites if s.code == "untraceable-module"]


@pytest.mark.parametrize("path", ["end-to-end", "full"])
def test_fold_reports_an_opaque_submodule_and_the_norms_it_hides(path, monkeypatch):
    import asrfx.pipeline

    if path == "full":
        monkeypatch.setattr(asrfx.pipeline, "_fold_checked_end_to_end", lambda *a, **k: None)
    model = randomize_bn(_NetWithOpaqueBlock(), 21).eval()
    x = torch.randn(2, 3, 9, 9)
    with pytest.warns(UserWarning, match=r"'block'.*cannot be traced"):
        deploy = asrfx.fold(model, example_inputs=(x,))
    rep = deploy.asrfx_report
    [rec] = _opaque(rep)
    assert (rec.path, rec.action) == ("block", "kept")
    assert "cannot be traced symbolically" in rec.reason and "int()" in rec.reason
    assert "1 BatchNorm" in rec.reason and "folded" in rec.reason
    assert any(s.path == "bn" and s.action == "fused" for s in rep.sites)  # outside: fused
    with torch.no_grad():
        assert rel_err(model(x), deploy(x)) <= REL_TOL


def test_prepare_reports_an_opaque_submodule_and_fold_of_its_result_again():
    model = randomize_bn(_NetWithOpaqueBlock(), 22).eval()
    x = torch.randn(2, 3, 9, 9)
    with pytest.warns(UserWarning, match=r"'block'"):
        prepared = asrfx.prepare(model, example_inputs=(x,))
    [rec] = _opaque(prepared.asrfx_report)
    assert rec.path == "block" and "nothing inside it is converted" in rec.reason
    assert not psi_names(prepared)  # the SE inside the opaque block is not converted
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    [rec] = _opaque(deploy.asrfx_report)
    assert rec.path == "block" and "1 BatchNorm" in rec.reason
    # pickled and loaded back, the prepared model still knows (the report's source is meta)
    again = asrfx.fold(pickled_copy(prepared), example_inputs=(x,))
    assert [s.path for s in _opaque(again.asrfx_report)] == ["block"]


class JitTypeTests(nn.Module):
    """``torch.jit.isinstance`` on traced values, as MONAI's ``UpCat`` writes it: a skip
    connection concatenated only when one is given, a list checked as ``List[Tensor]``, and a
    size (an int) checked as a tensor (False)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.fuse = nn.Conv2d(8, 4, 1)

    def up(self, x, skip):
        if skip is not None and torch.jit.isinstance(skip, torch.Tensor):
            return self.fuse(torch.cat([skip, x], 1))
        return x

    def forward(self, x):
        from typing import List

        y = self.conv(x)
        parts = [y, x]
        if torch.jit.isinstance(parts, List[torch.Tensor]):
            y = y + 1
        if torch.jit.isinstance(x.shape[1], torch.Tensor):
            y = y * 0
        return self.up(y, x) + self.up(y, None)


def test_torch_jit_isinstance_of_traced_values_is_answered_from_their_types():
    model = JitTypeTests().eval()
    x = torch.randn(2, 4, 5, 5)
    original = torch.jit.isinstance
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (an unfaithful trace would make a leaf and warn)
        gm = asrfx.trace(model, x)
    assert torch.jit.isinstance is original  # restored after tracing
    assert sum(1 for n in gm.graph.nodes if n.target is torch.cat) == 1
    assert not any(n.target is operator.mul for n in gm.graph.nodes)
    with torch.no_grad():
        for xi in (x, torch.randn(3, 4, 7, 2)):
            assert rel_err(model(xi), gm(xi)) <= REL_TOL
    deploy = asrfx.fold(model, example_inputs=(x,))
    with torch.no_grad():
        assert rel_err(model(x), deploy(x)) <= REL_TOL


class AsTensor(nn.Module):
    """``torch.as_tensor`` of traced tensors: alone (the tensor itself), with a dtype (a
    conversion the graph keeps)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = torch.as_tensor(self.bn(self.conv(x)))
        return y + torch.as_tensor(x.mean(1, keepdim=True), dtype=torch.float64).float()


def test_torch_as_tensor_of_traced_values_traces():
    model = randomize_bn(AsTensor(), 1).eval()
    x = torch.randn(2, 3, 6, 6)
    gm = asrfx.trace(model, x)
    calls = [n for n in gm.graph.nodes if n.target is torch.as_tensor]
    assert len(calls) == 1 and calls[0].kwargs == {"dtype": torch.float64}
    deploy = asrfx.fold(model, example_inputs=(x,))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deploy.modules())
    with torch.no_grad():
        for xi in (x, torch.randn(1, 3, 4, 9)):
            assert rel_err(model(xi), gm(xi)) <= REL_TOL
            assert rel_err(model(xi), deploy(xi)) <= REL_TOL


class LegacyVariable(nn.Module):
    """The pre-0.4 ``Variable`` wrapper on a traced buffer (CondenseNet's learned channel
    selection, ``torch.index_select(x, 1, Variable(self.index))``), and on a traced tensor."""

    def __init__(self):
        super().__init__()
        self.register_buffer("index", torch.tensor([2, 0, 1]))
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        from torch.autograd import Variable

        y = self.bn(self.conv(torch.index_select(x, 1, Variable(self.index))))
        return y + Variable(y).mean()


def test_a_legacy_variable_of_a_traced_value_traces_as_detach():
    model = randomize_bn(LegacyVariable(), 2).eval()
    x = torch.randn(2, 3, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (an untraceable module would warn and stay opaque)
        gm = asrfx.trace(model, x)
    assert sum(1 for n in gm.graph.nodes if n.target == "detach") == 2
    from torch.autograd import Variable

    t = torch.arange(3.0)
    assert "__new__" not in vars(Variable) and Variable(t).data_ptr() == t.data_ptr()
    deploy = asrfx.fold(model, example_inputs=(x,))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deploy.modules())
    with torch.no_grad():
        for xi in (x, torch.randn(1, 3, 7, 4)):
            assert rel_err(model(xi), deploy(xi)) <= REL_TOL


class _ManyArgs(nn.Module):
    """Calls whose arguments are proxies, numbers, strings, None, a dtype, a slice, an Ellipsis
    and plain / nested tuples and lists of them."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=(1, 1))
        self.register_buffer("scale", torch.rand(4))

    def forward(self, x):
        y = self.conv(x)
        z = y.permute([0, 2, 3, 1]).reshape((y.shape[0], -1, 4))
        z = F.pad(z, (0, 1), mode="constant", value=0.5)[..., :4]
        w = torch.cat([y, y * self.scale.view(1, -1, 1, 1)], dim=1).to(torch.float32)
        s = w.sum(dim=(2, 3), keepdim=True) + torch.tensor(2.0)
        return torch.stack((z.mean(1), s.flatten(1)[:, :4]), 0), None, "tag", 1.5


def test_asrfx_tracer_records_the_arguments_fx_records():
    """AsrTracer's fast path for common argument types gives the graph fx's own tracer gives
    (the same nodes with the same arguments), and the same outputs."""
    class FxTracer(fx.Tracer):
        proxy_buffer_attributes = True  # as AsrTracer

    mine = _ManyArgs()  # one model per tracer: a trace stores its constants on the model
    fxs = copy.deepcopy(mine)
    ours = fx.GraphModule(mine, asrfx.tracing.AsrTracer().trace(mine))
    theirs = fx.GraphModule(fxs, FxTracer().trace(fxs))

    def shape(gm):
        return [(n.op, str(n.target), fx.node.map_arg(n.args, lambda a: a.name),
                 fx.node.map_arg(n.kwargs, lambda a: a.name)) for n in gm.graph.nodes]

    assert shape(ours) == shape(theirs)
    x = torch.randn(2, 3, 5, 5)
    a, b = ours(x), theirs(x)
    assert a[1:] == b[1:] == (None, "tag", 1.5)
    torch.testing.assert_close(a[0], b[0])  # (float32's default tolerances)
