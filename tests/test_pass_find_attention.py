"""``find_attention_sites`` on small hand-built graphs: what a site is made of, and what is
refused (by code) or not reported at all.

Each model is traced with :class:`asrfx.tracing.AsrTracer` and its shapes recorded, which is all
the pass reads; nothing here goes through ``asrfx.prepare``.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from asrfx.passes import find_attention_sites
from asrfx.passes.graph_utils import tensor_shape
from helpers import SE, BAMGate, SENet, SharedGate, UnknownLayoutScores, asr_traced


def _find(model: nn.Module, *inputs: torch.Tensor):
    gm = asr_traced(model, *inputs)
    sites, refusals = find_attention_sites(gm)
    return gm, sites, refusals


def _node(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def _codes(refusals) -> list[str]:
    return [code for _, _, code in refusals]


IMAGES = (2, 3, 8, 8)


class Wrap(nn.Module):
    """``att(stem(x))``: puts the attention under the path ``att``."""

    def __init__(self, att: nn.Module, c: int = 8, cin: int = 3, conv: type = nn.Conv2d):
        super().__init__()
        self.stem = conv(cin, c, 3, padding=1)
        self.att = att

    def forward(self, x):
        return self.att(self.stem(x))


# --- sites ---------------------------------------------------------------------------------------


def test_se_site_is_made_of_its_statistic_branch_and_gate():
    gm, sites, refusals = _find(SENet(8), torch.randn(*IMAGES))
    assert refusals == []
    (site,) = sites
    assert site.path == "se" and site.channels == 8 and site.fusion == "mul"
    assert site.x is _node(gm, "bn") and site.mul.args[:2] == (site.x, site.gate)
    assert site.gate is _node(gm, "sigmoid")
    (stat,) = site.stats
    assert stat.target == "mean" and tensor_shape(stat) == (2, 8, 1, 1)
    # the branch: every node strictly between the statistic and the gate, in graph order
    assert [n.name for n in site.branch] == ["se_fc1", "relu", "se_fc2", "sigmoid"]
    assert stat not in site.branch and site.x not in site.branch
    assert site.more_muls == [] and site.psi_nodes == [] and site.asr_mul is None


class ECAGate(nn.Module):
    """ECA: pooled descriptor mixed across neighbouring channels by a Conv1d."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.k = nn.Conv1d(1, 1, 3, padding=1, bias=False)

    def forward(self, x):
        n, c = x.shape[0], x.shape[1]
        y = self.k(self.pool(x).view(n, c).unsqueeze(1)).view(n, c, 1, 1)
        return x * torch.sigmoid(y)


def test_eca_gate_mixing_channels_with_conv1d_is_a_site():
    gm, sites, refusals = _find(Wrap(ECAGate()), torch.randn(*IMAGES))
    assert refusals == []
    (site,) = sites
    assert site.path == "att" and site.channels == 8
    assert [n.target for n in site.stats] == ["att.pool"]
    assert "att.k" in [n.target for n in site.branch]
    assert site.gate.target is torch.sigmoid and site.x is _node(gm, "stem")


