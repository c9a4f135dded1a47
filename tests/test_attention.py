"""Tests for asrfx.attention: the channel-attention library and its use in the zoo's ResNets.

Every registry entry is checked for shape preservation, torch.fx traceability (traced == eager),
input dependence of its gate, and (for every module) agreement with an independent computation of
its paper's equation written here with plain tensor ops.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import asrfx.attention as attention
from asrfx.attention import (ATTENTIONS, CBAM, ECA, GC, GCT, SE, SPA, SRM, CBAMChannel,
                             ECATranspose, EffectiveSE, make_attention)
from asrfx.zoo import BasicBlock, Bottleneck, SEModule, cifar_resnet

NAMES = ["se", "ese", "eca", "eca_transpose", "srm", "gct", "cbam", "cbam_channel", "spa", "gc"]
TWO_D_ONLY = {"eca_transpose", "spa", "gc"}
ANY_DIMS = [n for n in NAMES if n not in TWO_D_ONLY]
ADDITIVE = {"gc"}  # fusion x + f(x); every other module is x * g
C = 64


# every test starts from torch.manual_seed(0): conftest._deterministic_torch


def spatial_shape(dims: int) -> tuple:
    return {1: (12,), 2: (8, 8), 3: (4, 6, 4)}[dims]


def randomize(module: nn.Module) -> nn.Module:
    """Non-trivial parameters and BatchNorm statistics, eval mode (BN uses running stats)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, GCT):  # fresh GCT is the identity (gamma = beta = 0)
                m.alpha.copy_(1 + 0.5 * torch.rand(m.alpha.shape, generator=gen))
                m.gamma.copy_(torch.randn(m.gamma.shape, generator=gen))
                m.beta.copy_(0.5 * torch.randn(m.beta.shape, generator=gen))
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen))
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen))
    return module.eval()


def build(name: str, dims: int = 2, channels: int = C) -> nn.Module:
    return randomize(make_attention(name, channels, dims=dims))


# --------------------------------------------------------------------------
# independent references: each paper's equation in plain tensor ops


def _sp(x):
    return tuple(range(2, x.dim()))


def _bcast(g, x):
    """(N, C) -> (N, C, 1, ..., 1) matching x."""
    return g.reshape(g.shape + (1,) * (x.dim() - 2))


def ref_se(m: SEModule, x):
    y = x.mean(_sp(x))
    h = torch.relu(y @ m.fc1.weight.T + m.fc1.bias)
    return x * _bcast(torch.sigmoid(h @ m.fc2.weight.T + m.fc2.bias), x)


def ref_ese(m: EffectiveSE, x):
    c = x.shape[1]
    y = x.mean(_sp(x))
    z = y @ m.fc.weight.reshape(c, c).T + m.fc.bias
    return x * _bcast(torch.clamp(z / 6 + 0.5, 0, 1), x)  # hard sigmoid relu6(z + 3) / 6


