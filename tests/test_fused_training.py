"""The fused training form (``prepare(..., fused=True)``): each converted gate goes through its
BatchNorm's affine. It must compute what the multiply form computes, in training and eval mode,
with the same gradients, parameter names, statistics and deploy model."""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import asrfx
from asrfx.passes.batch_excitations import BatchedExcitations
from asrfx.passes.fuse_gates import GatedBatchNorm2d, GatedConv2d
from asrfx.zoo import cifar_resnet
from helpers import REL_TOL, pickled_copy, randomize_bn, randomize_psi, rel_err

X = torch.randn(6, 3, 12, 12, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 3, 4, 5])


def _pair(model: nn.Module, x: torch.Tensor = X, **kw):
    """(multiply form, fused form) of ``model``, with equal psi."""
    plain = asrfx.prepare(model, example_inputs=(x,), **kw)
    fused = asrfx.prepare(model, example_inputs=(x,), fused=True, **kw)
    fused.load_state_dict(plain.state_dict())
    return plain, fused


def _step(model: nn.Module, x: torch.Tensor = X) -> tuple[torch.Tensor, dict]:
    model.train()
    model.zero_grad()
    torch.manual_seed(0)  # dropouts draw the same masks in both forms
    out = model(x)
    F.cross_entropy(out, Y[: len(x)] % out.shape[1]).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                          if p.grad is not None}


def _assert_same_training(plain: nn.Module, fused: nn.Module, steps: int = 2) -> None:
    for _ in range(steps):
        a, ga = _step(plain)
        b, gb = _step(fused)
        assert rel_err(a, b) <= REL_TOL
        assert ga.keys() == gb.keys()
        # every gradient: psi's, the excitation's, the norms'. A conv bias before a
        # training-mode norm has a zero gradient up to rounding: such noise is measured
        # against the largest gradient of the model, not against itself
        scale = max(float(g.abs().max()) for g in ga.values())
        noise = 64 * torch.finfo(torch.float32).eps * scale
        for name in ga:
            err = float((ga[name] - gb[name]).abs().max())
            assert err <= REL_TOL * float(ga[name].abs().max()) + noise, name
        with torch.no_grad():
            for p, q in zip(plain.parameters(), fused.parameters()):
                if p.grad is not None:
                    p -= 0.05 * p.grad
                    q -= 0.05 * q.grad
    sa, sb = plain.state_dict(), fused.state_dict()
    assert sa.keys() == sb.keys()  # names kept: checkpoints load both ways
    for k in sa:  # statistics and counters updated alike
        assert rel_err(sa[k].double(), sb[k].double()) <= REL_TOL, k
    plain.eval()
    fused.eval()
    with torch.no_grad():
        assert rel_err(plain(X), fused(X)) <= REL_TOL
        # and both fold (each checked against its prepared form) to the same deploy model
        a = asrfx.fold(plain, example_inputs=(X,))
        b = asrfx.fold(fused, example_inputs=(X,))
        assert rel_err(a(X), b(X)) <= REL_TOL


@pytest.mark.parametrize("attention", ["se", "eca", "srm", "gct", "cbam_channel", "spa"])
def test_fused_form_trains_like_the_multiply_form(attention):
    torch.manual_seed(1)
    model = cifar_resnet(8, attention=attention, block="basic", num_classes=6)
    randomize_bn(model, 2)
    plain, fused = _pair(model)
    notes = fused.asrfx_report.notes
    assert any("fused training form: 3 gate(s)" in n for n in notes), notes
    assert sum(isinstance(m, GatedBatchNorm2d) for m in fused.modules()) == 3
    randomize_psi(plain, 3)
    fused.load_state_dict(plain.state_dict())
    _assert_same_training(plain, fused)


def test_fused_form_folds_to_the_same_deploy_model():
    torch.manual_seed(4)
    model = randomize_bn(cifar_resnet(8, attention="se", block="basic", num_classes=6), 5)
    plain, fused = _pair(model)
    randomize_psi(plain, 6)
    fused.load_state_dict(plain.state_dict())
    _step(plain)
    _step(fused)
    plain.eval()
    fused.eval()
    a = asrfx.fold(plain, example_inputs=(X,))
    b = asrfx.fold(fused, example_inputs=(X,))
    with torch.no_grad():
        assert rel_err(a(X), b(X)) <= REL_TOL
    assert [n.op for n in a.graph.nodes] == [n.op for n in b.graph.nodes]
    # folding leaves the prepared model fused
    assert sum(isinstance(m, GatedBatchNorm2d) for m in fused.modules()) == 3


def test_checkpoints_load_both_ways_and_the_fused_model_pickles():
    model = randomize_bn(cifar_resnet(8, attention="se", block="basic", num_classes=6), 7)
    plain, fused = _pair(model)
    randomize_psi(fused, 8)
    plain.load_state_dict(fused.state_dict(), strict=True)
    fused.load_state_dict(plain.state_dict(), strict=True)
    again = pickled_copy(fused)
    fused.eval()
    again.eval()
    with torch.no_grad():
        assert rel_err(fused(X), again(X)) <= REL_TOL


