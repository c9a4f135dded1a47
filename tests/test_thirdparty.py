"""asrfx on models nobody here wrote: MONAI's SE-ResNet50 and SE layers, and lukemelas'
EfficientNet-B0 (efficientnet_pytorch).

These libraries spell channel attention their own way (MONAI: ``AdaptiveAvgPool -> view -> Linear
-> ReLU -> Linear -> Sigmoid -> view``, in-place residual ``result += x``; EfficientNet: functional
``F.conv2d`` through static-same-padding convs, swish on the pooled vector, drop-connect only in
train mode). The tests check that every attention is found, that the training form trains, and that
the deploy form is exact after every BatchNorm got random statistics.
"""

from __future__ import annotations

import collections
import copy
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

import asrfx
from helpers import REL_TOL, psi_names, randomize_bn, randomize_psi, rel_err

monai = pytest.importorskip("monai")
efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch")

from monai.networks.blocks import ChannelSELayer, ResidualSELayer  # noqa: E402
from monai.networks.nets import SEResNet50  # noqa: E402
from efficientnet_pytorch import EfficientNet  # noqa: E402


# --------------------------------------------------------------------------------------------
# helpers


def _graphs(gm: fx.GraphModule) -> list[fx.Graph]:
    gs = [gm.graph]
    if isinstance(gm, asrfx.DualModeGraphModule) and gm.eval_graph is not gm.graph:
        gs.append(gm.eval_graph)
    return gs


