"""Selective-kernel (SKNet) and split attention (ResNeSt) over stacked branches: a softmax gate
per (branch, channel) is a channel gate; it is converted and folds into each branch's last
layer, leaving convs, the branch sum and no attention. Also ResNeSt's reference form, which
splits one conv's output into its radix parts with ``torch.split`` and gates each part."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asrfx
from helpers import REL_TOL, assert_coded, randomize_bn, randomize_psi, rel_err, sigmoid_nodes


class SelectiveKernel(nn.Module):
    """P branches with different receptive fields (3x3, dilated 3x3), stacked; the gate reads
    their sum, pooled; a softmax across the branches weighs each branch per channel."""

    def __init__(self, c: int = 8, paths: int = 2, hidden: int = 4):
        super().__init__()
        self.paths = nn.ModuleList(nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1 + i, dilation=1 + i, bias=False), nn.BatchNorm2d(c),
            nn.ReLU()) for i in range(paths))
        self.reduce = nn.Conv2d(c, hidden, 1)
        self.select = nn.Conv2d(hidden, c * paths, 1)
        self.p = paths

    def forward(self, x):
        stacked = torch.stack([path(x) for path in self.paths], dim=1)  # (N, P, C, H, W)
        z = self.reduce(stacked.sum(1).mean((2, 3), keepdim=True))
        a = self.select(F.relu(z))
        n, pc, h, w = a.shape
        a = torch.softmax(a.view(n, self.p, pc // self.p, h, w), dim=1)
        return (stacked * a).sum(1)


class SplitAttention(nn.Module):
    """One grouped conv computes the P splits as one ``(N, P*C, H, W)`` map, reshaped to
    ``(N, P, C, H, W)``; the gate is a softmax over the splits, per channel."""

    def __init__(self, c: int = 8, radix: int = 2, hidden: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(c, c * radix, 3, padding=1, groups=radix, bias=False)
        self.bn = nn.BatchNorm2d(c * radix)
        self.fc1 = nn.Conv2d(c, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, c * radix, 1)
        self.radix = radix

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        n, rc, h, w = y.shape
        y = y.reshape(n, self.radix, rc // self.radix, h, w)
        gap = y.sum(1).mean((2, 3), keepdim=True)
        a = self.fc2(F.relu(self.fc1(gap)))
        a = torch.softmax(a.view(n, self.radix, -1), dim=1).reshape(n, self.radix, -1, 1, 1)
        return (y * a).sum(1)


class SplitAttentionParts(nn.Module):
    """Split attention as the ResNeSt reference code writes it (Zhang et al., "ResNeSt:
    Split-Attention Networks", CVPR workshops 2022): one grouped conv for ``radix`` x
    ``cardinality`` groups, ``torch.split`` into the radix parts, a BatchNorm inside the
    excitation, a radix softmax per cardinal group ("rSoftMax"), the attention split the same
    way and each part scaled by its own share, the products summed."""

    def __init__(self, c: int = 8, radix: int = 2, cardinality: int = 1, hidden: int = 4,
                 listed: bool = False):
        super().__init__()
        self.listed = listed  # the parts kept in one list: iterated once, their nodes shared
        self.conv = nn.Conv2d(c, c * radix, 3, padding=1, groups=cardinality * radix,
                              bias=False)
        self.bn0 = nn.BatchNorm2d(c * radix)
        self.relu = nn.ReLU(inplace=True)
        self.fc1 = nn.Conv2d(c, hidden, 1, groups=cardinality)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.fc2 = nn.Conv2d(hidden, c * radix, 1, groups=cardinality)
        self.radix, self.cardinality = radix, cardinality

    def forward(self, x):
        x = self.relu(self.bn0(self.conv(x)))
        batch, rchannel = x.shape[:2]
        parts = torch.split(x, rchannel // self.radix, dim=1)
        if self.listed:
            parts = list(parts)
        gap = F.adaptive_avg_pool2d(sum(parts), 1)
        att = self.fc2(self.relu(self.bn1(self.fc1(gap))))
        att = att.view(batch, self.cardinality, self.radix, -1).transpose(1, 2)
        att = F.softmax(att, dim=1).reshape(batch, -1).view(batch, -1, 1, 1)
        atts = torch.split(att, rchannel // self.radix, dim=1)
        return sum(a * p for a, p in zip(atts, parts)).contiguous()


class Net(nn.Module):
    def __init__(self, block: type, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.block = block(c)
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        return self.head(self.block(torch.relu(self.stem(x))).mean((2, 3)))


@pytest.mark.parametrize("block", [SelectiveKernel, SplitAttention])
def test_stacked_branch_attention_converts_and_folds_away(block):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = Net(block)
    prepared = asrfx.prepare(model, example_inputs=(x,))
    report = prepared.asrfx_report
    (site,) = [s for s in report.sites if s.kind == "channel-attention"]
    assert (site.action, site.channels) == ("converted", 16), report
    psi = [p for n, p in prepared.named_parameters() if n.endswith("psi")]
    assert [tuple(p.shape) for p in psi] == [(1, 8, 1, 1)]  # psi replaces the pooled branch sum
    prepared.train()
    loss = prepared(torch.randn(4, 3, 8, 8)).square().mean()
    loss.backward()
    assert bool((psi[0].grad != 0).any())
    randomize_bn(prepared, 1)
    randomize_psi(prepared, 2)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    assert_coded(deploy.asrfx_report)
    (scale,) = [s for s in deploy.asrfx_report.sites if s.kind == "channel scale"]
    assert scale.action == "folded", deploy.asrfx_report
    assert not any(n.target in (torch.softmax, F.softmax) for n in deploy.graph.nodes)
    assert not sigmoid_nodes(deploy)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deploy.modules())
    prepared.eval()
    with torch.no_grad():
        for xi in (x, torch.randn(3, 3, 10, 6)):
            assert rel_err(prepared(xi), deploy(xi)) <= REL_TOL


def test_a_gate_per_branch_only_is_not_flattened():
    """A gate ``(N, P, 1, 1, 1)`` (one weight per branch, no channel) is not this form: the
    rewrite leaves it."""
    from asrfx.passes.stacked import flatten_stacked_gates
    from helpers import asr_traced

    class PerBranch(nn.Module):
        def forward(self, a, b):
            s = torch.stack([a, b], 1)
            g = torch.softmax(s.mean((2, 3, 4), keepdim=True), dim=1)
            return (s * g).sum(1)

    a, b = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    gm = asr_traced(PerBranch(), a, b)
    assert flatten_stacked_gates(gm) == 0


@pytest.mark.parametrize("radix,cardinality", [(2, 1), (4, 1), (2, 2)])
def test_split_attention_over_split_parts_converts_and_folds_away(radix, cardinality):
    """Each radix part's gate is a site; the sites share the excitation (its BatchNorm is
    switched to running statistics once) and each part's constant folds through the split and
    the ReLU into its slice of ``bn0``: no attention, no split of constants, no guard on one
    and no BatchNorm left, the same outputs."""
    import warnings

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = Net(lambda c: SplitAttentionParts(c, radix, cardinality))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (an fx node erased twice warns)
        prepared = asrfx.prepare(model, example_inputs=(x,))
    report = prepared.asrfx_report
    sites = [s for s in report.sites if s.kind.startswith("channel-attention")]
    assert [s.action for s in sites] == ["converted"] * radix, report
    frozen = [n for n in report.notes if "block.bn1" in n and "running statistics" in n]
    assert len(frozen) == 1, report.notes
    prepared.train()
    prepared(torch.randn(4, 3, 8, 8)).square().mean().backward()
    psi = [p for n, p in prepared.named_parameters() if n.endswith("psi")]
    assert psi and all(bool((p.grad != 0).any()) for p in psi)
    randomize_bn(prepared, 1)
    randomize_psi(prepared, 2)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    rep = deploy.asrfx_report
    assert_coded(rep)
    scales = [s for s in rep.sites if s.kind == "channel scale"]
    assert len(scales) == radix and all(s.action == "folded" for s in scales), rep
    assert all("block.bn0" in s.target and "split" in s.target for s in scales), rep
    assert not [s for s in rep.sites if s.action == "kept"], rep
    nodes = list(deploy.graph.nodes)
    assert not any(n.target in (torch.softmax, F.softmax) for n in nodes)
    # one split is left, of the feature map; its parts are read, so its guards stay
    splits = [n for n in nodes if n.target is torch.split]
    assert len(splits) == 1 and splits[0].args[0].op != "get_attr"
    assert any(n.target is torch._assert for n in nodes)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deploy.modules())
    prepared.eval()
    with torch.no_grad():
        for xi in (x, torch.randn(3, 3, 10, 6)):
            assert rel_err(prepared(xi), deploy(xi)) <= REL_TOL


@pytest.mark.parametrize("options", [{"mode": "both"}, {"fused": True}], ids=["both", "fused"])
def test_split_attention_over_split_parts_other_forms(options):
    """``mode="both"`` keeps the original attention reading each part (the tracer read the
    parts twice: once for the pooled sum, once for the products), so a part's ASR constant
    cannot move into ``bn0`` (that would scale the pooled sum too): it stays a multiply, with a
    code, and the fold is exact. The fused training form keeps the multiply (a split part is no
    norm's output) and folds like the multiply form."""
    import warnings

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = Net(lambda c: SplitAttentionParts(c, 2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepared = asrfx.prepare(model, example_inputs=(x,), **options)
    assert len([n for n in prepared.asrfx_report.notes if "running statistics" in n]) == 1
    prepared.train()
    prepared(torch.randn(4, 3, 8, 8)).square().mean().backward()
    randomize_bn(prepared, 1)
    randomize_psi(prepared, 2)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    rep = deploy.asrfx_report
    assert_coded(rep)
    scales = [s.action for s in rep.sites if s.kind == "channel scale"]
    assert scales == (["kept"] * 2 if "mode" in options else ["folded"] * 2), rep
    prepared.eval()
    with torch.no_grad():
        for xi in (x, torch.randn(3, 3, 10, 6)):
            assert rel_err(prepared(xi), deploy(xi)) <= REL_TOL


@pytest.mark.parametrize("mode", ["replace", "both"])
def test_split_attention_whose_pooled_sum_reads_the_gated_parts(mode):
    """Split attention with its parts in one list: the pooled sum and the products read the
    same part nodes. In mode "both" the original attention reads each part times its ASR gate,
    its pooled sum included; psi's batch size was read from that sum, which then depended on psi's own
    expansion (a cycle: networkx's error out of prepare). psi now takes the batch of the part
    it gates."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    prepared = asrfx.prepare(Net(lambda c: SplitAttentionParts(c, 2, 2, listed=True)),
                             example_inputs=(x,), mode=mode)
    action = "converted" if mode == "replace" else "added"
    assert prepared.asrfx_report.count(action=action) == 2, prepared.asrfx_report
    prepared.train()
    prepared(torch.randn(4, 3, 8, 8)).square().mean().backward()
    randomize_bn(prepared, 1)
    randomize_psi(prepared, 2)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    assert_coded(deploy.asrfx_report)
    prepared.eval()
    with torch.no_grad():
        for xi in (x, torch.randn(3, 3, 10, 6)):
            assert rel_err(prepared(xi), deploy(xi)) <= REL_TOL
