"""Shared helpers for the asrfx tests (importable as ``helpers`` from any test module)."""

from __future__ import annotations

import collections
import io
from typing import Callable, Iterable

import torch
import torch.fx as fx
from torch import nn

from asrfx.zoo import SEModule

__all__ = ["assert_coded", "SharedGate", "UnknownLayoutScores", "asr_traced", "traced", "run_graph", "actions", "randomize_bn", "randomize_psi", "randomize_ln", "rel_err", "count_se", "se_paths",
           "node_kinds", "sigmoid_nodes", "bn_call_nodes", "train_steps", "state_snapshot",
           "assert_state_equal", "assert_prepare_changes_nothing", "REL_TOL", "rand_images",
           "uniform", "divisors", "dtype_tol", "SE", "SENet", "DropPathNet", "psi_names",
           "has_batchnorm", "assert_outputs_close", "check_fold", "roundtrip"]

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
            # a traced-through BatchNorm subclass leaves a plain module holding its tensors
            if not (isinstance(m, nn.modules.batchnorm._BatchNorm) or
                    isinstance(m._buffers.get("running_var"), torch.Tensor)):
                continue
            n += 1
            for name, lo, hi in (("running_mean", -0.5, 0.5), ("running_var", 0.5, 2.0),
                                 ("weight", 0.5, 1.5), ("bias", -0.5, 0.5)):
                t = getattr(m, name, None)
                if isinstance(t, torch.Tensor):
                    uniform(t, lo, hi)
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
    """max |ref - out| / max |ref|, in float64; of lists or tuples of tensors (deep
    supervision heads), the largest over the pairs."""
    if isinstance(ref, (list, tuple)):
        assert isinstance(out, (list, tuple)) and len(out) == len(ref)
        return max(rel_err(a, b) for a, b in zip(ref, out))
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
    eg = getattr(gm, "eval_graph", None)  # a DualModeGraphModule's second graph
    if isinstance(eg, fx.Graph) and eg is not gm.graph:
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


# ---------------------------------------------------------------------------------------------
# inputs and small numeric helpers


def rand_images(batch: int, seed: int, size: int = 32) -> torch.Tensor:
    """A (batch, 3, size, size) standard-normal batch from a generator seeded with ``seed``."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def uniform(gen: torch.Generator, shape, lo: float, hi: float,
            dtype: torch.dtype | None = None) -> torch.Tensor:
    """U(lo, hi) of ``shape`` from ``gen``, in ``dtype`` (the default dtype if None)."""
    return torch.rand(*shape, generator=gen, dtype=dtype) * (hi - lo) + lo


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def dtype_tol(dtype: torch.dtype, float32_tol: float = REL_TOL) -> float:
    """Relative tolerance (max |ref - out| / max |ref|) of an exact fold or merge in ``dtype``:
    ``float32_tol`` in float32 (``REL_TOL``, about 840 eps, unless the caller asks for less);
    otherwise 2**20 eps (~2.3e-10 in float64) -- rounding alone stays below ~1e-14 in the small
    O(1) nets of the tests, while a fold that loses a term errs by the order of the values."""
    return float32_tol if dtype == torch.float32 else 2.0 ** 20 * torch.finfo(dtype).eps


# ---------------------------------------------------------------------------------------------
# models


class SE(nn.Module):
    """Squeeze-and-excitation with 1x1 convs: ``x * sigmoid(fc2(relu(fc1(mean(x)))))``.

    ``hidden``: the width of the excitation, ``max(c // 2, 1)`` unless given.
    """

    def __init__(self, c: int, hidden: int | None = None):
        super().__init__()
        hidden = max(c // 2, 1) if hidden is None else hidden
        self.fc1 = nn.Conv2d(c, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class SENet(nn.Module):
    """conv -> BN -> SE -> ReLU -> conv -> BN: the SE folds into ``bn``, both BNs into convs."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.se = SE(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.se(self.bn(self.conv(x))))))


class DropPathNet(nn.Module):
    """Forward differs between train and eval mode (stochastic depth), without shape reads:
    traced as two graphs over one set of weights."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.se = SE(c)

    def forward(self, x):
        y = self.conv(x)
        z = self.se(self.bn(y))
        if self.training:
            keep = (torch.rand_like(z[:, :1, :1, :1]) < 0.8).float()
            z = z * keep / 0.8
        return torch.relu(y + z)


# ---------------------------------------------------------------------------------------------
# model state


def psi_names(model: nn.Module) -> list[str]:
    """The names of ``model``'s psi parameters, in registration order."""
    return [n for n, _ in model.named_parameters() if n.endswith("psi")]


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def randomize_ln(model: nn.Module, seed: int) -> nn.Module:
    """Give every affine LayerNorm of ``model`` random weight ~ U(0.5, 1.5) and bias
    ~ U(-0.5, 0.5), in place, from a ``torch.Generator`` seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
    return model


# ---------------------------------------------------------------------------------------------
# fold checks


def assert_outputs_close(ref: nn.Module, model: nn.Module, *inputs: torch.Tensor,
                         tol: float = REL_TOL) -> None:
    """``ref`` (switched to eval mode) and ``model`` agree on every input: rel_err <= ``tol``."""
    ref.eval()
    with torch.no_grad():
        for xi in inputs:
            assert rel_err(ref(xi), model(xi)) <= tol


def check_fold(prepared: nn.Module, x: torch.Tensor, deploy: nn.Module,
               tol: float = REL_TOL) -> None:
    """Eval-mode outputs of ``prepared`` and ``deploy`` agree on ``x`` and on a fresh batch of 3
    (``torch.randn``, from the global generator)."""
    assert_outputs_close(prepared, deploy, x, torch.randn(3, *x.shape[1:]), tol=tol)


def roundtrip(model: nn.Module, x: torch.Tensor, *others: torch.Tensor, bn_seed: int = 1,
              psi_seed: int | None = 2, tol: float = REL_TOL,
              before_fold: Callable[[nn.Module], None] | None = None):
    """prepare at ``x`` -> ``before_fold(prepared)`` (e.g. a training step) -> random BatchNorm
    statistics (``bn_seed``, where there are BatchNorms) and psi (``psi_seed``; None keeps psi)
    -> fold at ``x``; eval outputs checked on ``x`` and ``others``. Returns (prepared, deploy)."""
    import asrfx

    prepared = asrfx.prepare(model, example_inputs=(x,))
    if before_fold is not None:
        before_fold(prepared)
    if has_batchnorm(prepared):
        randomize_bn(prepared, seed=bn_seed)
    if psi_seed is not None:
        randomize_psi(prepared, seed=psi_seed)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    assert_outputs_close(prepared, deploy, x, *others, tol=tol)
    assert_coded(prepared.asrfx_report)
    assert_coded(deploy.asrfx_report)
    return prepared, deploy


def assert_coded(report) -> None:
    """Every site a report keeps or refuses names its reason with a code, beside the prose."""
    uncoded = [s for s in report.sites if s.action in ("kept", "refused") and not s.code]
    assert not uncoded, f"kept/refused without a code: {uncoded}\n{report}"


# ---------------------------------------------------------------------------------------------
# pass-level tests: one pass on a small hand-built graph


def traced(model: nn.Module, *inputs: torch.Tensor, leaves: tuple = ()) -> fx.GraphModule:
    """``model`` as an eval-mode GraphModule with shape metadata for ``inputs`` (what the fold
    passes read), ready to hand to a single pass.

    ``leaves``: module types (matched exactly) kept as one call instead of being traced
    through, e.g. a user layer with a registered fold target. The GraphModule shares
    ``model``'s submodules, so reference outputs are taken from it before a pass runs.
    """
    from asrfx.passes.shapes import propagate_shapes

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return type(m) in leaves or super().is_leaf_module(m, qualname)

    gm = fx.GraphModule(model, _Tracer().trace(model), type(model).__name__)
    gm.eval()
    propagate_shapes(gm, inputs)
    return gm


def run_graph(gm: fx.GraphModule, *inputs: torch.Tensor):
    """``gm``'s output on ``inputs``, without gradients, after regenerating its code (passes
    edit the graph and leave the recompile to their caller)."""
    gm.recompile()
    with torch.no_grad():
        return gm(*inputs)


def actions(records) -> collections.Counter:
    """How many of a pass's records took each action ("folded", "fused", "kept", ...)."""
    return collections.Counter(r.action for r in records)


