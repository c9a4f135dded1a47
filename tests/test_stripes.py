"""Stripe Observation tools (asrfx.stripes): recording attention vectors, the statistic, plots."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asrfx
from asrfx.errors import InputError
from asrfx.stripes import (AttentionRecorder, plot_stripe_history, plot_stripes,
                           stripe_report, stripe_statistic)
from asrfx.zoo import SEModule, cifar_resnet

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _resnet20():
    return cifar_resnet(20, attention="se", block="basic", num_classes=10)


def _se_modules(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, SEModule)}


def _hooked_gates(model, x):
    """Each SEModule's sigmoid output (N, C), computed eagerly with forward hooks."""
    out, handles = {}, []
    for name, se in _se_modules(model).items():
        def hook(_m, _inp, result, name=name):
            out[name] = result.detach().clone()
        handles.append(se.gate.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return out


@pytest.fixture(scope="module")
def trained_like():
    """ResNet-20 with SE and random BN statistics, so gates differ between inputs and sites."""
    torch.manual_seed(1)
    model = _resnet20()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model


def test_one_site_per_se_module_with_its_channels(trained_like):
    model = trained_like
    rec = AttentionRecorder(model, torch.randn(2, 3, 8, 8))
    se = _se_modules(model)
    assert len(rec.sites) == len(se) == 9
    batches = [torch.randn(4, 3, 8, 8), (torch.randn(3, 3, 8, 8), torch.arange(3))]
    vectors = rec.record(batches)
    assert list(vectors) == rec.names
    assert set(vectors) == set(se)
    for name, v in vectors.items():
        assert v.dtype == torch.float32
        assert v.shape == (7, se[name].channels)
        assert rec.channels[name] == se[name].channels


def test_values_equal_the_se_sigmoid_output(trained_like):
    model = trained_like
    rec = AttentionRecorder(model, torch.randn(2, 3, 32, 32))
    xs = [torch.randn(5, 3, 32, 32), torch.randn(3, 3, 32, 32)]
    vectors = rec.record([xs[0], [xs[1], torch.zeros(3)]])  # a DataLoader yields lists
    expected = {k: torch.cat([a, b]) for (k, a), b in
                zip(_hooked_gates(model, xs[0]).items(), _hooked_gates(model, xs[1]).values())}
    assert set(vectors) == set(expected)
    for name, v in vectors.items():
        torch.testing.assert_close(v, expected[name], rtol=1e-6, atol=1e-7)
    # the gates really depend on the input: rows differ (a site whose one hidden ReLU unit is
    # dead everywhere has a constant gate, so not necessarily at every site)
    assert sum(stripe_statistic(v) > 0 for v in vectors.values()) >= 5


def test_recorder_reads_current_weights(trained_like):
    model = _resnet20()
    rec = AttentionRecorder(model, torch.randn(2, 3, 8, 8))
    x = torch.randn(4, 3, 8, 8)
    before = rec.record([x])["layer1.0.attention"]
    with torch.no_grad():
        model.layer1[0].attention.fc2.bias.add_(1.0)
    after = rec.record([x])["layer1.0.attention"]
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, _hooked_gates(model, x)["layer1.0.attention"])


def test_max_inputs_truncates():
    rec = AttentionRecorder(_resnet20(), torch.randn(2, 3, 8, 8))
    vectors = rec.record([torch.randn(4, 3, 8, 8)] * 3, max_inputs=6)
    assert all(v.shape[0] == 6 for v in vectors.values())
    with pytest.raises(InputError):
        rec.record([torch.randn(2, 3, 8, 8)], max_inputs=0)
    with pytest.raises(InputError, match="no inputs"):
        rec.record([])
    with pytest.raises(InputError, match="first element"):
        rec.record([{"image": torch.randn(2, 3, 8, 8)}])


def test_model_mode_restored():
    model = _resnet20()
    model.train()
    model.layer2[0].bn1.eval()  # a deliberately mixed state must survive tracing and recording
    modes = {n: m.training for n, m in model.named_modules()}
    bn = model.bn1
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    rec = AttentionRecorder(model, torch.randn(2, 3, 8, 8))
    assert {n: m.training for n, m in model.named_modules()} == modes
    rec.record([torch.randn(4, 3, 8, 8)])
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert rec.graph_module.training  # the traced module is restored as well
    # eval mode: BatchNorm statistics untouched
    torch.testing.assert_close(bn.running_mean, stats[0])
    torch.testing.assert_close(bn.running_var, stats[1])
    assert bn.num_batches_tracked == stats[2]

    model.eval()
    rec.record([torch.randn(2, 3, 8, 8)])
    assert not any(m.training for m in model.modules())


def test_mode_restored_when_a_batch_fails():
    model = _resnet20().train()
    rec = AttentionRecorder(model, torch.randn(2, 3, 8, 8))
    with pytest.raises(Exception):
        rec.record([torch.randn(2, 5, 8, 8)])  # wrong channel count
    assert all(m.training for m in model.modules())


def test_prepared_and_folded_models_have_no_sites():
    model = _resnet20()
    x = torch.randn(2, 3, 8, 8)
    prepared = asrfx.prepare(model, example_inputs=(x,))
    with pytest.raises(InputError, match="no input-dependent channel attention"):
        AttentionRecorder(prepared, x)
    folded = asrfx.fold(prepared, example_inputs=(x,))
    with pytest.raises(InputError, match="asrfx.prepare"):
        AttentionRecorder(folded, x)
    with pytest.raises(InputError):
        AttentionRecorder(cifar_resnet(20, block="basic", num_classes=10), x)


