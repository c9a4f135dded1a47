"""``collapse_batch`` on small hand-built graphs: a constant branch that reads the batch size
only as a size is rewritten to compute one row; any other use of the batch size leaves it as it
is, with the reason; a branch that never reads it is not touched. And ``one_row`` itself.

Each model multiplies its input by a gate computed from parameters (and shapes) alone, the form
an ASR branch has once it reads psi. Nothing here goes through ``asrfx.prepare``/``fold``.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

from asrfx.passes.batch_rows import collapse_batch, one_row
from asrfx.passes.graph_utils import reads_shape_only, tensor_shape, value_dependent
from asrfx.passes.shapes import propagate_shapes
from asrfx.tracing import AsrTracer
from helpers import dtype_tol, rel_err

C = 4
TOL = dtype_tol(torch.float32)


class ConstantGate(nn.Module):
    """``x * g`` with ``g`` computed from ``w`` (and shapes of ``x``); ``use`` picks how the
    branch reads the batch size."""

    def __init__(self, use: str):
        super().__init__()
        self.w = nn.Parameter(torch.rand(C) + 0.1)
        self.fc = nn.Linear(C, C)
        self.use = use

    def forward(self, x):
        use, w = self.use, self.w
        if use == "view":          # SE's spelling: b, c = x.shape[:2] ... view(b, c, 1, 1)
            b, c = x.shape[:2]
            g = torch.sigmoid(self.fc(w.expand(b, -1))).view(b, c, 1, 1)
        elif use == "size0":
            g = torch.sigmoid(self.fc(w.expand(x.size(0), -1))).view(x.size(0), -1, 1, 1)
        elif use == "full_size":
            g = torch.sigmoid(w.view(1, -1, 1, 1).expand(x.size()))
        elif use == "new_zeros":
            g = torch.sigmoid(w.new_zeros(x.shape[0], C, 1, 1) + w.view(1, C, 1, 1))
        elif use == "numel":       # a count that includes the batch
            g = torch.sigmoid(self.fc(w.expand(x.numel() // (C * 36), -1))).view(-1, C, 1, 1)
        elif use == "arithmetic":  # b * 1 is not a shape read any more
            g = torch.sigmoid(self.fc(w.expand(x.size(0) * 1, -1))).view(-1, C, 1, 1)
        elif use == "value":       # the batch size as a value
            g = torch.sigmoid(self.fc(w * torch.arange(x.size(0)).sum())).view(1, C, 1, 1)
        elif use == "none":        # no shape read at all
            g = torch.sigmoid(self.fc(w)).view(1, C, 1, 1)
        elif use == "channels":    # reads only the channel extent
            g = torch.sigmoid(self.fc(w)).view(1, x.size(1), 1, 1)
        elif use == "shape_channels":  # reads the shape, uses only its channel extent
            b, c = x.shape[:2]
            g = torch.sigmoid(self.fc(w)).view(1, c, 1, 1)
        else:
            raise ValueError(use)
        return x * g


def _graph(use: str, x: torch.Tensor):
    """(graph module, the constant branch, the multiply applying it, value-dependent nodes)."""
    torch.manual_seed(0)
    model = ConstantGate(use).eval()
    gm = fx.GraphModule(model, AsrTracer().trace(model), "ConstantGate")
    propagate_shapes(gm, (x,))
    dep = value_dependent(gm.graph)
    branch = {n for n in gm.graph.nodes if n not in dep and not reads_shape_only(n) and
              n.op in ("get_attr", "call_module", "call_function", "call_method") and
              tensor_shape(n) is not None}
    outs = {u for n in branch for u in n.users if u in dep}
    return model, gm, branch, outs, dep


def _gate(gm: fx.GraphModule, outs: set) -> fx.Node:
    (mul,) = outs
    return next(a for a in mul.args if a is not mul.args[0])


def _code(gm: fx.GraphModule) -> str:
    return gm.graph.python_code("self").src


X = (3, C, 6, 6)


@pytest.mark.parametrize("use", ["view", "size0", "full_size", "new_zeros"])
def test_batch_size_read_as_a_size_gives_one_row(use):
    x = torch.randn(*X)
    model, gm, branch, outs, dep = _graph(use, x)
    gate = _gate(gm, outs)
    rows, *rest = tensor_shape(gate)
    assert rows == 3
    assert collapse_batch(gm, branch, outs, dep) == (True, None)
    assert any(n.op == "call_function" and n.target is one_row for n in gm.graph.nodes)
    gm.graph.lint()
    gm.recompile()
    x2 = torch.randn(5, C, 6, 6)
    propagate_shapes(gm, (x2,))
    assert tensor_shape(gate) == (1, *rest)        # one row, whatever the batch
    assert tensor_shape(next(iter(outs))) == (5, C, 6, 6)
    with torch.no_grad():
        for xi in (x, x2):
            assert rel_err(model(xi), gm(xi)) <= TOL


@pytest.mark.parametrize("use, enters", [
    ("numel", "numel"),            # counts the batch
    ("arithmetic", "mul"),         # b * 1
    ("value", "arange"),           # torch.arange(b)
])
def test_batch_size_used_otherwise_is_refused_with_a_reason(use, enters):
    x = torch.randn(*X)
    _, gm, branch, outs, dep = _graph(use, x)
    before = _code(gm)
    changed, reason = collapse_batch(gm, branch, outs, dep)
    assert changed is False
    assert isinstance(reason, str) and enters in reason  # names the node it enters by
    assert _code(gm) == before


@pytest.mark.parametrize("use", ["none", "channels"])
def test_branch_that_never_reads_the_batch_size_is_not_touched(use):
    x = torch.randn(*X)
    _, gm, branch, outs, dep = _graph(use, x)
    before = _code(gm)
    assert collapse_batch(gm, branch, outs, dep) == (False, None)
    assert _code(gm) == before


def test_branch_reading_only_the_channels_of_a_shape_is_reported_unchanged():
    x = torch.randn(*X)
    _, gm, branch, outs, dep = _graph("shape_channels", x)
    before = _code(gm)
    assert collapse_batch(gm, branch, outs, dep) == (False, None)
    assert _code(gm) == before


def test_branch_value_read_outside_the_branch_is_refused():
    """``outs`` are the only readers allowed: a branch value also read elsewhere would see one
    row there too."""
    x = torch.randn(*X)
    _, gm, branch, outs, dep = _graph("view", x)
    before = _code(gm)
    changed, reason = collapse_batch(gm, branch, set(), dep)
    assert changed is False and isinstance(reason, str) and reason
    assert _code(gm) == before


def test_one_row_of_a_batch_size_and_of_a_shape():
    assert one_row(7) == 1
    assert one_row(torch.Size((7, 3, 4))) == torch.Size((1, 3, 4))
    assert one_row((2, 5)) == torch.Size((1, 5))
    assert isinstance(one_row([4, 2, 2]), torch.Size)


def test_one_row_is_recorded_when_traced_again():
    """A rewritten graph traced again (a GraphModule loaded back) keeps its one_row call."""

    def f(x):
        return x.new_ones(one_row(x.shape))

    gm = fx.symbolic_trace(f)
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"].count(one_row) == 1
    assert gm(torch.randn(5, 3, 2)).shape == (1, 3, 2)