class GlobalContext(nn.Module):
    """GC: softmax attention pooling by matrix product, context added to every position."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.mask = nn.Conv2d(c, 1, 1)
        self.t1 = nn.Conv2d(c, 4, 1)
        self.t2 = nn.Conv2d(4, c, 1)

    def forward(self, x):
        n, c = x.shape[0], x.shape[1]
        w = torch.softmax(self.mask(x).flatten(2), dim=-1)              # (N, 1, HW)
        ctx = torch.matmul(x.flatten(2), w.transpose(1, 2)).view(n, c, 1, 1)
        return x + self.t2(torch.relu(self.t1(ctx)))


def test_global_context_addition_is_an_additive_site():
    gm, sites, refusals = _find(Wrap(GlobalContext()), torch.randn(*IMAGES))
    assert refusals == []
    (site,) = sites
    assert site.fusion == "add" and site.channels == 8 and site.path == "att"
    assert site.gate.target == "att.t2" and site.x is _node(gm, "stem")
    (stat,) = site.stats
    assert stat.target is torch.matmul and tensor_shape(stat) == (2, 8, 1)
    # the attention weights over positions belong to the statistic, not to the branch
    assert all(n.target != "att.mask" for n in site.branch)


class WeightedPooling(nn.Module):
    """Attention pooling written as ``(x * a).sum``: a per-position weighting of the map that
    only the statistic reads (``leak``: the weighted map is also part of the output)."""

    def __init__(self, c: int = 8, leak: bool = False):
        super().__init__()
        self.mask = nn.Conv2d(c, 1, 1)
        self.fc = nn.Conv2d(c, c, 1)
        self.leak = leak

    def forward(self, x):
        a = torch.sigmoid(self.mask(x))                                   # (N, 1, H, W)
        weighted = x * a
        g = torch.sigmoid(self.fc(weighted.sum((2, 3), keepdim=True)))
        out = x * g
        return out + weighted if self.leak else out


def test_weighting_read_only_by_a_statistic_is_not_reported():
    _, sites, refusals = _find(Wrap(WeightedPooling()), torch.randn(*IMAGES))
    (site,) = sites
    assert [n.target for n in site.stats] == ["sum"]
    assert refusals == []


def test_weighting_read_elsewhere_is_reported_as_spatial_attention():
    _, sites, refusals = _find(Wrap(WeightedPooling(leak=True)), torch.randn(*IMAGES))
    assert len(sites) == 1
    assert [(p, code) for p, _, code in refusals] == [("att", "spatial-attention")]


class TokenGate(nn.Module):
    """SE over tokens ``(N, L, C)``: mean over the tokens, gate over the channels (last dim)."""

    def __init__(self, din: int = 5, c: int = 8):
        super().__init__()
        self.embed = nn.Linear(din, c)
        self.fc1 = nn.Linear(c, 4)
        self.fc2 = nn.Linear(4, c)

    def forward(self, t):
        t = self.embed(t)
        g = torch.sigmoid(self.fc2(torch.relu(self.fc1(t.mean(1))))).unsqueeze(1)
        return t * g


def test_token_gate_over_the_last_dim_is_a_site():
    gm, sites, refusals = _find(TokenGate(), torch.randn(2, 6, 5))
    assert refusals == []
    (site,) = sites
    assert site.channels == 8                      # the last dim, not the 6 tokens
    assert site.x is _node(gm, "embed") and site.gate.target == "unsqueeze"
    (stat,) = site.stats
    assert tensor_shape(stat) == (2, 8)


class ChannelsLastGate(nn.Module):
    """SE on a channels-last map ``(N, H, W, C)``; ``signal``: the layout is shown by the permute
    that moves the channels last, else the map arrives in that layout from the input."""

    def __init__(self, c: int = 6, signal: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.fc = nn.Linear(c, c)
        self.signal = signal

    def forward(self, x):
        y = self.conv(x).permute(0, 2, 3, 1) if self.signal else x * 2.0
        return y * torch.sigmoid(self.fc(y.mean((1, 2), keepdim=True)))


def test_channels_last_gate_is_a_site_when_the_graph_shows_the_layout():
    # H = W = C = 6: the shapes alone cannot tell (N, 1, 1, C) from a gate over the width
    gm, sites, refusals = _find(ChannelsLastGate(), torch.randn(2, 3, 6, 6))
    assert refusals == []
    (site,) = sites
    assert site.channels == 6 and site.x.target == "permute"
    assert tensor_shape(site.gate) == (2, 1, 1, 6)


def test_channels_last_gate_without_a_layout_signal_is_no_site():
    _, sites, refusals = _find(ChannelsLastGate(signal=False), torch.randn(2, 6, 6, 6))
    assert sites == [] and refusals == []


def test_one_gate_scaling_two_maps_is_one_site_with_more_muls():
    gm, sites, refusals = _find(SharedGate(), torch.randn(*IMAGES))
    assert refusals == []
    (site,) = sites
    assert site.mul is _node(gm, "mul") and site.x is _node(gm, "a")
    assert site.more_muls == [_node(gm, "mul_1")]
    assert _node(gm, "b") in site.more_muls[0].args


class TwoStatistics(nn.Module):
    """CBAM's channel half: average- and max-pooled descriptors through one MLP."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x):
        avg = self.fc(x.mean((2, 3), keepdim=True))
        mx = self.fc(x.amax((2, 3), keepdim=True))
        return x * torch.sigmoid(avg + mx)


def test_each_statistic_is_listed_in_graph_order():
    _, sites, refusals = _find(Wrap(TwoStatistics()), torch.randn(*IMAGES))
    assert refusals == []
    (site,) = sites
    assert [n.target for n in site.stats] == ["mean", "amax"]
    assert all(s not in site.branch for s in site.stats)


class ExpandedGate(nn.Module):
    def __init__(self, c: int = 8, spelling: str = "expand_as"):
        super().__init__()
        self.fc = nn.Conv2d(c, c, 1)
        self.spelling = spelling

    def forward(self, x):
        g = torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))
        if self.spelling == "expand_as":
            return x * g.expand_as(x)
        return g.expand(x.shape) * x