class _TwoGates(nn.Module):
    """Two functional SE gates in one module: two sites with the same module path."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.fc_a = nn.Linear(c, c)
        self.fc_b = nn.Linear(c, c)

    def forward(self, x):
        x = self.conv(x)
        a = torch.sigmoid(self.fc_a(F.adaptive_avg_pool2d(x, 1).flatten(1)))[:, :, None, None]
        x = x * a
        b = torch.sigmoid(self.fc_b(x.mean((2, 3))))[:, :, None, None]
        return x * b


def test_sites_with_one_path_get_suffixes():
    model = nn.Sequential(_TwoGates())
    rec = AttentionRecorder(model, torch.randn(2, 3, 6, 6))
    assert rec.names == ["0#1", "0#2"]
    vectors = rec.record([torch.randn(3, 3, 6, 6)])
    assert [v.shape for v in vectors.values()] == [(3, 8), (3, 8)]


class _DropPathSE(nn.Module):
    """A forward that differs in train mode: the recorder must run the eval graph."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.se = SEModule(c, reduction=4)

    def forward(self, x):
        y = self.se(self.conv(x))
        if self.training:
            y = y * 0.0
        return y


def test_dual_mode_model_uses_eval_graph():
    model = _DropPathSE().train()
    rec = AttentionRecorder(model, torch.randn(2, 3, 6, 6))
    assert isinstance(rec.graph_module, asrfx.DualModeGraphModule)
    x = torch.randn(4, 3, 6, 6)
    vectors = rec.record([x])
    torch.testing.assert_close(vectors["se"], _hooked_gates(model, x)["se"])
    assert model.training


class _SharedGate(nn.Module):
    """A gate of shape (1, C, 1, 1) (batch-independent statistic) is expanded to N rows."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.fc = nn.Linear(c, c)

    def forward(self, x):
        x = self.conv(x)
        g = torch.sigmoid(self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1)))
        return x * g.view(-1, 4, 1, 1)


def test_batch_of_one_gate_is_expanded():
    model = _SharedGate()
    rec = AttentionRecorder(model, torch.randn(2, 3, 5, 5))
    vectors = rec.record([torch.randn(1, 3, 5, 5), torch.randn(2, 3, 5, 5)])
    assert vectors[rec.names[0]].shape == (3, 4)


def test_stripe_statistic_by_hand():
    v = torch.tensor([[0.0, 0.5], [1.0, 0.5], [0.5, 0.5]])
    # channel 0: values 0, 1, 0.5 -> population var 1/6; channel 1: constant -> 0
    assert stripe_statistic(v) == pytest.approx(math.sqrt(1 / 6) / 2, rel=1e-12)
    assert stripe_statistic(torch.tensor([[0.0, 1.0], [2.0, 3.0]])) == pytest.approx(1.0)


def test_stripe_statistic_of_identical_rows_is_zero():
    row = torch.rand(1, 16)
    assert stripe_statistic(row.expand(50, 16)) == 0.0
    assert stripe_statistic(row) == 0.0  # one input: no spread
    for bad in (torch.rand(16), torch.rand(0, 4), torch.rand(2, 3, 4)):
        with pytest.raises(InputError):
            stripe_statistic(bad)


def test_stripe_report():
    v = {"a": torch.tensor([[0.0, 1.0], [2.0, 3.0]]), "b": torch.full((5, 3), 0.25)}
    rows = stripe_report(v)
    assert [r["path"] for r in rows] == ["a", "b"]
    assert rows[0] == {"path": "a", "channels": 2, "inputs": 2, "statistic": pytest.approx(1.0),
                       "mean_gate": pytest.approx(1.5)}
    assert rows[1]["statistic"] == 0.0 and rows[1]["mean_gate"] == pytest.approx(0.25)
    assert rows[1]["channels"] == 3 and rows[1]["inputs"] == 5


def test_plot_stripes_writes_png(tmp_path, trained_like):
    pytest.importorskip("matplotlib")
    rec = AttentionRecorder(trained_like, torch.randn(2, 3, 8, 8))
    vectors = rec.record([torch.randn(6, 3, 8, 8)])
    out = plot_stripes(vectors, tmp_path / "sub" / "stripes.png", max_sites=5, max_inputs=4)
    assert out == tmp_path / "sub" / "stripes.png"
    data = out.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_SIGNATURE
    # values outside [0, 1] and a single site still draw
    out2 = plot_stripes({"x": torch.randn(3, 7)}, str(tmp_path / "raw.png"))
    assert out2.read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(InputError):
        plot_stripes({}, tmp_path / "empty.png")


def test_plot_stripe_history_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    per_site = {f"layer{i}": [0.1 / (e + i + 1) for e in range(4)] for i in range(12)}
    for history in (per_site, {"only": [0.3, 0.2]}, [0.3, 0.2, 0.1]):
        out = plot_stripe_history(history, tmp_path / "h.png", first_epoch=1)
        assert out.read_bytes()[:8] == PNG_SIGNATURE
        out.unlink()
    with pytest.raises(InputError):
        plot_stripe_history([], tmp_path / "h.png")


def test_monai_seresnet50_has_16_sites():
    mnets = pytest.importorskip("monai.networks.nets")
    model = mnets.SEResNet50(spatial_dims=2, in_channels=1, num_classes=3)
    x = torch.randn(2, 1, 32, 32)
    rec = AttentionRecorder(model, x)
    assert len(rec.sites) == 16
    vectors = rec.record([x, torch.randn(3, 1, 32, 32)])
    assert len(vectors) == 16
    for name, v in vectors.items():
        assert v.shape == (5, rec.channels[name])
        assert ((v >= 0) & (v <= 1)).all()  # sigmoid gates