def asr_traced(model: nn.Module, *inputs: torch.Tensor) -> fx.GraphModule:
    """``model`` traced as ``prepare`` traces it (:class:`asrfx.tracing.AsrTracer`, the model's
    own train/eval mode), with shape metadata for ``inputs``: a graph to hand to one
    prepare-side pass."""
    from asrfx.passes.shapes import propagate_shapes
    from asrfx.tracing import AsrTracer

    gm = fx.GraphModule(model, AsrTracer().trace(model), type(model).__name__)
    propagate_shapes(gm, inputs)
    return gm


class SharedGate(nn.Module):
    """One gate scaling two maps: one site (one psi), two multiplies."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.a = nn.Conv2d(3, c, 3, padding=1)
        self.b = nn.Conv2d(3, c, 1)
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        g = torch.sigmoid(self.fc(a.mean((2, 3), keepdim=True)))
        return a * g + b * g


class UnknownLayoutScores(nn.Module):
    """Tokens scored against a learned vector (``(N, L, C) @ w(C, 1)``) straight from the
    input: nothing in the graph says which dim holds the channels, so the gate is refused by
    what feeds it."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.q = nn.Linear(c, c)
        self.w = nn.Parameter(torch.randn(c, 1) * 0.3)

    def forward(self, t):
        t = t * 2.0
        return t * torch.softmax(self.q(t) @ self.w, dim=1)


def pickled_copy(model: nn.Module) -> nn.Module:
    """``model`` through ``torch.save`` / ``torch.load`` of the whole module (pickle)."""
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


class TypeCheck(nn.Module):
    """Traces without error but wrongly: ``isinstance(proxy, Tensor)`` is False while tracing."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x):
        if isinstance(x, torch.Tensor):
            return self.conv(x) * 2
        return x


class BAMGate(nn.Module):
    """BAM (Park et al., BMVC 2018): ``x * (1 + sigmoid(channel(x) * spatial(x)))``, a gate per
    channel and position from a pooled channel branch and a dilated spatial branch."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(c, 2), nn.ReLU(), nn.Linear(2, c))
        self.sp = nn.Sequential(nn.Conv2d(c, 2, 1), nn.Conv2d(2, 2, 3, padding=2, dilation=2),
                                nn.Conv2d(2, 1, 1))

    def forward(self, x):
        ch = self.fc(x.mean((2, 3))).view(x.shape[0], -1, 1, 1)
        return x * (1 + torch.sigmoid(ch * self.sp(x)))
