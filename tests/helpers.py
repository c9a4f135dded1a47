"""Shared helpers for the asrfx tests (importable as ``helpers`` from any test module)."""

from __future__ import annotations

import collections
from typing import Iterable

import torch
import torch.fx as fx
from torch import nn

from asrfx.zoo import SEModule

__all__ = ["randomize_bn", "rel_err", "count_se", "se_paths", "node_kinds", "sigmoid_nodes",
           "bn_call_nodes", "train_steps", "state_snapshot", "assert_state_equal", "REL_TOL"]

#: the equivalence tolerance of the tests: max |ref - out| / max |ref|.
REL_TOL = 1e-4


def randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    """Give every BatchNorm of ``model`` random running statistics and affine parameters, in place.

    A freshly built BatchNorm has mean 0, var 1, weight 1, bias 0 -- the identity in eval mode
    (up to eps), so a fold that mishandles norms could still pass. Equivalence tests call this
    before every comparison: running_mean, bias ~ U(-0.5, 0.5), running_var ~ U(0.5, 2),
    weight ~ U(0.5, 1.5), drawn from a ``torch.Generator`` seeded with ``seed``.
    """
    gen = torch.Generator().manual_seed(seed)

    def uniform(t: torch.Tensor, lo: float, hi: float) -> None:
        v = torch.rand(t.shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo
        t.copy_(v.to(dtype=t.dtype, device=t.device))

    n = 0
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                continue
            n += 1
            if m.running_mean is not None:
                uniform(m.running_mean, -0.5, 0.5)
            if m.running_var is not None:
                uniform(m.running_var, 0.5, 2.0)
            if m.weight is not None:
                uniform(m.weight, 0.5, 1.5)
            if m.bias is not None:
                uniform(m.bias, -0.5, 0.5)
    assert n > 0, "model has no BatchNorm to randomize"
    return model


def randomize_psi(model: nn.Module, seed: int) -> nn.Module:
    """psi starts as a constant (0.1); random values make every channel's gate differ.

    Values are drawn from U(0.1, 1): positive, because some statistics psi stands for are never
    negative (variance, sum of squares) and their branches take square roots of them.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("psi"):
                p.copy_((torch.rand(p.shape, generator=gen) * 0.9 + 0.1).to(p))
    return model


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    """max |ref - out| / max |ref|, in float64."""
    ref, out = ref.detach().double(), out.detach().double()
    assert ref.shape == out.shape, (ref.shape, out.shape)
    return (ref - out).abs().max().item() / max(ref.abs().max().item(), 1e-12)


def se_paths(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, SEModule)]


def count_se(model: nn.Module) -> int:
    return len(se_paths(model))


def _kind(gm: fx.GraphModule, n: fx.Node) -> str:
    if n.op == "call_module":
        return type(gm.get_submodule(str(n.target))).__name__
    if n.op in ("call_function", "call_method"):
        return str(n.target)
    if n.op == "get_attr":
        return "get_attr"  # names differ between models; the op alone is compared
    return n.op


def node_kinds(gm: fx.GraphModule) -> collections.Counter:
    """Multiset of (op, target kind) over the graph's nodes."""
    return collections.Counter((n.op, _kind(gm, n)) for n in gm.graph.nodes)


def _graphs(gm: fx.GraphModule) -> Iterable[fx.Graph]:
    yield gm.graph
    eg = gm.__dict__.get("_asrfx_eval_graph")
    if eg is not None and eg is not gm.graph:
        yield eg


def sigmoid_nodes(gm: fx.GraphModule, graph: fx.Graph | None = None) -> list[fx.Node]:
    """Sigmoid calls in any spelling: nn.Sigmoid module, torch.sigmoid / F.sigmoid, .sigmoid()."""
    graph = gm.graph if graph is None else graph
    out = []
    for n in graph.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), nn.Sigmoid):
            out.append(n)
        elif n.op == "call_function" and n.target in (torch.sigmoid,
                                                      torch.nn.functional.sigmoid):
            out.append(n)
        elif n.op == "call_method" and n.target in ("sigmoid", "sigmoid_"):
            out.append(n)
    return out


def bn_call_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)),
                                                nn.modules.batchnorm._BatchNorm):
            out.append(n)
        elif n.op == "call_function" and n.target in (torch.nn.functional.batch_norm,
                                                      torch.batch_norm):
            out.append(n)
    return out


def train_steps(model: nn.Module, *, steps: int = 3, batch: int = 8, num_classes: int = 10,
                size: int = 32, lr: float = 0.05, seed: int = 0) -> list[float]:
    """A few SGD steps in train mode on random data with cross-entropy; returns the losses."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for _ in range(steps):
        x = torch.randn(batch, 3, size, size, generator=gen)
        y = torch.randint(0, num_classes, (batch,), generator=gen)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), f"{k} changed"


def assert_prepare_changes_nothing(model: nn.Module, *inputs: torch.Tensor) -> None:
    """prepare() converts nothing in ``model``: no site, no psi, identical eval outputs."""
    import asrfx

    prepared = asrfx.prepare(model, example_inputs=inputs)
    assert prepared.asrfx_report.count(action="converted") == 0
    assert not any(n.endswith("psi") for n, _ in prepared.named_parameters())
    model.eval()
    prepared.eval()
    with torch.no_grad():
        torch.testing.assert_close(prepared(*inputs), model(*inputs))
