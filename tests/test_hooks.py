"""Hooks are never dropped silently.

A hook runs when its module is *called*. A submodule with forward (pre-)hooks or backward hooks
is therefore kept a leaf of the trace (one ``call_module``), named in a warning and in the
report, so its hooks run in the prepared and in the folded model; fold never folds into,
through or away such a module; an attention whose branch calls a hooked module is kept as it
is. Legacy ``torch.nn.utils.weight_norm`` (a forward pre-hook that recomputes ``weight`` from
``weight_g``/``weight_v``) is one such hook, and its non-leaf ``weight`` is copied, detached.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

import asrfx
from asrfx.zoo import BasicBlock, SEModule
from helpers import randomize_bn, rel_err

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
TOL = 1e-5


def _net(seed: int = 0) -> nn.Module:
    """stem conv-BN-ReLU, a basic block with SE, a plain basic block, a linear head; eval mode,
    random BatchNorm statistics."""
    torch.manual_seed(seed)
    model = nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, 16, 3, padding=1, bias=False), bn=nn.BatchNorm2d(16), act=nn.ReLU(),
        block1=BasicBlock(16, 16, attention=lambda c: SEModule(c, reduction=4)),
        block2=BasicBlock(16, 16),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(16, 10)))
    return randomize_bn(model, seed + 1).eval()


def _legacy_weight_norm(module: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of parametrizations
        return torch.nn.utils.weight_norm(module)


def _site(report: asrfx.Report, path: str, kind: str) -> asrfx.Site:
    found = [s for s in report.sites if s.path == path and s.kind == kind]
    assert found, f"no {kind!r} site at {path!r} in\n{report}"
    return found[0]


class Recorder:
    """A hook object: what the module saw, call by call (the caller's object, not a copy)."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def __call__(self, module: nn.Module, args: tuple, *rest) -> None:
        value = rest[-1] if rest else args[0]  # a forward hook's output, a pre-hook's input
        if isinstance(value, tuple):
            value = value[0]
        self.seen.append(value.detach().clone())


# --- legacy weight_norm ----------------------------------------------------------------------

def test_legacy_weight_norm_conv_goes_through_prepare_train_and_fold():
    model = _net()
    model.block1.conv1 = _legacy_weight_norm(model.block1.conv1)
    assert not model.block1.conv1.weight.is_leaf  # what copy.deepcopy refuses to copy

    train = asrfx.prepare(model, example_inputs=(X,))
    assert _site(train.asrfx_report, "block1.attention", "channel-attention").action == \
        "converted"
    conv = train.get_submodule("block1.conv1")
    assert {"weight_g", "weight_v"} <= {n for n, _ in conv.named_parameters()}
    # a training step moves weight_v (weight_g has no gradient through a training-mode BN);
    # the stale `weight` attribute is recomputed from them on each call
    train.train()
    opt = torch.optim.SGD(train.parameters(), lr=0.5)
    v_before = conv.weight_v.detach().clone()
    train(X).square().mean().backward()
    opt.step()
    assert not torch.allclose(conv.weight_v, v_before)
    randomize_bn(train, 5)
    train.eval()
    with torch.no_grad():
        ref = train(X)

    deploy = asrfx.fold(train, example_inputs=(X,))
    with torch.no_grad():
        assert rel_err(ref, deploy(X)) < TOL
    kept = _site(deploy.asrfx_report, "block1.conv1", "hooked module")
    assert (kept.action, kept.code) == ("kept", "hooked-module")
    assert "legacy weight_norm" in kept.reason and "remove_weight_norm" in kept.reason
    # the converted attention still folded away
    assert not any("psi" in n for n, _ in deploy.named_parameters())

    # a prepared model that was trained holds a non-leaf `weight` again: prepare returns a copy
    train.train()
    train(X).sum().backward()
    again = asrfx.prepare(train, example_inputs=(X,))
    assert isinstance(again, nn.Module) and again is not train

    # the model itself traces and folds, the weight-normed conv a call kept unfused
    model(X).sum().backward()  # `weight` is a non-leaf again
    gm = asrfx.trace(model, X)
    with torch.no_grad():
        assert rel_err(model(X), gm(X)) < TOL
    assert "block1.conv1" in {n.target for n in gm.graph.nodes if n.op == "call_module"}
    model(X).sum().backward()
    direct = asrfx.fold(model, example_inputs=(X,))
    with torch.no_grad():
        assert rel_err(model(X), direct(X)) < TOL
    assert _site(direct.asrfx_report, "block1.conv1", "hooked module").action == "kept"


def test_legacy_weight_norm_inside_an_attention_names_the_parametrized_alternative():
    model = _net()
    model.block1.attention.fc1 = _legacy_weight_norm(model.block1.attention.fc1)
    train = asrfx.prepare(model, example_inputs=(X,))
    site = _site(train.asrfx_report, "block1.attention", "channel-attention")
    assert (site.action, site.code) == ("refused", "hooked-module-in-branch")
    assert "block1.attention.fc1" in site.reason and "legacy weight_norm" in site.reason
    assert "torch.nn.utils.parametrizations.weight_norm" in site.reason
    train.eval()
    with torch.no_grad():
        assert rel_err(model(X), train(X)) < TOL
    # the advice holds: the parametrized form converts, and folds away
    fixed = _net()
    torch.nn.utils.parametrizations.weight_norm(fixed.block1.attention.fc1)
    train = asrfx.prepare(fixed, example_inputs=(X,))
    assert _site(train.asrfx_report, "block1.attention", "channel-attention").action == \
        "converted"
    train.eval()
    deploy = asrfx.fold(train, example_inputs=(X,))
    with torch.no_grad():
        assert rel_err(train(X), deploy(X)) < TOL
    assert not any("attention" in n for n, _ in deploy.named_parameters())


# --- hooks on submodules ---------------------------------------------------------------------

def _forward_hook(module: nn.Module, rec: Recorder) -> None:
    module.register_forward_hook(rec)


def _forward_hook_with_kwargs(module: nn.Module, rec: Recorder) -> None:
    module.register_forward_hook(lambda m, args, kwargs, out: rec(m, args, out),
                                 with_kwargs=True)


def _forward_pre_hook(module: nn.Module, rec: Recorder) -> None:
    module.register_forward_pre_hook(rec)


def _forward_pre_hook_with_kwargs(module: nn.Module, rec: Recorder) -> None:
    def hook(m, args, kwargs):
        rec(m, args)
        return args, kwargs
    module.register_forward_pre_hook(hook, with_kwargs=True)


HOOKS = {"forward": _forward_hook, "forward with kwargs": _forward_hook_with_kwargs,
         "forward pre": _forward_pre_hook, "forward pre with kwargs": _forward_pre_hook_with_kwargs}


@pytest.mark.parametrize("path, hook", [
    ("block1.attention", "forward"),      # an attention module the tracer would inline
    ("block2", "forward with kwargs"),    # a whole residual block
    ("block2", "forward pre"),
    ("block1", "forward pre with kwargs"),
    ("block1.conv1", "forward"),          # a leaf anyway: fold must not fuse its BN into it
    ("bn", "forward pre"),                # a BatchNorm fold would fuse into the stem conv
])
def test_a_hook_on_a_submodule_runs_in_the_prepared_and_the_folded_model(path, hook):
    model = _net()
    rec = Recorder()
    HOOKS[hook](model.get_submodule(path), rec)
    inlined = path in ("block1.attention", "block1", "block2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train = asrfx.prepare(model, example_inputs=(X,))
    named = [str(w.message) for w in caught if f"'{path}'" in str(w.message)]
    if inlined:
        assert named and "hook" in named[0] and "opaque leaf" in named[0], named
        site = _site(train.asrfx_report, path, "hooked module")
        assert (site.action, site.code) == ("kept", "hooked-module") and "hook" in site.reason
    else:
        assert not named
    # an attention inside a hooked module stays as it is (the hook sees what it saw)
    holds_attention = "block1.attention".startswith(path)
    assert train.asrfx_report.count("converted") == (0 if holds_attention else 1)

    train.eval()
    rec.seen.clear()
    with torch.no_grad():
        ref = train(X)
    assert len(rec.seen) == 1, f"the hook on {path} ran {len(rec.seen)} times in the prepared model"
    seen_ref = rec.seen[0]

    deploy = asrfx.fold(train, example_inputs=(X,))
    rec.seen.clear()
    with torch.no_grad():
        out = deploy(X)
    assert rel_err(ref, out) < TOL
    assert len(rec.seen) == 1, f"the hook on {path} ran {len(rec.seen)} times in the folded model"
    assert rel_err(seen_ref, rec.seen[0]) < TOL, "the hook saw other values in the folded model"
    site = _site(deploy.asrfx_report, path, "hooked module")
    assert site.action == "kept" and "handle.remove()" in site.reason


def test_a_pre_hook_that_changes_the_input_is_applied_when_the_model_runs():
    model = _net()
    state = {"scale": 2.0}
    model.block2.register_forward_pre_hook(lambda m, args: (args[0] * state["scale"],))
    with pytest.warns(UserWarning, match=r"'block2' \(BasicBlock\) has a forward pre-hook"):
        train = asrfx.prepare(model, example_inputs=(X,), mode="keep")  # nothing converted
    with pytest.warns(UserWarning, match=r"'block2' \(BasicBlock\) has a forward pre-hook"):
        deploy = asrfx.fold(model, example_inputs=(X,))
    train.eval()
    for scale in (2.0, -0.5):  # the hook reads its state at call time: nothing is baked in
        state["scale"] = scale
        with torch.no_grad():
            ref = model(X)
            assert rel_err(ref, train(X)) < TOL
            assert rel_err(ref, deploy(X)) < TOL


def test_a_backward_hook_on_a_block_runs_when_the_prepared_model_trains():
    model = _net()
    calls = []
    model.block2.register_full_backward_hook(lambda m, gin, gout: calls.append(gout[0].shape))
    with pytest.warns(UserWarning, match=r"'block2' \(BasicBlock\) has a backward hook"):
        train = asrfx.prepare(model, example_inputs=(X,))
    assert _site(train.asrfx_report, "block2", "hooked module").action == "kept"
    train.train()
    calls.clear()
    train(X).sum().backward()
    assert calls == [torch.Size((2, 16, 8, 8))]


@pytest.mark.parametrize("path, what", [("block1.attention.pool", "no longer call"),
                                        ("block1.attention.fc1", "on psi")])
def test_a_hook_inside_an_attention_branch_keeps_the_attention_as_it_is(path, what):
    """The model's only hook is on a module the conversion would bypass (the pooling psi
    replaces) or feed psi (the excitation): the attention is refused, named, and the hook runs
    in the prepared and the folded model."""
    model = _net()
    rec = Recorder()
    model.get_submodule(path).register_forward_hook(rec)
    train = asrfx.prepare(model, example_inputs=(X,))
    site = _site(train.asrfx_report, "block1.attention", "channel-attention")
    assert (site.action, site.code) == ("refused", "hooked-module-in-branch")
    assert path in site.reason and what in site.reason and "handle.remove()" in site.reason
    assert not any("psi" in n for n, _ in train.named_parameters())
    train.eval()
    with torch.no_grad():
        ref = model(X)
        rec.seen.clear()
        assert rel_err(ref, train(X)) < TOL
    assert len(rec.seen) == 1
    deploy = asrfx.fold(train, example_inputs=(X,))
    rec.seen.clear()
    with torch.no_grad():
        assert rel_err(ref, deploy(X)) < TOL
    assert len(rec.seen) == 1


def test_a_hook_added_to_a_prepared_attention_branch_is_not_evaluated_away():
    train = asrfx.prepare(_net(), example_inputs=(X,))
    rec = Recorder()
    train.block1.attention.fc1.register_forward_hook(rec)
    train.eval()
    with torch.no_grad():
        ref = train(X)
    deploy = asrfx.fold(train, example_inputs=(X,))
    rec.seen.clear()
    with torch.no_grad():
        assert rel_err(ref, deploy(X)) < TOL
    assert len(rec.seen) == 1
    assert _site(deploy.asrfx_report, "block1.attention.fc1", "hooked module").action == "kept"
    # the attention's constant still folded into the norm before it
    assert _site(deploy.asrfx_report, "block1.attention", "channel scale").action == "folded"


def test_trace_keeps_a_hooked_submodule_a_leaf():
    model = _net()
    rec = Recorder()
    model.block2.register_forward_hook(rec)
    with pytest.warns(UserWarning, match=r"'block2' \(BasicBlock\) has a forward hook"):
        gm = asrfx.trace(model, X)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"
            and str(n.target).startswith("block2")] == ["block2"]
    rec.seen.clear()
    with torch.no_grad():
        assert rel_err(model(X), gm(X)) < TOL
    assert len(rec.seen) == 2  # once in model(X), once in gm(X)


@pytest.mark.parametrize("entry", ["prepare", "fold"])
def test_a_hook_on_the_model_itself_is_named_in_a_warning(entry):
    model = _net()
    model.register_forward_hook(lambda m, args, out: None)
    call = asrfx.prepare if entry == "prepare" else asrfx.fold
    with pytest.warns(UserWarning, match="Sequential has a forward hook on itself"):
        call(model, example_inputs=(X,))
