"""Constant evaluation (passes/const_eval.py) on hand-built graphs: input-independent branches
become get_attr buffers (one row where the batch size only sized them), ``ctx.reference`` is
the unchanged graph's output, branches that must stay computed are reported with a code, and
the input-dependent part of the graph is never touched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from asrfx.passes.const_eval import evaluate_constants, rows_agree
from asrfx.passes.protocol import PassContext
from helpers import SE, node_kinds, rel_err, run_graph, sigmoid_nodes, traced


class Gate(nn.Module):
    """An ASR-style gate: ``x * sigmoid(fc(psi))`` -- a function of a parameter alone."""

    def __init__(self, c=4):
        super().__init__()
        self.psi = nn.Parameter(torch.randn(1, c, 1, 1))
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(self.psi))


class GatedNet(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.gate = Gate(c)

    def forward(self, x):
        return self.gate(self.conv(x))


class SizedByBatch(nn.Module):
    """Third-party spelling: the branch reads the batch size only to shape its rows."""

    def __init__(self, c=4):
        super().__init__()
        self.psi = nn.Parameter(torch.randn(1, c))
        self.fc = nn.Linear(c, c)

    def forward(self, x):
        b, c = x.shape[:2]
        return x * torch.sigmoid(self.fc(self.psi.expand(b, -1))).view(b, c, 1, 1)


class BatchArithmetic(nn.Module):
    """The batch size reaches the branch through arithmetic (``b * 1``): it cannot be reduced
    to one row by construction, but its rows agree."""

    def __init__(self, c=4):
        super().__init__()
        self.psi = nn.Parameter(torch.randn(1, c, 1, 1))

    def forward(self, x):
        return x * torch.sigmoid(self.psi.expand(x.shape[0] * 1, -1, 1, 1))


class BatchIndexed(nn.Module):
    """A branch that uses the batch size as a value: its rows differ."""

    def forward(self, x):
        return x * torch.arange(x.shape[0]).view(-1, 1, 1, 1).float()


class ShapedLikeInput(nn.Module):
    """A constant sized from the input that a concatenation (not a broadcasting op) reads."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.randn(1, 2, 1, 1))

    def forward(self, x):
        n, _, h, w = x.shape
        return torch.cat([x, self.p.expand(n, -1, h, w) * 2], 1)


