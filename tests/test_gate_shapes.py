"""Only per-channel gates are converted, and psi never depends on the input size.

A pooled statistic reduces *all* positions of a feature map and keeps its channels. A product of
the tokens with a learned, input-independent vector (``scores = q @ w``, ``(N, L, C) @ (C, 1) ->
(N, L, 1)``) has the shape of a pooled column but scores each token: taken for pooling, it gave a
psi of shape ``(1, L, 1)`` and a prepared model that only ran at the example's sequence length.

Look-alikes here must leave the model unchanged at any size; real global-context and token
attention must still convert, and their prepared and folded models must run, and agree, at an
input size other than the example's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asrfx
from asrfx.attention import TokenSE, make_attention
from helpers import (UnknownLayoutScores, assert_outputs_close, has_batchnorm, randomize_bn, randomize_ln,
                     randomize_psi)


def _psis(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.named_parameters() if n.endswith("psi")}


def _check_second_size(prepared: nn.Module, x: torch.Tensor, x2: torch.Tensor,
                       seed: int) -> nn.Module:
    """Train and eval forward of ``prepared`` at ``x2`` (a size other than the example ``x``),
    then fold at ``x`` and compare prepared with folded, in eval mode, at both sizes."""
    assert x2.shape[0] != x.shape[0] and x2.shape[1:] != x.shape[1:]
    prepared.train()
    prepared(x2).float().sum().backward()  # psi takes part in training at the other size too
    assert all(p.grad is not None for n, p in prepared.named_parameters() if n.endswith("psi"))
    if has_batchnorm(prepared):
        randomize_bn(prepared, seed)
    randomize_ln(prepared, seed + 1)
    randomize_psi(prepared, seed + 2)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    assert_outputs_close(prepared, deploy, x, x2)
    return deploy


def _assert_not_converted(model: nn.Module, x: torch.Tensor, x2: torch.Tensor):
    prepared = asrfx.prepare(model, example_inputs=(x,))
    report = prepared.asrfx_report
    assert report.count(action="converted") == 0, str(report)
    assert _psis(prepared) == {}
    model.eval()
    prepared.eval()
    with torch.no_grad():
        for xi in (x, x2):
            torch.testing.assert_close(prepared(xi), model(xi))
    return report


# --- must not fire -----------------------------------------------------------------------------


class TokenScores(nn.Module):
    """Each token scored against a learned vector, ``scores = q @ w`` with ``w`` of shape
    ``(C, 1)``; the scores (softmax over the tokens, or raw) weight the tokens, or pool them."""

    def __init__(self, c: int = 16, form: str = "softmax_gate"):
        super().__init__()
        self.form = form
        self.norm = nn.LayerNorm(c)
        self.q = nn.Linear(c, c)
        self.w = nn.Parameter(torch.randn(c, 1) * 0.3)
        self.head = nn.Linear(c, 4)

    def forward(self, t):
        t = self.norm(t)
        scores = self.q(t) @ self.w                      # (N, L, 1)
        if self.form == "raw_gate":
            return self.head(t * scores)
        a = torch.softmax(scores, dim=1)                 # over the tokens
        if self.form == "softmax_gate":
            return self.head(t + t * a)
        assert self.form == "weighted_sum"
        return self.head((t * a).sum(1))                 # attention pooling as the model's output


class LinearScorer(nn.Module):
    """A ``Linear(C, 1)`` scorer: ``(N, L, 1)`` scores, a softmax over the tokens, the tokens
    weighted by them: one weight per token, not per channel."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.score = nn.Linear(c, 1)
        self.head = nn.Linear(c, 4)

    def forward(self, t):
        t = self.norm(t)
        return self.head(t * torch.softmax(self.score(t), dim=1))


@pytest.mark.parametrize("form", ["softmax_gate", "raw_gate", "weighted_sum"])
def test_tokens_scored_against_a_learned_vector_are_not_a_site(form):
    torch.manual_seed(0)
    report = _assert_not_converted(TokenScores(form=form), torch.randn(2, 10, 16),
                                   torch.randn(3, 7, 16))
    if form != "weighted_sum":  # a per-token gate of the model's output: reported, kept
        assert report.count(action="refused", kind="spatial attention") == 1, str(report)


def test_a_linear_scorer_gate_over_tokens_is_not_a_site():
    torch.manual_seed(0)
    report = _assert_not_converted(LinearScorer(), torch.randn(2, 10, 16), torch.randn(3, 7, 16))
    assert report.count(action="refused", kind="spatial attention") == 1, str(report)


