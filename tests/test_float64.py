"""float64 models fold as exactly as float32 ones.

The fold computes in float64 and converts with ``t.to(torch.float64)``, ``t.double()`` and
``r.to(dtype)``. For a float64 tensor each of these returns the tensor itself (an ``expand``ed one
keeps its zero strides), so in a float64 model a value the fold "converted" may be a layer's own
parameter or buffer: writing into it in place changes the layer, and a result that is such an
alias ties the deploy model's parameters to each other. Every test here runs float32 and float64
side by side; tolerances derive from the dtype (:func:`helpers.dtype_tol`).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asrfx
from asrfx import foldmath
from helpers import (SE, assert_state_equal, dtype_tol, randomize_bn, randomize_psi, rel_err,
                     state_snapshot)

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64])


def _check(model: nn.Module, deploy: nn.Module, x: torch.Tensor) -> None:
    """Eval-mode outputs agree on ``x`` and on a fresh batch of another size, in x's dtype."""
    model.eval()
    fresh = torch.randn(3, *x.shape[1:], dtype=x.dtype,
                        generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        for xi in (x, fresh):
            ref, out = model(xi), deploy(xi)
            assert out.dtype == x.dtype
            err = rel_err(ref, out)
            assert err <= dtype_tol(x.dtype), f"{x.dtype}: rel err {err:.2e}\n{deploy.asrfx_report}"


def _targets(deploy, kind: str = "channel scale") -> list[str]:
    return [s.target for s in deploy.asrfx_report.sites if s.kind == kind and
            s.action == "folded"]


def _prepared(model: nn.Module, x: torch.Tensor, seed: int) -> nn.Module:
    prepared = asrfx.prepare(model, example_inputs=(x,))
    randomize_bn(prepared, seed=seed)
    randomize_psi(prepared, seed=seed + 1)
    return prepared


# ---------------------------------------------------------------------------------------------
# a constant gate folded into the input side of a BatchNorm


class GateThenNorm(nn.Module):
    """conv -> GELU (takes no scale) -> SE -> BN: ASR's constant gate has no producer to go
    to; the BN's input side takes it (running mean 0, weight g*s, bias b + g/sd * (t - m))."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.conv, self.se, self.bn = (nn.Conv2d(3, c, 3, padding=1), SE(c, hidden=4),
                                       nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.tanh(self.bn(self.se(F.gelu(self.conv(x)))))


@DTYPES
def test_gate_folded_into_batchnorm_input_keeps_the_running_mean_term(dtype):
    """Before: the running mean was read with ``.to(float64)`` and then zeroed in place; for a
    float64 buffer the read was the buffer, so the new bias lost its ``-g/sd * m`` term (float64
    relative error ~0.5, float32 exact)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    model = GateThenNorm().to(dtype)
    # statistics frozen (fine-tuning): a gate before a training-mode BN would cancel and is
    # refused; before a frozen one it trains and folds into the norm's input side
    model.bn.eval()
    prepared = _prepared(model, x, seed=1)
    assert prepared.asrfx_report.count(action="converted") == 1
    before = state_snapshot(prepared)
    deploy = asrfx.fold(prepared, example_inputs=(x,), tol=dtype_tol(dtype))
    assert _targets(deploy) == ["bn (norm input)"]
    _check(prepared, deploy, x)
    assert_state_equal(before, state_snapshot(prepared))  # fold leaves its argument alone


class RepBlock(nn.Module):
    """RepVGG-style: 3x3 conv+BN, 1x1 conv+BN and an identity BN, summed; an SE gate on the
    block's input (into the convs' input columns and the identity BN's input side) and/or on
    the sum (into every branch's BN)."""

    def __init__(self, c: int, gate_in: bool, gate_out: bool):
        super().__init__()
        self.k3 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.k1 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.id = nn.BatchNorm2d(c)
        self.se_in = SE(c, hidden=4) if gate_in else None
        self.se_out = SE(c, hidden=4) if gate_out else None

    def forward(self, x):
        if self.se_in is not None:
            x = self.se_in(x)
        y = self.k3(x) + self.k1(x) + self.id(x)
        if self.se_out is not None:
            y = self.se_out(y)
        return y


class RepNet(nn.Module):
    def __init__(self, gate_in: bool, gate_out: bool, c: int = 6):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.b1, self.b2 = RepBlock(c, gate_in, gate_out), RepBlock(c, gate_in, gate_out)

    def forward(self, x):
        return self.b2(F.gelu(self.b1(F.gelu(self.stem(x)))))


@DTYPES
@pytest.mark.parametrize("gate_in,gate_out", [(True, False), (True, True), (False, True)])
def test_rep_block_with_gates_folds_and_merges_exactly(dtype, gate_in, gate_out):
    """The identity BN of a RepVGG block taking a gate on its input side is then merged as an
    identity kernel from its (rewritten) statistics; before, in float64, its bias had lost the
    running-mean term and the merged conv erred by ~0.1-1.2 relative."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    prepared = _prepared(RepNet(gate_in, gate_out).to(dtype), x, seed=3)
    deploy = asrfx.fold(prepared, example_inputs=(x,), tol=dtype_tol(dtype))
    targets = _targets(deploy)
    assert len(targets) == gate_in * 2 + gate_out * 2, deploy.asrfx_report
    if gate_in:
        assert any("b1.id (norm input)" in t for t in targets), targets
    mods = [deploy.get_submodule(str(n.target)) for n in deploy.graph.nodes
            if n.op == "call_module"]
    # stem + one merged 3x3 per block, no norm left
    assert sum(isinstance(m, nn.Conv2d) for m in mods) == 3
    assert not any(isinstance(m, nn.BatchNorm2d) for m in mods)
    _check(prepared, deploy, x)


# ---------------------------------------------------------------------------------------------
# results of the fold math are new tensors


def _storages(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _foldmath_calls(dtype: torch.dtype):
    """(name, function, args) for every foldmath identity, on random tensors of ``dtype`` (the
    per-channel scale and shift in float64, as the passes give them)."""
    g = torch.Generator().manual_seed(5)

    def r(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dt)

    w, b, s, t = r(4, 2, 3, 3), r(4), r(4, dt=torch.float64), r(4, dt=torch.float64)
    s_in, t_in = r(4, dt=torch.float64), r(4, dt=torch.float64)
    lw, lb = r(3, 4), r(3)
    yield "norm", foldmath.fold_scale_into_norm, (r(4), r(4), s, t)
    yield "conv_out", foldmath.fold_scale_into_conv_out, (w, b, s, t)
    yield "conv_in", foldmath.fold_scale_into_conv_in, (w, b, s_in, None, 2)
    yield "conv_in_shift", foldmath.fold_scale_into_conv_in, (w, b, s_in, t_in, 2)
    yield "linear_in", foldmath.fold_scale_into_linear_in, (lw, lb, s_in, None)
    yield "linear_in_shift", foldmath.fold_scale_into_linear_in, (lw, lb, s_in, t_in)
    yield "pad_kernel", foldmath.pad_kernel, (w, (3, 3))
    yield "merge_parallel", foldmath.merge_parallel_convs, ([w, r(4, 2, 1, 1)], [b, None])
    yield "merge_sequential", foldmath.merge_sequential_convs, (r(2, 3, 1, 1), None, r(5, 2, 3, 3),
                                                                r(5))
    yield "avg_pool_kernel", foldmath.avg_pool_kernel, (r(4, 3, 1, 1), (3, 3))


@DTYPES
@pytest.mark.parametrize("case", [c[0] for c in _foldmath_calls(torch.float32)])
def test_foldmath_results_are_new_tensors_and_inputs_stay(dtype, case):
    """Before, in float64: ``fold_scale_into_conv_in`` / ``_linear_in`` without a shift and
    ``merge_sequential_convs`` without a first bias returned the layer's own bias, and
    ``avg_pool_kernel`` a zero-stride ``expand`` of the 1x1 kernel (a Parameter no optimizer
    step can write); in both dtypes ``merge_sequential_convs`` returned einsum's permuted,
    non-contiguous layout."""
    (_, fn, args), = [c for c in _foldmath_calls(dtype) if c[0] == case]
    leaves = [a for a in args if isinstance(a, torch.Tensor)] + \
        [e for a in args if isinstance(a, list) for e in a if isinstance(e, torch.Tensor)]
    saved = [a.clone() for a in leaves]
    out = fn(*args)
    outs = list(out) if isinstance(out, tuple) else [out]
    for o in outs:
        assert o.is_contiguous(), (case, o.stride())
        assert o.dtype == leaves[0].dtype
        assert all(_storages(o) != _storages(a) for a in leaves), case
    assert len({_storages(o) for o in outs}) == len(outs)
    for o in outs:
        o.mul_(3.0).add_(1.0)  # writing into a result touches no input
    for a, before in zip(leaves, saved):
        assert torch.equal(a, before), case  # inputs are not computed: compared exactly


class DBBish(nn.Module):
    """DBB-style sequential branches: 1x1 conv -> average pool, 1x1 conv -> 3x3 conv."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.pool = nn.Sequential(nn.Conv2d(c, c, 1), nn.AvgPool2d(3, 1, 0))
        self.seq = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.Conv2d(c, c, 3))

    def forward(self, x):
        return torch.tanh(self.pool(x)) + torch.tanh(self.seq(x))


