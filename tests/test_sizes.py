"""Sizes the rewrite pins: the channel counts and the batch extent 1 a converted branch reads
become numbers (``passes/sizes.pin_sizes``); sizes that vary stay read, and so does any size the
rest of the graph reads."""

import operator

import pytest
import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

import asrfx
from asrfx.passes import asr_rewrite
from asrfx.passes.sizes import VARIES, fixed_size, input_dependence, pin_sizes
from asrfx.passes.graph_utils import value_dependent
from asrfx.zoo import cifar_resnet
from helpers import randomize_bn, randomize_psi, rel_err, REL_TOL

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _shape_reads(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes
            if n.op == "call_function" and n.target is getattr and n.args[1] == "shape"
            or n.op == "call_method" and n.target == "size"]


def _unpinned(model: nn.Module, monkeypatch, **kw) -> fx.GraphModule:
    """The training form as it was before sizes were pinned."""
    with monkeypatch.context() as m:
        m.setattr(asr_rewrite, "pin_sizes", lambda gm, nodes: 0)
        return asrfx.prepare(model, example_inputs=(X,), **kw)


def _assert_same_everywhere(a: fx.GraphModule, b: fx.GraphModule) -> None:
    """Same outputs in train and eval mode at batch and spatial sizes other than X's."""
    for shape in [(1, 3, 16, 16), (5, 3, 12, 20)]:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
        for train in (True, False):
            a.train(train)
            b.train(train)
            with torch.no_grad():
                assert rel_err(a(x), b(x)) <= REL_TOL, (shape, train)


class _ExpandingSE(nn.Module):
    """SE whose gate is expanded to the map's full shape: the channel count and the batch are
    fixed, the height and width vary with the input."""

    def __init__(self, c: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, 4), nn.Linear(4, c)

    def forward(self, x):
        b, c, h, w = x.shape
        y = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3))))))
        return x * y.view(b, c, 1, 1).expand(b, c, h, w)


class _Net(nn.Module):
    def __init__(self, attention: type, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.att = attention(c)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        return self.head(self.att(self.bn(self.conv(x))).mean((2, 3)))


def test_the_resnet_branches_read_no_shape(monkeypatch):
    """Every SE site of a ResNet reads ``b, c = x.shape[:2]`` for its ``view(b, c, 1, 1)``: in
    the training form the view takes ``(1, C, 1, 1)`` as numbers, six nodes fewer per site,
    and the model computes what the unpinned form computes at any batch and spatial size."""
    model = randomize_bn(cifar_resnet(14, attention="se", block="basic", num_classes=6), 1)
    traced = asrfx.trace(model, example_inputs=(X,))
    assert len(_shape_reads(traced)) == 6  # one per site
    before = _unpinned(model, monkeypatch)
    after = asrfx.prepare(model, example_inputs=(X,))
    assert _shape_reads(after) == []
    assert len(before.graph.nodes) - len(after.graph.nodes) == 6 * 6
    views = [n for n in after.graph.nodes if n.op == "call_method" and n.target == "view"]
    assert sorted(n.args[1:] for n in views) == sorted(
        (1, c, 1, 1) for c in (16, 16, 32, 32, 64, 64))
    randomize_psi(before, 2)
    after.load_state_dict(before.state_dict())
    _assert_same_everywhere(before, after)
    deploy = asrfx.fold(after, example_inputs=(X,))
    with torch.no_grad():
        assert rel_err(before.eval()(X), deploy(X)) <= REL_TOL


def test_a_size_that_varies_stays_read(monkeypatch):
    """The batch, height and width the gate is expanded to (over x) stay read: a baked 2 or
    16 would fail at other inputs. The view of psi's one row takes numbers."""
    model = randomize_bn(_Net(_ExpandingSE), 3)
    before = _unpinned(model, monkeypatch)
    after = asrfx.prepare(model, example_inputs=(X,))
    (view,) = [n for n in after.graph.nodes if n.op == "call_method" and n.target == "view"]
    assert view.args[1:] == (1, 8, 1, 1)
    (expand,) = [n for n in after.graph.nodes if n.op == "call_method" and n.target == "expand"]
    assert expand.args[2] == 8
    assert all(isinstance(expand.args[i], fx.Node) for i in (1, 3, 4))
    assert _shape_reads(after)
    randomize_psi(before, 4)
    after.load_state_dict(before.state_dict())
    _assert_same_everywhere(before, after)


class _Shared(nn.Module):
    """A size read once, used by a constant branch and by the map's own reshape."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 1)
        self.g = nn.Parameter(torch.randn(6))

    def forward(self, x):
        y = self.conv(x)
        c = y.shape[1]
        gate = self.g.view(1, c, 1, 1)
        return (y * gate).reshape(y.shape[0], c, -1)


def _traced_shared() -> fx.GraphModule:
    gm = fx.symbolic_trace(_Shared())
    ShapeProp(gm).propagate(X)
    return gm


def test_a_size_the_rest_of_the_graph_reads_stays_there():
    gm = _traced_shared()
    (gate,) = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "view"]
    (size,) = [n for n in gate.args if isinstance(n, fx.Node) and n.target is operator.getitem]
    assert pin_sizes(gm, [gate]) == 1
    assert gate.args[1:] == (1, 6, 1, 1)
    (reshape,) = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "reshape"]
    assert size in reshape.args and size in gm.graph.nodes
    gm.recompile()
    x = torch.randn(3, 3, 5, 7)
    ref = _Shared()
    ref.load_state_dict(gm.state_dict())
    assert rel_err(ref(x), gm(x)) <= REL_TOL


def test_only_the_given_nodes_change_and_unused_reads_go():
    gm = _traced_shared()
    (gate,) = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "view"]
    before = [(n.name, n.args) for n in gm.graph.nodes]
    assert pin_sizes(gm, []) == 0
    assert [(n.name, n.args) for n in gm.graph.nodes] == before
    # once the reshape reads its channel count elsewhere, the shared read has no reader left
    (reshape,) = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "reshape"]
    reshape.update_arg(2, 6)
    reads = len(_shape_reads(gm))
    pin_sizes(gm, [gate])
    assert len(_shape_reads(gm)) == reads - 1  # y.shape for c went; y.shape[0]'s read stays


@pytest.mark.parametrize("dim, fixed", [(0, False), (1, True), (2, False), (3, False)])
def test_fixed_size_tells_channels_from_lengths(dim, fixed):
    """Of a conv's output only the channel count is the same at every input."""
    gm = _traced_shared()
    y = next(n for n in gm.graph.nodes if n.op == "call_module")
    with gm.graph.inserting_after(y):
        read = gm.graph.call_method("size", (y, dim))
    graph = gm.graph
    dep = input_dependence(graph)[0]
    assert read not in value_dependent(graph)
    v = fixed_size(gm, read, dep, {})
    assert (v == 6) if fixed else (v is VARIES)


def test_input_dependence_is_both_walks_in_one():
    """(every node that reads an input, shape reads included; the value-dependent ones) equal
    what each definition gives alone, on a traced ResNet and its training form."""
    model = cifar_resnet(14, attention="se", block="basic", num_classes=6)
    for gm in (asrfx.trace(model, example_inputs=(X,)), asrfx.prepare(model, example_inputs=(X,)),
               _traced_shared()):
        dep: set = set()
        for n in gm.graph.nodes:
            if n.op == "placeholder" or any(a in dep for a in n.all_input_nodes):
                dep.add(n)
        both = input_dependence(gm.graph)
        assert both == (dep, value_dependent(gm.graph))
        assert both[1] < both[0]  # (the output node and shape reads are no value nodes)