@pytest.mark.parametrize("spelling", ["expand_as", "expand"])
def test_gate_expanded_to_the_map_is_read_as_the_gate(spelling):
    gm, sites, refusals = _find(Wrap(ExpandedGate(spelling=spelling)), torch.randn(*IMAGES))
    assert refusals == []
    (site,) = sites
    assert site.gate.target is torch.sigmoid and site.x is _node(gm, "stem")
    assert tensor_shape(site.gate) == (2, 8, 1, 1)


def test_two_attention_modules_are_two_sites_with_their_paths():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), SE(8), nn.ReLU(), SE(8))
    _, sites, refusals = _find(model, torch.randn(*IMAGES))
    assert refusals == []
    assert [s.path for s in sites] == ["1", "3"]
    assert sites[1].x.target == "2"  # the ReLU of the first site's output


# --- refusals, by code ---------------------------------------------------------------------------


class SpatialGate(nn.Module):
    """CBAM's spatial half: one input-dependent value per position."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        return x * torch.sigmoid(self.conv(x.mean(1, keepdim=True)))


class PooledMapGate(nn.Module):
    """The gated map is itself pooled data spread over the positions, and the gate reads it
    (not a statistic of it)."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x):
        m = x.mean((2, 3), keepdim=True).expand(-1, -1, 8, 8)
        return m * torch.sigmoid(self.fc(m[:, :, :1, :1]))


class ChannelMixingPool(nn.Module):
    """``AdaptiveAvgPool2d`` applied to a 1-D map ``(N, C, L)`` pools channels and positions:
    its "statistic" is a (2, 2) grid that is not one value per channel."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d((2, 2))
        self.fc = nn.Linear(2, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(self.pool(x)))


class SelfCalibrated(nn.Module):
    """A self-calibrated convolution (Liu et al., CVPR 2020): ``conv(x) * sigmoid(x +
    up(conv(down(x))))``, the gate from a downsampled view of the block's input."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.down = nn.AvgPool2d(4, 4)
        self.k2 = nn.Conv2d(c, c, 3, padding=1)
        self.k3 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        w = torch.sigmoid(x + F.interpolate(self.k2(self.down(x)), size=x.shape[2:]))
        return self.k3(x) * w


class SoftMask(nn.Module):
    """The soft mask of a residual attention network (Wang et al., CVPR 2017): ``(1 + mask) *
    trunk``, the mask down- and upsampled."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.trunk = nn.Conv2d(c, c, 3, padding=1)
        self.mask = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(c, c, 1),
                                  nn.Upsample(scale_factor=2), nn.Sigmoid())

    def forward(self, x):
        return (1 + self.mask(x)) * self.trunk(x)


class CoordinateGate(nn.Module):
    """Coordinate attention (Hou et al., CVPR 2021), one direction: a gate per channel and row,
    ``(N, C, H, 1)``, from the map pooled along its width."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.conv(x.mean(3, keepdim=True)))


#: code -> (model, input shape, module path of the refused multiply)
REFUSALS = {
    "spatial-attention": (lambda: Wrap(SpatialGate()), IMAGES, "att"),
    "gate-scores-positions": (lambda: nn.Sequential(UnknownLayoutScores()), (2, 10, 16), "0"),
    "gate-reads-map": (lambda: Wrap(PooledMapGate()), IMAGES, "att"),
    "statistic-extent": (lambda: Wrap(ChannelMixingPool(), c=2, conv=nn.Conv1d), (2, 3, 10),
                         "att"),
    "element-attention": (lambda: Wrap(BAMGate()), IMAGES, "att"),
    "element-attention (self-calibrated)": (lambda: Wrap(SelfCalibrated()), IMAGES, "att"),
    "element-attention (soft mask)": (lambda: Wrap(SoftMask()), IMAGES, "att"),
    "element-attention (coordinate)": (lambda: Wrap(CoordinateGate()), IMAGES, "att"),
}


@pytest.mark.parametrize("code", sorted(REFUSALS))
def test_look_alike_is_refused_with_its_code(code):
    make, shape, path = REFUSALS[code]
    _, sites, refusals = _find(make(), torch.randn(*shape))
    assert sites == []
    assert [(p, c) for p, _, c in refusals] == [(path, code.split(" ")[0])]
    assert all(isinstance(reason, str) and reason for _, reason, _ in refusals)


