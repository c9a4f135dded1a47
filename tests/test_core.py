"""End-to-end tests of ``asrfx.prepare`` / ``asrfx.fold`` on the zoo's CIFAR ResNets.

Every equivalence check randomizes the BatchNorms first (:func:`helpers.randomize_bn`): fresh
BatchNorms are the identity in eval mode, which would let a wrong fold pass.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import asrfx
from asrfx.zoo import SEModule, cifar_resnet
from helpers import (REL_TOL, assert_state_equal, bn_call_nodes, count_se, node_kinds,
                     rand_images, randomize_bn, rel_err, se_paths, sigmoid_nodes, state_snapshot,
                     train_steps)

NUM_CLASSES = 10
SIZE = 32  # the input size: also helpers.rand_images' default


def _psis(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.endswith("psi")}


def _assert_equivalent(ref_model: nn.Module, folded: nn.Module, batches, seed: int = 100):
    """``folded`` matches ``ref_model`` (both in eval mode) on fresh inputs of each batch size."""
    assert not ref_model.training and not folded.training
    for i, b in enumerate(batches):
        x = rand_images(b, seed + i)
        with torch.no_grad():
            ref, out = ref_model(x), folded(x)
        assert out.shape == ref.shape == (b, NUM_CLASSES)
        err = rel_err(ref, out)
        assert err <= REL_TOL, f"batch {b}: relative error {err:.3e} > {REL_TOL:.0e}"


# ---------------------------------------------------------------------------------------------
# prepare -> train -> randomize BN -> fold, cached per configuration (the ResNet-164 run is the
# expensive part of this file; several tests share it).

_CONFIGS = {
    "r20": dict(depth=20, block="basic"),
    "r56": dict(depth=56, block="basic"),
    "r164": dict(depth=164, block="bottleneck"),
}
_TRAIN = dict(steps=3, batch=8)
_CACHE: dict = {}


def _pipeline(name: str, fold_batch: int):
    key = (name, fold_batch)
    if key not in _CACHE:
        cfg = _CONFIGS[name]
        torch.manual_seed(cfg["depth"])
        original = cifar_resnet(cfg["depth"], attention="se", block=cfg["block"],
                                num_classes=NUM_CLASSES)
        prepared = asrfx.prepare(original, example_inputs=(rand_images(fold_batch, 1),),
                                 mode="replace", init=0.1)
        psi0 = {n: p.detach().clone() for n, p in _psis(prepared).items()}
        losses = train_steps(prepared, num_classes=NUM_CLASSES, size=SIZE, **_TRAIN)
        assert all(torch.isfinite(torch.tensor(losses)))
        # training moved psi (otherwise the fold below would test the initial constant only)
        assert any(not torch.equal(psi0[n], p) for n, p in _psis(prepared).items())
        randomize_bn(prepared, seed=7)
        folded = asrfx.fold(prepared, example_inputs=(rand_images(fold_batch, 2),), check=True,
                            fuse_bn=True)
        prepared.eval()
        _CACHE[key] = (original, prepared, folded)
    return _CACHE[key]


def _other_batches(fold_batch: int) -> list[int]:
    # the batch the fold saw, plus two it did not see
    return [fold_batch] + [b for b in (1, 3, 8) if b != fold_batch][:2]


@pytest.mark.parametrize("name,fold_batch", [
    ("r20", 1), ("r20", 8),
    ("r56", 1), ("r56", 8),
    ("r164", 1), ("r164", 8),
])
def test_train_then_fold_is_equivalent(name, fold_batch):
    original, prepared, folded = _pipeline(name, fold_batch)
    n_se = count_se(original)
    report = folded.asrfx_report
    assert report.stage == "fold"
    assert report.count(action="folded", kind="channel scale") == n_se
    assert report.count(action="kept") == 0
    assert not folded.training
    _assert_equivalent(prepared, folded, _other_batches(fold_batch))


@pytest.mark.slow
@pytest.mark.parametrize("dims", [1, 3])
def test_train_then_fold_other_dims_slow(dims):
    torch.manual_seed(dims)
    model = cifar_resnet(20, attention="se", block="basic", num_classes=NUM_CLASSES, dims=dims)
    size = 64 if dims == 1 else 8
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, *([size] * dims), generator=gen)
    prepared = asrfx.prepare(model, example_inputs=(x,))
    opt = torch.optim.SGD(prepared.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(prepared(x), torch.tensor([0, 1, 2, 3])).backward()
        opt.step()
    randomize_bn(prepared, seed=3)
    folded = asrfx.fold(prepared, example_inputs=(x,))
    prepared.eval()
    for b in (1, 3):
        xb = torch.randn(b, 3, *([size] * dims), generator=gen)
        with torch.no_grad():
            assert rel_err(prepared(xb), folded(xb)) <= REL_TOL


# ---------------------------------------------------------------------------------------------
# psi parameters


def test_one_psi_per_se_and_report_counts_r164():
    original, prepared, _ = _pipeline("r164", 8)
    n_se = count_se(original)
    assert n_se == 54
    assert len(_psis(prepared)) == n_se
    assert sorted(_psis(prepared)) == sorted(f"{p}.psi" for p in se_paths(original))
    assert prepared.asrfx_report.count(action="converted") == n_se
    assert prepared.asrfx_report.count(action="refused") == 0


def test_psi_shape_init_grad_and_step():
    torch.manual_seed(0)
    original = cifar_resnet(20, attention="se", block="basic", num_classes=NUM_CLASSES)
    n_se = count_se(original)
    prepared = asrfx.prepare(original, example_inputs=(rand_images(4, 0),), init=0.1)
    psis = _psis(prepared)
    assert len(psis) == n_se == 9
    report = prepared.asrfx_report
    assert report.stage == "prepare"
    assert report.count(action="converted") == n_se
    assert report.count(action="converted", kind="channel-attention") == n_se
    assert sorted(s.path for s in report.sites) == sorted(se_paths(original))
    assert report.params_after - report.params_before == sum(p.numel() for p in psis.values())

    for path in se_paths(original):
        c = original.get_submodule(path).channels
        psi = psis[f"{path}.psi"]
        # psi replaces the SE's pooled statistic, the output of AdaptiveAvgPool2d(1): shape
        # (N, C, 1, 1), taken with batch 1 (apply_asr: psi_shape = (1, *stat_shape[1:])). The
        # SE's flatten(1) comes after the pool, so it stays in the branch and is applied to psi.
        assert tuple(psi.shape) == (1, c, 1, 1)
        assert psi.requires_grad
        assert torch.equal(psi.detach(), torch.full((1, c, 1, 1), 0.1))

    prepared.train()
    opt = torch.optim.SGD(prepared.parameters(), lr=0.1)
    opt.zero_grad()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, SIZE, SIZE, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    nn.functional.cross_entropy(prepared(x), y).backward()
    live = 0
    for path in se_paths(original):
        psi = psis[f"{path}.psi"]
        assert psi.grad is not None, path
        # psi reaches the loss only through the SE's fc1 -> ReLU: with a constant input, a hidden
        # layer whose pre-activations are all <= 0 passes no gradient at all (a property of
        # SE + constant psi, not of asrfx). So: non-zero gradient exactly when a unit is alive.
        with torch.no_grad():
            alive = bool((prepared.get_submodule(f"{path}.fc1")(psi.flatten(1)) > 0).any())
        nonzero = bool(psi.grad.abs().sum() > 0)
        assert nonzero == alive, path
        live += alive
    assert live >= n_se // 2

    before = {n: p.detach().clone() for n, p in psis.items()}
    opt.step()
    for n, p in psis.items():
        moved = not torch.equal(before[n], p.detach())
        assert moved == bool(p.grad.abs().sum() > 0), n


def test_every_psi_gets_gradient_when_se_hidden_units_are_alive():
    """With every SE's fc1 bias at +1 (all hidden ReLUs active at psi = 0.1), every psi must get
    a non-zero gradient and move on the optimizer step."""
    torch.manual_seed(0)
    original = cifar_resnet(20, attention="se", block="basic", num_classes=NUM_CLASSES)
    with torch.no_grad():
        for m in original.modules():
            if isinstance(m, SEModule):
                m.fc1.bias.fill_(1.0)
    prepared = asrfx.prepare(original, example_inputs=(rand_images(2, 0),))
    psis = _psis(prepared)
    assert len(psis) == count_se(original)
    prepared.train()
    opt = torch.optim.SGD(prepared.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, SIZE, SIZE, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    nn.functional.cross_entropy(prepared(x), y).backward()
    before = {n: p.detach().clone() for n, p in psis.items()}
    for n, p in psis.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    opt.step()
    for n, p in psis.items():
        assert not torch.equal(before[n], p.detach()), n


@pytest.mark.parametrize("init", [0.5, "normal", "scalar-tensor", "dict"])
def test_psi_init_variants(init):
    torch.manual_seed(0)
    original = cifar_resnet(20, attention="se", block="basic", num_classes=NUM_CLASSES)
    paths = se_paths(original)
    arg = {"dict": {f"{p}.psi": float(i) for i, p in enumerate(paths)},
           "scalar-tensor": torch.tensor(0.3)}.get(init, init)
    psis = _psis(asrfx.prepare(original, example_inputs=(rand_images(2, 0),), init=arg))
    assert sorted(psis) == sorted(f"{p}.psi" for p in paths)
    for i, p in enumerate(paths):
        v = psis[f"{p}.psi"].detach()
        if init == "normal":
            assert v.std() > 0.1  # drawn, not constant
        else:
            expected = float(i) if init == "dict" else 0.5 if init == 0.5 else 0.3
            assert torch.equal(v, torch.full_like(v, expected))


def test_psi_init_tensor_that_fits_some_sites_only():
    torch.manual_seed(0)
    original = cifar_resnet(20, attention="se", block="basic", num_classes=NUM_CLASSES)
    # a (16,) tensor fits the 16-channel sites of stage 1, not the 32/64-channel ones
    with pytest.raises(ValueError, match="does not fit"):
        asrfx.prepare(original, example_inputs=(rand_images(2, 0),), init=torch.arange(16.0))


@pytest.mark.parametrize("bad", ["misfit-tensor", "incomplete-dict"])
def test_bad_psi_init_is_an_input_error(bad):
    torch.manual_seed(0)
    original = cifar_resnet(20, attention="se", block="basic", num_classes=NUM_CLASSES)
    init = torch.arange(16.0) if bad == "misfit-tensor" else {"layer1.0.attention.psi": 0.2}
    with pytest.raises(asrfx.InputError):
        asrfx.prepare(original, example_inputs=(rand_images(2, 0),), init=init)


# ---------------------------------------------------------------------------------------------
# the deploy graph has no trace of the attention


def test_folded_se_graph_equals_folded_plain_graph_r164():
    original, prepared, folded = _pipeline("r164", 8)
    torch.manual_seed(1640)
    plain = cifar_resnet(164, attention=None, block="bottleneck", num_classes=NUM_CLASSES)
    randomize_bn(plain, seed=8)
    folded_plain = asrfx.fold(plain, example_inputs=(rand_images(2, 3),))

    kinds_se, kinds_plain = node_kinds(folded), node_kinds(folded_plain)
    assert kinds_se == kinds_plain, (kinds_se - kinds_plain, kinds_plain - kinds_se)
    assert len(folded.graph.nodes) == len(folded_plain.graph.nodes)

    assert sigmoid_nodes(folded) == []
    assert not any(n.op == "get_attr" for n in folded.graph.nodes)
    assert not any("psi" in str(n.target) for n in folded.graph.nodes)
    assert not any(isinstance(m, (SEModule, nn.Sigmoid, nn.Linear)) and "attention" in name
                   for name, m in folded.named_modules())
    assert not any("psi" in k or "attention" in k for k in folded.state_dict())
    # same architecture after folding: same parameter names, shapes and count
    assert {k: v.shape for k, v in folded.state_dict().items()} == \
        {k: v.shape for k, v in folded_plain.state_dict().items()}
    assert folded.asrfx_report.params_after == folded_plain.asrfx_report.params_after


# ---------------------------------------------------------------------------------------------
# mode="both": ASR(SE) + SE


_BOTH: dict = {}


def _both_r20():
    """(original, prepared in mode 'both'); built once, never mutated by the tests."""
    if not _BOTH:
        torch.manual_seed(20)
        original = cifar_resnet(20, attention="se", block="basic", num_classes=NUM_CLASSES)
        prepared = asrfx.prepare(original, example_inputs=(rand_images(4, 0),), mode="both")
        _BOTH["r20"] = (original, prepared)
    return _BOTH["r20"]


class _ConvBnSE(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.se = SEModule(16)

    def forward(self, x):
        return self.se(self.bn(self.conv(x)))


def test_both_mode_single_se_block():
    torch.manual_seed(0)
    model = randomize_bn(_ConvBnSE(), seed=1)
    x = rand_images(2, 0)[..., :8, :8]
    prepared = asrfx.prepare(model, example_inputs=(x,), mode="both")
    assert len(sigmoid_nodes(prepared)) == 2
    folded = asrfx.fold(prepared, example_inputs=(x,))
    prepared.eval()
    with torch.no_grad():
        assert rel_err(prepared(x), folded(x)) <= REL_TOL


def test_both_mode_keeps_original_se_and_adds_one_psi():
    original, prepared = _both_r20()
    n_se = count_se(original)
    orig_sd, prep_sd = original.state_dict(), prepared.state_dict()
    for k, v in orig_sd.items():
        assert k in prep_sd, f"original parameter {k} lost"
        assert torch.equal(prep_sd[k], v), k
    new = set(prep_sd) - set(orig_sd)
    psis = sorted(k for k in new if k.endswith("psi"))
    assert psis == sorted(f"{p}.psi" for p in se_paths(original))
    # everything else that is new belongs to the ASR copy of a site's excitation
    assert all(".asr." in k for k in new if not k.endswith("psi")), sorted(new)
    assert len(sigmoid_nodes(prepared)) == 2 * n_se
    report = prepared.asrfx_report
    assert report.count(action="added") == n_se
    assert report.count(action="converted") == 0
    for p in se_paths(original):
        assert torch.equal(prepared.get_parameter(f"{p}.psi").detach(),
                           torch.full_like(prepared.get_parameter(f"{p}.psi"), 0.1))


def test_both_mode_trains_and_folds_exactly():
    original, prepared = _both_r20()
    prepared = copy.deepcopy(prepared)
    n_se = count_se(original)
    losses = train_steps(prepared, steps=2, batch=4, num_classes=NUM_CLASSES)
    assert all(torch.isfinite(torch.tensor(losses)))
    for n, p in _psis(prepared).items():
        assert p.grad is not None, n
    randomize_bn(prepared, seed=11)
    folded = asrfx.fold(prepared, example_inputs=(rand_images(8, 5),))
    prepared.eval()
    _assert_equivalent(prepared, folded, [8, 1, 3])

    # the original, input-dependent SE gates stay: one sigmoid per SE
    assert len(sigmoid_nodes(folded)) == n_se
    assert not any("psi" in str(n.target) or ".asr." in str(n.target)
                   for n in folded.graph.nodes)
    report = folded.asrfx_report
    kept = [s for s in report.sites if s.action == "kept" and s.kind == "channel-attention"]
    assert sorted(s.path for s in kept) == sorted(se_paths(original))
    assert all(s.channels == original.get_submodule(s.path).channels for s in kept)


def test_both_mode_folds_the_asr_scale_away():
    """ASR is inference-free: the ASR half of ASR(SE)+SE folds into the BatchNorm before it, and
    the deploy graph is that of the plain SE network. (Before 0c9a52a the SE's ``x.shape`` read
    kept the BN output from having a single reader and the scale stayed as a multiply.)"""
    original, prepared = _both_r20()
    n_se = count_se(original)
    prepared = randomize_bn(copy.deepcopy(prepared), seed=12)
    folded = asrfx.fold(prepared, example_inputs=(rand_images(4, 5),))
    report = folded.asrfx_report
    assert report.count(action="kept", kind="channel scale") == 0
    assert report.count(action="folded", kind="channel scale") == n_se
    torch.manual_seed(20)
    se_only = randomize_bn(cifar_resnet(20, attention="se", block="basic",
                                        num_classes=NUM_CLASSES), seed=12)
    assert node_kinds(folded) == node_kinds(asrfx.fold(se_only,
                                                       example_inputs=(rand_images(4, 5),)))


def test_both_mode_fold_report_names_the_asr_scale_sites():
    """The fold report names each ASR scale by its SE's path, not '(top)' (before 0c9a52a the
    inserted multiply had no nn_module_stack meta)."""
    original, prepared = _both_r20()
    folded = asrfx.fold(randomize_bn(copy.deepcopy(prepared), seed=13),
                        example_inputs=(rand_images(4, 5),))
    scale_paths = [s.path for s in folded.asrfx_report.sites if s.kind == "channel scale"]
    assert sorted(scale_paths) == sorted(se_paths(original))


# ---------------------------------------------------------------------------------------------
# checkpoints, purity, modes


def test_original_checkpoint_loads_into_prepared():
    torch.manual_seed(0)
    original = cifar_resnet(20, attention="se", block="basic", num_classes=NUM_CLASSES)
    prepared = asrfx.prepare(original, example_inputs=(rand_images(2, 0),))
    # a different "trained" original: other weights, other BN statistics
    torch.manual_seed(1)
    trained = randomize_bn(cifar_resnet(20, attention="se", block="basic",
                                        num_classes=NUM_CLASSES), seed=5)
    result = prepared.load_state_dict(trained.state_dict(), strict=False)
    assert result.missing_keys, "prepare added psi parameters"
    assert all(k.endswith("psi") for k in result.missing_keys), result.missing_keys
    assert sorted(result.missing_keys) == sorted(f"{p}.psi" for p in se_paths(original))
    # replace mode keeps every SE parameter (fc1, fc2 now read psi); the pool has no state
    assert result.unexpected_keys == []
    sd = trained.state_dict()
    for k, v in prepared.state_dict().items():
        if k.endswith("psi"):
            assert torch.equal(v, torch.full_like(v, 0.1)), k
        else:
            assert torch.equal(v, sd[k]), k


@pytest.mark.parametrize("mode", ["replace", "both"])
@pytest.mark.parametrize("training", [True, False])
def test_prepare_and_fold_do_not_touch_the_callers_model(mode, training):
    torch.manual_seed(0)
    original = cifar_resnet(20, attention="se", block="basic", num_classes=NUM_CLASSES)
    randomize_bn(original, seed=1)
    original.train(training)
    snap = state_snapshot(original)
    prepared = asrfx.prepare(original, example_inputs=(rand_images(4, 0),), mode=mode)
    assert_state_equal(snap, state_snapshot(original))
    assert original.training is training
    assert all(m.training is training for m in original.modules())
    assert prepared.training is training

    snap_p = state_snapshot(prepared)
    folded = asrfx.fold(prepared, example_inputs=(rand_images(4, 1),))
    assert_state_equal(snap_p, state_snapshot(prepared))
    assert prepared.training is training
    assert all(m.training is training for m in prepared.modules())
    assert not folded.training
    assert not any(m.training for m in folded.modules())

    # fold of a plain (unprepared) model: same guarantees
    folded_orig = asrfx.fold(original, example_inputs=(rand_images(4, 1),))
    assert_state_equal(snap, state_snapshot(original))
    assert original.training is training
    assert not folded_orig.training


def test_fold_of_plain_resnet_fuses_every_batchnorm():
    torch.manual_seed(0)
    plain = cifar_resnet(20, attention=None, block="basic", num_classes=NUM_CLASSES)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert n_bn == 21
    randomize_bn(plain, seed=2)
    folded = asrfx.fold(plain, example_inputs=(rand_images(8, 0),))
    assert bn_call_nodes(folded) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    report = folded.asrfx_report
    assert report.count(action="fused", kind="conv+bn") == n_bn
    assert report.count(action="kept") == 0
    plain.eval()
    _assert_equivalent(plain, folded, [8, 1, 3])


def test_fold_of_plain_bottleneck_resnet_fuses_every_batchnorm():
    torch.manual_seed(0)
    plain = cifar_resnet(29, attention=None, block="bottleneck", num_classes=NUM_CLASSES)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    randomize_bn(plain, seed=3)
    folded = asrfx.fold(plain, example_inputs=(rand_images(2, 0),))
    assert bn_call_nodes(folded) == []
    assert folded.asrfx_report.count(action="fused", kind="conv+bn") == n_bn
    plain.eval()
    _assert_equivalent(plain, folded, [2, 1, 5])


# ---------------------------------------------------------------------------------------------
# reports


def test_report_prints_a_table_with_site_paths(capsys):
    torch.manual_seed(0)
    original = cifar_resnet(20, attention="se", block="basic", num_classes=NUM_CLASSES)
    prepared = asrfx.prepare(original, example_inputs=(rand_images(2, 0),))
    text = str(prepared.asrfx_report)
    lines = text.splitlines()
    assert lines[0].startswith("asrfx prepare:")
    header = next(line for line in lines if line.startswith("site"))
    for col in ("kind", "action"):
        assert col in header
    for path in se_paths(original):
        row = next((line for line in lines if line.split() and line.split()[0] == path), None)
        assert row is not None, f"no table row for {path}"
        assert "converted" in row and f"{path}.psi" in row
    assert "parameters:" in text

    print(prepared.asrfx_report)
    assert capsys.readouterr().out.strip() == text.strip()

    folded = asrfx.fold(randomize_bn(prepared, seed=4), example_inputs=(rand_images(2, 0),))
    ftext = str(folded.asrfx_report)
    assert ftext.startswith("asrfx fold:")
    for path in se_paths(original):
        assert any(line.split() and line.split()[0] == path and "folded" in line
                   for line in ftext.splitlines()), path
    assert repr(folded.asrfx_report) == ftext