class NormAct(nn.BatchNorm2d):
    """A BatchNorm subclass with an activation (traced through: an ``F.batch_norm`` call)."""

    def forward(self, x):
        return F.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                   self.bias, self.training, self.momentum, self.eps))


class Mixed(nn.Module):
    """Sites of every kind: after a torch BatchNorm, after a traced-through norm, a gate moved
    behind a training-mode norm, and after a bare conv (stays a multiply)."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 3, padding=1)
        self.act = NormAct(c)
        self.fcs = nn.ModuleList(nn.Conv2d(c, c, 1) for _ in range(4))
        self.head = nn.Linear(c, 6)

    def gate(self, i, y):
        return y * torch.sigmoid(self.fcs[i](y.mean((2, 3), keepdim=True)))

    def forward(self, x):
        y = self.gate(0, self.bn1(self.conv1(x)))          # after a torch BatchNorm
        y = self.gate(1, self.act(self.conv2(y)))            # after ReLU: stays a multiply
        y = self.bn2(self.gate(2, self.conv3(y)))            # moved behind bn2, then fused
        y = self.gate(3, y)                                  # after bn2's moved gate
        return self.head(y.mean((2, 3)))


def test_every_kind_of_site_trains_alike_and_the_report_says_which_stay():
    torch.manual_seed(9)
    model = randomize_bn(Mixed(), 10)
    plain, fused = _pair(model)
    notes = fused.asrfx_report.notes
    stays = [n for n in notes if "stays a multiply" in n]
    assert len(stays) >= 1 and any("fcs" in n or "(top)" in n or "gate" in n for n in stays), \
        notes
    randomize_psi(plain, 11)
    fused.load_state_dict(plain.state_dict())
    _assert_same_training(plain, fused)


def test_traced_through_norm_takes_the_gate_in_its_affine():
    class GateAfterNormNoAct(nn.Module):
        def __init__(self, c: int = 8):
            super().__init__()
            self.conv = nn.Conv2d(3, c, 3, padding=1)
            self.bn = _PlainSub(c)
            self.fc = nn.Conv2d(c, c, 1)
            self.head = nn.Linear(c, 6)

        def forward(self, x):
            y = self.bn(self.conv(x))
            y = y * torch.sigmoid(self.fc(y.mean((2, 3), keepdim=True)))
            return self.head(torch.relu(y).mean((2, 3)))

    torch.manual_seed(12)
    model = randomize_bn(GateAfterNormNoAct(), 13)
    plain, fused = _pair(model)
    assert not any("stays a multiply" in n for n in fused.asrfx_report.notes), \
        fused.asrfx_report.notes
    assert not any(n.target is torch.sigmoid and any(u.target in (torch.mul, "mul") or
                                                     getattr(u.target, "__name__", "") == "mul"
                                                     for u in n.users)
                   for n in fused.graph.nodes if n.op == "call_function")
    randomize_psi(plain, 14)
    fused.load_state_dict(plain.state_dict())
    _assert_same_training(plain, fused)


class _PlainSub(nn.BatchNorm2d):
    """A BatchNorm subclass from outside torch with torch's forward (traced through)."""


def test_calibrated_init_and_sync_batch_norm():
    """``init="calibrate"`` works the same; a SyncBatchNorm is never fused (its forward decides
    at run time whether to synchronise) and the report says so."""
    torch.manual_seed(15)
    model = randomize_bn(cifar_resnet(8, attention="se", block="basic", num_classes=6), 16)
    kw = dict(init="calibrate", calibration_data=[X[:3], X[3:]])
    plain, fused = _pair(model, **kw)
    for p in (plain, fused):
        p.eval()
    with torch.no_grad():
        assert rel_err(plain(X), fused(X)) <= REL_TOL
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(cifar_resnet(8, attention="se",
                                                                  block="basic"))
    prepared = asrfx.prepare(synced.eval(), example_inputs=(X,), fused=True)
    notes = prepared.asrfx_report.notes
    assert any("fused training form: 0 gate(s)" in n for n in notes), notes
    assert sum("not a torch BatchNorm's output" in n for n in notes) == 3, notes


def test_fused_must_be_a_bool():
    with pytest.raises(asrfx.InputError, match="fused must be True or False"):
        asrfx.prepare(cifar_resnet(8, attention="se", block="basic"), example_inputs=(X,),
                      fused="yes")


class ReluThenGate(nn.Module):
    """conv -> BN -> ReLU -> a gate (``sigmoid`` or ``tanh``; ECA-style ``expand_as`` for
    ``eca``): a positive gate crosses the ReLU into the norm."""

    def __init__(self, gate: str, c: int = 8):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.fc = nn.Conv2d(c, c, 1)
        self.head = nn.Linear(c, 6)
        self.gate = gate

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        z = self.fc(y.mean((2, 3), keepdim=True))
        if self.gate == "tanh":
            y = y * torch.tanh(z)
        elif self.gate == "eca":
            y = y * torch.sigmoid(z).expand_as(y)
        else:
            y = y * torch.sigmoid(z)
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("gate, fused_count", [("sigmoid", 1), ("eca", 1), ("tanh", 0)])
def test_a_positive_gate_crosses_a_relu_into_the_norm(gate, fused_count):
    torch.manual_seed(17)
    model = randomize_bn(ReluThenGate(gate), 18)
    plain, fused = _pair(model)
    notes = fused.asrfx_report.notes
    assert any(f"fused training form: {fused_count} gate(s)" in n for n in notes), notes
    assert sum(isinstance(m, GatedBatchNorm2d) for m in fused.modules()) == fused_count
    if not fused_count:  # a gate of either sign does not cross a ReLU
        assert any("stays a multiply" in n for n in notes), notes
    randomize_psi(plain, 19)
    fused.load_state_dict(plain.state_dict())
    _assert_same_training(plain, fused)


