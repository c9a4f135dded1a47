"""More MONAI networks, each a failure mode found while sweeping the library's model families.

* ``EfficientNetBN``: drop-connect calls ``len(inputs.shape)`` in train mode; the tracer answers
  the rank from example values, so all 16 SE sites convert (before: 7, the rest opaque leaves).
* ``BasicUNet``, ``BasicUNetPlusPlus``, ``FlexibleUNet``: ``UpCat`` tests
  ``torch.jit.isinstance(x_e, torch.Tensor)``, which is False on a proxy, so fx silently drops the
  skip concatenation (the check against the eager model then made every ``UpCat`` an opaque leaf,
  with a warning). The tracer answers it from the example value's type: no leaf, the skip
  concatenations in the graph, the decoder's norms fused.
* ``SEResNeXt50``, 1D ``SEResNet50``, ``DenseNet121``: grouped convs, 1D SE, pre-activation BN.
* ``HighResNet``: ``torch.as_tensor`` of traced tensors (the top level failed to trace).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import asrfx
from helpers import psi_names, roundtrip

monai = pytest.importorskip("monai")
import monai.networks.nets as mnets  # noqa: E402
from monai.networks.blocks import ChannelSELayer  # noqa: E402
from monai.networks.nets.efficientnet import MBConvBlock  # noqa: E402


def _roundtrip(model: nn.Module, x: torch.Tensor, x2: torch.Tensor):
    """Prepare at ``x``, run in train mode at ``x`` and at ``x2`` (another batch and spatial size:
    psi must not fix the input size), fold at ``x``, compare in eval mode at both."""
    assert x2.shape[0] != x.shape[0] and x2.shape[2:] != x.shape[2:]

    def train_at_both_sizes(prepared: nn.Module) -> None:
        prepared.train()
        out = prepared(x)
        out = out[0] if isinstance(out, list) else out  # (UNet++: a list of heads)
        out.float().sum().backward()
        with torch.no_grad():
            out2 = prepared(x2)
            assert (out2[0] if isinstance(out2, list) else out2).shape[0] == x2.shape[0]

    # BatchNorm statistics randomized (seed 3), psi kept as trained
    return roundtrip(model, x, x2, bn_seed=3, psi_seed=None, before_fold=train_at_both_sizes)


def test_monai_efficientnet_bn_len_of_shape_is_answered():
    model = mnets.EfficientNetBN("efficientnet-b0", pretrained=False, spatial_dims=2,
                                 in_channels=3, num_classes=4)
    n_se = sum(1 for m in model.modules() if isinstance(m, MBConvBlock) and m.has_se)
    assert n_se == 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no submodule may fall back to an opaque leaf
        prepared, deploy = _roundtrip(model, torch.randn(2, 3, 64, 64), torch.randn(3, 3, 48, 80))
    assert isinstance(prepared, asrfx.DualModeGraphModule)  # drop-connect in train mode only
    assert prepared.asrfx_report.count(action="converted") == n_se
    assert len(psi_names(prepared)) == n_se
    assert deploy.asrfx_report.count(action="folded", kind="channel scale") == n_se
    # tracing ran real layers for example values; BatchNorm statistics must be untouched
    fresh = mnets.EfficientNetBN("efficientnet-b0", pretrained=False, spatial_dims=2,
                                 in_channels=3, num_classes=4)
    stats = {k: v for k, v in fresh.state_dict().items() if "running" in k}
    again = asrfx.prepare(fresh, example_inputs=(torch.randn(2, 3, 64, 64),))
    for k, v in stats.items():
        assert torch.equal(again.state_dict()[k], v), k


def _skips_taken(model: nn.Module, x: torch.Tensor) -> int:
    """How many ``UpCat`` calls of an eager run (on a copy) get an encoder feature map."""
    import copy

    twin, seen = copy.deepcopy(model).eval(), []
    for m in twin.modules():
        if type(m).__name__ == "UpCat":
            m.register_forward_pre_hook(lambda mod, args: seen.append(args[1] is not None))
    with torch.no_grad():
        twin(x)
    return sum(seen)


@pytest.mark.parametrize("name", ["basic_unet", "basic_unet_plus_plus", "flexible_unet"])
def test_monai_unet_decoders_trace_their_skip_connections(name):
    if name == "basic_unet":
        model = mnets.BasicUNet(spatial_dims=2, in_channels=1, out_channels=2,
                                features=(8, 8, 16, 32, 64, 8), norm="batch")
    elif name == "basic_unet_plus_plus":
        model = mnets.BasicUNetPlusPlus(spatial_dims=2, in_channels=1, out_channels=2,
                                        features=(4, 4, 8, 8, 16, 4), norm="batch")
    else:
        model = mnets.FlexibleUNet(1, 2, "efficientnet-b0", pretrained=False, spatial_dims=2)
    x = torch.randn(2, 1, 64, 64)
    ups = [p for p, m in model.named_modules() if type(m).__name__ == "UpCat"]
    assert ups
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no submodule may fall back to an opaque leaf
        gm = asrfx.trace(model, x)
        called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
        assert not called & set(ups)
        cats = [n for n in gm.graph.nodes if n.target is torch.cat]
        assert len(cats) >= _skips_taken(model, x) > 0  # (UNet++ concatenates more itself)
        prepared, deploy = _roundtrip(model, x, torch.randn(1, 1, 96, 64))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in deploy.modules())


@pytest.mark.parametrize("name", ["seresnext50", "seresnet50_1d"])
def test_monai_se_families(name):
    if name == "seresnext50":
        model = mnets.SEResNeXt50(spatial_dims=2, in_channels=3, num_classes=4)
        x, x2 = torch.randn(1, 3, 64, 64), torch.randn(2, 3, 48, 80)
    else:
        model = mnets.SEResNet50(spatial_dims=1, in_channels=2, num_classes=4)
        x, x2 = torch.randn(2, 2, 256), torch.randn(1, 2, 160)
    n_se = sum(1 for m in model.modules() if isinstance(m, ChannelSELayer))
    prepared, deploy = _roundtrip(model, x, x2)
    assert prepared.asrfx_report.count(action="converted") == n_se == 16
    assert deploy.asrfx_report.count(action="folded", kind="channel scale") == n_se
    assert not any("sigmoid" in str(n.target).lower() for n in deploy.graph.nodes)


def test_monai_densenet_pre_activation_bn_is_reported_not_fused():
    model = mnets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=3)
    x = torch.randn(2, 1, 64, 64)
    prepared, deploy = _roundtrip(model, x, torch.randn(1, 1, 48, 80))
    assert prepared.asrfx_report.count(action="converted") == 0
    report = deploy.asrfx_report
    kept = [s for s in report.sites if s.kind == "conv+bn" and s.action == "kept"]
    assert kept and all(s.reason and s.code for s in kept)
    n_bn_left = sum(1 for n in deploy.graph.nodes if n.op == "call_module"
                    and isinstance(deploy.get_submodule(str(n.target)), nn.BatchNorm2d))
    assert n_bn_left == len(kept)


def test_monai_highresnet_as_tensor_traces():
    """``HighResNet`` returns ``torch.as_tensor(self.blocks(x))`` (and adds
    ``torch.as_tensor`` of each residual's shortcut): the tracer used to read the proxy as an
    array and failed at the top level."""
    model = mnets.HighResNet(spatial_dims=2, in_channels=1, out_channels=2, norm_type="batch")
    x = torch.randn(2, 1, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _roundtrip(model, x, torch.randn(1, 1, 24, 40))