@DTYPES
def test_sequential_merges_give_parameters_of_their_own(dtype):
    """Before, in float64, the 1x1 -> average pool merge kept a zero-stride kernel as its
    weight (an optimizer step on the deploy model failed: 'more than one element of the
    written-to tensor refers to a single memory location'); in both dtypes the 1x1 -> 3x3
    merge's weight was not contiguous, and the pool merge's bias was a view of the 1x1 conv's
    bias in the graph being folded."""
    torch.manual_seed(0)
    model = DBBish().to(dtype)
    x = torch.randn(2, 4, 7, 7, dtype=dtype)
    deploy = asrfx.fold(model, example_inputs=(x,), tol=dtype_tol(dtype))
    assert deploy.asrfx_report.count(action="merged", kind="sequential merge") == 2
    _check(model, deploy, x)
    params = list(deploy.parameters())
    assert all(p.is_contiguous() for p in params), [p.stride() for p in params]
    assert len({_storages(p) for p in params}) == len(params)
    theirs = {_storages(p) for p in model.parameters()}
    assert not any(_storages(p) in theirs for p in params)
    before = state_snapshot(model)
    opt = torch.optim.SGD(deploy.parameters(), lr=0.1)
    deploy.train()
    deploy(x).square().mean().backward()
    opt.step()  # in place on every parameter
    assert_state_equal(before, state_snapshot(model))