def test_a_norm_with_hooks_is_not_fused():
    """A hook on the norm would see the scale as a second input: that site keeps the
    multiply (and the hook sees what it always saw)."""
    model = cifar_resnet(8, attention="se", block="basic", num_classes=6)
    seen = []
    model.layer1[0].bn2.register_forward_hook(lambda m, i, o: seen.append(len(i)))
    prepared = asrfx.prepare(model, example_inputs=(X,), fused=True)
    notes = prepared.asrfx_report.notes
    assert any("fused training form: 2 gate(s)" in n for n in notes), notes
    assert not isinstance(prepared.get_submodule("layer1.0.bn2"), GatedBatchNorm2d)
    prepared(X)
    assert seen and set(seen) == {1}


# ----------------------------------------------------------------- batched excitations

@pytest.mark.parametrize("attention", ["se", "eca", "eca_transpose", "srm", "gct", "ese",
                                       "cbam_channel", "spa"])
def test_identical_excitations_run_batched_and_train_alike(attention):
    """Two blocks per stage: each stage's two excitations run as one vmap call on stacked
    parameters, with the multiply form's outputs, gradients, statistics and deploy model."""
    torch.manual_seed(20)
    model = randomize_bn(cifar_resnet(14, attention=attention, block="basic", num_classes=6),
                         21)
    plain, fused = _pair(model)
    notes = fused.asrfx_report.notes
    assert any("excitations of 6 site(s) run as 3 batched call(s)" in n for n in notes), notes
    assert sum(isinstance(m, BatchedExcitations) for m in fused.modules()) == 3
    # the per-site excitation layers are no longer called: their parameters enter the stacks
    called = {str(n.target) for n in fused.graph.nodes if n.op == "call_module"}
    assert not any(".attention." in c for c in called), called
    randomize_psi(plain, 22)
    fused.load_state_dict(plain.state_dict())
    _assert_same_training(plain, fused)


def test_batched_excitations_pickle_and_keep_the_state_dict():
    model = randomize_bn(cifar_resnet(14, attention="se", block="basic", num_classes=6), 23)
    plain, fused = _pair(model)
    assert list(plain.state_dict()) == list(fused.state_dict())
    randomize_psi(fused, 24)
    again = pickled_copy(fused)
    assert sum(isinstance(m, BatchedExcitations) for m in again.modules()) == 3
    for m in (fused, again):
        m.eval()
    with torch.no_grad():
        assert rel_err(fused(X), again(X)) <= REL_TOL


def _traced_entries(model: nn.Module) -> list:
    return [g for m in model.modules() if isinstance(m, BatchedExcitations)
            for g in m.__dict__.get("_asrfx_traced", {}).values()]


@pytest.mark.parametrize("attention", ["se", "eca", "eca_transpose", "srm", "gct", "ese",
                                       "cbam_channel", "spa"])
def test_batched_excitations_run_a_traced_graph_equal_to_the_vmap_call(attention):
    """The batched call runs the aten graph vmap dispatches to, traced once per input
    signature: same outputs and gradients as the vmap call itself."""
    torch.manual_seed(25)
    model = randomize_bn(cifar_resnet(14, attention=attention, block="basic", num_classes=6),
                         26)
    _, fused = _pair(model)
    randomize_psi(fused, 27)
    with torch.no_grad():
        fused.eval()(X)  # traced for eval mode
    assert len(_traced_entries(fused)) == 3
    vmapped = pickled_copy(fused)
    assert _traced_entries(vmapped) == []  # the traces are not pickled
    for m in vmapped.modules():
        if isinstance(m, BatchedExcitations):
            m._traced = lambda inputs: None  # the vmap call on every step
    a, ga = _step(fused)
    b, gb = _step(vmapped)
    traced = _traced_entries(fused)
    assert len(traced) == 6 and all(isinstance(g, fx.GraphModule) for g in traced)
    assert _traced_entries(vmapped) == []
    assert rel_err(a, b) <= REL_TOL
    assert ga.keys() == gb.keys()
    for name in ga:
        tol = REL_TOL * float(ga[name].abs().max()) + torch.finfo(torch.float32).tiny
        assert float((ga[name] - gb[name]).abs().max()) <= tol, name