def ref_eca(m, x):
    y = x.mean(_sp(x))  # (N, C)
    w = m.conv.weight.flatten()
    k = w.numel()
    pad = torch.zeros(y.shape[0], k // 2)
    yp = torch.cat([pad, y, pad], 1)
    z = sum(w[j] * yp[:, j:j + y.shape[1]] for j in range(k))  # z_c = sum_j w_j y_{c + j - k//2}
    return x * _bcast(torch.sigmoid(z), x)


def ref_srm(m: SRM, x):
    mu = x.mean(_sp(x))
    sigma = torch.sqrt(((x - _bcast(mu, x)) ** 2).mean(_sp(x)) + 1e-5)
    w = m.cfc.weight[:, 0, :]  # (C, 2): one weight per channel and statistic
    z = w[:, 0] * mu + w[:, 1] * sigma
    bn = m.bn
    z = (z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    return x * _bcast(torch.sigmoid(z), x)


def ref_gct(m: GCT, x):
    c = x.shape[1]
    s = m.alpha.flatten() * torch.sqrt((x ** 2).sum(_sp(x)) + m.epsilon)  # (N, C)
    # paper form: s_hat = sqrt(C) s / ||s||_2 (eps scaled by C to match mean-form exactly)
    s_hat = math.sqrt(c) * s / torch.sqrt((s ** 2).sum(1, keepdim=True) + c * m.epsilon)
    g = 1 + torch.tanh(m.gamma.flatten() * s_hat + m.beta.flatten())
    return x * _bcast(g, x)


def _ref_cbam_channel(m: CBAMChannel, x):
    c = x.shape[1]
    w1 = m.mlp[0].weight.reshape(-1, c)
    w2 = m.mlp[2].weight.reshape(c, -1)

    def mlp(v):
        return torch.relu(v @ w1.T) @ w2.T

    g = torch.sigmoid(mlp(x.mean(_sp(x))) + mlp(x.flatten(2).max(-1).values))
    return x * _bcast(g, x)


def ref_cbam(m: CBAM, x):
    x1 = _ref_cbam_channel(m.channel, x)
    s = torch.cat([x1.mean(1, keepdim=True), x1.max(1, keepdim=True).values], 1)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[x.dim() - 2]
    a = conv(s, m.spatial.weight, m.spatial.bias, padding=m.kernel_size // 2)
    return x1 * torch.sigmoid(a)


def ref_spa(m: SPA, x):
    n, c, h, w = x.shape  # 8x8: pools are exact block means

    def pool(s):
        return x.reshape(n, c, s, h // s, s, w // s).mean((3, 5)).reshape(n, -1)

    p = torch.cat([pool(1), pool(2), pool(4)], 1)
    g = torch.sigmoid(torch.relu(p @ m.fc1.weight.T + m.fc1.bias) @ m.fc2.weight.T + m.fc2.bias)
    return x * _bcast(g, x)


def ref_gc(m: GC, x):
    n, c = x.shape[:2]
    xf = x.reshape(n, c, -1)
    logits = torch.einsum("c,ncs->ns", m.conv_mask.weight.flatten(), xf) + m.conv_mask.bias
    a = torch.exp(logits - logits.max(1, keepdim=True).values)
    a = a / a.sum(1, keepdim=True)
    ctx = torch.einsum("ncs,ns->nc", xf, a)
    conv1, ln, _, conv2 = m.transform
    h = ctx @ conv1.weight.reshape(-1, c).T + conv1.bias
    h = (h - h.mean(1, keepdim=True)) / torch.sqrt(h.var(1, unbiased=False, keepdim=True) + ln.eps)
    h = torch.relu(h * ln.weight.flatten() + ln.bias.flatten())
    out = h @ conv2.weight.reshape(c, -1).T + conv2.bias
    return x + _bcast(out, x)


REFERENCES = {
    "se": ref_se, "ese": ref_ese, "eca": ref_eca, "eca_transpose": ref_eca, "srm": ref_srm,
    "gct": ref_gct, "cbam": ref_cbam, "cbam_channel": _ref_cbam_channel, "spa": ref_spa,
    "gc": ref_gc,
}


# --------------------------------------------------------------------------
# registry and API


def test_registry_names_classes_and_all():
    assert list(ATTENTIONS) == NAMES
    assert ATTENTIONS["se"] is SE is SEModule
    expected = {"ese": EffectiveSE, "eca": ECA, "eca_transpose": ECATranspose, "srm": SRM,
                "gct": GCT, "cbam": CBAM, "cbam_channel": CBAMChannel, "spa": SPA, "gc": GC}
    for name, cls in expected.items():
        assert ATTENTIONS[name] is cls
    assert set(attention.__all__) == {
        "SE", "EffectiveSE", "ECA", "ECATranspose", "SRM", "GCT", "CBAM", "CBAMChannel", "SPA",
        "GC", "ATTENTIONS", "make_attention", "TokenSE"}
    for name in attention.__all__:
        assert hasattr(attention, name)


@pytest.mark.parametrize("name", NAMES)
def test_docstrings_cite_the_paper(name):
    doc = ATTENTIONS[name].__doc__
    assert doc and "20" in doc  # a year
    if name == "spa":
        assert "ICME 2020" in doc
    else:
        assert "arXiv:" in doc


@pytest.mark.parametrize("bad", ["SE", "nope", "", None, 3])
def test_make_attention_unknown_name_lists_names(bad):
    with pytest.raises(ValueError) as err:
        make_attention(bad, 16)
    for name in NAMES:
        assert repr(name) in str(err.value)


@pytest.mark.parametrize("name", sorted(TWO_D_ONLY))
@pytest.mark.parametrize("dims", [1, 3])
def test_two_d_only_modules_reject_other_dims(name, dims):
    with pytest.raises(ValueError, match="dims=2"):
        make_attention(name, 16, dims=dims)


@pytest.mark.parametrize("name", NAMES)
def test_bad_arguments_raise(name):
    with pytest.raises(ValueError):
        make_attention(name, 0)
    with pytest.raises(ValueError, match="dims"):
        make_attention(name, 16, dims=4)


def test_hyperparameters():
    # ECA: k = |log2(C)/2 + 1/2|_odd
    assert [ECA(c).kernel_size for c in (16, 32, 64, 128, 256, 512, 1024)] == [3, 3, 3, 5, 5, 5, 5]
    assert ECA(64).conv.padding == (1,) and ECA(64).conv.bias is None
    assert ECATranspose(512).kernel_size == 5
    assert ECA(256, gamma=1, b=0).kernel_size == 9
    # eSE: one full-width 1x1 conv with bias
    ese = EffectiveSE(32)
    assert ese.fc.weight.shape == (32, 32, 1, 1) and ese.fc.bias is not None
    # SRM: channel-wise FC over (mean, std), BN1d
    srm = SRM(32)
    assert srm.cfc.weight.shape == (32, 1, 2) and srm.cfc.bias is None
    assert isinstance(srm.bn, nn.BatchNorm1d)
    # GCT: identity at init
    gct = GCT(32, dims=3)
    assert gct.alpha.shape == (1, 32, 1, 1, 1)
    x = torch.randn(2, 32, 3, 4, 5)
    torch.testing.assert_close(gct(x), x)
    # CBAM / SPA / GC widths
    cbam = CBAM(64, reduction=8)
    assert cbam.channel.mlp[0].weight.shape == (8, 64, 1, 1) and cbam.spatial.weight.shape == (1, 2, 7, 7)
    assert CBAMChannel(8).mlp[0].out_channels == 1
    with pytest.raises(ValueError):
        CBAM(64, kernel_size=4)
    assert SPA(64).fc1.in_features == 64 * 21 and SPA(64).fc2.out_features == 64
    gc = GC(64)
    assert gc.transform[1].normalized_shape == (4, 1, 1)
    gc0 = GC(64, zero_init_last=True)
    x = torch.randn(2, 64, 5, 5)
    torch.testing.assert_close(gc0(x), x)


# --------------------------------------------------------------------------
# per-module behaviour: shape, tracing, input dependence, reference equation


def _dims_cases():
    return [(n, 2) for n in NAMES] + [(n, d) for n in ANY_DIMS for d in (1, 3)]


@pytest.mark.parametrize("name,dims", _dims_cases())
def test_shape_and_reference(name, dims):
    m = build(name, dims)
    x = torch.randn(3, C, *spatial_shape(dims))
    with torch.no_grad():
        out = m(x)
        expected = REFERENCES[name](m, x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,dims", _dims_cases())
def test_fx_trace_matches_eager(name, dims):
    m = build(name, dims)
    gm = torch.fx.symbolic_trace(m)
    assert isinstance(gm, torch.fx.GraphModule)
    # no fx-unfriendly calls got baked in: a different batch size and spatial size still work
    for batch, scale in ((2, 1), (5, 2)):
        x = torch.randn(batch, C, *(s * scale for s in spatial_shape(dims)))
        with torch.no_grad():
            torch.testing.assert_close(gm(x), m(x))


@pytest.mark.parametrize("name", NAMES)
def test_train_mode_runs_and_traces(name):
    m = make_attention(name, C).train()
    x = torch.randn(4, C, 8, 8, requires_grad=True)
    out = m(x)
    out.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    gm = torch.fx.symbolic_trace(m)
    x = torch.randn(4, C, 8, 8)
    torch.testing.assert_close(gm(x), m(x))


def _gate(name, m, x):
    out = m(x)
    return out - x if name in ADDITIVE else out / x


@pytest.mark.parametrize("name,dims", _dims_cases())
def test_gate_depends_on_input(name, dims):
    m = build(name, dims)
    shape = (2, C, *spatial_shape(dims))
    # |x| >= 0.5 so out / x is the gate; signed, with different statistics per input
    sign1 = torch.randint(0, 2, shape) * 2 - 1
    sign2 = torch.where(torch.rand(1, C, *([1] * dims)) < 0.8, 1, -1)
    x1 = sign1 * (torch.rand(shape) + 0.5)
    x2 = sign2 * (3 * torch.rand(shape) * torch.rand(1, C, *([1] * dims)) + 0.5)
    with torch.no_grad():
        g1, g2 = _gate(name, m, x1), _gate(name, m, x2)
    assert torch.isfinite(g1).all() and torch.isfinite(g2).all()
    assert (g1 - g2).abs().max() > 1e-3
    if name not in ADDITIVE and name != "cbam":
        # a per-channel gate: constant over the spatial positions of each (sample, channel)
        flat = g1.flatten(2)
        torch.testing.assert_close(flat, flat[..., :1].expand_as(flat))


def test_eca_spellings_agree():
    a, b = ECA(128), ECATranspose(128)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 128, 5, 7)
    torch.testing.assert_close(a(x), b(x))


def test_cbam_is_channel_then_spatial():
    m = build("cbam")
    ch = CBAMChannel(C)
    ch.load_state_dict(m.channel.state_dict())
    x = torch.randn(2, C, 8, 8)
    with torch.no_grad():
        x1 = ch(x)
        ratio = m(x) / x1
    # the spatial map is per position, shared by all channels
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))


def test_gct_is_batch_independent():
    # GCT normalizes across channels of one sample, never across the batch
    m = build("gct")
    x = torch.randn(4, C, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(m(x)[1:2], m(x[1:2]))


def test_no_shared_state_between_instances():
    a, b = make_attention("gct", 16), make_attention("gct", 16)
    with torch.no_grad():
        a.gamma.fill_(1.0)
    assert torch.all(b.gamma == 0)
    assert list(ATTENTIONS) == NAMES


# --------------------------------------------------------------------------
# in the zoo's ResNets


def _blocks(model):
    return [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]


@pytest.mark.parametrize("name", NAMES)
def test_cifar_resnet20_with_every_attention(name):
    model = cifar_resnet(20, attention=name, block="basic", num_classes=10)
    cls = ATTENTIONS[name]
    blocks = _blocks(model)
    atts = [m for m in model.modules() if type(m) is cls]
    assert len(blocks) == 9 and len(atts) == len(blocks)
    for b in blocks:
        assert type(b.attention) is cls
        assert b.attention.channels == b.out_planes
    x = torch.randn(2, 3, 32, 32)
    out = model(x)  # train mode
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    model.eval()
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


def test_cifar_resnet_se_unchanged():
    model = cifar_resnet(20, attention="se", block="basic")
    assert all(type(b.attention) is SEModule and b.attention.reduction == 16 for b in _blocks(model))


@pytest.mark.parametrize("name", ANY_DIMS)
def test_cifar_resnet_dims1_and_dims3(name):
    m1 = cifar_resnet(8, attention=name, block="basic", in_channels=1, num_classes=5, dims=1)
    assert all(type(b.attention) is ATTENTIONS[name] for b in _blocks(m1))
    assert m1(torch.randn(2, 1, 24)).shape == (2, 5)
    m3 = cifar_resnet(8, attention=name, block="basic", in_channels=1, num_classes=5, dims=3,
                      width=4)
    assert m3(torch.randn(2, 1, 8, 8, 8)).shape == (2, 5)


@pytest.mark.parametrize("name", sorted(TWO_D_ONLY))
def test_cifar_resnet_two_d_only_reject_dims1(name):
    with pytest.raises(ValueError, match="dims=2"):
        cifar_resnet(8, attention=name, block="basic", dims=1)


def test_cifar_resnet_unknown_name_lists_library_names():
    with pytest.raises(ValueError) as err:
        cifar_resnet(20, attention="CBAM", block="basic")
    for name in NAMES:
        assert repr(name) in str(err.value)