class ExpandedGate(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.psi = nn.Parameter(torch.randn(1, c, 1, 1))

    def forward(self, x):
        return x * torch.sigmoid(self.psi).expand_as(x)


def _const_buffers(gm):
    return {str(n.target): tuple(gm.get_buffer(str(n.target)).shape)
            for n in gm.graph.nodes if n.op == "get_attr" and "asrfx_const" in str(n.target)}


def _evaluate(model, x):
    gm = traced(model, x)
    ref = run_graph(gm, x)
    ctx = PassContext((x,))
    records = evaluate_constants(gm, ctx)
    return gm, ctx, ref, records


def test_a_constant_branch_becomes_one_buffer_named_after_its_module():
    x = torch.randn(3, 3, 6, 6)
    gm, ctx, ref, records = _evaluate(GatedNet(), x)
    assert records == []
    assert _const_buffers(gm) == {"gate.asrfx_const": (1, 4, 1, 1)}
    assert sigmoid_nodes(gm) == []
    assert not any(n.op == "call_module" and n.target == "gate.fc" for n in gm.graph.nodes)
    assert rel_err(ref, run_graph(gm, x)) <= 1e-6


@pytest.mark.parametrize("model", [GatedNet, ExpandedGate, BatchIndexed],
                         ids=["plain", "expand-as", "kept-branch"])
def test_reference_is_the_unchanged_graphs_output(model):
    x = torch.randn(3, 3 if model is GatedNet else 4, 5, 5)
    gm, ctx, ref, _ = _evaluate(model(), x)
    assert ctx.reference is not None
    assert ctx.reference.shape == ref.shape
    assert rel_err(ref, ctx.reference) <= 1e-6


def test_a_branch_sized_by_the_batch_is_computed_on_one_row_and_broadcasts():
    x = torch.randn(3, 4, 5, 5)
    model = SizedByBatch()
    gm, _, ref, records = _evaluate(model, x)
    assert records == []
    assert list(_const_buffers(gm).values()) == [(1, 4, 1, 1)]
    assert rel_err(ref, run_graph(gm, x)) <= 1e-6
    other = torch.randn(5, 4, 5, 5)  # another batch size: one row still serves every sample
    with torch.no_grad():
        assert rel_err(model(other), run_graph(gm, other)) <= 1e-6


def test_a_branch_whose_rows_agree_is_baked_as_one_row():
    x = torch.randn(3, 4, 5, 5)
    gm, _, ref, records = _evaluate(BatchArithmetic(), x)
    assert records == []
    assert list(_const_buffers(gm).values()) == [(1, 4, 1, 1)]
    assert rel_err(ref, run_graph(gm, x)) <= 1e-6


def test_a_branch_that_differs_across_the_batch_is_kept_and_reported():
    x = torch.randn(3, 4, 5, 5)
    gm, _, ref, records = _evaluate(BatchIndexed(), x)
    assert [(r.kind, r.action, r.code) for r in records] == \
        [("constant branch", "kept", "batch-dependent")]
    assert records[0].key.startswith("const:")
    assert _const_buffers(gm) == {}
    assert any(n.target is torch.arange for n in gm.graph.nodes)
    other = torch.randn(5, 4, 5, 5)
    with torch.no_grad():
        assert rel_err(BatchIndexed()(other), run_graph(gm, other)) <= 1e-6


def test_a_constant_shaped_like_the_input_that_no_broadcast_reads_is_kept():
    x = torch.randn(2, 3, 4, 4)
    gm, _, ref, records = _evaluate(ShapedLikeInput(), x)
    assert [(r.kind, r.action, r.code) for r in records] == \
        [("constant branch", "kept", "shape-follows-input")]
    assert _const_buffers(gm) == {}
    assert rel_err(ref, run_graph(gm, x)) <= 1e-6


def test_an_expanded_gate_is_baked_per_channel_not_per_position():
    x = torch.randn(3, 4, 5, 5)
    gm, _, ref, records = _evaluate(ExpandedGate(), x)
    assert records == []
    assert list(_const_buffers(gm).values()) == [(1, 4, 1, 1)]
    assert not any(n.target == "expand_as" for n in gm.graph.nodes)
    assert rel_err(ref, run_graph(gm, x)) <= 1e-6


class ParameterRead(nn.Module):
    """A parameter read as it is (a get_attr already): nothing to evaluate."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(1, 4, 1, 1))

    def forward(self, x):
        return x + self.bias


@pytest.mark.parametrize("model", [lambda: SE(4), ParameterRead, lambda: nn.Sequential(
    nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())],
    ids=["input-dependent-se", "parameter-read", "plain-layers"])
def test_input_dependent_graphs_are_left_alone(model):
    x = torch.randn(2, 4, 5, 5)
    gm = traced(model(), x)
    before = node_kinds(gm)
    ref = run_graph(gm, x)
    ctx = PassContext((x,))
    assert evaluate_constants(gm, ctx) == []
    assert node_kinds(gm) == before
    assert _const_buffers(gm) == {}
    assert rel_err(ref, run_graph(gm, x)) <= 1e-6
    assert rel_err(ref, ctx.reference) <= 1e-6


def test_rows_agree_within_rounding_only():
    row = torch.linspace(-2.0, 3.0, 8).view(1, 8)
    same = row.expand(4, 8).clone()
    assert rows_agree(same)
    nudged = same.clone()
    nudged[2, 5] += 2 * torch.finfo(torch.float32).eps * 3.0  # a last-bit difference
    assert rows_agree(nudged)
    apart = same.clone()
    apart[1, 0] += 1e-3
    assert not rows_agree(apart)
    with_nan = same.clone()
    with_nan[0, 0] = float("nan")
    assert not rows_agree(with_nan)
    ints = torch.arange(3).view(1, 3).expand(2, 3)
    assert rows_agree(ints)
    assert not rows_agree(torch.tensor([[1, 2], [1, 3]]))


class SpatialConstant(nn.Module):
    """Constants computed from parameters and the input's extents, added to or multiplied
    into it: ``kind`` "position" a position code over ``torch.zeros(x.shape[2:])`` (EdgeNeXt's
    Fourier encoding), "scale" a per-channel gate times the input's width, "tokens" a code over
    a sequence's length; and "channels" reads only ``b, c = x.shape[:2]`` (an SE's
    ``y.view(b, c, 1, 1)``), which stays bakeable."""

    def __init__(self, kind: str, c: int = 4):
        super().__init__()
        self.kind = kind
        self.w = nn.Parameter(torch.randn(1, c, 1, 1))

    def forward(self, x):
        if self.kind == "position":
            grid = torch.zeros(x.shape[2:]).cumsum(0) + 1
            return x + self.w * grid.cos()
        if self.kind == "scale":
            return x * (torch.sigmoid(self.w) * x.shape[-1])
        if self.kind == "tokens":
            n, length, c = x.shape
            code = torch.arange(length, dtype=x.dtype).reshape(1, length, 1).expand(1, length, c)
            return x + self.w.reshape(1, 1, -1) * code
        b, c = x.shape[:2]
        return x * torch.sigmoid(self.w).view(1, -1).expand(b, c).view(b, c, 1, 1)


@pytest.mark.parametrize("kind", ["position", "scale", "tokens"])
def test_a_constant_computed_from_the_inputs_extent_is_kept_computed(kind):
    """Baked at the example's size it would be wrong, or the wrong shape, at another size."""
    model = SpatialConstant(kind)
    x = torch.randn(2, 5, 4) if kind == "tokens" else torch.randn(2, 4, 5, 6)
    gm, _, ref, records = _evaluate(model, x)
    assert [(r.action, r.code) for r in records] == [("kept", "shape-follows-input")], records
    assert _const_buffers(gm) == {}
    other = torch.randn(3, 7, 4) if kind == "tokens" else torch.randn(3, 4, 7, 3)
    with torch.no_grad():
        for xi in (x, other):
            assert rel_err(model(xi), run_graph(gm, xi)) <= 1e-6


def test_a_constant_reading_only_the_batch_and_channels_is_baked():
    model = SpatialConstant("channels")
    gm, _, ref, records = _evaluate(model, torch.randn(2, 4, 5, 6))
    assert records == []
    assert list(_const_buffers(gm).values()) == [(1, 4, 1, 1)]
    other = torch.randn(3, 4, 7, 3)
    with torch.no_grad():
        assert rel_err(model(other), run_graph(gm, other)) <= 1e-6