def test_a_new_input_signature_is_traced_again():
    model = randomize_bn(cifar_resnet(14, attention="se", block="basic", num_classes=6), 28)
    _, fused = _pair(model)
    _step(fused)
    assert len(_traced_entries(fused)) == 3
    fused.eval()
    with torch.no_grad():
        out32 = fused(X)
        assert len(_traced_entries(fused)) == 6  # eval mode: traced for its own mode
        out64 = fused.double()(X.double())
    assert len(_traced_entries(fused)) == 9  # float64: its own trace
    assert rel_err(out32.double(), out64) <= REL_TOL


def test_under_autocast_the_batched_calls_run_vmap():
    """A trace would bake autocast's casts in: under autocast nothing is traced, and the
    result is what the vmap call gives."""
    model = randomize_bn(cifar_resnet(14, attention="se", block="basic", num_classes=6), 29)
    _, fused = _pair(model)
    vmapped = pickled_copy(fused)
    for m in vmapped.modules():
        if isinstance(m, BatchedExcitations):
            m._traced = lambda inputs: None
    fused.eval()
    vmapped.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = fused(X), vmapped(X)
    assert _traced_entries(fused) == []
    assert a.dtype == b.dtype == torch.bfloat16
    assert rel_err(a.float(), b.float()) <= 4 * torch.finfo(torch.bfloat16).eps


class _ScaledByHeight(nn.Module):
    """An excitation that reads the map's height: equal weights shapes, different sizes."""

    def __init__(self, c: int):
        super().__init__()
        self.fc = nn.Linear(c, c)

    def forward(self, x):
        b, c, h, _ = x.shape
        return x * torch.sigmoid(self.fc(x.mean((2, 3))) * (h / 8.0)).view(b, c, 1, 1)


class _TwoResolutions(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.c1, self.b1, self.a1 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), \
            _ScaledByHeight(c)
        self.c2, self.b2, self.a2 = nn.Conv2d(c, c, 3, padding=1, stride=2), \
            nn.BatchNorm2d(c), _ScaledByHeight(c)
        self.head = nn.Linear(c, 6)

    def forward(self, x):
        y = self.a1(self.b1(self.c1(x)))
        y = self.a2(self.b2(self.c2(y)))
        return self.head(y.mean((2, 3)))


def test_a_site_whose_sizes_differ_from_the_batch_gets_its_own_value():
    """The two excitations are the same computation on weights of the same shapes, but each
    reads its own map's height (12 and 6): the batch uses the first site's sizes, and the
    second site, seeing other sizes, computes its own value. Exact at any input size."""
    torch.manual_seed(25)
    model = randomize_bn(_TwoResolutions(), 26)
    plain, fused = _pair(model)
    assert any("excitations of 2 site(s) run as 1 batched call(s)" in n
               for n in fused.asrfx_report.notes), fused.asrfx_report.notes
    randomize_psi(plain, 27)
    fused.load_state_dict(plain.state_dict())
    _assert_same_training(plain, fused)
    x = torch.randn(2, 3, 20, 20, generator=torch.Generator().manual_seed(28))
    with torch.no_grad():
        assert rel_err(plain(x), fused(x)) <= REL_TOL


class _ReadsSizes(nn.Module):
    """SE written with the sizes third-party code reads: ``b, c = x.shape[:2]``, ``x.size(1)``
    and arithmetic on them (c // 2 hidden units are a fixed count, not an input size)."""

    def __init__(self, c: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, c // 2), nn.Linear(c // 2, c)

    def forward(self, x):
        b, c = x.shape[:2]
        y = x.mean((2, 3)).view(b, x.size(1))
        y = torch.relu(self.fc1(y)).view(b, c // 2)
        return x * torch.sigmoid(self.fc2(y)).view(b, c, 1, 1)


class _ReadsBatchSize(_ReadsSizes):
    """The batch size read on its own (``x.size(0)``): one row, whatever the batch."""

    def forward(self, x):
        y = torch.relu(self.fc1(x.mean((2, 3)).view(x.size(0), -1)))
        return x * torch.sigmoid(self.fc2(y)).view(x.size(0), x.shape[1], 1, 1)


class _SizesNet(nn.Module):
    def __init__(self, c: int = 8, attention: type = _ReadsSizes):
        super().__init__()
        self.c0 = nn.Conv2d(3, c, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(3))
        self.norms = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(3))
        self.att = nn.ModuleList(attention(c) for _ in range(3))
        self.head = nn.Linear(c, 6)

    def forward(self, x):
        y = self.c0(x)
        for conv, norm, att in zip(self.convs, self.norms, self.att):
            y = torch.relu(att(norm(conv(y))) + y)
        return self.head(y.mean((2, 3)))


def _shape_reads(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes
            if n.op == "call_function" and n.target is getattr and n.args[1] == "shape"
            or n.op == "call_method" and n.target == "size"]


@pytest.mark.parametrize("attention", [_ReadsSizes, _ReadsBatchSize])
def test_sizes_the_layers_fix_are_constants_of_the_batched_call(attention):
    """The channel count read from a conv's output and the batch extent psi's row has are the
    same at every input: the batched excitation takes them as constants, so the fused graph
    reads no shape at all and no site checks its sizes at every call (``excitation_row``).
    The result is still exact at other batch and spatial sizes, where a baked batch or
    height would fail or differ."""
    from asrfx.passes.batch_excitations import excitation_row
    torch.manual_seed(40)
    model = randomize_bn(_SizesNet(attention=attention), 41)
    plain, fused = _pair(model)
    assert any("excitations of 3 site(s) run as 1 batched call(s)" in n
               for n in fused.asrfx_report.notes), fused.asrfx_report.notes
    assert _shape_reads(asrfx.trace(model, example_inputs=(X,))), "the model reads sizes"
    assert _shape_reads(plain) == [], "the rewrite pins them in the multiply form too"
    assert _shape_reads(fused) == []
    assert not any(n.target is excitation_row for n in fused.graph.nodes)
    (batched,) = [n for n in fused.graph.nodes if n.op == "call_module"
                  and isinstance(fused.get_submodule(str(n.target)), BatchedExcitations)]
    assert all(isinstance(a, fx.Node) and a.target is torch.stack for a in batched.args)
    randomize_psi(plain, 42)
    fused.load_state_dict(plain.state_dict())
    _assert_same_training(plain, fused)
    for shape in [(1, 3, 12, 12), (5, 3, 7, 9)]:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(43))
        plain.train()
        fused.train()
        a, b = plain(x), fused(x)
        assert rel_err(a, b) <= REL_TOL, shape
        plain.eval()
        fused.eval()
        with torch.no_grad():
            assert rel_err(plain(x), fused(x)) <= REL_TOL, shape


