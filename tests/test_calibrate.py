"""init="calibrate": psi starts at the mean statistic its branch saw on calibration data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import asrfx
from asrfx.zoo import SEModule, cifar_resnet
from helpers import randomize_bn, rel_err


def _pooled_means(model: nn.Module, data: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean over all calibration inputs of each SE's pooled statistic, via forward hooks."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, SEModule):
            hooks.append(m.pool.register_forward_hook(
                lambda mod, i, o, name=name: seen.setdefault(name, []).append(o.detach())))
    model.eval()
    with torch.no_grad():
        for x in data:
            model(x)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v).mean(0, keepdim=True) for k, v in seen.items()}


def test_calibrated_psi_is_the_mean_statistic():
    torch.manual_seed(0)
    model = randomize_bn(cifar_resnet(20, attention="se", block="basic", num_classes=10), 1)
    data = [torch.randn(5, 3, 16, 16) for _ in range(3)] + [(torch.randn(2, 3, 16, 16), None)]
    prepared = asrfx.prepare(model, example_inputs=(torch.randn(2, 3, 16, 16),),
                             init="calibrate", calibration_data=data)
    expected = _pooled_means(model, [d[0] if isinstance(d, tuple) else d for d in data])
    assert len(expected) == 9
    for path, mean in expected.items():
        psi = prepared.get_parameter(f"{path}.psi")
        assert psi.shape == mean.shape == (1, model.get_submodule(path).channels, 1, 1)
        torch.testing.assert_close(psi.detach(), mean, rtol=1e-5, atol=1e-6)


def test_calibrated_conversion_is_close_to_the_trained_attention():
    """With psi at the mean statistic the converted model stays near the original (the gates are
    evaluated at the mean input instead of per input), and folds exactly."""
    torch.manual_seed(0)
    model = randomize_bn(cifar_resnet(20, attention="se", block="basic", num_classes=10), 2)
    data = [torch.randn(16, 3, 16, 16) for _ in range(4)]
    x = torch.randn(8, 3, 16, 16)
    calibrated = asrfx.prepare(model, example_inputs=(x,), init="calibrate",
                               calibration_data=data).eval()
    constant = asrfx.prepare(model, example_inputs=(x,), init=0.1).eval()
    model.eval()
    with torch.no_grad():
        ref = model(x)
        assert rel_err(ref, calibrated(x)) < rel_err(ref, constant(x))
    deploy = asrfx.fold(calibrated, example_inputs=(x,))
    with torch.no_grad():
        assert rel_err(calibrated(x), deploy(x)) <= 1e-4


def test_calibrate_errors():
    model = cifar_resnet(8, attention="se", block="basic", num_classes=10)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(asrfx.InputError, match="calibration_data"):
        asrfx.prepare(model, example_inputs=(x,), init="calibrate")
    with pytest.raises(asrfx.InputError, match="empty"):
        asrfx.prepare(model, example_inputs=(x,), init="calibrate", calibration_data=[])
    with pytest.raises(asrfx.InputError, match="calibration batch"):
        asrfx.prepare(model, example_inputs=(x,), init="calibrate",
                      calibration_data=[torch.randn(2, 5, 8, 8)])


def test_calibrate_in_dual_mode_model():
    """A model whose forward differs between train and eval (drop-path) gets one calibrated psi
    per site, shared by both graphs."""

    class DropPathSE(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.se = SEModule(8, reduction=2)

        def forward(self, x):
            y = self.se(self.bn(self.conv(x)))
            if self.training:
                y = y * (torch.rand(y.shape[0], 1, 1, 1) > 0.1).float()
            return y

    model = DropPathSE()
    data = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    prepared = asrfx.prepare(model, example_inputs=(data[0],), init="calibrate",
                             calibration_data=data)
    assert isinstance(prepared, asrfx.DualModeGraphModule)
    expected = _pooled_means(model, data)["se"]
    torch.testing.assert_close(prepared.get_parameter("se.psi").detach(), expected)
