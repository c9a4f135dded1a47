"""einops inside models: layers (``Rearrange``, ``Reduce``, ``EinMix``) and functions
(``rearrange``, ``reduce``, ``repeat``, ``parse_shape``) are traced into torch operators, so the
attention they spell is found, converted and folded (vit-pytorch's MaxViT writes its SE so)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.fx as fx
from torch import nn

import asrfx
from helpers import randomize_bn, randomize_psi, rel_err, roundtrip

einops = pytest.importorskip("einops")
from einops import parse_shape, rearrange, reduce, repeat  # noqa: E402
from einops.layers.torch import EinMix, Rearrange, Reduce  # noqa: E402


class EinSE(nn.Module):
    """Squeeze-excitation written with einops layers (as vit-pytorch's MaxViT writes it)."""

    def __init__(self, c: int, r: int = 4):
        super().__init__()
        self.gate = nn.Sequential(Reduce("b c h w -> b c", "mean"), nn.Linear(c, c // r),
                                  nn.SiLU(), nn.Linear(c // r, c), nn.Sigmoid(),
                                  Rearrange("b c -> b c 1 1"))

    def forward(self, x):
        return x * self.gate(x)


class EinFunctionalSE(nn.Module):
    """Squeeze-excitation written with einops functions, 1x1 convolutions."""

    def __init__(self, c: int, r: int = 4):
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = reduce(x, "b c h w -> b c 1 1", "mean")
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


def mbconv(c: int, se: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, 2 * c, 1), nn.BatchNorm2d(2 * c), nn.GELU(),
                         nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c),
                         nn.BatchNorm2d(2 * c), nn.GELU(), se,
                         nn.Conv2d(2 * c, c, 1), nn.BatchNorm2d(c))


class PatchNet(nn.Module):
    """A conv stem, two MBConv blocks (einops SE), a patch embedding that splits the image into
    2x2 patches (rearrange with an axis decomposition), a class token (repeat), token mixing
    with EinMix, and a head that pools tokens (reduce)."""

    def __init__(self, c: int = 8, functional: bool = False):
        super().__init__()
        se = EinFunctionalSE if functional else EinSE
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.block1 = mbconv(c, se(2 * c))
        self.block2 = mbconv(c, se(2 * c))
        self.embed = nn.Linear(4 * c, 16)
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        self.mix = EinMix("b t d -> b t e", weight_shape="d e", bias_shape="e", d=16, e=16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.block1(x)
        x = x + self.block2(x)
        tokens = rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=2, p2=2)
        tokens = self.embed(tokens)
        cls = repeat(self.cls, "1 1 d -> b 1 d", **parse_shape(tokens, "b _ _"))
        tokens = self.mix(torch.cat([cls, tokens], dim=1))
        return self.head(reduce(tokens, "b t d -> b d", "mean"))


def _no_opaque(record) -> None:
    opaque = [str(w.message) for w in record if "opaque" in str(w.message)]
    assert not opaque, opaque


@pytest.mark.parametrize("functional", [False, True], ids=["layers", "functions"])
def test_einops_se_is_converted_and_folded_at_other_shapes(functional):
    torch.manual_seed(0)
    model = PatchNet(functional=functional).eval()
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        prepared, deploy = roundtrip(model, x, torch.randn(3, 3, 16, 16),
                                     torch.randn(1, 3, 24, 32))
    _no_opaque(record)
    assert prepared.asrfx_report.count(action="converted") == 2
    # both constants end in the projection convolutions after the SE
    assert deploy.asrfx_report.count(action="folded") == 2
    # kept: the class token, whose repeat follows the batch, and EinMix's bias (no attention)
    kept = sorted(s.path for s in deploy.asrfx_report.sites if s.action == "kept")
    assert kept == ["", "mix"], deploy.asrfx_report
    # no multiply by a gate is left, and no einops call either: only torch operators
    assert not any(n.target is torch.sigmoid or isinstance(n.target, str) and "sigmoid" in
                   n.target for n in deploy.graph.nodes)


def test_einops_reshape_sizes_follow_the_input():
    """The patch split reads its sizes from the traced shape: a model traced at 16x16 runs at
    24x32 and at another batch, equal to the eager model (nothing baked from the example)."""
    torch.manual_seed(1)
    model = PatchNet().eval()
    randomize_bn(model, seed=3)
    gm = asrfx.trace(model, example_inputs=(torch.randn(2, 3, 16, 16),))
    assert not any(type(m).__module__.startswith("einops") for m in gm.modules())
    with torch.no_grad():
        for shape in [(2, 3, 16, 16), (5, 3, 24, 32), (1, 3, 8, 40)]:
            xi = torch.randn(*shape)
            assert rel_err(model(xi), gm(xi)) <= 1e-6


def test_einops_model_trains_in_both_training_forms():
    """prepare's multiply form and its fused form (gates through the BatchNorms) of an einops
    model: equal outputs, gradients and statistics over training steps, the same deploy
    model."""
    from test_fused_training import _assert_same_training, _pair

    torch.manual_seed(2)
    plain, fused = _pair(PatchNet().eval())
    randomize_psi(plain, seed=5)
    fused.load_state_dict(plain.state_dict())
    _assert_same_training(plain, fused)


def test_ndim_is_answered_from_the_example():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 4)

        def forward(self, x):
            if x.ndim == 4:  # a Python branch on the rank
                x = x.flatten(2).mean(-1)
            axes = list(range(1, x.ndim))
            return self.fc(torch.cat([x, x.amax(dim=axes, keepdim=True).expand_as(x)], 1)[:, :12])

    model = Flat().eval()
    x = torch.randn(2, 6, 4, 4)
    gm = asrfx.trace(model, example_inputs=(x,))
    xi = torch.randn(3, 6, 5, 7)
    with torch.no_grad():
        assert rel_err(model(xi), gm(xi)) <= 1e-6