def test_the_batched_gates_are_computed_first():
    """Computed from parameters only, every batched call runs at the start of the step, before
    the first convolution, not between the stages' large maps."""
    model = randomize_bn(cifar_resnet(14, attention="se", block="basic", num_classes=6), 45)
    _, fused = _pair(model)
    order = list(fused.graph.nodes)
    calls = [i for i, n in enumerate(order) if n.op == "call_module"
             and isinstance(fused.get_submodule(str(n.target)), BatchedExcitations)]
    first_conv = next(i for i, n in enumerate(order) if n.op == "call_module"
                      and isinstance(fused.get_submodule(str(n.target)), nn.Conv2d))
    assert len(calls) == 3 and max(calls) < first_conv


def _affine_calls(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module" and "affine" in n.kwargs]


def _affine_products(gm: fx.GraphModule) -> list[fx.Node]:
    """The products ``stack(params) * gates`` of the batched groups, checked to run before the
    first convolution."""
    order = list(gm.graph.nodes)
    first_conv = next(i for i, n in enumerate(order) if n.op == "call_module"
                      and isinstance(gm.get_submodule(str(n.target)), nn.Conv2d))
    products = [i for i, n in enumerate(order) if n.target is operator.mul and
                n.args[0].target is torch.stack]
    assert products and max(products) < first_conv
    return [order[i] for i in products]


def _with_bn2(model: nn.Module, make) -> nn.Module:
    """``model`` with each block's second norm replaced by ``make(num_features)``."""
    for name, m in list(model.named_modules()):
        if name.endswith("bn2"):
            setattr(model.get_submodule(name.rpartition(".")[0]), "bn2", make(m.num_features))
    return model


def test_a_batched_groups_norms_take_their_affines_from_one_product():
    """Each stage's gated norms get ``weight * g`` and ``bias * g`` from one product of their
    stacked parameters with the batched gates (two multiplies per group, placed with the
    batched call before the first convolution), and train, evaluate and fold as the multiply
    form; the same fused graph without the precomputed affines computes the same."""
    torch.manual_seed(46)
    model = randomize_bn(cifar_resnet(14, attention="se", block="basic", num_classes=6), 47)
    plain, fused = _pair(model)
    calls = _affine_calls(fused)
    assert len(calls) == 6
    assert all(isinstance(fused.get_submodule(str(c.target)), GatedBatchNorm2d) for c in calls)
    products = _affine_products(fused)
    assert len(products) == 6
    stacked = {str(a.target) for n in products for a in n.args[0].args[0]}
    assert stacked == {f"{c.target}.{p}" for c in calls for p in ("weight", "bias")}
    # the same graph with every norm computing its own weight * s: the same step
    own = copy.deepcopy(fused)
    for n in _affine_calls(own):
        n.kwargs = {}
    own.graph.eliminate_dead_code()
    own.recompile()
    assert not _affine_calls(own)
    a, ga = _step(fused)
    b, gb = _step(own)
    assert rel_err(a, b) <= REL_TOL
    for name in ga:
        assert rel_err(ga[name], gb[name]) <= REL_TOL, name
    randomize_psi(plain, 48)
    fused.load_state_dict(plain.state_dict())
    _assert_same_training(plain, fused)


def test_traced_through_norms_of_a_group_take_their_affines_from_one_product():
    """The same with every gated norm a BatchNorm subclass from outside torch (traced
    through to ``F.batch_norm``): each ``gate_affine(w, g)`` returns its row of the group's
    product, and fold takes the gates out again."""
    from asrfx.passes.fuse_gates import gate_affine

    torch.manual_seed(51)
    model = randomize_bn(_with_bn2(cifar_resnet(14, attention="se", block="basic",
                                                num_classes=6), _PlainSub), 52)
    plain, fused = _pair(model)
    affines = [n for n in fused.graph.nodes if n.target is gate_affine]
    assert len(affines) == 12 and all(len(n.args) == 3 for n in affines)
    assert len(_affine_products(fused)) == 6
    randomize_psi(plain, 53)
    fused.load_state_dict(plain.state_dict())
    _assert_same_training(plain, fused)
    deploy = asrfx.fold(fused, example_inputs=(X,))
    assert not any(n.target in (gate_affine, torch.stack) for n in deploy.graph.nodes)


@pytest.mark.parametrize("norm", [nn.BatchNorm2d, _PlainSub])
def test_norms_without_affine_parameters_compute_their_own_gated_affine(norm):
    from asrfx.passes.fuse_gates import gate_affine

    torch.manual_seed(49)
    model = randomize_bn(_with_bn2(cifar_resnet(14, attention="se", block="basic",
                                                num_classes=6),
                                   lambda c: norm(c, affine=False)), 50)
    plain, fused = _pair(model)
    assert any(isinstance(m, BatchedExcitations) for m in fused.modules())
    if norm is nn.BatchNorm2d:
        assert sum(isinstance(m, GatedBatchNorm2d) for m in fused.modules()) == 6
    else:  # traced through: F.batch_norm(x, ..., gate_affine(None, g), None)
        affines = [n for n in fused.graph.nodes if n.target is gate_affine]
        assert len(affines) == 6 and all(len(n.args) == 2 for n in affines)
    assert not _affine_calls(fused)
    _assert_same_training(plain, fused)


class _DropSE(nn.Module):
    """SE with a dropout inside its excitation: it draws random numbers."""

    def __init__(self, c: int):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(c, c), nn.Dropout(0.3), nn.Linear(c, c)

    def forward(self, x):
        y = self.fc2(self.drop(torch.relu(self.fc1(x.mean((2, 3))))))
        return x * torch.sigmoid(y)[:, :, None, None]


class _DropNet(_SizesNet):
    def __init__(self, c: int = 8, rate: float = 0.3):
        super().__init__(c)
        self.att = nn.ModuleList(_DropSE(c) for _ in range(3))
        for a in self.att:
            a.drop.p = rate


def test_an_excitation_that_draws_random_numbers_is_not_batched():
    """A dropout in the excitation draws a mask per site, in the multiply form's order; one
    batched call would draw one mask over the stacked sites (and vmap refuses a random op in
    its default mode: training failed with a RuntimeError). Such excitations keep their own
    per-site computation, and the fused form trains like the multiply form with the same
    seed."""
    model = randomize_bn(_DropNet(), 46)
    plain, fused = _pair(model)
    assert not any(isinstance(m, BatchedExcitations) for m in fused.modules())
    called = {str(n.target) for n in fused.graph.nodes if n.op == "call_module"}
    assert {f"att.{i}.drop" for i in range(3)} <= called, called
    randomize_psi(plain, 47)
    fused.load_state_dict(plain.state_dict())
    _assert_same_training(plain, fused)


def test_a_dropout_of_rate_zero_is_batched_and_may_not_change():
    """A dropout of rate 0 draws nothing (timm's GC blocks: ``ConvMlp(drop=0.)``): such
    excitations are batched. Raised later, the rate would need a mask per site: the batched
    call refuses to train then, naming what to do, instead of ignoring it."""
    from asrfx.errors import InputError
    model = randomize_bn(_DropNet(rate=0.0), 48)
    plain, fused = _pair(model)
    assert sum(isinstance(m, BatchedExcitations) for m in fused.modules()) == 1
    randomize_psi(plain, 49)
    fused.load_state_dict(plain.state_dict())
    _assert_same_training(plain, fused)
    for twin in (copy.deepcopy(fused), pickled_copy(fused)):  # each checks its own sites
        twin.get_submodule("att.2.drop").p = 0.1
        with pytest.raises(InputError, match="p=0.1"):
            twin.train()(X)
    fused.train()(X)
    fused.get_submodule("att.1.drop").p = 0.2
    fused.eval()
    with torch.no_grad():
        fused(X)  # eval: the dropout is the identity whatever its rate
    fused.train()
    with pytest.raises(InputError, match="p=0.2.*prepare the model again"):
        fused(X)


def test_a_size_other_inputs_change_stays_read():
    """A height (and a batch size read without being made one row) is not fixed: the site
    keeps reading it, and the batch checks it against its own (here the heights differ, 12
    and 6, so the second site computes its own value)."""
    from asrfx.passes.batch_excitations import excitation_row
    model = randomize_bn(_TwoResolutions(), 44)
    _, fused = _pair(model)
    assert _shape_reads(fused)
    assert any(n.target is excitation_row for n in fused.graph.nodes)


def test_an_excitation_with_hooks_keeps_its_own_call():
    model = cifar_resnet(14, attention="se", block="basic", num_classes=6)
    seen = []
    model.layer1[0].attention.fc1.register_forward_hook(lambda m, i, o: seen.append(1))
    fused = asrfx.prepare(model, example_inputs=(X,), fused=True)
    notes = fused.asrfx_report.notes
    # layer1's other site is alone of its kind now: two stages batched, four sites
    assert any("excitations of 4 site(s) run as 2 batched call(s)" in n for n in notes), notes
    seen.clear()
    fused(X)
    assert seen == [1]


class _ReluThenSizedGate(nn.Module):
    """conv -> BN -> ReLU -> an SE whose gate is sized from the ReLU output's shape
    (``b, c = y.shape[:2]``): once the gate goes into the norm, those shape reads must not read
    the ReLU (that would read the norm, which reads the gate: a cycle)."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, c)
        self.head = nn.Linear(c, 6)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        b, c = y.shape[:2]
        g = torch.sigmoid(self.fc(y.mean((2, 3)))).view(b, c, 1, 1)
        return self.head((y * g).mean((2, 3)))


class _TracedNormSizedGate(nn.Module):
    """A traced-through norm (an ``F.batch_norm`` call in the graph) whose output's shape sizes
    the gate applied to it."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, c, 3, padding=1), _PlainSub(c)
        self.fc = nn.Linear(c, c)
        self.head = nn.Linear(c, 6)

    def forward(self, x):
        y = self.bn(self.conv(x))
        b, c = y.shape[:2]
        y = y * torch.sigmoid(self.fc(y.mean((2, 3)))).view(b, c, 1, 1)
        return self.head(torch.relu(y).mean((2, 3)))


@pytest.mark.parametrize("net, seed", [(_ReluThenSizedGate, 29), (_TracedNormSizedGate, 32)])
def test_a_gate_sized_from_the_fused_norms_output_fuses(net, seed):
    """The gate's sizes are read from the ReLU's or the traced norm's output shape; fused, they
    read the norm's input (no cycle), and the form trains like the multiply form."""
    torch.manual_seed(seed)
    model = randomize_bn(net(), seed + 1)
    plain, fused = _pair(model)
    assert any("fused training form: 1 gate(s)" in n for n in fused.asrfx_report.notes)
    randomize_psi(plain, seed + 2)
    fused.load_state_dict(plain.state_dict())
    _assert_same_training(plain, fused)


class _NormAct(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d`` layout: ``F.batch_norm`` (traced through) -> ``drop`` -> ``act``
    as modules (Identity / Dropout / ReLU)."""

    def __init__(self, c: int, drop: nn.Module, act: nn.Module):
        super().__init__(c)
        self.drop, self.act = drop, act

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(self.drop(x))


class _NormActSE(nn.Module):
    def __init__(self, drop: nn.Module, act: nn.Module, c: int = 8):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, c, 3, padding=1), _NormAct(c, drop, act)
        self.fc = nn.Conv2d(c, c, 1)
        self.head = nn.Linear(c, 6)

    def forward(self, x):
        y = self.bn(self.conv(x))
        y = y * torch.sigmoid(self.fc(y.mean((2, 3), keepdim=True)))
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("drop, act, fused_count", [
    (nn.Identity(), nn.Identity(), 1), (nn.Identity(), nn.ReLU(), 1),
    (nn.Dropout(0.2), nn.ReLU(inplace=True), 1), (nn.Identity(), nn.SiLU(), 0)])
def test_a_gate_crosses_identities_dropouts_and_relus_into_the_norm(drop, act, fused_count):
    """Found sweeping timm: its norm layers put an Identity (``drop``) between the norm and
    the activation, which kept every such gate a multiply. Identities and dropouts commute with
    a per-channel scale (a positive one also with ReLU); SiLU does not."""
    torch.manual_seed(35)
    model = randomize_bn(_NormActSE(drop, act), 36)
    plain, fused = _pair(model)
    notes = fused.asrfx_report.notes
    assert any(f"fused training form: {fused_count} gate(s)" in n for n in notes), notes
    randomize_psi(plain, 37)
    fused.load_state_dict(plain.state_dict())
    torch.manual_seed(38)  # the same dropout masks in both forms
    state = torch.get_rng_state()
    a, ga = _step(plain)
    torch.set_rng_state(state)
    b, gb = _step(fused)
    assert rel_err(a, b) <= REL_TOL
    scale = max(float(g.abs().max()) for g in ga.values())
    for name in ga:
        assert float((ga[name] - gb[name]).abs().max()) <= REL_TOL * scale, name


class _Scaled(nn.Module):
    """A parameter-free module whose setting does not show in its repr."""

    def __init__(self, k: float):
        super().__init__()
        self.k = k

    def forward(self, x):
        return torch.sigmoid(self.k * x)


class _ScaledSE(nn.Module):
    def __init__(self, c: int, k: float):
        super().__init__()
        self.fc, self.act = nn.Linear(c, c), _Scaled(k)

    def forward(self, x):
        return x * self.act(self.fc(x.mean((2, 3))))[:, :, None, None]


def test_excitations_with_user_modules_of_other_settings_are_not_batched_together():
    class Net(nn.Module):
        def __init__(self, c: int = 8):
            super().__init__()
            self.conv = nn.Conv2d(3, c, 3, padding=1)
            self.bns = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(2))
            self.atts = nn.ModuleList([_ScaledSE(c, 1.0), _ScaledSE(c, 5.0)])
            self.head = nn.Linear(c, 6)

        def forward(self, x):
            y = self.conv(x)
            for bn, att in zip(self.bns, self.atts):
                y = att(bn(y))
            return self.head(y.mean((2, 3)))

    torch.manual_seed(39)
    model = randomize_bn(Net(), 40)
    # kept opaque, the module's setting is not in the graph: only the object tells them apart
    plain, fused = _pair(model, leaf_modules=[_Scaled])
    assert any(n.op == "call_module" and "act" in str(n.target) for n in fused.graph.nodes)
    assert not any("batched call" in n for n in fused.asrfx_report.notes)
    randomize_psi(plain, 41)
    fused.load_state_dict(plain.state_dict())
    _assert_same_training(plain, fused)


# ----------------------------------------------------------------- gates into consuming convs

class _SE(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, max(2, c // 4), 1), nn.Conv2d(max(2, c // 4), c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.silu(self.fc1(x.mean((2, 3), keepdim=True)))))


class InvertedResidual(nn.Module):
    """MobileNetV2 / EfficientNet's block: expand -> BN -> SiLU -> depthwise -> BN -> SiLU -> SE
    -> project -> BN. The SE scales a SiLU output (no scale crosses a SiLU) that only the
    projection reads: its gate goes into the projection's kernel."""

    def __init__(self, c: int, project_groups: int = 1, project_kernel: int = 1,
                 padding_mode: str = "zeros", between: str = "", also_read: bool = False):
        super().__init__()
        e = 3 * c
        self.expand, self.bn1 = nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e)
        self.dw, self.bn2 = nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False), \
            nn.BatchNorm2d(e)
        self.se = _SE(e)
        self.between = nn.Dropout(0.3) if between == "dropout" else \
            nn.Identity() if between == "identity" else None
        self.project = nn.Conv2d(e, c, project_kernel, padding=project_kernel // 2,
                                 padding_mode=padding_mode, groups=project_groups, bias=True)
        self.bn3 = nn.BatchNorm2d(c)
        self.also_read = also_read

    def forward(self, x):
        y = F.silu(self.bn2(self.dw(F.silu(self.bn1(self.expand(x))))))
        y = self.se(y)
        out = x + self.bn3(self.project(y if self.between is None else self.between(y)))
        return out + y[:, : x.shape[1]] if self.also_read else out


