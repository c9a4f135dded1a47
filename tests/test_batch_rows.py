"""Constant branches are batch-independent by construction (passes/batch_rows.py).

An excitation fed psi used to run on N expanded copies of psi; a Linear over N identical rows
can give rows that differ in the last bit (AVX2 BLAS kernels, batch 2-4), and fold then kept the
whole ASR branch in the deploy graph ("differs across the batch"). Now the training form runs
the excitation once on psi (batch 1) and broadcasts the gate, and fold evaluates any branch that
reads the batch size only for its shapes on one row.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.fx as fx
from torch import nn

import asrfx
from asrfx.passes.batch_rows import collapse_batch, one_row
from helpers import REL_TOL, randomize_bn, rel_err


class TanhSE(nn.Module):
    """An SE written as users write it: ``x * tanh(fc(pool(x).flatten(1))).view(n, c, 1, 1)``
    (``gate=False``: no gate at all)."""

    def __init__(self, c: int, gate: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, c)
        self.gate = gate

    def forward(self, x):
        x = self.bn(self.conv(x))
        n, c = x.shape[:2]
        g = self.fc(self.pool(x).flatten(1))
        if self.gate:
            g = torch.tanh(g)
        return x * g.view(n, c, 1, 1)


def _psi_normal(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("psi"):
                p.copy_(torch.randn(p.shape, generator=gen))


def _deploy_kinds(gm: fx.GraphModule) -> list[str]:
    return [type(gm.get_submodule(str(n.target))).__name__ if n.op == "call_module"
            else str(n.target) for n in gm.graph.nodes if n.op not in ("placeholder", "output")]


# the configurations that were left unfolded on a 2-core AMD EPYC (c=33, batch 2 and 3), and
# neighbours
@pytest.mark.parametrize("c,batch,gate,seed", list(itertools.product(
    (5, 33), (2, 3, 4), (True, False), (0, 1))))
def test_user_se_with_random_psi_folds_completely(c, batch, gate, seed):
    torch.manual_seed(seed)
    model = TanhSE(c, gate)
    x = torch.randn(batch, 3, 6, 6)
    prepared = asrfx.prepare(model, example_inputs=(x,))
    _psi_normal(prepared, seed)
    randomize_bn(prepared, seed)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    report = deploy.asrfx_report
    assert [s.action for s in report.sites if s.action == "kept"] == [], report
    # nothing of the branch is left: one conv (BN fused, the gate folded into it)
    assert _deploy_kinds(deploy) == ["Conv2d"], deploy.code
    assert not any("psi" in k for k in deploy.state_dict())
    prepared.eval()
    with torch.no_grad():
        for xi in (x, torch.randn(batch + 3, 3, 6, 6)):
            assert rel_err(prepared(xi), deploy(xi)) <= REL_TOL


def test_training_form_runs_the_excitation_once():
    """No expand of psi in the prepared graph; the excitation's Linear sees one row whatever
    the batch, and the gate still reaches every sample."""
    model = TanhSE(8)
    x = torch.randn(4, 3, 6, 6)
    prepared = asrfx.prepare(model, example_inputs=(x,))
    assert not [n for n in prepared.graph.nodes if n.op == "call_method" and n.target == "expand"]
    seen = []
    fc = prepared.get_submodule("fc")
    fc.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    prepared.train()
    out = prepared(torch.randn(5, 3, 6, 6))
    assert seen == [(1, 8)]
    assert out.shape == (5, 8, 6, 6)


def _expanded_form(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    """The training form as it was: psi expanded to the batch (apply_asr(one_row=False))."""
    import asrfx.pipeline as api

    original = api.apply_asr
    api.apply_asr = lambda *a, **k: original(*a, **{**k, "one_row": False})
    try:
        return asrfx.prepare(model, example_inputs=(x,))
    finally:
        api.apply_asr = original


@pytest.mark.parametrize("attention", ["se", "eca", "gc", "srm", "gct", "cbam_channel"])
def test_one_row_training_form_equals_the_expanded_one(attention):
    """Outputs and every gradient (psi's included) in train mode match the expanded form, for
    library attention of several shapes (SE, ECA's conv1d across channels, GC's additive
    context, SRM's two statistics, GCT's norms across channels, CBAM's shared MLP)."""
    from asrfx.attention import make_attention

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          make_attention(attention, 16))
    x = torch.randn(4, 3, 8, 8)
    a = asrfx.prepare(model, example_inputs=(x,), init="normal")
    b = _expanded_form(model, x)
    b.load_state_dict(a.state_dict())
    assert any(n.op == "call_method" and n.target == "expand" for n in b.graph.nodes)
    assert not any(n.op == "call_method" and n.target == "expand" and "psi" in str(n.args[0])
                   for n in a.graph.nodes)
    a.train()
    b.train()
    ya, yb = a(x), b(x)
    assert rel_err(yb, ya) <= 1e-5
    ya.square().sum().backward()
    yb.square().sum().backward()
    grads_b = dict(b.named_parameters())
    # a gradient that is zero in exact arithmetic (a conv bias before a training-mode BN) is
    # rounding noise in both forms: compare against the largest gradient of the model too
    scale = max(float(q.grad.abs().max()) for q in grads_b.values() if q.grad is not None)
    for name, p in a.named_parameters():
        q = grads_b[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is None:  # a weight the converted attention no longer reads (GC's mask conv)
            assert not name.endswith("psi")
            continue
        diff = float((p.grad - q.grad).abs().max())
        assert diff <= 1e-4 * max(float(q.grad.abs().max()), 1e-3 * scale), name


class ConstBranch(nn.Module):
    """A constant branch written by hand: a parameter expanded over the batch, then a Linear."""

    def __init__(self, c: int = 33):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.w = nn.Parameter(torch.randn(1, c, 1, 1))
        self.fc = nn.Linear(c, c)

    def forward(self, x):
        x = self.conv(x)
        n = x.size(0)
        g = self.fc(self.w.expand(n, -1, -1, -1).flatten(1))
        return x * torch.sigmoid(g).view(n, -1, 1, 1)


def test_hand_written_constant_branch_is_evaluated_on_one_row():
    torch.manual_seed(0)
    model = ConstBranch()
    deploy = asrfx.fold(model, example_inputs=(torch.randn(3, 3, 6, 6),))
    assert [s for s in deploy.asrfx_report.sites if s.action == "kept"] == []
    assert _deploy_kinds(deploy) == ["Conv2d"], deploy.code


class BatchCounter(nn.Module):
    """A branch that uses the batch size as a value: its rows really differ; it must stay."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        x = self.conv(x)
        n = x.size(0)
        g = torch.arange(n, dtype=x.dtype).view(n, 1, 1, 1) + 1.0
        return x * g


def test_branch_using_the_batch_size_as_a_value_is_kept_and_exact():
    model = BatchCounter()
    x = torch.randn(3, 3, 5, 5)
    deploy = asrfx.fold(model, example_inputs=(x,))
    kept = [s for s in deploy.asrfx_report.sites if s.kind == "constant branch"]
    assert [s.action for s in kept] == ["kept"], deploy.asrfx_report
    assert kept[0].code == "batch-dependent" and "differs across the batch" in kept[0].reason
    with torch.no_grad():
        for xi in (x, torch.randn(5, 3, 5, 5)):
            assert rel_err(model(xi), deploy(xi)) <= REL_TOL


class MergedBatch(nn.Module):
    """The batch size enters a shape by arithmetic (``view(n * c)``): not a pure batch extent, so
    psi stays expanded in the training form; fold still evaluates it (rows agree)."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, c)

    def forward(self, x):
        x = self.bn(self.conv(x))
        n, c = x.shape[:2]
        g = torch.sigmoid(self.fc(x.mean((2, 3)))).reshape(n * c)
        return x * g.view(n, c, 1, 1)


def test_batch_size_in_arithmetic_keeps_psi_expanded_and_folds():
    model = MergedBatch()
    x = torch.randn(3, 3, 6, 6)
    prepared = asrfx.prepare(model, example_inputs=(x,))
    assert prepared.asrfx_report.count(action="converted") == 1
    assert any(n.op == "call_method" and n.target == "expand" for n in prepared.graph.nodes)
    prepared.train()
    assert prepared(torch.randn(5, 3, 6, 6)).shape == (5, 6, 6, 6)
    randomize_bn(prepared, 1)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    assert [s for s in deploy.asrfx_report.sites if s.action == "kept"] == []
    prepared.eval()
    with torch.no_grad():
        assert rel_err(prepared(x), deploy(x)) <= REL_TOL


def test_one_row():
    assert one_row(7) == 1
    assert one_row(torch.Size((7, 3, 4))) == torch.Size((1, 3, 4))
    assert one_row((2, 5)) == torch.Size((1, 5))


def test_collapse_refuses_a_branch_read_elsewhere():
    """A branch value that something other than the broadcasting op reads (here: returned as
    a second output) would see one row: the rewrite is refused, nothing changed."""

    class Returns(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(1, 4, 1, 1))

        def forward(self, x):
            g = self.w.expand(x.size(0), -1, -1, -1)
            return x * g, g

    gm = fx.symbolic_trace(Returns())
    from torch.fx.passes.shape_prop import ShapeProp
    ShapeProp(gm).propagate(torch.randn(3, 4, 2, 2))
    from asrfx.passes.graph_utils import value_dependent

    dep = value_dependent(gm.graph)
    g = next(n for n in gm.graph.nodes if n.op == "call_method" and n.target == "expand")
    w = g.args[0]
    mul = next(iter(u for u in g.users if u.op == "call_function"))
    before = gm.code
    changed, reason = collapse_batch(gm, {w, g}, {mul}, dep)
    assert not changed and "also read" in reason
    assert gm.code == before


class NormedSE(nn.Module):
    """An SE whose excitation normalises its hidden units: ``norm`` decides with what."""

    def __init__(self, c: int, norm: str):
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // 2, 1)
        self.fc2 = nn.Conv2d(c // 2, c, 1)
        self.norm = norm
        if norm == "running":
            self.bn = nn.BatchNorm2d(c // 2)
        elif norm == "batch-only":
            self.bn = nn.BatchNorm2d(c // 2, track_running_stats=False)
        self.bias = nn.Parameter(torch.zeros(c // 2))

    def forward(self, x):
        h = self.fc1(x.mean((2, 3), keepdim=True))
        if self.norm == "functional":  # batch statistics written by hand, no running ones
            h = nn.functional.batch_norm(h, None, None, None, self.bias, training=True)
        else:
            h = self.bn(h)
        return x * torch.sigmoid(self.fc2(torch.relu(h)))


def _normed_net(norm: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         NormedSE(8, norm))


@pytest.mark.parametrize("norm", ["batch-only", "functional"])
def test_branch_normalising_with_batch_statistics_is_refused(norm):
    """psi is one value for the whole batch: a norm with batch statistics only would output its
    bias whatever psi is (psi's gradient ~1e-7 before: it never trained). The site is refused,
    the norm named, the attention left input-dependent."""
    model = _normed_net(norm)
    x = torch.randn(4, 3, 8, 8)
    prepared = asrfx.prepare(model, example_inputs=(x,))
    (site,) = prepared.asrfx_report.sites
    assert (site.action, site.code) == ("refused", "batch-stats-norm-in-branch")
    assert ("3.bn" if norm == "batch-only" else "batch_norm") in site.reason
    assert not [n for n, _ in prepared.named_parameters() if n.endswith("psi")]
    prepared.eval()
    model.eval()
    with torch.no_grad():
        assert rel_err(model(x), prepared(x)) <= 1e-6


def test_branch_norm_with_running_statistics_trains_psi():
    """The same SE with running statistics converts; the norm is frozen to them, and psi's
    gradient is of the size of the other weights' (it trains)."""
    prepared = asrfx.prepare(_normed_net("running"), example_inputs=(torch.randn(4, 3, 8, 8),))
    (site,) = prepared.asrfx_report.sites
    assert site.action == "converted"
    prepared.train()
    prepared(torch.randn(4, 3, 8, 8)).square().sum().backward()
    psi = prepared.get_parameter("3.psi").grad.abs().max()
    fc1 = prepared.get_parameter("3.fc1.weight").grad.abs().max()
    assert psi > 1e-3 * fc1 > 0


class GateThenBN(nn.Module):
    """conv -> SE gate -> BatchNorm: in training the norm divides each channel by its batch
    standard deviation, so a constant gate cancels (``BN(x g) = sign(g) BN(x)``)."""

    def __init__(self, shortcut: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(8, 4), nn.Linear(4, 8)
        self.bn = nn.BatchNorm2d(8)
        self.shortcut = shortcut

    def forward(self, x):
        x = self.conv(x)
        g = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3))))))
        y = x * g[:, :, None, None]
        return self.bn(y) + y if self.shortcut else self.bn(y)


def _train_step_and_fold(model: nn.Module, x: torch.Tensor, seed: int = 0):
    """prepare, one SGD step (psi's gradient measured against the excitation's), norms
    randomised, fold (its own check), and the eval outputs compared once more."""
    prepared = asrfx.prepare(model, example_inputs=(x,))
    prepared.train()
    loss = (prepared(x) * torch.randn(prepared(x).shape)).sum()
    loss.backward()
    grads = {n: p.grad.abs().max().item() for n, p in prepared.named_parameters()
             if p.grad is not None}
    with torch.no_grad():
        for p in prepared.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    randomize_bn(prepared, seed)
    prepared.eval()
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    with torch.no_grad():
        assert rel_err(prepared(x), deploy(x)) <= REL_TOL
    return prepared, deploy, grads


def test_gate_read_only_by_a_training_batch_norm_moves_behind_it():
    """The constant gate scales the norm's output instead: it trains (psi's gradient is of the
    order of its excitation's, not rounding noise) and folds into the norm's affine."""
    torch.manual_seed(0)
    model = GateThenBN()
    x = torch.randn(4, 3, 8, 8)
    prepared, deploy, grads = _train_step_and_fold(model, x)
    (site,) = prepared.asrfx_report.sites
    assert (site.action, site.code) == ("converted", "gate-after-batch-norm")
    assert "bn (BatchNorm2d)" in site.reason
    assert grads["psi"] > 1e-3 * grads["fc2.weight"] > 0
    assert deploy.asrfx_report.count(action="kept", kind="channel-attention") == 0
    assert not any(n.target is torch.sigmoid for n in deploy.graph.nodes)
    assert [n.target for n in deploy.graph.nodes if n.op == "call_module"] == ["conv"]


def test_constant_gate_before_a_training_batch_norm_would_not_train():
    """The refusal's premise, measured: with the gate forced into its ASR form (a constant),
    the training-mode norm cancels it and psi's gradient is rounding noise. (With the norm's
    eps, ``g / sqrt(var g^2 + eps)`` leaks a gradient of order eps / (var g^2)^1.5 that only
    pulls g towards the eps regime; eps = 1e-12 here shows the cancellation itself.)"""
    model = GateThenBN()
    model.bn.eps = 1e-12
    psi = nn.Parameter(torch.full((1, 8), 0.5))
    model.train()

    def asr_forward(x):
        x = model.conv(x)
        g = torch.sigmoid(model.fc2(torch.relu(model.fc1(psi))))
        return model.bn(x * g[:, :, None, None])

    out = asr_forward(torch.randn(4, 3, 8, 8))
    (out * torch.randn(out.shape)).sum().backward()  # (a normalised map's square sum is fixed)
    backbone = model.conv.weight.grad.abs().max()
    assert backbone > 1e-3
    assert psi.grad.abs().max() < 1e-5 * backbone


def test_gate_also_read_elsewhere_or_before_a_frozen_norm_converts():
    x = torch.randn(4, 3, 8, 8)
    both = asrfx.prepare(GateThenBN(shortcut=True), example_inputs=(x,))
    assert both.asrfx_report.count(action="converted") == 1
    frozen = GateThenBN()
    frozen.bn.eval()  # fine-tuning with frozen statistics: the gate does not cancel
    prepared = asrfx.prepare(frozen, example_inputs=(x,))
    assert prepared.asrfx_report.count(action="converted") == 1


def test_additive_gate_before_a_training_batch_norm_moves_behind_it():
    """Global-context attention adds a per-channel constant; a training-mode BN subtracts the
    batch mean and would cancel it just the same: the context shifts the norm's output."""
    from asrfx.attention import make_attention

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), make_attention("gc", 16),
                          nn.BatchNorm2d(16))
    prepared, deploy, grads = _train_step_and_fold(model, torch.randn(2, 3, 8, 8))
    (site,) = prepared.asrfx_report.sites
    assert (site.code, site.form) == ("gate-after-batch-norm", "additive context")
    assert "shifts the output of 2 (BatchNorm2d)" in site.reason
    # the context's last layer starts at zero (GCNet's init): its bias shows the gradient that
    # a norm behind the context would cancel
    assert grads["1.transform.3.bias"] > 1e-3 * grads["2.bias"] > 0
    assert [n.target for n in deploy.graph.nodes if n.op == "call_module"] == ["0"]


