"""timm and torchvision models through prepare -> one SGD step -> fold (``make zoo``).

These need timm / torchvision, which need the CUDA build of torch (it runs on the CPU): ``make
zoo`` builds that environment outside the clone and runs this file there. Under ``make test``
(the CPU build, no torchvision) the module is skipped.

Each model (random weights, ``pretrained=False``) is checked for what fold promises:
every attention converted; a training step with finite loss in which every psi whose gate the
loss reaches gets a gradient; after randomising every norm's statistics and affine weights and
psi, fold is exact on the example and on an input of another batch *and* spatial size; the
deploy graph holds no psi, no gate and no computation from parameters alone, unless the report
says why.
"""

from __future__ import annotations

import pytest

timm = pytest.importorskip("timm")
torch = pytest.importorskip("torch")

import torch.fx  # noqa: E402
from torch import nn  # noqa: E402

import asrfx  # noqa: E402
from helpers import randomize_psi, rel_err, sigmoid_nodes  # noqa: E402

pytestmark = pytest.mark.zoo

# the smallest model of a family per kind of attention / excitation spelling
TIMM = [
    "seresnet18",            # SE, module spelling
    "ecaresnet26t",          # ECA (conv1d across channels)
    "efficientnet_b0",       # SE with an in-place-capable SiLU, conv excitation
    "mobilenetv3_small_050",  # SE with hard-sigmoid
    "regnety_002",           # SE inside the bottleneck
    "gcresnext26ts",         # global context (attention pooling by matmul)
    "skresnet18",            # selective kernel over stacked branches
    "resnest14d",            # split attention over a reshaped grouped-conv map
    "eca_resnext26ts",       # ECA in a bottleneck with a BN-act subclass
    "rexnet_100",            # SE with BN in the excitation
    "ghostnet_050",          # SE (hard sigmoid) in ghost bottlenecks
    "mixnet_s",              # mixed-kernel convs with SE
    "tinynet_a",             # EfficientNet-style SE at another depth / width
    "seresnext26d_32x4d",    # SE in grouped bottlenecks
    "semnasnet_050",         # MNASNet with SE
    "fbnetv3_b",             # hard-swish / hard-sigmoid SE
    "lcnet_050",             # SE late in a depthwise net
    "ese_vovnet19b_dw",      # effective SE (one conv, hard sigmoid)
    "nf_regnet_b0",          # normaliser-free: weight-standardised convs, no BatchNorm
]


def _randomize_norms(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            # a traced-through BatchNorm subclass leaves a plain module holding its tensors
            stats = isinstance(m._buffers.get("running_var"), torch.Tensor)
            if stats:
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            for name in ("weight", "bias"):
                p = getattr(m, name, None) if stats or isinstance(
                    m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) else None
                if isinstance(p, torch.Tensor):
                    p.copy_(torch.rand(p.shape, generator=gen) + (0.5 if name == "weight"
                                                                   else -0.5))


def _batchnorms_after_convs(gm: torch.fx.GraphModule) -> list[str]:
    """BatchNorm calls (modules, or ``F.batch_norm`` of a traced-through subclass) whose input
    an exact Conv computes: what fusion should have removed."""
    def is_conv(n):
        return n.op == "call_module" and type(gm.get_submodule(str(n.target))) in (
            nn.Conv1d, nn.Conv2d, nn.Conv3d)

    left = []
    for n in gm.graph.nodes:
        bn = (n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)),
                                                    nn.modules.batchnorm._BatchNorm)) or \
            n.target is nn.functional.batch_norm
        if bn and n.args and isinstance(n.args[0], torch.fx.Node) and is_conv(n.args[0]):
            left.append(n.name)
    return left


TORCHVISION = ["efficientnet_b0", "mobilenet_v3_small", "regnet_y_400mf"]


def _build(source: str, name: str) -> nn.Module:
    if source == "timm":
        return timm.create_model(name, pretrained=False, num_classes=10)
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=10)


@pytest.mark.parametrize("source,name", [("timm", n) if isinstance(n, str) else
                                         pytest.param("timm", *n.values, marks=n.marks)
                                         for n in TIMM] +
                         [("torchvision", n) for n in TORCHVISION])