# ---------------------------------------------------------------------------------------------
# a norm without affine parameters takes the dtype of its values, not of the float64 scale


class ScaledLayerNorm(nn.Module):
    def __init__(self, tokens: bool):
        super().__init__()
        self.norm = nn.LayerNorm(6 if tokens else (6, 5, 5), elementwise_affine=False)
        shape = (1, 1, 6) if tokens else (1, 6, 1, 1)
        self.register_buffer("k", torch.linspace(-1.5, 2.0, 6).reshape(shape))

    def forward(self, x):
        return torch.tanh(self.norm(x) * self.k)


@DTYPES
@pytest.mark.parametrize("tokens", [False, True])
def test_non_affine_layernorm_takes_the_scale_in_the_models_dtype(dtype, tokens):
    """Before, the folded weight and bias of a LayerNorm without affine parameters came out in
    the scale's float64: a float32 model then failed to run ('mixed dtype')."""
    model = ScaledLayerNorm(tokens).to(dtype)
    x = torch.randn(*((2, 7, 6) if tokens else (2, 6, 5, 5)), dtype=dtype)
    deploy = asrfx.fold(model, example_inputs=(x,), tol=dtype_tol(dtype))
    assert _targets(deploy) == ["norm (norm affine)"]
    assert deploy.norm.weight.dtype == deploy.norm.bias.dtype == dtype
    _check(model, deploy, x)


