"""Conv/Linear -> BatchNorm fusion edge cases: non-affine norms, biases, 1D/3D, Linear+BN1d,
half precision, and norms that must stay (no running statistics, input read twice)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import asrfx
from helpers import randomize_bn, rel_err


def _bn_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module"
            and isinstance(gm.get_submodule(str(n.target)), nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_bn_fuses_exactly(dims, affine, bias):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    model = nn.Sequential(conv(3, 6, 3, padding=1, bias=bias), bn(6, affine=affine), nn.ReLU())
    randomize_bn(model, seed=1)
    x = torch.randn(2, 3, *([6] * dims))
    deploy = asrfx.fold(model, example_inputs=(x,))
    assert _bn_nodes(deploy) == []
    assert deploy.asrfx_report.count(action="fused") == 1
    model.eval()
    with torch.no_grad():
        assert rel_err(model(x), deploy(x)) <= 1e-5


def test_linear_bn1d_fuses_exactly():
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 2))
    randomize_bn(model, seed=2)
    x = torch.randn(4, 5)
    deploy = asrfx.fold(model, example_inputs=(x,))
    assert _bn_nodes(deploy) == []
    model.eval()
    with torch.no_grad():
        assert rel_err(model(x), deploy(x)) <= 1e-5


def test_norms_that_must_stay():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 4, 1)
            self.bn_batchstats = nn.BatchNorm2d(4, track_running_stats=False)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y, self.bn_batchstats(self.conv2(y))

    model = Net()
    randomize_bn(model, seed=3)
    x = torch.randn(3, 3, 5, 5)
    deploy = asrfx.fold(model, example_inputs=(x,))
    kept = {s.path: s.code for s in deploy.asrfx_report.sites if s.action == "kept"}
    assert kept["bn"] == "producer-read-elsewhere"
    assert kept["bn_batchstats"] == "no-running-stats"
    model.eval()
    with torch.no_grad():
        assert asrfx.relative_error(model(x), deploy(x)) <= 1e-5


def test_half_precision_fusion_is_computed_in_float64():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
    randomize_bn(model, seed=4)
    with torch.no_grad():
        model[1].running_var.mul_(1e-3)  # small variances: where low-precision rsqrt hurts
    x = torch.randn(2, 3, 8, 8)
    ref = model.eval()(x).double()
    half = asrfx.fold(model.to(torch.bfloat16), example_inputs=(x.bfloat16(),))
    assert half.get_submodule("0").weight.dtype == torch.bfloat16
    with torch.no_grad():
        err = rel_err(ref, half(x.bfloat16()).double())
    # the only error left is bf16 rounding of the inputs, weights and arithmetic
    assert err <= 3e-2


class NormedHead(nn.Module):
    """conv -> ReLU -> global pool -> flatten -> BatchNorm1d -> Linear: no conv produces the
    norm's input, so the norm folds forward into the Linear's input columns."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.bn = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.bn(self.pool(torch.relu(self.conv(x))).flatten(1)))


class NormAfterSum(nn.Module):
    """A BatchNorm after a summed two-branch block: fused once the branches are one conv."""

    def __init__(self):
        super().__init__()
        self.k3 = nn.Conv2d(4, 4, 3, padding=1)
        self.k1 = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.k3(x) + self.k1(x)))


@pytest.mark.parametrize("model,x,target", [
    (NormedHead, (2, 3, 8, 8), "fc (input columns)"),
    (NormAfterSum, (2, 4, 6, 6), "merged_conv"),
])
def test_batchnorms_without_a_conv_producer_still_go(model, x, target):
    m = randomize_bn(model(), seed=5).eval()
    x = torch.randn(*x)
    deploy = asrfx.fold(m, example_inputs=(x,))
    (rec,) = [s for s in deploy.asrfx_report.sites if s.kind == "conv+bn"]
    assert (rec.action, rec.target) == ("fused", target), deploy.asrfx_report
    assert not any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in deploy.modules())
    with torch.no_grad():
        for xi in (x, torch.randn(5, *x.shape[1:])):
            assert rel_err(m(xi), deploy(xi)) <= 1e-5
