"""Multi-branch structural re-parameterization from the graph: RepVGG- and ACNet-style blocks
fold to one conv per block, exactly; sums that are not one conv are left and reported."""

from __future__ import annotations

import pytest
import torch
from hypothesis import event, given, settings, strategies as st
from torch import nn

import asrfx
from asrfx import foldmath
from helpers import dtype_tol, randomize_bn, randomize_psi, rel_err


#: float32 tolerance of an exact merge, 1e-5 (~84 eps); in float64 :func:`helpers.dtype_tol`
#: gives 2**20 eps (~2.3e-10): far above the rounding of these small O(1) nets (~1e-15) and far
#: below any slip of a fold (of the order of the values).
MERGE_F32_TOL = 1e-5


def cbn(ci, co, k, stride=1, padding=None, groups=1):
    k = k if isinstance(k, tuple) else (k, k)
    padding = padding if padding is not None else tuple(d // 2 for d in k)
    return nn.Sequential(nn.Conv2d(ci, co, k, stride, padding, groups=groups, bias=False),
                         nn.BatchNorm2d(co))


class RepVGGBlock(nn.Module):
    """RepVGG (Ding et al., CVPR 2021, arXiv 2101.03697): 3x3+BN, 1x1+BN, identity BN."""

    def __init__(self, ci, co, stride=1, groups=1):
        super().__init__()
        self.k3 = cbn(ci, co, 3, stride, groups=groups)
        self.k1 = cbn(ci, co, 1, stride, groups=groups)
        self.id = nn.BatchNorm2d(ci) if ci == co and stride == 1 else None

    def forward(self, x):
        y = self.k3(x) + self.k1(x)
        if self.id is not None:
            y = y + self.id(x)
        return torch.relu(y)


class ACBlock(nn.Module):
    """ACNet (Ding et al., ICCV 2019, arXiv 1908.03930): 3x3, 1x3 and 3x1 branches."""

    def __init__(self, c):
        super().__init__()
        self.square, self.hor, self.ver = cbn(c, c, 3), cbn(c, c, (1, 3)), cbn(c, c, (3, 1))

    def forward(self, x):
        return torch.relu(self.square(x) + self.hor(x) + self.ver(x))


def repvgg_net():
    return nn.Sequential(RepVGGBlock(3, 8, 2), RepVGGBlock(8, 8), RepVGGBlock(8, 8, groups=2),
                         RepVGGBlock(8, 16, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 10))


def acnet():
    return nn.Sequential(cbn(3, 8, 3), nn.ReLU(), ACBlock(8), ACBlock(8), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10))


def _convs_and_norms(gm):
    mods = [gm.get_submodule(str(n.target)) for n in gm.graph.nodes if n.op == "call_module"]
    return (sum(isinstance(m, nn.Conv2d) for m in mods),
            sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in mods))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("build,blocks", [(repvgg_net, 4), (acnet, 3)])
def test_multi_branch_nets_fold_to_one_conv_per_block(build, blocks, dtype):
    torch.manual_seed(0)
    model = randomize_bn(build(), seed=1).to(dtype)
    x = torch.randn(2, 3, 16, 16, dtype=dtype)
    deploy = asrfx.fold(model, example_inputs=(x,), tol=dtype_tol(dtype, MERGE_F32_TOL))
    assert _convs_and_norms(deploy) == (blocks, 0)
    n_merged = deploy.asrfx_report.count(action="merged", kind="branch merge")
    assert n_merged == (4 if build is repvgg_net else 2)
    model.eval()
    with torch.no_grad():
        for xi in (x, torch.randn(3, 3, 16, 16, dtype=dtype)):
            out = deploy(xi)
            assert out.dtype == dtype
            assert rel_err(model(xi), out) <= dtype_tol(dtype, MERGE_F32_TOL)


def test_asr_inserted_into_repvgg_folds_together_with_the_merge():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    prepared = asrfx.prepare(repvgg_net(), example_inputs=(x,), insert="se", where="every_bn")
    assert prepared.asrfx_report.count(action="inserted") == 10  # one per branch BN
    randomize_bn(prepared, seed=2)
    randomize_psi(prepared, seed=3)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    assert _convs_and_norms(deploy) == (4, 0)
    assert not [n for n in deploy.graph.nodes if "mul" in str(n.target)]
    prepared.eval()
    with torch.no_grad():
        assert rel_err(prepared(x), deploy(x)) <= 1e-4


class TwoBranch(nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return self.a(x) + self.b(x)


def _dilated():
    return nn.Sequential(nn.Conv2d(4, 4, 3, padding=2, dilation=2, bias=False),
                         nn.BatchNorm2d(4))


def _reflect():
    return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect", bias=False),
                         nn.BatchNorm2d(4))