def test_inserted_attention_takes_the_model_dtype():
    """prepare(insert=...) on a float64 model: the new modules are built in float64 too (they
    were float32 and the first call failed with "expected scalar type Double")."""
    import asrfx
    from asrfx.zoo import cifar_resnet
    from helpers import randomize_bn, randomize_psi, rel_err

    torch.manual_seed(0)
    model = cifar_resnet(20, attention=None, num_classes=10).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    prepared = asrfx.prepare(model, example_inputs=(x,), insert="se")
    assert prepared.asrfx_report.count(action="inserted") > 0
    assert {p.dtype for p in prepared.parameters()} == {torch.float64}
    randomize_bn(prepared, 0)
    randomize_psi(prepared, 1)
    deploy = asrfx.fold(prepared, example_inputs=(x,), tol=1e-10)
    prepared.eval()
    with torch.no_grad():
        assert rel_err(prepared(x), deploy(x)) <= 1e-10


class NearlyCancelling(nn.Module):
    """conv+BN minus a plain conv computing nearly the same (its weights are the fused ones,
    perturbed by 1e-5), with large norm gains: the output is ~1e-4 of what the branches
    compute, so float32 rounding alone (eager or folded) errs by more than the check's
    tolerance."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.bn_a(self.a(x)) - self.b(x)


def _nearly_cancelling(seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    m = NearlyCancelling()
    with torch.no_grad():
        bn = m.bn_a
        bn.running_mean.copy_(torch.rand(8, generator=gen) - 0.5)
        bn.running_var.copy_(torch.rand(8, generator=gen) * 1.5 + 0.5)
        bn.weight.copy_(torch.rand(8, generator=gen) * 20 + 20)
        bn.bias.copy_(torch.rand(8, generator=gen) - 0.5)
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        m.b.weight.copy_(m.a.weight * s.view(-1, 1, 1, 1) * (1 + 1e-5))
        m.b.bias.copy_((m.a.bias - bn.running_mean) * s + bn.bias)
    return m.eval()


def test_ill_conditioned_float32_fold_is_judged_against_float64():
    """The fold's float32 output differs from the eager float32 output by more than the
    tolerance, but the same fold in float64 is exact: the fold is accepted, and the note says
    so; a wrong fold of the same model is still refused."""
    m = _nearly_cancelling()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 10
    with torch.no_grad():
        assert rel_err(m(x), asrfx.fold(m, example_inputs=(x,), check=False)(x)) > 1e-4
    deploy = asrfx.fold(m, example_inputs=(x,))
    notes = " ".join(deploy.asrfx_report.notes)
    assert "float32: the fold differs from the eager model" in notes, notes
    assert "the same fold computed in float64 errs" in notes, notes


def test_ill_conditioned_float32_wrong_fold_is_still_refused(monkeypatch):
    real = foldmath.fold_scale_into_conv_out

    def off(weight, bias, scale, shift=None):
        w, b = real(weight, bias, scale, shift)
        return w * 1.01, b  # a 1% error in the fused layer

    monkeypatch.setattr(foldmath, "fold_scale_into_conv_out", off)
    m = _nearly_cancelling()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 10
    with pytest.raises(asrfx.FoldMismatch, match="float64 the fold errs"):
        asrfx.fold(m, example_inputs=(x,))
