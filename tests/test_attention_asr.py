"""Every attention of the library, and the forms found in the wild, through prepare and fold.

Each check randomises BatchNorm statistics before comparing, trains a step first, and compares the
folded graph with the folded plain backbone: after the fold nothing of a channel attention may be
left (CBAM's spatial half is per position and input-dependent: it must stay, and be reported).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asrfx
from asrfx.attention import ATTENTIONS, SPA, SRM
from asrfx.zoo import SEModule, cifar_resnet
from helpers import (BAMGate, assert_outputs_close, assert_prepare_changes_nothing, node_kinds, randomize_bn,
                     randomize_psi, rel_err)

X16 = (4, 3, 16, 16)


def _train_step(model: nn.Module, x: torch.Tensor) -> None:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    F.cross_entropy(model(x), torch.randint(0, 10, (x.shape[0],))).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # deep nets, random labels
    opt.step()


def _roundtrip(depth: int, block: str, name: str):
    torch.manual_seed(0)
    model = cifar_resnet(depth, attention=name, block=block, num_classes=10)
    x = torch.randn(*X16)
    prepared = asrfx.prepare(model, example_inputs=(x,))
    _train_step(prepared, x)
    randomize_bn(prepared, seed=1)
    randomize_psi(prepared, seed=2)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    assert_outputs_close(prepared, deploy, x, torch.randn(2, 3, 16, 16))
    plain = asrfx.fold(randomize_bn(cifar_resnet(depth, block=block, num_classes=10), 1),
                       example_inputs=(x,))
    return model, prepared, deploy, plain


def _blocks(depth: int, block: str) -> int:
    return 3 * ((depth - 2) // (6 if block == "basic" else 9))


@pytest.mark.parametrize("name", sorted(ATTENTIONS))
def test_library_module_in_resnet56(name):
    model, prepared, deploy, plain = _roundtrip(56, "basic", name)
    n = _blocks(56, "basic")
    report = prepared.asrfx_report
    assert report.count(action="converted") == n
    assert deploy.asrfx_report.count(action="folded", kind="channel scale") == n
    assert deploy.asrfx_report.count(action="kept", kind="channel scale") == 0
    if name == "cbam":
        # the spatial half stays: per-position and input-dependent. It is reported, twice.
        assert report.count(action="refused", kind="spatial attention") == n
        assert deploy.asrfx_report.count(action="kept", kind="spatial attention") == n
        assert node_kinds(deploy) != node_kinds(plain)
    else:
        assert node_kinds(deploy) == node_kinds(plain)


@pytest.mark.parametrize("name", ["se", "gc"] + [pytest.param(n, marks=pytest.mark.slow)
                                                  for n in sorted(ATTENTIONS)
                                                  if n not in ("se", "gc", "cbam")])
def test_library_module_in_resnet164(name):
    model, prepared, deploy, plain = _roundtrip(164, "bottleneck", name)
    assert prepared.asrfx_report.count(action="converted") == _blocks(164, "bottleneck")
    assert node_kinds(deploy) == node_kinds(plain)


def test_multi_statistic_modules_get_one_psi_per_statistic():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 8, 8)
    for module, shapes in ((SRM(8), [(1, 8), (1, 8)]),
                           (SPA(8, reduction=4), [(1, 8, 1, 1), (1, 8, 2, 2), (1, 8, 4, 4)])):
        prepared = asrfx.prepare(nn.Sequential(nn.BatchNorm2d(8), module), example_inputs=(x,))
        psis = {n: tuple(p.shape) for n, p in prepared.named_parameters() if n.endswith("psi")}
        assert sorted(psis.values()) == sorted(shapes), psis


def test_calibrate_multi_statistic_srm():
    """SRM reads mean and variance (its std is sqrt(var + eps), computed in the branch from the
    pooled variance): each psi starts at its own statistic's mean over the calibration data."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), SRM(8))
    data = [torch.randn(6, 3, 8, 8) for _ in range(2)]
    prepared = asrfx.prepare(model, example_inputs=(data[0],), init="calibrate",
                             calibration_data=data)
    model.eval()
    with torch.no_grad():
        feats = torch.cat([model[1](model[0](d)) for d in data])
    mean = feats.mean((2, 3)).mean(0, keepdim=True)
    var = feats.var((2, 3), unbiased=False).mean(0, keepdim=True)
    psis = {n: p.detach() for n, p in prepared.named_parameters() if n.endswith("psi")}
    got = sorted(psis.values(), key=lambda t: float(t.sum()))
    want = sorted([mean, var], key=lambda t: float(t.sum()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


# --- insertion ---------------------------------------------------------------------------------


@pytest.mark.parametrize("where,every,expected", [
    ("block_output", 1, 9), ("block_output", 2, 5), ("block_output", 4, 3),
    ("every_bn", 1, 21), ("every_bn", 3, 7),
])
def test_insertion_fires_the_expected_number_of_sites(where, every, expected):
    torch.manual_seed(0)
    model = cifar_resnet(20, block="basic", num_classes=10)
    x = torch.randn(*X16)
    prepared = asrfx.prepare(model, example_inputs=(x,), insert="se", where=where, every=every)
    assert prepared.asrfx_report.count(action="inserted") == expected
    assert len([n for n, _ in prepared.named_parameters() if n.endswith("psi")]) == expected
    _train_step(prepared, x)
    randomize_bn(prepared, seed=3)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    plain = asrfx.fold(randomize_bn(cifar_resnet(20, block="basic", num_classes=10), 3),
                       example_inputs=(x,))
    assert node_kinds(deploy) == node_kinds(plain)
    prepared.eval()
    with torch.no_grad():
        assert rel_err(prepared(x), deploy(x)) <= 1e-4


def test_block_output_is_after_the_last_norm_of_the_main_branch():
    model = cifar_resnet(20, block="basic", num_classes=10)
    prepared = asrfx.prepare(model, example_inputs=(torch.randn(*X16),), insert="eca")
    paths = [s.path for s in prepared.asrfx_report.sites if s.action == "inserted"]
    # downsampling blocks have a shortcut BN too (layer2.0.downsample.1): never chosen
    assert paths == [f"layer{s}.{b}.bn2_asr" for s in (1, 2, 3) for b in range(3)]


def test_insertion_with_a_predicate_and_a_callable():
    model = cifar_resnet(20, block="basic", num_classes=10)
    x = torch.randn(*X16)
    made = []

    def factory(c):
        made.append(c)
        return asrfx.attention.EffectiveSE(c)

    prepared = asrfx.prepare(model, example_inputs=(x,), insert=factory,
                             where=lambda path, node: path.startswith("layer3") and
                             path.endswith("bn1"))
    assert made == [64, 64, 64]
    assert prepared.asrfx_report.count(action="inserted") == 3


@pytest.mark.parametrize("mode,kept,converted,added", [
    (None, 9, 0, 0), ("replace", 0, 9, 0), ("both", 0, 0, 9)])
def test_insertion_next_to_existing_attention(mode, kept, converted, added):
    model = cifar_resnet(20, attention="se", block="basic", num_classes=10)
    x = torch.randn(*X16)
    prepared = asrfx.prepare(model, example_inputs=(x,), insert="eca", mode=mode)
    r = prepared.asrfx_report
    assert (r.count(action="inserted"), r.count(action="kept"), r.count(action="converted"),
            r.count(action="added")) == (9, kept, converted, added)
    randomize_bn(prepared, seed=4)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    prepared.eval()
    with torch.no_grad():
        assert rel_err(prepared(x), deploy(x)) <= 1e-4


def test_insertion_errors():
    model = cifar_resnet(8, block="basic", num_classes=10)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(asrfx.InputError, match="not a known attention"):
        asrfx.prepare(model, example_inputs=(x,), insert="nope")
    with pytest.raises(asrfx.InputError, match="every"):
        asrfx.prepare(model, example_inputs=(x,), insert="se", every=0)
    with pytest.raises(asrfx.InputError, match="where"):
        asrfx.prepare(model, example_inputs=(x,), insert="se", where="everywhere")
    with pytest.raises(asrfx.InputError, match="nn.Module"):
        asrfx.prepare(model, example_inputs=(x,), insert=lambda c: 3)


# --- forms found in the wild, written here ----------------------------------------------------


class SelectiveKernel(nn.Module):
    """SKNet-style (Li et al., CVPR 2019, arXiv 1903.06586): two branches, one pooled descriptor,
    a softmax across branches gives each branch a per-channel weight."""

    def __init__(self, c):
        super().__init__()
        self.b3 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.b5 = nn.Sequential(nn.Conv2d(c, c, 3, padding=2, dilation=2, bias=False),
                                nn.BatchNorm2d(c))
        self.fc = nn.Linear(c, c // 2)
        self.heads = nn.Linear(c // 2, 2 * c)

    def forward(self, x):
        u3, u5 = self.b3(x), self.b5(x)
        z = F.relu(self.fc((u3 + u5).mean((2, 3))))
        a = self.heads(z).view(x.shape[0], 2, -1).softmax(dim=1)
        return u3 * a[:, 0, :, None, None] + u5 * a[:, 1, :, None, None]


class FunctionalGC(nn.Module):
    """Additive global context in functional spelling: x + W2 relu(W1 mean(x))."""

    def __init__(self, c):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(c // 2, c) * 0.2)
        self.w2 = nn.Parameter(torch.randn(c, c // 2) * 0.2)

    def forward(self, x):
        ctx = F.linear(F.relu(F.linear(x.mean((2, 3)), self.w1)), self.w2)
        return x + ctx[:, :, None, None]


class ResidualGate(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc = nn.Linear(c, c)

    def forward(self, x):
        return x + x * torch.sigmoid(self.fc(F.adaptive_max_pool2d(x, 1).flatten(1)))[..., None,
                                                                                        None]


@pytest.mark.parametrize("block,sites", [(SelectiveKernel, 2), (FunctionalGC, 1),
                                         (ResidualGate, 1)])
def test_forms_in_the_wild(block, sites):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), block(8),
                          nn.ReLU(), nn.Conv2d(8, 4, 1))
    x = torch.randn(4, 3, 8, 8)
    prepared = asrfx.prepare(model, example_inputs=(x,))
    assert prepared.asrfx_report.count(action="converted") == sites
    n_psi = len([n for n, _ in prepared.named_parameters() if n.endswith("psi")])
    assert n_psi == 1  # SK's two gates share one pooled descriptor, so one psi
    prepared.train()
    prepared(x).sum().backward()
    assert all(p.grad is not None for n, p in prepared.named_parameters() if n.endswith("psi"))
    randomize_bn(prepared, seed=5)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    r = deploy.asrfx_report
    assert r.count(action="kept", kind="channel scale") == 0
    assert r.count(action="folded", kind="channel scale") == sites
    ops = {str(n.target) for n in deploy.graph.nodes if n.op != "call_module"}
    assert not any(k in o for o in ops for k in ("softmax", "sigmoid", "mean", "linear"))
    prepared.eval()
    with torch.no_grad():
        assert rel_err(prepared(x), deploy(x)) <= 1e-4


def test_self_attention_is_never_touched():
    class TokenMixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)
            self.mha = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, t):
            q, k, v = self.qkv(t).chunk(3, dim=-1)
            att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(16), dim=-1)
            return self.mha(att @ v, t, t)[0]

    model = TokenMixer()
    x = torch.randn(2, 10, 16)
    assert_prepare_changes_nothing(model, x)


@pytest.mark.parametrize("name", sorted(ATTENTIONS))
def test_library_module_inserted_by_prepare_into_resnet56(name):
    torch.manual_seed(0)
    x = torch.randn(*X16)
    prepared = asrfx.prepare(cifar_resnet(56, block="basic", num_classes=10),
                             example_inputs=(x,), insert=name)
    n = _blocks(56, "basic")
    assert prepared.asrfx_report.count(action="inserted") == n
    _train_step(prepared, x)
    randomize_bn(prepared, seed=6)
    randomize_psi(prepared, seed=7)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    prepared.eval()
    with torch.no_grad():
        assert rel_err(prepared(x), deploy(x)) <= 1e-4
    plain = asrfx.fold(randomize_bn(cifar_resnet(56, block="basic", num_classes=10), 6),
                       example_inputs=(x,))
    if name == "cbam":  # the spatial half of inserted CBAM is input-dependent and stays
        assert deploy.asrfx_report.count(action="kept", kind="spatial attention") == n
    else:
        assert node_kinds(deploy) == node_kinds(plain)


class _BamThenSE(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.bam = BAMGate(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.se = SEModule(c, reduction=4)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.bam(torch.relu(self.b1(self.c1(x))))
        x = self.se(self.b2(self.c2(x)))
        return self.head(x.mean((2, 3)))


def test_element_wise_attention_is_reported_by_prepare_and_fold():
    """BAM's gate is per channel and position: refused with a reason by prepare, kept and named
    by fold, while the SE beside it converts and folds."""
    x = torch.randn(2, 3, 16, 16)
    model = randomize_bn(_BamThenSE(), 3).eval()
    prepared = asrfx.prepare(model, example_inputs=(x,))
    report = prepared.asrfx_report
    assert report.count(action="converted") == 1
    (bam,) = [s for s in report.sites if s.kind == "element-wise attention"]
    assert (bam.path, bam.action, bam.code) == ("bam", "refused", "element-attention")
    assert "per channel and position" in bam.reason
    randomize_psi(prepared, 4)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    assert deploy.asrfx_report.count(action="kept", kind="element-wise attention") == 1
    assert deploy.asrfx_report.count(action="folded", kind="channel scale") == 1
    assert_outputs_close(prepared, deploy, x, torch.randn(3, 3, 24, 20))