class Mobile(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.Sequential(InvertedResidual(4, **kw), InvertedResidual(4, **kw))
        self.head = nn.Linear(4, 6)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("kw", [{}, {"project_groups": 2},
                                {"project_kernel": 3, "padding_mode": "reflect"},
                                {"between": "dropout"}, {"between": "identity"}],
                         ids=["1x1", "grouped", "3x3-reflect", "dropout", "identity"])
def test_a_gate_only_convolutions_read_goes_into_their_kernels(kw):
    torch.manual_seed(30)
    model = randomize_bn(Mobile(**kw), 31)
    plain, fused = _pair(model)
    notes = fused.asrfx_report.notes
    assert any("2 through the input columns of the convolutions" in n for n in notes), notes
    assert not any("stays a multiply" in n for n in notes), notes
    assert sum(isinstance(m, GatedConv2d) for m in fused.modules()) == 2
    # no multiply by a gate is left on a feature map in the training graph
    assert not [n for n in fused.graph.nodes
                if n.op == "call_function" and n.target in (operator.mul, torch.mul) and
                any(isinstance(a, fx.Node) and a.op == "call_function" and
                    a.target is torch.sigmoid for a in n.args)]
    randomize_psi(plain, 32)
    fused.load_state_dict(plain.state_dict())
    again = pickled_copy(fused).eval()  # the gated convs and scaled kernels pickle
    with torch.no_grad():
        assert rel_err(fused.eval()(X), again(X)) <= REL_TOL
    _assert_same_training(plain, fused)


@pytest.mark.parametrize("case", ["also-read", "hooked"])
def test_a_gated_map_read_by_more_than_convolutions_keeps_the_multiply(case):
    torch.manual_seed(33)
    model = randomize_bn(Mobile(also_read=case == "also-read"), 34)
    seen = []
    if case == "hooked":
        for block in model.blocks:
            block.project.register_forward_hook(lambda m, i, o: seen.append(len(i)))
    plain, fused = _pair(model)
    notes = fused.asrfx_report.notes
    assert sum("nor do only torch convolutions read the gated map" in n for n in notes) == 2, \
        notes
    assert not any(isinstance(m, GatedConv2d) for m in fused.modules())
    randomize_psi(plain, 35)
    fused.load_state_dict(plain.state_dict())
    _assert_same_training(plain, fused)
    assert not seen or set(seen) == {1}  # a hook sees what it always saw


def test_inserted_attention_is_reported_as_inserted_when_fused():
    model = cifar_resnet(8, attention=None, block="basic", num_classes=6)
    fused = asrfx.prepare(model, example_inputs=(X,), insert="se", fused=True)
    assert any("fused training form: 3 gate(s)" in n for n in fused.asrfx_report.notes)
    assert [s.action for s in fused.asrfx_report.sites] == ["inserted"] * 3
    assert all(s.kind == "channel-attention (inserted)" for s in fused.asrfx_report.sites)