def test_scores_against_a_learned_vector_are_refused_with_a_reason():
    torch.manual_seed(0)
    report = _assert_not_converted(UnknownLayoutScores(), torch.randn(2, 10, 16),
                                   torch.randn(3, 7, 16))
    (refused,) = [s for s in report.sites if s.action == "refused"]
    assert refused.code == "gate-scores-positions"


class OrthogonalUpdate(nn.Module):
    """A residual update split into its parts along and across the residual, per token
    (orthogonal residual updates, Oh et al. 2025, as vit-pytorch writes them): the projection
    ``(out * unit).sum(-1, keepdim=True) * unit`` weights each *token*, computed in float64
    through a cast and ``F.normalize``. The casts must not hide that the tensors are tokens."""

    def __init__(self, dim: int = 16, cast: str = "double"):
        super().__init__()
        self.cast = cast
        self.embed = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim))
        self.block = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))

    def forward(self, t):
        x = self.embed(t)
        out = self.block(x)
        if self.cast == "double":
            r, o = x.double(), out.double()
        else:
            r, o = x.to(torch.float64), out.to(dtype=torch.float64)
        unit = F.normalize(r, dim=-1)
        parallel = (o * unit).sum(dim=-1, keepdim=True) * unit
        return x + (o - parallel).to(x.dtype)


@pytest.mark.parametrize("cast", ["double", "to"])
def test_a_per_token_projection_behind_casts_is_refused_as_per_token(cast):
    torch.manual_seed(0)
    report = _assert_not_converted(OrthogonalUpdate(cast=cast), torch.randn(2, 10, 16),
                                   torch.randn(3, 7, 16))
    (refused,) = [s for s in report.sites if s.action == "refused"]
    assert refused.code == "spatial-attention", str(report)


class TokenRMSNorm(nn.Module):
    """Patch tokens with a class token and register tokens put before them
    (``torch.cat(..., dim=1)``), then an RMS norm written out
    (``h * rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)``: Sapiens2 in transformers): one value
    per token. ``rolled`` passes the tokens through an op that shows no layout at all."""

    def __init__(self, c: int = 16, joined: str = "cat"):
        super().__init__()
        self.joined = joined
        self.patch = nn.Conv2d(3, c, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, c))
        self.reg = nn.Parameter(torch.randn(1, 2, c))
        self.weight = nn.Parameter(torch.rand(c) + 0.5)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        n = x.shape[0]
        if self.joined == "cat":
            t = torch.cat([self.cls.expand(n, -1, -1), self.reg.expand(n, -1, -1), t], dim=1)
        else:
            t = torch.roll(t, 1, dims=1)
        h = t.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.fc((self.weight * h).mean(1))


@pytest.mark.parametrize("joined", ["cat", "roll"])
def test_a_per_token_norm_after_tokens_of_unshown_layout_is_not_converted(joined):
    """Converted, the norm's per-token scale was taken for a channel gate over an (N, C, L) map
    with C = the token count: the prepared model computed something else, and both it and the
    deploy model failed at another image size."""
    torch.manual_seed(0)
    report = _assert_not_converted(TokenRMSNorm(joined=joined), torch.randn(2, 3, 16, 16),
                                   torch.randn(3, 3, 24, 20))
    (refused,) = [s for s in report.sites if s.action == "refused"]
    assert refused.code == "spatial-attention", str(report)


class FlatPositionGate(nn.Module):
    """A flattened map ``(N, C, HW)`` gated by its mean over the channels, ``(N, 1, HW)``: one
    value per position. The flatten shows the layout; read as tokens, psi would have been
    ``(1, 1, HW)``."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)

    def forward(self, x):
        y = self.conv(x).flatten(2)
        return y * torch.sigmoid(y.mean(1, keepdim=True))


def test_a_flattened_map_gated_per_position_is_spatial_attention():
    torch.manual_seed(0)
    report = _assert_not_converted(FlatPositionGate(), torch.randn(2, 3, 6, 6),
                                   torch.randn(3, 3, 5, 4))
    assert report.count(action="refused", kind="spatial attention") == 1, str(report)


class ChannelReductionGate(nn.Module):
    """``t * sigmoid(mean over the channels)`` on tokens: the statistic keeps the tokens."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.norm = nn.LayerNorm(c)

    def forward(self, t):
        t = self.norm(t)
        return t * torch.sigmoid(t.mean(-1, keepdim=True))


def test_a_mean_over_the_channels_of_tokens_is_not_a_statistic():
    torch.manual_seed(0)
    _assert_not_converted(ChannelReductionGate(), torch.randn(2, 10, 16), torch.randn(3, 7, 16))