@pytest.mark.parametrize("a,b,code", [
    (cbn(4, 4, 3, groups=2), cbn(4, 4, 1), "branches-differ"),
    (cbn(4, 4, 3), _dilated(), "dilated-or-even-kernel"),      # selective-kernel style
    (cbn(4, 4, 3), _reflect(), "branch-padding"),
])
def test_sums_that_are_not_one_conv_are_left_and_reported(a, b, code):
    model = randomize_bn(TwoBranch(a, b), seed=4)
    x = torch.randn(2, 4, 8, 8)
    deploy = asrfx.fold(model, example_inputs=(x,))
    (rec,) = [s for s in deploy.asrfx_report.sites if s.kind == "branch merge"]
    assert (rec.action, rec.code) == ("kept", code) and rec.reason
    model.eval()
    with torch.no_grad():
        assert rel_err(model(x), deploy(x)) <= 1e-5


def test_identity_kernel_and_pad_kernel():
    x = torch.randn(2, 6, 5, 5)
    for groups in (1, 2, 6):
        w = foldmath.identity_kernel(6, groups, (3, 3), torch.float32)
        y = torch.nn.functional.conv2d(x, w, padding=1, groups=groups)
        torch.testing.assert_close(y, x)
    w1 = torch.randn(4, 3, 1, 1)
    w3 = foldmath.pad_kernel(w1, (3, 3))
    torch.testing.assert_close(torch.nn.functional.conv2d(x[:, :3], w3, padding=1),
                               torch.nn.functional.conv2d(x[:, :3], w1))
    with pytest.raises(ValueError):
        foldmath.pad_kernel(torch.randn(1, 1, 2, 2), (3, 3))


@settings(max_examples=25, deadline=None)
@given(k1=st.sampled_from([1, 3, 5]), k2=st.sampled_from([1, 3, 5]),
       stride=st.sampled_from([1, 2]), groups=st.sampled_from([1, 2]),
       c=st.sampled_from([2, 4]), bias=st.booleans())