class _SE(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))


class TwoGatesInARow(nn.Module):
    """conv -> SE1 -> BN0 -> SE2 -> depthwise conv -> BN1. SE1's gate cancels in BN0; moved
    behind BN0 it would scale BN0's output, which (through SE2's constant gate and the
    depthwise conv) only BN1 reads: it would cancel there too. Both gates belong behind BN1."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv, self.se1, self.bn0 = nn.Conv2d(3, c, 3, padding=1), _SE(c), nn.BatchNorm2d(c)
        self.se2, self.bn1 = _SE(c), nn.BatchNorm2d(c)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        y = self.bn0(self.se1(self.conv(x)))
        y = self.bn1(self.dw(self.se2(y)))
        return self.head(torch.relu(y).mean((2, 3)))


def test_two_gates_in_a_row_both_move_behind_the_last_norm_and_train():
    """Found by the fuzzer: the second move rewired the first gate's product away (its gate
    was silently dropped from the training form); and a gate moved behind a norm whose output
    only another training-mode norm reads would not train there either."""
    torch.manual_seed(1)
    x = torch.randn(4, 3, 8, 8)
    prepared, deploy, grads = _train_step_and_fold(TwoGatesInARow(), x)
    sites = {s.path: s for s in prepared.asrfx_report.sites}
    for path in ("se1", "se2"):
        assert (sites[path].action, sites[path].code) == ("converted", "gate-after-batch-norm")
        assert "bn1 (BatchNorm2d)" in sites[path].reason, sites[path].reason
        assert grads[f"{path}.psi"] > 1e-3 * grads[f"{path}.fc.weight"] > 0
    # every psi is read by the training graph
    read = {str(n.target) for n in prepared.graph.nodes if n.op == "get_attr"}
    assert {"se1.psi", "se2.psi"} <= read
    assert not any(n.target is torch.sigmoid for n in deploy.graph.nodes)