def test_zoo_model_folds_exactly_and_completely(source, name):
    torch.manual_seed(0)
    model = _build(source, name)
    x = torch.randn(2, 3, 64, 64)
    other = torch.randn(3, 3, 96, 80)
    prepared = asrfx.prepare(model, example_inputs=(x,))
    report = prepared.asrfx_report
    assert report.count(action="converted") > 0, report
    assert report.count(action="refused", kind="channel-attention") == 0, report

    # timm zero-initialises the last norm of each residual block and the last layer of some
    # excitations (GC's fc2): a gate on a zero map, or behind zero weights, gets no gradient in
    # any form. Random norms and nonzero weights first.
    _randomize_norms(prepared, 1)
    with torch.no_grad():
        for p in prepared.parameters():
            if p.dim() > 1 and not bool(p.any()):
                p.normal_(0, 0.02)
    prepared.train()
    opt = torch.optim.SGD(prepared.parameters(), lr=0.01)
    loss = nn.functional.cross_entropy(prepared(torch.randn(4, 3, 64, 64)),
                                       torch.randint(0, 10, (4,)))
    loss.backward()
    assert torch.isfinite(loss)
    grads = {n: p.grad for n, p in prepared.named_parameters() if n.endswith("psi")}
    assert sum(1 for g in grads.values() if g is not None and bool((g != 0).any())) \
        >= 0.9 * len(grads), "most psi must train"
    opt.step()
    prepared(other)  # train mode at another size

    _randomize_norms(prepared, 1)
    randomize_psi(prepared, 2)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    freport = deploy.asrfx_report
    assert not [s for s in freport.sites if s.code in ("psi-left", "constant-computation-left")]
    assert not [n for n, _ in deploy.named_parameters() if n.endswith("psi")]
    assert not sigmoid_nodes(deploy) or report.count(action="refused") > 0
    assert _batchnorms_after_convs(deploy) == [], freport
    prepared.eval()
    with torch.no_grad():
        for xi in (x, other):
            assert rel_err(prepared(xi), deploy(xi)) <= 1e-4


class _FeatureMaps(nn.Module):
    """A transformers backbone's feature maps as a tuple (its forward returns a dataclass)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return tuple(self.backbone(x).feature_maps)


class _Logits(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


def _other(name: str) -> tuple[nn.Module, torch.Tensor]:
    """(model, example input) of the models of other collections below."""
    if name.startswith("vit_pytorch:"):
        pytest.importorskip("einops")
        from vit_pytorch.max_vit import MaxViT

        model = MaxViT(num_classes=10, dim_conv_stem=16, dim=16, dim_head=8, depth=(1, 1),
                       window_size=4)
        return model, torch.randn(2, 3, 32, 32)
    transformers = pytest.importorskip("transformers")
    cls = name.split(":")[1]
    if cls == "EfficientNet":
        cfg = transformers.EfficientNetConfig(width_coefficient=1.0, depth_coefficient=1.0,
                                              hidden_dim=1280, num_labels=10)  # B0
        return _Logits(transformers.EfficientNetForImageClassification(cfg)), \
            torch.randn(2, 3, 64, 64)
    backbone = getattr(transformers, cls)(getattr(transformers, cls[:-len("Backbone")] +
                                                  "Config")())
    return _FeatureMaps(backbone), torch.randn(2, 3, 64, 64)


# (model, SE sites it has): einops layers spell MaxViT's SE; transformers' backbones record their
# feature maps with forward hooks installed by the forward itself (capture_outputs)
OTHERS = [("vit_pytorch:MaxViT", 2), ("transformers:EfficientNet", 16),
          ("transformers:PPLCNetV3Backbone", 2), ("transformers:PPLCNetV4Backbone", 5),
          ("transformers:ResNetBackbone", 0)]


@pytest.mark.parametrize("name,sites", OTHERS)
def test_other_collections_trace_whole_and_fold(name, sites):
    """Models of other collections are captured whole (no opaque submodule), their attention
    converted, and the fold exact at another batch and size."""
    import warnings

    torch.manual_seed(0)
    model, x = _other(name)
    model.eval()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        prepared = asrfx.prepare(model, example_inputs=(x,))
    assert not [str(w.message) for w in record if "opaque" in str(w.message)]
    assert prepared.asrfx_report.count(action="converted") == sites, prepared.asrfx_report
    _randomize_norms(prepared, 1)
    randomize_psi(prepared, 2)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    assert not [n for n, _ in deploy.named_parameters() if n.endswith("psi")]
    assert _batchnorms_after_convs(deploy) == [], deploy.asrfx_report
    other = torch.randn(3, *x.shape[1:-2], 2 * x.shape[-2], 2 * x.shape[-1])
    with torch.no_grad():
        for xi in (x, other):
            a, b = prepared(xi), deploy(xi)
            for u, v in zip(*((a, b) if isinstance(a, tuple) else ((a,), (b,)))):
                assert rel_err(u, v) <= 1e-4
