"""fold of an ``nn.Module`` checks trace and fold at once, against the eager model.

The traced graph is not run by itself before the passes: shapes are recorded only when a pass
reads one (``DeferredTensorMeta``), and the folded graph is compared with the eager model. On
anything but a passing check fold takes the full path (trace checked on its own, culprits made
leaves, a failing site named). These tests hold the two paths to the same results, and the
deferred metadata to what recorded metadata says.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.fx as fx
from torch import nn

import asrfx
import asrfx.pipeline as pipeline
from asrfx.passes.graph_utils import tensor_shape
from asrfx.passes.shapes import (DeferredTensorMeta, ShapeRecorder, defer_shapes,
                                 drop_deferred, propagate_shapes)
from asrfx.zoo import build_model
from helpers import REL_TOL, DropPathNet, SENet, TypeCheck, randomize_bn, rel_err

torch.set_num_threads(1)


class _Unfaithful(nn.Module):
    """conv -> BN (fuses) -> a submodule that traces to the identity."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.body = nn.Sequential(nn.ReLU(), TypeCheck(c))

    def forward(self, x):
        return self.body(self.bn(self.stem(x)))


class _Scaled(nn.Module):
    """A constant per-channel scale after a BN: scale folding reads shapes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.gain = nn.Parameter(torch.linspace(0.5, 2.0, 6).view(1, 6, 1, 1))
        self.head = nn.Conv2d(6, 5, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x)) * self.gain))


def _models():
    yield "resnet20", build_model("resnet20", attention=None, num_classes=10), (2, 3, 32, 32)
    yield "resnet20-se", build_model("resnet20", attention="se", num_classes=10), (2, 3, 32, 32)
    yield "SENet", SENet(), (2, 3, 8, 8)
    yield "DropPathNet", DropPathNet(), (2, 3, 8, 8)
    yield "scaled", _Scaled(), (2, 3, 8, 8)


MODELS = {name: (model, shape) for name, model, shape in _models()}


def _full_path_only(monkeypatch):
    monkeypatch.setattr(pipeline, "_fold_checked_end_to_end", lambda *a, **k: None)


def _summary(gm: fx.GraphModule):
    rep = gm.asrfx_report
    sites = [(s.path, s.kind, s.channels, s.action, s.target, s.reason, s.code)
             for s in rep.sites]
    notes = [n for n in rep.notes if not n.startswith("checked against")]
    return gm.code, sites, notes, rep.params_before, rep.params_after


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_end_to_end_check_folds_exactly_as_the_full_path(name, monkeypatch):
    model, shape = MODELS[name]
    model = randomize_bn(copy.deepcopy(model), 3).eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = asrfx.fold(model, example_inputs=(x,))
        _full_path_only(monkeypatch)
        full = asrfx.fold(model, example_inputs=(x,))
    assert _summary(fast) == _summary(full)
    assert any(n.startswith("checked against") for n in fast.asrfx_report.notes)
    a, b = fast.state_dict(), full.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    with torch.no_grad():
        ref = model(x)
        assert rel_err(ref, fast(x)) <= REL_TOL
    # no deferred metadata is left behind; every tensor node of the result has real metadata
    assert not any(isinstance(n.meta.get("tensor_meta"), DeferredTensorMeta)
                   for n in fast.graph.nodes)


def _count_recorder_runs(monkeypatch) -> list:
    runs = []
    original = ShapeRecorder.run

    def counting(self, *args, **kwargs):  # what ran: how many BatchNorm calls it still had
        runs.append(sum(n.op == "call_module" and
                        isinstance(self.module.get_submodule(str(n.target)), nn.BatchNorm2d)
                        for n in self.graph.nodes))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ShapeRecorder, "run", counting)
    return runs


def test_a_plain_conv_net_runs_its_traced_graph_once_the_folded_one(monkeypatch):
    """The point of the end-to-end check: the unfolded graph is not run; only the folded one
    is (the eager model runs once, as the reference). The full path runs both."""
    model = randomize_bn(build_model("resnet20", attention=None, num_classes=10), 5).eval()
    x = torch.randn(1, 3, 32, 32)
    runs = _count_recorder_runs(monkeypatch)
    asrfx.fold(model, example_inputs=(x,))
    assert runs == [0]  # the folded graph, once
    runs.clear()
    _full_path_only(monkeypatch)
    asrfx.fold(model, example_inputs=(x,))
    assert len(runs) == 1 and runs[0] > 0  # the trace check, unfolded (then a compiled run)


def test_an_unfaithful_trace_falls_back_and_warns_once(monkeypatch):
    model = randomize_bn(_Unfaithful(), 6).eval()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        deploy = asrfx.fold(model, example_inputs=(x,))
    leaf = [w for w in caught if "'body.1'" in str(w.message)]
    assert len(leaf) == 1, [str(w.message) for w in caught]
    assert "body.1" in [str(n.target) for n in deploy.graph.nodes if n.op == "call_module"]
    with torch.no_grad():
        assert rel_err(model(x), deploy(x)) <= REL_TOL
    assert any(s.code == "" and s.action == "fused" for s in deploy.asrfx_report.sites)


def test_fold_without_check_still_checks_the_trace():
    """check=False has no end-to-end comparison, so the trace is checked on its own."""
    model = randomize_bn(_Unfaithful(), 7).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"'body\.1'"):
        deploy = asrfx.fold(model, example_inputs=(x,), check=False)
    with torch.no_grad():
        assert rel_err(model(x), deploy(x)) <= REL_TOL


def test_warnings_of_a_successful_attempt_are_given_once():
    """A hook on the model itself warns in the attempt; the attempt passes, and the warning is
    re-issued (once, not dropped)."""
    model = randomize_bn(SENet(), 8).eval()
    model.register_forward_pre_hook(lambda m, a: None)
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asrfx.fold(model, example_inputs=(x,))
    assert sum("on itself" in str(w.message) for w in caught) == 1


def test_a_failing_fold_is_still_named_by_the_full_path(monkeypatch):
    """A wrong fold fails the end-to-end check; the full path then names the culprit."""
    model = randomize_bn(_Scaled(), 9).eval()
    x = torch.randn(2, 3, 8, 8)
    real = asrfx.foldmath.fold_scale_into_conv_out

    def wrong(weight, bias, scale, shift=None):
        w, b = real(weight, bias, scale, shift)
        return w * 1.5, b

    monkeypatch.setattr(asrfx.foldmath, "fold_scale_into_conv_out", wrong)
    with pytest.raises(asrfx.FoldMismatch) as info:
        asrfx.fold(model, example_inputs=(x,))
    assert info.value.site is not None


# --------------------------------------------------------------------------------------------
# deferred shape metadata


def _traced_resnet():
    model = build_model("resnet20", attention="se", num_classes=10).eval()
    return fx.symbolic_trace(model), torch.randn(2, 3, 32, 32)


def test_deferred_metadata_answers_as_recorded_metadata(monkeypatch):
    gm, x = _traced_resnet()
    propagate_shapes(gm, (x,))
    want = {n.name: (tensor_shape(n), getattr(n.meta.get("tensor_meta"), "dtype", None),
                     hasattr(n.meta.get("tensor_meta"), "shape")) for n in gm.graph.nodes}
    gm2, _ = _traced_resnet()
    runs = _count_recorder_runs(monkeypatch)
    defer_shapes(gm2, (x,))
    assert not runs
    got = {n.name: (tensor_shape(n), getattr(n.meta.get("tensor_meta"), "dtype", None),
                    hasattr(n.meta.get("tensor_meta"), "shape")) for n in gm2.graph.nodes}
    assert got == want
    assert len(runs) == 1  # the first read ran the graph; every other read was answered
    assert not any(isinstance(n.meta.get("tensor_meta"), DeferredTensorMeta)
                   for n in gm2.graph.nodes)


def test_deferred_metadata_is_dropped_by_any_recorder_run_and_never_copied_into_a_run():
    gm, x = _traced_resnet()
    defer_shapes(gm, (x,))
    meta = copy.deepcopy(next(iter(gm.graph.nodes)).meta)  # copying probes no shape
    assert isinstance(meta["tensor_meta"], DeferredTensorMeta)
    with torch.no_grad():
        ShapeRecorder(gm).propagate(x)
    assert all(not isinstance(n.meta.get("tensor_meta"), DeferredTensorMeta)
               for n in gm.graph.nodes)
    gm2, _ = _traced_resnet()
    defer_shapes(gm2, (x,))
    drop_deferred(gm2.graph)
    assert all("tensor_meta" not in n.meta for n in gm2.graph.nodes)


def test_a_graph_that_fails_at_the_first_read_raises_an_input_error():
    gm, _ = _traced_resnet()
    defer_shapes(gm, (torch.randn(2, 5, 32, 32),))  # wrong channel count
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    with pytest.raises(asrfx.InputError):
        tensor_shape(node)
    # and so does every later read, of any node: never a silent "no shape"
    for n in list(gm.graph.nodes)[-3:]:
        with pytest.raises(asrfx.InputError):
            getattr(n.meta["tensor_meta"], "shape", None)


class _ClipsInForward(nn.Module):
    """Weight clipping inside ``forward`` (as some GAN critics do): every run writes into the
    parameter. Fold's runs must write into its working copy, never the caller's."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        with torch.no_grad():
            self.conv.weight.mul_(50)  # well outside the clipping range

    def forward(self, x):
        self.conv.weight.data.clamp_(-0.01, 0.01)
        return self.bn(self.conv(x))


def test_a_model_writing_into_its_parameters_is_not_touched_by_fold():
    model = randomize_bn(_ClipsInForward(), 11).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            asrfx.fold(model, example_inputs=(x,))
        except asrfx.ASRError:
            pass  # refusing is fine; touching the caller's weights is not
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