def _is_sigmoid(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(gm.get_submodule(str(n.target)), nn.Sigmoid)
    if n.op == "call_function":
        return n.target in (torch.sigmoid, F.sigmoid, torch.nn.functional.sigmoid,
                            torch.Tensor.sigmoid, torch.special.expit)
    if n.op == "call_method":
        return n.target in ("sigmoid", "sigmoid_")
    return False


def _sigmoids(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for g in _graphs(gm) for n in g.nodes if _is_sigmoid(gm, n)]


def _train_step(model: nn.Module, x: torch.Tensor, num_classes: int, seed: int = 0) -> float:
    """One SGD step with cross-entropy; every psi must receive a finite, non-zero gradient."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (x.shape[0],), generator=gen)
    model.train()
    psis = dict((n, p) for n, p in model.named_parameters() if n.endswith("psi"))
    before = {n: p.detach().clone() for n, p in psis.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    out = model(x)
    assert out.shape == (x.shape[0], num_classes)
    loss = F.cross_entropy(out, y)
    assert torch.isfinite(loss)
    loss.backward()
    for n, p in psis.items():
        assert p.grad is not None, f"{n} got no gradient"
        assert torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, f"{n} got an all-zero gradient"
    opt.step()
    for n, p in psis.items():
        assert not torch.equal(before[n], p.detach()), f"{n} did not change in the SGD step"
    return loss.item()


def _check_fold_exact(prepared: nn.Module, x: torch.Tensor, x_other: torch.Tensor,
                      seed: int) -> fx.GraphModule:
    """Run ``prepared`` in train mode at ``x_other`` (another batch and spatial size than the
    example ``x``: psi must not fix the input size); randomize BN + psi (in place), fold at
    ``x``; compare in eval mode at ``x`` and at ``x_other``; return the folded model."""
    assert x_other.shape[0] != x.shape[0] and x_other.shape[2:] != x.shape[2:]
    prepared.train()
    with torch.no_grad():
        assert prepared(x_other).shape[0] == x_other.shape[0]
    randomize_bn(prepared, seed)
    randomize_psi(prepared, seed + 1)
    prepared.eval()
    state = {k: v.clone() for k, v in prepared.state_dict().items()}
    folded = asrfx.fold(prepared, example_inputs=(x,))
    assert not folded.training
    # fold must not modify the model it folds
    for k, v in prepared.state_dict().items():
        assert torch.equal(state[k], v), f"fold modified {k} of its input"
    with torch.no_grad():
        for inp in (x, x_other):
            ref = prepared(inp)
            out = folded(inp)
            assert ref.abs().max() > 0
            err = rel_err(ref, out)
            assert err <= REL_TOL, f"fold inexact at input {tuple(inp.shape)}: rel err {err:.3e}"
    return folded


# --------------------------------------------------------------------------------------------
# MONAI SEResNet50


_MONAI_CASES = {
    "2d": dict(spatial_dims=2, in_channels=3, shape=(2, 3, 64, 64), other=(3, 3, 48, 80)),
    # 32^3 ends in a 1x1x1 map at layer4: the SE there gates a tensor with spatial size 1 (and
    # at the other size, 24 x 16 x 24, too)
    "3d": dict(spatial_dims=3, in_channels=1, shape=(2, 1, 32, 32, 32), other=(3, 1, 24, 16, 24)),
}


@pytest.fixture(scope="module", params=sorted(_MONAI_CASES))
def monai_case(request):
    case = _MONAI_CASES[request.param]
    torch.manual_seed(1234)
    model = SEResNet50(spatial_dims=case["spatial_dims"], in_channels=case["in_channels"],
                       num_classes=5)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(case["shape"], generator=gen)
    x_other = torch.randn(case["other"], generator=gen)
    prepared = asrfx.prepare(model, example_inputs=(x,))
    return dict(name=request.param, model=model, prepared=prepared, x=x, x_other=x_other)


def test_monai_seresnet50_every_channel_se_layer_converted(monai_case):
    model, prepared = monai_case["model"], monai_case["prepared"]
    n_se = sum(isinstance(m, ChannelSELayer) for m in model.modules())
    assert n_se == 16  # 3 + 4 + 6 + 3 bottlenecks, one SE each
    report = prepared.asrfx_report
    assert report.count(action="converted") == n_se
    assert report.count(action="converted", kind="channel-attention") == n_se
    assert report.count(action="refused") == 0
    psis = psi_names(prepared)
    assert len(psis) == n_se
    se_paths = {n for n, m in model.named_modules() if isinstance(m, ChannelSELayer)}
    converted = {s.path for s in report.sites if s.action == "converted"}
    assert converted == se_paths
    assert {p.rpartition(".")[0] for p in psis} == se_paths
    # prepare does not touch its input model
    assert not any(n.endswith("psi") for n, _ in model.named_parameters())


def test_monai_seresnet50_train_step(monai_case):
    prepared = copy.deepcopy(monai_case["prepared"])
    _train_step(prepared, monai_case["x"], num_classes=5)


def test_monai_seresnet50_fold_exact_and_sigmoid_free(monai_case):
    prepared = copy.deepcopy(monai_case["prepared"])
    assert len(_sigmoids(prepared)) == 16  # the gates are there before the fold
    folded = _check_fold_exact(prepared, monai_case["x"], monai_case["x_other"], seed=11)
    assert _sigmoids(folded) == []
    assert folded.asrfx_report.count(action="folded", kind="channel scale") == 16
    # the excitation MLPs are gone from the deploy graph
    assert not any("se_layer" in str(n.target) for n in folded.graph.nodes
                   if n.op == "call_module")
    assert not any(isinstance(m, ChannelSELayer) for m in folded.modules())


# --------------------------------------------------------------------------------------------
# MONAI ChannelSELayer / ResidualSELayer in a small net


class _MonaiSENet(nn.Module):
    def __init__(self, c: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.se = ChannelSELayer(2, c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.rse = ResidualSELayer(2, c)  # x * relu-gate + x (in place)
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        x = torch.relu(self.se(self.bn1(self.conv1(x))))
        x = torch.relu(self.rse(self.bn2(self.conv2(x))))
        return self.head(x.mean((2, 3)))


def _per_channel_const_ops(gm: fx.GraphModule) -> list[fx.Node]:
    """Multiplies / adds whose other operand is a stored tensor (a leftover per-channel constant)."""
    ops = {operator.mul, operator.imul, torch.mul, operator.add, operator.iadd, torch.add,
           "mul", "mul_", "add", "add_"}
    out = []
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_method") and n.target in ops:
            if any(isinstance(a, fx.Node) and a.op == "get_attr" for a in n.args):
                out.append(n)
    return out


def test_monai_se_and_residual_se_layers_fold_into_bn():
    torch.manual_seed(3)
    model = _MonaiSENet()
    x = torch.randn(2, 3, 16, 16)
    prepared = asrfx.prepare(model, example_inputs=(x,))
    rep = prepared.asrfx_report
    assert {s.path for s in rep.sites if s.action == "converted"} == {"se", "rse"}
    assert sorted(psi_names(prepared)) == ["rse.psi", "se.psi"]
    _train_step(copy.deepcopy(prepared), torch.randn(4, 3, 16, 16), num_classes=4)

    folded = _check_fold_exact(prepared, x, torch.randn(5, 3, 12, 20), seed=21)
    assert _sigmoids(folded) == []
    assert _per_channel_const_ops(folded) == []
    mul_nodes = [n for n in folded.graph.nodes
                 if n.op in ("call_function", "call_method")
                 and n.target in (operator.mul, operator.imul, torch.mul, "mul", "mul_")]
    assert mul_nodes == [], folded.code
    # only the model's own residual-free ops remain: conv, relu, conv, relu, mean, head
    assert [n.op for n in folded.graph.nodes].count("get_attr") == 0


def test_monai_residual_gate_becomes_one_plus_g_in_the_bn():
    """ResidualSELayer computes x*g + x: the fold must scale bn2 by (1 + g), not by g."""
    torch.manual_seed(4)
    model = _MonaiSENet()
    x = torch.randn(2, 3, 16, 16)
    prepared = asrfx.prepare(model, example_inputs=(x,))
    randomize_bn(prepared, 5)
    randomize_psi(prepared, 6)
    prepared.eval()
    folded = asrfx.fold(prepared, example_inputs=(x,), fuse_bn=False)
    c = 16
    def excite(path: str) -> torch.Tensor:
        # the excitation MLP of the original layer (Linear, act, Linear, gate) applied to psi
        v = prepared.get_parameter(f"{path}.psi").reshape(1, c)
        for i in range(4):
            v = prepared.get_submodule(f"{path}.fc.{i}")(v)
        return v

    with torch.no_grad():
        g_rse, g_se = excite("rse"), excite("se")
    g_rse, g_se = g_rse.reshape(c).double(), g_se.reshape(c).double()
    bn1, bn2 = prepared.get_submodule("bn1"), prepared.get_submodule("bn2")
    fbn1, fbn2 = folded.get_submodule("bn1"), folded.get_submodule("bn2")
    torch.testing.assert_close(fbn2.weight.double(), bn2.weight.double() * (1 + g_rse),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fbn2.bias.double(), bn2.bias.double() * (1 + g_rse),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fbn1.weight.double(), bn1.weight.double() * g_se,
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fbn1.bias.double(), bn1.bias.double() * g_se,
                               rtol=1e-5, atol=1e-6)
    assert _per_channel_const_ops(folded) == []
    with torch.no_grad():
        assert rel_err(prepared(x), folded(x)) <= REL_TOL


# --------------------------------------------------------------------------------------------
# efficientnet_pytorch EfficientNet-B0


@pytest.fixture(scope="module")
def effnet():
    torch.manual_seed(99)
    model = EfficientNet.from_name("efficientnet-b0", num_classes=10)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 64, 64, generator=gen)
    x_other = torch.randn(3, 3, 48, 80, generator=gen)
    prepared = asrfx.prepare(model, example_inputs=(x,))
    return dict(model=model, prepared=prepared, x=x, x_other=x_other)


def _se_blocks(model) -> list[int]:
    return [i for i, b in enumerate(model._blocks)
            if b._block_args.se_ratio is not None and 0 < b._block_args.se_ratio <= 1]


def test_efficientnet_b0_prepare_is_dual_mode_and_converts_every_se(effnet):
    model, prepared = effnet["model"], effnet["prepared"]
    se = _se_blocks(model)
    assert len(se) == len(model._blocks) == 16
    assert isinstance(prepared, asrfx.DualModeGraphModule)
    assert prepared.eval_graph is not prepared.graph
    rep = prepared.asrfx_report
    assert rep.count(action="converted") == 16
    assert rep.count(action="refused") == 0
    assert {s.path for s in rep.sites if s.action == "converted"} == \
        {f"_blocks.{i}" for i in se}
    psis = psi_names(prepared)
    assert len(psis) == 16
    # one psi per block, shared by the train and the eval graph (one state_dict)
    for g in _graphs(prepared):
        used = {str(n.target) for n in g.nodes if n.op == "get_attr" and
                str(n.target).endswith("psi")}
        assert used == set(psis)
    assert sum(k.endswith("psi") for k in prepared.state_dict()) == 16


def test_efficientnet_b0_train_step(effnet):
    prepared = copy.deepcopy(effnet["prepared"])
    _train_step(prepared, effnet["x"], num_classes=10)


def _pooled_sigmoids(gm: fx.GraphModule) -> list[fx.Node]:
    """Sigmoids applied to a tensor with spatial size 1 (needs shape metadata)."""
    out = []
    for n in _sigmoids(gm):
        shape = n.args[0].meta["tensor_meta"].shape
        assert len(shape) == 4
        if shape[2] * shape[3] == 1:
            out.append(n)
    return out


def test_efficientnet_b0_fold_exact_and_no_pooled_sigmoid(effnet):
    prepared = copy.deepcopy(effnet["prepared"])
    x = effnet["x"]
    # the detector below sees the SE gates of the prepared eval graph: a sigmoid on pooled
    # (N, C, 1, 1) data per block (the swish inside each excitation is a MemoryEfficientSwish:
    # an autograd Function, so an opaque call)
    eval_gm = fx.GraphModule(prepared, copy.deepcopy(prepared.eval_graph)).eval()
    ShapeProp(eval_gm).propagate(x)
    assert len(_pooled_sigmoids(eval_gm)) == 16
    folded = _check_fold_exact(prepared, x, effnet["x_other"], seed=31)
    assert not isinstance(folded, asrfx.DualModeGraphModule) or \
        folded.eval_graph is folded.graph
    assert folded.asrfx_report.count(action="folded") == 16
    ShapeProp(folded).propagate(x)
    assert _sigmoids(folded) == [], "an SE gate (a sigmoid of pooled data) survived the fold"
    # what is left of every SE is nothing: the swishes still called are on full feature maps
    swishes = [n for n in folded.graph.nodes if n.op == "call_module" and
               type(folded.get_submodule(str(n.target))).__name__ == "MemoryEfficientSwish"]
    assert swishes and all(n.meta["tensor_meta"].shape[2:] != (1, 1) for n in swishes)
    assert not any(n.op == "call_function" and n.target is torch.rand for n in folded.graph.nodes)


def test_efficientnet_b0_modes_differ_only_by_drop_connect(effnet):
    model, prepared = effnet["model"], effnet["prepared"]
    x = effnet["x"]

    def multiset(g):
        return collections.Counter((n.op, str(n.target)) for n in g.nodes
                                   if n.op != "get_attr")

    train, ev = multiset(prepared.graph), multiset(prepared.eval_graph)
    assert not (ev - train), "eval graph has nodes the train graph lacks"
    extra = train - ev
    # drop-connect runs in blocks with an identity skip; b0 has 9 of them
    skip = [b for b in model._blocks if b.id_skip and
            all(s == 1 for s in (b._block_args.stride if isinstance(b._block_args.stride, list)
                                 else [b._block_args.stride]))
            and b._block_args.input_filters == b._block_args.output_filters]
    rand_key = ("call_function", str(torch.rand))
    floor_key = ("call_function", str(torch.floor))
    assert extra[rand_key] == len(skip) == 9
    assert extra[floor_key] == len(skip)
    allowed = {rand_key, floor_key, ("call_function", str(operator.add)),
               ("call_function", str(operator.mul)), ("call_function", str(operator.truediv)),
               ("call_function", str(operator.getitem)), ("call_function", str(getattr))}
    assert set(extra) <= allowed, set(extra) - allowed

    # eval mode runs exactly the eval graph; train mode exactly the train graph
    with torch.no_grad():
        work = copy.deepcopy(prepared)
        randomize_bn(work, 41)
        randomize_psi(work, 42)
        work.eval()
        out = work(x)
        eval_gm = fx.GraphModule(work, copy.deepcopy(work.eval_graph))
        eval_gm.eval()
        torch.testing.assert_close(out, eval_gm(x))

        # train mode: freeze BN so that both runs see the same statistics
        work.train()
        for m in work.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        train_gm = fx.GraphModule(work, copy.deepcopy(work.graph))
        train_gm.train()
        for m in train_gm.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        torch.manual_seed(5)
        a = work(x)
        torch.manual_seed(5)
        b = train_gm(x)
        torch.testing.assert_close(a, b)
        assert not torch.equal(a, out), "drop-connect should change the train-mode output"

        # deepcopy keeps the dual-mode behaviour and gives identical eval outputs
        dup = copy.deepcopy(work)
        assert isinstance(dup, asrfx.DualModeGraphModule)
        assert dup.eval_graph is not work.eval_graph
        work.eval()
        dup.eval()
        torch.testing.assert_close(work(x), dup(x))
        torch.testing.assert_close(dup(x), out)
        x5 = torch.randn(5, 3, 64, 64)
        torch.testing.assert_close(work(x5), dup(x5))
        dup.train()
        for m in dup.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        torch.manual_seed(5)
        torch.testing.assert_close(dup(x), a)


def test_efficientnet_b0_fused_form_scales_the_projection_kernels():
    """The SE of every MBConv block scales a swish output that only the block's projection
    reads, an ``F.conv2d`` behind static-same padding (an ``nn.Identity``): in the fused form
    each gate goes into that call's kernel (``scaled_kernel``), no gated map is stored, and a
    training step computes what the multiply form computes; both fold to the same model."""
    from asrfx.passes.fuse_gates import scaled_kernel

    torch.manual_seed(40)
    # no drop-connect / dropout: the two forms' steps are compared value by value
    model = EfficientNet.from_name("efficientnet-b0", num_classes=10, dropout_rate=0.0,
                                   drop_connect_rate=0.0)
    randomize_bn(model, 41)
    gen = torch.Generator().manual_seed(42)
    x = torch.randn(2, 3, 64, 64, generator=gen)
    xb, yb = torch.randn(4, 3, 64, 64, generator=gen), torch.tensor([1, 3, 5, 7])
    plain = asrfx.prepare(model, example_inputs=(x,))
    fused = asrfx.prepare(model, example_inputs=(x,), fused=True)
    notes = fused.asrfx_report.notes
    assert any("16 through the input columns of the convolutions" in n for n in notes), notes
    assert sum(n.target is scaled_kernel for n in fused.graph.nodes) == 16
    randomize_psi(plain, 43)
    fused.load_state_dict(plain.state_dict())
    outs, grads = [], []
    for m in (plain, fused):
        m.train()
        out = m(xb)
        F.cross_entropy(out, yb).backward()
        outs.append(out.detach())
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert rel_err(outs[0], outs[1]) <= REL_TOL
    assert grads[0].keys() == grads[1].keys()
    largest = max(float(g.abs().max()) for g in grads[0].values())
    for name, g in grads[0].items():  # float32 rounding of the two orders, against the largest
        assert float((g - grads[1][name]).abs().max()) <= REL_TOL * largest, name
    deploy = [asrfx.fold(m.eval(), example_inputs=(x,)) for m in (plain, fused)]
    with torch.no_grad():
        assert rel_err(deploy[0](xb), deploy[1](xb)) <= REL_TOL
    assert deploy[1].asrfx_report.count(action="folded") == 16