class InputGate(nn.Module):
    """A per-channel scale read from a second model input: no pooled statistic."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.fc = nn.Linear(4, c)

    def forward(self, x, cond):
        return self.conv(x) * torch.sigmoid(self.fc(cond)).view(-1, 8, 1, 1)


def test_gate_from_another_input_is_refused_with_its_code():
    _, sites, refusals = _find(InputGate(), torch.randn(*IMAGES), torch.randn(2, 4))
    assert sites == []
    assert _codes(refusals) == ["gate-reads-input"]


class OnePositionProduct(nn.Module):
    """Two maps computed from the input, multiplied element by element (a state-space layer's
    ``h * act(z)``); at a small example size the maps have one position each, so only their
    shapes, ``(N, C, 1)``, look per channel."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, 2 * c, 3, padding=1, stride=8)

    def forward(self, x):
        h, z = self.conv(x).flatten(2).chunk(2, dim=1)
        return h * F.silu(z)


@pytest.mark.parametrize("size", [8, 32], ids=["one-position", "many-positions"])
def test_product_of_unpooled_maps_is_not_attention_at_any_size(size):
    """Nothing pooled the 'gate': not a refused attention at one position, just as it is not
    one at 16 positions."""
    _, sites, refusals = _find(OnePositionProduct(), torch.randn(2, 3, size, size))
    assert sites == [] and refusals == []


def test_pooled_gate_on_a_one_position_map_is_still_attention():
    """A real SE gate on a map that happens to have one position is still found."""
    _, sites, refusals = _find(Wrap(SE(8)), torch.randn(2, 3, 1, 1))
    assert [s.path for s in sites] == ["att"] and refusals == []


class CornerGate(nn.Module):
    """A per-channel gate computed from one position of the map: no global reduction."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x[:, :, :1, :1]))


def test_gate_without_a_global_reduction_is_refused_as_not_pooled():
    _, sites, refusals = _find(Wrap(CornerGate()), torch.randn(*IMAGES))
    assert sites == []
    assert _codes(refusals) == ["gate-not-pooled"]


# --- must not fire -------------------------------------------------------------------------------


class ConstantScale(nn.Module):
    """Per-channel scales that do not depend on the input: a learned vector, and an
    excitation of a learned vector (what an ASR branch looks like after prepare)."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(1, c, 1, 1))
        self.shift = nn.Parameter(torch.rand(1, c, 1, 1))
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x):
        y = self.conv(x) * self.scale + self.shift
        return y * torch.sigmoid(self.fc(self.scale))


class Residual(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y + self.conv2(torch.relu(y))


class Swish(nn.Module):
    """``y * sigmoid(y)``: a gate with the map's own resolution, elementwise."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y * torch.sigmoid(y)


@pytest.mark.parametrize("model", [ConstantScale, Residual, Swish])
def test_look_alikes_are_neither_sites_nor_refusals(model):
    _, sites, refusals = _find(model(), torch.randn(*IMAGES))
    assert sites == [] and refusals == []


def test_finding_sites_leaves_the_graph_as_it_is():
    gm = asr_traced(SENet(8), torch.randn(*IMAGES))
    before = gm.graph.python_code("self").src
    find_attention_sites(gm)
    assert gm.graph.python_code("self").src == before


class SelfGating(nn.Module):
    """Gates without context: swish spelled out, a GLU over channels, a gated convolution's
    per-pixel gate (``conv_a(x) * sigmoid(conv_b(x))``) -- activations, not attention."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1)
        self.b = nn.Conv2d(c, c, 3, padding=1)
        self.glu = nn.Conv2d(c, 2 * c, 1)

    def forward(self, x):
        x = x * torch.sigmoid(x)
        h, z = self.glu(x).chunk(2, dim=1)
        x = h * torch.sigmoid(z)
        return self.a(x) * torch.sigmoid(self.b(x))


def test_self_gating_without_context_is_not_reported():
    _, sites, refusals = _find(Wrap(SelfGating()), torch.randn(*IMAGES))
    assert sites == [] and refusals == []


def test_element_wise_attention_after_a_pooling_stem_is_still_told_from_self_gating():
    """The context must lie on the gate's own branch: a max-pooling stem before a swish does not
    make the swish attention, and a BAM behind the same stem is still found."""
    stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(2))
    _, sites, refusals = _find(nn.Sequential(stem, nn.SiLU(), SelfGating()),
                               torch.randn(2, 3, 16, 16))
    assert refusals == []
    stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(2))
    _, sites, refusals = _find(nn.Sequential(stem, SelfGating(), BAMGate()),
                               torch.randn(2, 3, 16, 16))
    assert [(p, c) for p, _, c in refusals] == [("2", "element-attention")]