def test_merge_parallel_convs_is_exact(k1, k2, stride, groups, c, bias):
    x = torch.randn(2, c, 9, 9, dtype=torch.float64)
    a = nn.Conv2d(c, c, k1, stride, k1 // 2, groups=groups, bias=bias).double()
    b = nn.Conv2d(c, c, k2, stride, k2 // 2, groups=groups, bias=bias).double()
    w, bb = foldmath.merge_parallel_convs([a.weight, b.weight], [a.bias, b.bias])
    k = max(k1, k2)
    y = torch.nn.functional.conv2d(x, w, bb, stride, k // 2, groups=groups)
    torch.testing.assert_close(y, a(x) + b(x))


@pytest.mark.parametrize("name", ["repvgg_net", "acnet"])
def test_zoo_multi_branch_nets(name):
    from asrfx import zoo

    torch.manual_seed(0)
    model = randomize_bn(getattr(zoo, name)(), seed=5)
    x = torch.randn(2, 3, 32, 32)
    deploy = asrfx.fold(model, example_inputs=(x,))
    assert _convs_and_norms(deploy) == (6, 0)  # 3 stages x 2 blocks, one conv each, no norm
    model.eval()
    with torch.no_grad():
        assert rel_err(model(x), deploy(x)) <= 1e-5
    # training-free: ASR inserted after every branch norm folds into the merge as well
    prepared = asrfx.prepare(model, example_inputs=(x,), insert="eca", where="every_bn")
    randomize_psi(prepared, seed=6)
    folded = asrfx.fold(prepared, example_inputs=(x,))
    assert _convs_and_norms(folded) == (6, 0)


class _Sequential(nn.Module):
    """DBB-style sequential branch: 1x1 conv [-> BN] -> kxk conv or average pool."""

    def __init__(self, bn, pad, pool):
        super().__init__()
        self.c1 = nn.Conv2d(4, 6, 1, bias=False)
        self.bn = nn.BatchNorm2d(6) if bn else nn.Identity()
        self.c2 = nn.AvgPool2d(3, 1, pad) if pool else nn.Conv2d(6, 5, 3, padding=pad)

    def forward(self, x):
        return torch.tanh(self.c2(self.bn(self.c1(x))))


@pytest.mark.parametrize("bn,pad,pool,action", [
    (False, 1, False, "merged"),   # no bias between: exact with zero padding
    (True, 0, False, "merged"),    # BN bias, but the kxk never reads padding
    (True, 1, False, "kept"),      # BN bias + zero padding: not one conv (DBB pads with the bias)
    (False, 1, True, "merged"),    # 1x1 -> avg pool
    (True, 0, True, "merged"),
    (True, 1, True, "kept"),       # bias + padded pool
])
def test_sequential_merges_fire_only_where_exact(bn, pad, pool, action):
    model = _Sequential(bn, pad, pool)
    if bn:
        randomize_bn(model, seed=7)
    x = torch.randn(2, 4, 7, 7)
    deploy = asrfx.fold(model, example_inputs=(x,))
    (rec,) = [s for s in deploy.asrfx_report.sites if s.kind == "sequential merge"]
    assert rec.action == action
    if action == "kept":
        assert rec.code == ("bias-before-padded-pool" if pool else "bias-before-padded-conv")
    else:
        assert _convs_and_norms(deploy) == (1, 0)
    model.eval()
    with torch.no_grad():
        for xi in (x, torch.randn(3, 4, 9, 9)):
            assert rel_err(model(xi), deploy(xi)) <= 1e-5


class _Branches(nn.Module):
    """A sum of parallel branches over one input, each conv+BN or an identity (BN or none),
    maybe with a constant per-channel gate ``k`` (an evaluated attention) on the input
    (``gate="before"``: conv input columns and an identity BN's input side take it) or on the
    sum (``"after"``: each branch's BN affine takes it, where every branch has one)."""

    def __init__(self, branches, gate: str = "none", k: torch.Tensor | None = None):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.gate = gate
        if gate != "none":
            self.register_buffer("k", k.reshape(1, -1, 1, 1).clone())

    def forward(self, x):
        if self.gate == "before":
            x = x * self.k
        y = self.branches[0](x)
        for b in self.branches[1:]:
            y = y + b(x)
        if self.gate == "after":
            y = y * self.k
        return torch.tanh(y)


@st.composite
def branch_sums(draw):
    c = draw(st.sampled_from([2, 4]))
    stride = draw(st.sampled_from([1, 2]))
    groups = draw(st.sampled_from([1, 2]))
    kinds = ["conv"] + [draw(st.sampled_from(["conv", "conv", "conv", "bn", "id"]))
                        for _ in range(draw(st.integers(1, 2)))]
    # an identity branch sums only with stride-1 'same' convs: three times in four draw those
    # (else nearly every example with one fails to run and tests nothing)
    same = any(k != "conv" for k in kinds) and draw(st.integers(0, 3)) != 0
    if same:
        stride = 1
    specs, mods = [], []
    for kind in kinds:
        if kind == "conv":
            k = draw(st.sampled_from([(1, 1), (3, 3), (5, 5), (1, 3), (3, 1)]))
            dil = draw(st.sampled_from([1, 1, 1, 2]))
            off = 0 if same else draw(st.sampled_from([0, 0, 0, 1]))  # padding off 'same'
            pad = tuple(dil * (kk // 2) + off for kk in k)
            s = 1 if same else draw(st.sampled_from([stride, stride, 1 + (stride == 1)]))
            g = draw(st.sampled_from([groups, groups, 1]))
            specs.append(("conv", k, dil, pad, s, g))
            mods.append(nn.Sequential(nn.Conv2d(c, c, k, s, pad, dilation=dil, groups=g,
                                                bias=draw(st.booleans())), nn.BatchNorm2d(c)))
        else:
            specs.append((kind,))
            mods.append(nn.BatchNorm2d(c) if kind == "bn" else nn.Identity())
    gate = draw(st.sampled_from(["none", "none", "before", "after"]))
    k = torch.tensor(draw(st.lists(st.sampled_from([-1.5, -0.5, 0.25, 0.75, 1.25, 2.0]),
                                   min_size=c, max_size=c)))
    return c, specs, _Branches(mods, gate, k)


def _expect_merge(specs) -> bool:
    """Independent statement of when a sum of branches is exactly one conv."""
    convs = [s for s in specs if s[0] == "conv"]
    if any(s[2] != 1 for s in convs):
        return False  # dilated: not a centred part of one dense kernel
    offsets = {tuple(k // 2 - p for k, p in zip(s[1], s[3])) for s in convs}
    if len(offsets) != 1 or len({(s[4], s[5]) for s in convs}) != 1:
        return False
    if len(convs) < len(specs):  # identity branches: stride 1, 'same' windows
        return convs[0][4] == 1 and offsets == {(0, 0)}
    return True


@settings(max_examples=40, deadline=None)
@given(case=branch_sums(), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_branch_sums_merge_exactly_when_they_are_one_conv(case, seed, dtype):
    c, specs, model = case
    torch.manual_seed(seed)
    randomize_bn(model, seed=seed)
    model.to(dtype)
    x = torch.randn(2, c, 9, 9, dtype=dtype)
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    except RuntimeError:
        return  # branch outputs of different sizes cannot be summed at all
    deploy = asrfx.fold(model, example_inputs=(x,), tol=dtype_tol(dtype, MERGE_F32_TOL))
    event(f"{dtype}, gate {model.gate}{', identity BN' if ('bn',) in specs else ''}")
    recs = [s for s in deploy.asrfx_report.sites if s.kind == "branch merge"]
    merged = [r for r in recs if r.action == "merged"]
    if _expect_merge(specs):
        assert len(merged) == 1, recs
        assert _convs_and_norms(deploy) == (1, 0)
    else:  # a sub-sum may still merge (e.g. a grouped conv with its identity BN), never all
        assert not any(f"({len(specs)} branches" in r.target for r in merged), (specs, recs)
        assert _convs_and_norms(deploy)[0] >= 2
    with torch.no_grad():
        for xi in (x, torch.randn(3, c, 9, 9, dtype=dtype)):
            assert rel_err(model(xi), deploy(xi)) <= dtype_tol(dtype, MERGE_F32_TOL)