class RowPoolGate(nn.Module):
    """Adaptive pooling to ``(None, 1)`` keeps the rows: on a one-row example its output looks
    like ``(N, C, 1, 1)``, yet it is a per-row gate."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x):
        y = self.conv(x)
        return y * torch.sigmoid(self.fc(F.adaptive_avg_pool2d(y, (None, 1))))


def test_adaptive_pooling_that_keeps_a_spatial_dim_is_not_a_statistic():
    torch.manual_seed(0)
    _assert_not_converted(RowPoolGate(), torch.randn(2, 3, 1, 8), torch.randn(3, 3, 5, 6))


# --- must still fire ----------------------------------------------------------------------------


class GCNetContext(nn.Module):
    """The global context block as its authors wrote it (GCNet, arXiv 1904.11492): the map viewed
    as ``(N, 1, C, HW)``, softmax weights ``(N, 1, HW, 1)``, a 4-D matmul, additive or
    multiplicative fusion."""

    def __init__(self, c: int, fusion: str):
        super().__init__()
        self.fusion = fusion
        self.conv_mask = nn.Conv2d(c, 1, 1)
        self.softmax = nn.Softmax(dim=2)
        self.transform = nn.Sequential(nn.Conv2d(c, c // 2, 1), nn.LayerNorm([c // 2, 1, 1]),
                                       nn.ReLU(inplace=True), nn.Conv2d(c // 2, c, 1))

    def forward(self, x):
        batch, channel, height, width = x.size()
        input_x = x.view(batch, channel, height * width).unsqueeze(1)       # (N, 1, C, HW)
        mask = self.conv_mask(x).view(batch, 1, height * width)
        mask = self.softmax(mask).unsqueeze(-1)                             # (N, 1, HW, 1)
        context = torch.matmul(input_x, mask).view(batch, channel, 1, 1)    # (N, C, 1, 1)
        term = self.transform(context)
        return x + term if self.fusion == "add" else x * torch.sigmoid(term)


class MatmulMaskGC(nn.Module):
    """Global context whose mask is a matmul against a learned vector (a 1x1 conv written out):
    the learned-vector product scores the positions, the second matmul pools them."""

    def __init__(self, c: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(c, 1) * 0.3)
        self.fc = nn.Conv1d(c, c, 1)

    def forward(self, x):
        flat = x.flatten(2)                                                 # (N, C, HW)
        a = torch.softmax(flat.transpose(1, 2) @ self.w, dim=1)            # (N, HW, 1)
        return x * torch.sigmoid(self.fc(flat @ a)).unsqueeze(-1)           # (N, C, 1) -> gate


def _conv_net(block: nn.Module, c: int = 8) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), block,
                         nn.ReLU(), nn.Conv2d(c, 4, 1))


@pytest.mark.parametrize("name", ["library_gc", "gcnet_add", "gcnet_mul", "matmul_mask"])
def test_global_context_attention_converts_and_runs_at_another_size(name):
    torch.manual_seed(0)
    c = 32  # the library's GC keeps C // 16 hidden units: two here
    block = {"library_gc": lambda: make_attention("gc", c),
             "gcnet_add": lambda: GCNetContext(c, "add"),
             "gcnet_mul": lambda: GCNetContext(c, "mul"),
             "matmul_mask": lambda: MatmulMaskGC(c)}[name]()
    x, x2 = torch.randn(2, 3, 8, 8), torch.randn(3, 3, 12, 10)
    prepared = asrfx.prepare(_conv_net(block, c), example_inputs=(x,))
    assert prepared.asrfx_report.count(action="converted") == 1, str(prepared.asrfx_report)
    (shape,) = _psis(prepared).values()
    assert shape in ((1, c, 1), (1, 1, c, 1)), shape  # the pooled context: channels only
    deploy = _check_second_size(prepared, x, x2, seed=1)
    assert deploy.asrfx_report.count(action="folded", kind="channel scale") == 1
    assert not any("softmax" in str(n.target) or "matmul" in str(n.target)
                   for n in deploy.graph.nodes)


class AttentionPoolGate(nn.Module):
    """Tokens pooled by a ``Linear(C, 1)`` scorer with a softmax over the tokens (attention
    pooling: input-dependent weights over all tokens), the pooled vector driving a channel gate
    of the tokens. Spelled as a weighted sum or as a matmul."""

    def __init__(self, c: int = 16, spelling: str = "sum"):
        super().__init__()
        self.spelling = spelling
        self.norm = nn.LayerNorm(c)
        self.score = nn.Linear(c, 1)
        self.fc1, self.fc2 = nn.Linear(c, c // 4), nn.Linear(c // 4, c)
        self.head = nn.Linear(c, 4)

    def forward(self, t):
        t = self.norm(t)
        a = torch.softmax(self.score(t), dim=1)                   # (N, L, 1)
        if self.spelling == "sum":
            pooled = (t * a).sum(1)                               # (N, C)
        else:
            pooled = (a.transpose(1, 2) @ t).squeeze(1)           # (N, 1, L) @ (N, L, C)
        g = torch.sigmoid(self.fc2(torch.relu(self.fc1(pooled))))
        return self.head(t * g.unsqueeze(1))


@pytest.mark.parametrize("spelling", ["sum", "matmul"])
def test_attention_pooled_tokens_driving_a_channel_gate_convert(spelling):
    torch.manual_seed(0)
    x, x2 = torch.randn(2, 10, 16), torch.randn(3, 7, 16)
    prepared = asrfx.prepare(AttentionPoolGate(spelling=spelling), example_inputs=(x,))
    report = prepared.asrfx_report
    assert report.count(action="converted") == 1, str(report)
    assert report.count(action="refused") == 0, str(report)  # the weighting is part of the pool
    assert list(_psis(prepared).values()) in ([(1, 16)], [(1, 1, 16)])
    _check_second_size(prepared, x, x2, seed=2)


class TokenSENet(nn.Module):
    def __init__(self, c: int = 16):
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.se = TokenSE(c)
        self.head = nn.Linear(c, 4)

    def forward(self, t):
        return self.head(self.se(self.norm(t)))


def test_token_se_converts_and_runs_at_another_sequence_length():
    torch.manual_seed(0)
    x, x2 = torch.randn(2, 10, 16), torch.randn(3, 7, 16)
    prepared = asrfx.prepare(TokenSENet(), example_inputs=(x,))
    assert prepared.asrfx_report.count(action="converted") == 1
    assert _psis(prepared) == {"se.psi": (1, 16)}
    _check_second_size(prepared, x, x2, seed=3)


def test_zoo_vit_token_se_still_converts():
    """The zoo ViT's residual stream is now known to be tokens (``conv(x).flatten(2).transpose(1,
    2)``); its TokenSE still converts. Its learned position embedding fixes the sequence length,
    so there is no second size to run it at (tests/test_tokens.py checks its fold)."""
    from asrfx.zoo import vit_tiny

    torch.manual_seed(0)
    prepared = asrfx.prepare(vit_tiny(attention=True, depth=1),
                             example_inputs=(torch.randn(2, 3, 32, 32),))
    assert prepared.asrfx_report.count(action="converted") == 1
    assert _psis(prepared) == {"blocks.0.se.psi": (1, 32)}


def test_psi_extent_names_a_statistic_that_keeps_the_tokens():
    """The last check before a site is made: psi's size must be the pooled map's channels."""
    from torch.fx.passes.shape_prop import ShapeProp

    from asrfx.passes.find_attention import is_statistic, psi_extent
    from asrfx.passes.graph_utils import value_dependent

    torch.manual_seed(0)
    for model, x, want in ((TokenScores(), torch.randn(2, 10, 16), False),
                           (_conv_net(GCNetContext(8, "add")), torch.randn(2, 3, 8, 8), True)):
        gm = asrfx.trace(model, x)
        ShapeProp(gm).propagate(x)
        dep = value_dependent(gm.graph)
        (mm,) = [n for n in gm.graph.nodes if "matmul" in str(n.target)]
        assert is_statistic(gm, mm, dep) is want
        reason = psi_extent(gm, mm, dep)
        assert (reason is None) is want, reason
        if not want:
            assert "(1, 10, 1)" in reason


def test_gate_that_is_the_statistic_itself_reads_psi():
    """``y * y.mean((2, 3), keepdim=True)``: the statistic is the gate, there is no branch in
    between. psi used to be created and never read (the report said "converted")."""

    class SelfGate(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return y * y.mean((2, 3), keepdim=True)

    x = torch.randn(2, 3, 6, 6)
    prepared = asrfx.prepare(SelfGate(), example_inputs=(x,))
    assert prepared.asrfx_report.count(action="converted") == 1
    assert not [n for n in prepared.graph.nodes if n.target == "mean"], prepared.code
    assert [n.target for n in prepared.graph.nodes if n.op == "get_attr"] == ["psi"]
    prepared.train()
    prepared(x).square().sum().backward()
    assert prepared.get_parameter("psi").grad.abs().max() > 0