def test_einops_outside_a_trace_is_untouched():
    from einops import _backends

    model = PatchNet().eval()
    asrfx.prepare(model, example_inputs=(torch.randn(2, 3, 16, 16),))
    assert not any(issubclass(t, fx.Proxy) for t in _backends._type2backend)
    t = torch.arange(24.).reshape(2, 3, 4)
    assert torch.equal(rearrange(t, "a b c -> c (a b)"), t.permute(2, 0, 1).reshape(4, 6))
    # fx's own tracer still refuses einops functions, as before asrfx traced anything
    with pytest.raises(Exception, match="einops"):
        fx.symbolic_trace(EinFunctionalSE(8))


def test_einops_without_example_inputs_stays_opaque_with_a_warning():
    """The rank einops needs comes from the example inputs: without them the block is an opaque
    call, named in a warning, and the trace still runs the model right."""
    model = nn.Sequential(nn.Conv2d(3, 8, 1), EinSE(8)).eval()
    with pytest.warns(UserWarning, match=r"'1\.gate\.0'.*example_inputs"):
        gm = asrfx.trace(model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(model(x), gm(x)) <= 1e-6


class RegisterTokens(nn.Module):
    """Register tokens packed beside the patch tokens and split off again (einops ``pack`` /
    ``unpack``, as vit-pytorch's ViTs with registers write it), after a conv stem with an
    einops SE."""

    def __init__(self, c: int = 8, registers: int = 2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.se = EinSE(c)
        self.registers = nn.Parameter(torch.randn(registers, c))
        self.mix = nn.Linear(c, c)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        t = rearrange(self.se(self.stem(x)), "b c h w -> b (h w) c")
        r = repeat(self.registers, "n d -> b n d", b=t.shape[0])
        t, ps = einops.pack([r, t], "b * d")
        t = self.mix(t)
        r, t = einops.unpack(t, ps, "b * d")
        return self.head(t.mean(1) + r.mean(1))


def test_pack_and_unpack_are_recorded_as_calls():
    torch.manual_seed(3)
    model = RegisterTokens().eval()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        prepared, deploy = roundtrip(model, x, torch.randn(3, 3, 12, 10))
    _no_opaque(record)
    assert prepared.asrfx_report.count(action="converted") == 1
    assert {n.target for n in deploy.graph.nodes if n.op == "call_function"} >= \
        {einops.pack, einops.unpack}


class SlicedPositions(nn.Module):
    """Learned positions sliced to the number of tokens, ``x + pos[:, :n]`` with ``n`` read from
    tokens that ``pack`` returned (XCiT in vit-pytorch): nothing in the graph says whether dim
    1 of those tokens holds channels or positions, so the slice must stay computed."""

    def __init__(self, c: int = 8, most: int = 64):
        super().__init__()
        self.embed = nn.Conv2d(3, c, 2, 2)
        self.pos = nn.Parameter(torch.randn(1, most, c))
        self.head = nn.Linear(c, 10)

    def forward(self, img):
        x = rearrange(self.embed(img), "b c h w -> b h w c")
        x, ps = einops.pack([x], "b * d")
        b, n, _ = x.shape
        x = x + self.pos[:, :n]
        return self.head(x.mean(1))


def test_a_constant_sliced_to_a_token_count_of_unknown_layout_stays_computed():
    torch.manual_seed(4)
    model = SlicedPositions().eval()
    x = torch.randn(2, 3, 8, 8)
    deploy = asrfx.fold(model, example_inputs=(x,))
    kept = [s for s in deploy.asrfx_report.sites if s.kind == "constant branch"]
    assert [s.code for s in kept] == ["shape-follows-input"], deploy.asrfx_report
    with torch.no_grad():
        for xi in (x, torch.randn(3, 3, 4, 6), torch.randn(1, 3, 12, 10)):
            assert rel_err(model(xi), deploy(xi)) <= 1e-5


def test_einops_on_an_argument_the_example_does_not_give_names_it():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x, mask=None):
            if mask is not None:
                x = x * reduce(mask, "b n d -> b n 1", "max")
            return self.fc(x)

    with pytest.raises(asrfx.TraceError, match="einops on mask, a forward argument the "
                                               "example inputs do not give"):
        asrfx.prepare(Masked(), example_inputs=(torch.randn(2, 5, 8),))
