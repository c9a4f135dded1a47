"""The check never certifies a non-finite or half-precision-noisy result wrongly.

* ``relative_error`` returns NaN / Inf honestly (Python's ``max(0.0, nan)`` is ``0.0``);
* a model whose own output is NaN/Inf raises :class:`asrfx.NonFiniteError` naming where the
  non-finite values first appear;
* NaN/Inf only in the folded output is a :class:`asrfx.FoldMismatch`;
* a float16 / bfloat16 fold that differs from the eager model by more than the tolerance is
  judged against the unfolded model run in float64: accepted when no worse than eager, with
  both numbers in the report (or in the error).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import asrfx
from asrfx import foldmath
from asrfx.zoo import SEModule
from helpers import randomize_bn


def test_relative_error_is_nan_or_inf_when_values_are():
    one = torch.tensor([1.0, 2.0])
    assert math.isnan(asrfx.relative_error(torch.tensor([1.0, math.nan]), one))
    assert math.isnan(asrfx.relative_error(one, torch.tensor([1.0, math.nan])))
    assert math.isinf(asrfx.relative_error(one, torch.tensor([1.0, math.inf])))
    # the same infinity on both sides is no error; finite values compare as before
    assert asrfx.relative_error(torch.tensor([1.0, math.inf]),
                                torch.tensor([1.0, math.inf])) == 0.0
    assert asrfx.relative_error(one, torch.tensor([1.0, 2.5])) == pytest.approx(0.25)
    # nested outputs: a NaN in the second tensor is not hidden by a finite first one
    assert math.isnan(asrfx.relative_error((one, one), (one, torch.tensor([math.nan, 2.0]))))


def _se_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         SEModule(8, reduction=2), nn.Conv2d(8, 4, 1))


def test_nan_batchnorm_statistics_are_named():
    prepared = asrfx.prepare(_se_net(), example_inputs=(torch.randn(2, 3, 8, 8),))
    randomize_bn(prepared, 0)
    with torch.no_grad():
        prepared.get_submodule("1").running_var[3] = math.nan
    with pytest.raises(asrfx.NonFiniteError, match=r"1 \(BatchNorm2d\): running_var holds 1 NaN"):
        asrfx.fold(prepared)


def test_nan_in_a_functional_norm_weight_is_named():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.scale = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return nn.functional.group_norm(self.conv(x), 2, self.scale)

    net = Net()
    with torch.no_grad():
        net.scale[1] = math.inf
    with pytest.raises(asrfx.NonFiniteError, match=r"group_norm.*scale holds 1 Inf"):
        asrfx.fold(net, example_inputs=(torch.randn(2, 3, 6, 6),))


def test_non_finite_example_input_is_named():
    x = torch.randn(2, 3, 8, 8)
    x[0, 0, 0, 0] = math.nan
    with pytest.raises(asrfx.NonFiniteError, match="example input 0 holds 1 NaN"):
        asrfx.fold(_se_net().eval(), example_inputs=(x,))


def test_nan_only_in_the_folded_model_is_a_mismatch():
    """Conv weights of 1e7 on an input channel that is always zero, then a BatchNorm scaling by
    ~3e32: eager stays finite (0 * 1e7, then a finite product), the fused weights overflow
    float32 to inf and inf * 0 is NaN."""
    net = nn.Sequential(nn.Conv2d(2, 1, 1), nn.BatchNorm2d(1)).eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([1e7, 1.0]).view(1, 2, 1, 1))
        net[0].bias.fill_(0.5)
        net[1].running_mean.fill_(0.25)
        net[1].running_var.fill_(0.0)
        net[1].weight.fill_(1e30)
    x = torch.randn(2, 2, 4, 4)
    x[:, 0] = 0.0
    with torch.no_grad():
        assert torch.isfinite(net(x)).all()
    with pytest.raises(asrfx.FoldMismatch, match="relative error nan"):
        asrfx.fold(net, example_inputs=(x,))


def _near_dead_bn(dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor]:
    """A BatchNorm channel with running variance 1e-5 and weight 8 over a conv output that sits
    at the running mean: half-precision eager rounding of (x - mean) is amplified ~2500x."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 4, 1))
    with torch.no_grad():
        net[0].weight[0].zero_()
        net[0].weight[0, 0, 1, 1] = 1e-3
        net[0].bias[0] = 3.0
        bn = net[1]
        bn.running_mean.zero_()
        bn.running_mean[0] = 3.0
        bn.running_var.fill_(1.0)
        bn.running_var[0] = 1e-5
        bn.weight.fill_(1.0)
        bn.weight[0] = 8.0
        bn.bias.uniform_(-0.5, 0.5)
    return net.to(dtype).eval(), torch.randn(2, 3, 8, 8).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_fold_is_judged_against_float64(dtype):
    net, x = _near_dead_bn(dtype)
    deploy = asrfx.fold(net, example_inputs=(x,))
    note = next(n for n in deploy.asrfx_report.notes if "float64" in n)
    assert "no worse" in note
    # the note's numbers are the truth: the fold is closer to float64 than eager is
    net64 = _near_dead_bn(torch.float64)[0]
    net64.load_state_dict({k: v.double() for k, v in net.state_dict().items()})
    with torch.no_grad():
        truth = net64(x.double())
        eager, folded = asrfx.relative_error(truth, net(x)), \
            asrfx.relative_error(truth, deploy(x))
    assert folded < eager / 10
    assert f"{folded:.2e}" in note and f"{eager:.2e}" in note
    assert deploy(x).dtype == dtype


def test_half_precision_fold_worse_than_eager_is_refused(monkeypatch):
    """A fold that is wrong (weights tripled, injected) is not excused by half precision:
    FoldMismatch, with both float64 comparisons in the message."""
    real = foldmath.fold_scale_into_conv_out  # the identity Conv -> BatchNorm fusion uses

    def off(*args, **kwargs):
        w, b = real(*args, **kwargs)
        return w * 3, b

    monkeypatch.setattr(foldmath, "fold_scale_into_conv_out", off)
    net, x = _near_dead_bn(torch.float16)
    with pytest.raises(asrfx.FoldMismatch, match="float64 the fold errs .* float16 eager model"):
        asrfx.fold(net, example_inputs=(x,))
