"""The promises asrfx makes to its callers, each checked on its own.

1. Every failure a caller can cause is an :class:`asrfx.ASRError` (``InputError``, ``TraceError``,
   ``FoldMismatch``, ``ExportError``) naming the module and saying what to do; no raw torch.fx
   traceback escapes (bad example inputs, unsupported dtypes, untraceable code, bad checkpoints
   given to ``asrfx fold``).
2. ``prepare`` and ``fold`` are idempotent, and a model with nothing to do comes back equivalent;
   the report says which.
3. ``fold`` of a model in train mode folds in eval mode and leaves every submodule's own flag.
4. float16 / bfloat16 models fold in float64 and come back in their own dtype, on their own device.
5. Nothing is lost: the caller's model is never touched and shares no storage with the result;
   state_dicts round-trip bit-exactly; a trained checkpoint becomes the deploy model through
   ``asrfx fold`` (torch.export and ONNX files, loaded back and compared).

Every equivalence check randomizes BatchNorms and psi first (a fresh BatchNorm is the identity
in eval mode, a fresh psi one constant): a wrong fold could otherwise pass.
"""

from __future__ import annotations

import copy
import os
import pickle
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import asrfx
from asrfx.cli import fold_checkpoint, main
from helpers import REL_TOL, SE, DropPathNet, SENet, randomize_bn, randomize_psi, rel_err

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


# --------------------------------------------------------------------------------------------
# models


# SE, SENet (conv -> BN -> SE -> ReLU -> conv -> BN) and DropPathNet (two graphs): helpers


class KeptConst(nn.Module):
    """SE after ReLU6 at the output: nothing to fold into, the constant stays as a buffer."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.se = SE(c)

    def forward(self, x):
        return self.se(nn.functional.relu6(self.bn(self.conv(x))))


class LinearOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class TopLevelBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x) if x.sum() > 0 else self.conv(-x)


class Detector(nn.Module):
    """A traceable ``backbone`` with attention under a head whose control flow depends on the
    values (a detector's box selection)."""

    def __init__(self):
        super().__init__()
        self.backbone = SENet()

    def forward(self, x):
        scores = self.backbone(x)
        return scores[scores > 0] if bool((scores > 0).any()) else scores


class Gate(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return self.conv(x) if x.mean() > 0 else x * 0.5


class NestedGate(nn.Module):
    def __init__(self, c: int = 6):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.gate = Gate(c)
        self.se = SE(c)

    def forward(self, x):
        return self.se(self.gate(self.bn(self.stem(x))))


class OptionalArg(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x, mask=None):
        y = self.conv(x)
        return y if mask is None else y * mask


class Embed(nn.Module):
    """Integer inputs (token ids) are fine: only the layers asrfx folds must be floating."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv1d(8, 8, 1, bias=False)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, ids):
        return self.bn(self.conv(self.emb(ids).transpose(1, 2)))


def _x(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


X = _x(2, 3, 8, 8)


def _prepared(cls=SENet, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    p = asrfx.prepare(cls(), example_inputs=(X,), **kw)
    randomize_bn(p, seed + 1)
    randomize_psi(p, seed + 2)
    return p


# --------------------------------------------------------------------------------------------
# 1. errors are asrfx exceptions naming the module and the fix


def _call(entry: str, model: nn.Module, inputs):
    if entry == "trace":
        return asrfx.trace(model, inputs)
    return getattr(asrfx, entry)(model, example_inputs=inputs)


def _assert_clean(err: BaseException) -> None:
    """An asrfx error, not chained to the fx / torch exception underneath."""
    assert isinstance(err, asrfx.ASRError)
    assert type(err).__module__ == "asrfx.errors"
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)


BAD_INPUTS = {
    # case: (inputs, what the message must say besides the model's name)
    "wrong rank": (_x(2, 3, 8), ["(2, 3, 8)", "SENet.forward(x)"]),
    "unbatched": (_x(3, 8, 8), ["(3, 8, 8)"]),
    "wrong channels": (_x(2, 5, 8, 8), ["(2, 5, 8, 8)", "3 channels"]),
    "list of ints": ([1, 2, 3], ["no tensor", "int", "torch.randn"]),
    "tuple with a list": (([1, 2, 3],), ["no tensor", "list"]),
    "numpy array": (np.zeros((2, 3, 8, 8), np.float32), ["ndarray", "torch.from_numpy"]),
    "numpy in a tuple": ((np.zeros((2, 3, 8, 8), np.float32),), ["ndarray", "torch.from_numpy"]),
    "int tensor": ((torch.ones(2, 3, 8, 8, dtype=torch.long),), ["int64", "float32", ".to("]),
    "float64 into float32": ((_x(2, 3, 8, 8, dtype=torch.float64),), ["float64", "float32"]),
    "too many inputs": ((X, X), ["3 were given", "SENet.forward(x)"]),
    "too few inputs": ((), ["missing 1 required", "SENet.forward(x)"]),
    "empty batch": ((_x(0, 3, 8, 8),), ["empty", "(0, 3, 8, 8)", "at least one"]),
    "a dict": ({"x": X}, ["dict", "tuple of tensors"]),
}


@pytest.mark.parametrize("entry", ["trace", "prepare", "fold"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_example_inputs_are_input_errors_naming_the_model_and_the_fix(entry, case):
    inputs, says = BAD_INPUTS[case]
    with pytest.raises(asrfx.InputError) as info:
        _call(entry, SENet(), inputs)
    _assert_clean(info.value)
    msg = str(info.value)
    assert "SENet" in msg
    assert "pass example_inputs" in msg or "convert it" in msg, msg  # what to do
    for s in says:
        assert s in msg, f"{s!r} not in {msg!r}"


def test_bad_example_inputs_of_a_prepared_model_are_input_errors():
    """fold of a GraphModule does not retrace: its inputs are checked by running the graph."""
    prepared = _prepared()
    for inputs in [(_x(2, 5, 8, 8),), (torch.ones(2, 3, 8, 8, dtype=torch.long),), (X, X)]:
        with pytest.raises(asrfx.InputError) as info:
            asrfx.fold(prepared, example_inputs=inputs)
        _assert_clean(info.value)
        assert "SENet" in str(info.value) and "example_inputs" in str(info.value)


@pytest.mark.parametrize("entry", ["trace", "prepare", "fold"])
def test_top_level_failures_are_trace_errors_with_the_fix(entry):
    for model, fix in [(TopLevelBranch(), "leaf_modules"),
                       (OptionalArg(), "optional arguments ['mask']"),
                       (Detector(), "model.backbone = asrfx.prepare(model.backbone")]:
        with pytest.raises(asrfx.TraceError) as info:
            _call(entry, model, (X,))
        _assert_clean(info.value)
        assert info.value.module_path == ""
        msg = str(info.value)
        assert type(model).__name__ in msg and "fix:" in msg and fix in msg, msg


def test_output_changing_hook_on_the_top_level_is_named_in_the_trace_error():
    model = SENet()
    model.register_forward_hook(lambda mod, args, out: out * 2)
    with pytest.raises(asrfx.TraceError, match="forward hooks on itself") as info:
        asrfx.prepare(model, example_inputs=(X,))
    _assert_clean(info.value)


@pytest.mark.parametrize("entry", ["prepare", "fold"])
def test_nested_untraceable_module_becomes_a_leaf_with_a_warning(entry):
    model = NestedGate()
    randomize_bn(model, 3)
    with pytest.warns(UserWarning, match=r"'gate' \(Gate\) cannot be traced") as rec:
        out = _call(entry, model, (X,))
    assert any("leaf_modules" in str(w.message) or "opaque leaf" in str(w.message) for w in rec)
    assert "gate" in [str(n.target) for n in out.graph.nodes if n.op == "call_module"]
    model.eval()
    out.eval()
    with torch.no_grad():
        for sign in (1.0, -1.0):  # both branches of the gate
            xi = sign * (torch.rand(3, 3, 8, 8) + 0.1)
            if entry == "fold":
                assert rel_err(model(xi), out(xi)) <= REL_TOL
            else:
                assert out(xi).shape == model(xi).shape


class ComplexNet(nn.Module):
    """Runs in eager mode in complex64 (no BatchNorm); its fold would drop the imaginary part."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return self.conv2(y * torch.sigmoid(y.abs().mean((2, 3), keepdim=True)))


def _int_weight_net() -> nn.Module:
    m = SENet()
    m.conv.weight = nn.Parameter(torch.ones_like(m.conv.weight, dtype=torch.int8),
                                 requires_grad=False)
    return m


@pytest.mark.parametrize("entry", ["prepare", "fold"])
@pytest.mark.parametrize("case", ["complex", "int weights", "float8", "meta"])
def test_unsupported_models_are_input_errors(entry, case):
    if case == "complex":
        model, inputs, says = ComplexNet().to(torch.complex64), \
            (X.to(torch.complex64),), ["ComplexNet.conv.weight", "complex64", "view_as_real"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch: complex modules are experimental
            model(*inputs)  # the model itself works
    elif case == "int weights":
        model, inputs, says = _int_weight_net(), (X,), ["SENet.conv.weight", "int8",
                                                        "dequantize"]
    elif case == "float8":
        model, inputs, says = SENet(), (X,), ["float8_e4m3fn", "model.float()"]
        model.bn.weight.data = model.bn.weight.data.to(torch.float8_e4m3fn)
    else:
        model, inputs, says = SENet().to("meta"), (X.to("meta"),), ["meta", "to_empty"]
    with pytest.raises(asrfx.InputError) as info:
        _call(entry, model, inputs)
    _assert_clean(info.value)
    for s in says:
        assert s in str(info.value), str(info.value)


def test_integer_inputs_are_supported():
    model = Embed()
    randomize_bn(model, 4)
    ids = torch.randint(0, 10, (2, 5))
    folded = asrfx.fold(model, example_inputs=(ids,))
    assert folded.asrfx_report.count(action="fused") == 1
    model.eval()
    with torch.no_grad():
        assert rel_err(model(ids), folded(ids)) <= REL_TOL


# --- the `asrfx fold` command line


FACTORY = '''
import torch
from torch import nn


class SE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // 2, 1)
        self.fc2 = nn.Conv2d(c // 2, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class Tiny(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.se = SE(8)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(torch.relu(self.se(self.bn(self.conv(x)))).mean((2, 3)))


class Other(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x.mean((2, 3)))


def make():
    return Tiny()


def make_wide():
    return Tiny(classes=7)


def make_other():
    return Other()


def needs_args(width):
    return Tiny()
'''
FACTORY_MODULE = "asrfx_guar_factory"
SIZE = ["--size", "3", "8", "8"]


@pytest.fixture
def factory(tmp_path, monkeypatch):
    """A tiny model factory module in tmp_path, importable as ``asrfx_guar_factory``."""
    d = tmp_path / "factory"
    d.mkdir()
    (d / f"{FACTORY_MODULE}.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(d))
    monkeypatch.delitem(sys.modules, FACTORY_MODULE, raising=False)
    import importlib

    return importlib.import_module(FACTORY_MODULE)


def _fold_cli(spec: str, ckpt, out, *extra: str) -> int:
    return main(["fold", "--model", spec, "--checkpoint", str(ckpt), "--out", str(out), *SIZE,
                 *extra])


class _Mkdir:
    """Unpickling this would create a directory (it must never be unpickled)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _bad_checkpoint(case: str, tmp_path, factory) -> tuple[object, list[str]]:
    """(checkpoint path, what the error must say)."""
    p = tmp_path / f"{case.replace(' ', '_')}.pt"
    if case == "missing":
        return p, ["no checkpoint file", str(p)]
    if case == "directory":
        p.mkdir()
        return p, ["is a directory"]
    if case == "empty":
        p.write_bytes(b"")
        return p, ["empty or truncated"]
    if case == "garbage":
        p.write_bytes(b"\x00\x01 this is not a checkpoint " * 8)
        return p, ["not a PyTorch checkpoint"]
    if case == "plain pickle":
        with open(p, "wb") as f:
            pickle.dump({"state_dict": object()}, f)
        return p, ["weights-only", "never unpickles"]
    if case == "pickled object":
        torch.save({"conv.weight": _Mkdir(str(tmp_path / "EXECUTED"))}, p)
        return p, ["pickled Python object", "mkdir", "never unpickles"]
    if case == "not a dict":
        torch.save([torch.ones(2)], p)
        return p, ["not a state_dict", "list"]
    if case == "training checkpoint":
        torch.save({"model": factory.make().state_dict(), "epoch": 3}, p)
        return p, ["not a state_dict", "'model'", "'epoch': int"]
    if case == "another model":
        torch.save(factory.make_other().state_dict(), p)
        return p, ["does not fit", "'conv.weight'", "'lin.weight'", "check --model"]
    if case == "other shapes":
        torch.save(asrfx.prepare(factory.make_wide(), example_inputs=(X,)).state_dict(), p)
        return p, ["does not fit", "head.weight: (7, 8) in the checkpoint, (4, 8) in the model"]
    raise AssertionError(case)


CKPT_CASES = ["missing", "directory", "empty", "garbage", "plain pickle", "pickled object",
              "not a dict", "training checkpoint", "another model", "other shapes"]


@pytest.mark.parametrize("case", CKPT_CASES)
def test_fold_cli_refuses_bad_checkpoints_with_a_clear_message(case, tmp_path, factory, capsys):
    ckpt, says = _bad_checkpoint(case, tmp_path, factory)
    out = tmp_path / "out"
    capsys.readouterr()
    assert _fold_cli(f"{FACTORY_MODULE}:make", ckpt, out) == 2
    err = capsys.readouterr().err
    assert err.startswith("asrfx fold: ") and "Traceback" not in err
    assert "weights_only` set to `False`" not in err  # never advise unpickling
    for s in says:
        assert s in err, f"{s!r} not in {err!r}"
    assert any(fix in err for fix in ("torch.save(model.state_dict(), path)", "--model",
                                      "--num-classes")), err  # what to do
    assert not (tmp_path / "EXECUTED").exists()  # nothing was unpickled
    assert not out.exists()  # refused before writing anything
    # the library call raises the same error as an InputError
    with pytest.raises(asrfx.InputError) as info:
        fold_checkpoint(f"{FACTORY_MODULE}:make", ckpt, out, size=(3, 8, 8))
    _assert_clean(info.value)


def test_fold_cli_refuses_a_bad_model_spec(tmp_path, factory, capsys):
    ckpt = tmp_path / "c.pt"
    torch.save(factory.make().state_dict(), ckpt)
    for spec, says in [(f"{FACTORY_MODULE}:needs_args", "needs_args() raised TypeError"),
                       (f"{FACTORY_MODULE}:nope", "cannot import"),
                       ("no_such_module_xyz:make", "cannot import")]:
        assert _fold_cli(spec, ckpt, tmp_path / "out") == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err


# --------------------------------------------------------------------------------------------
# 2. idempotence; nothing to do


@pytest.mark.parametrize("case", ["prepare a prepared model", "prepare a folded model",
                                  "fold a folded model"])
@pytest.mark.parametrize("training", [True, False])
def test_a_second_prepare_or_fold_returns_the_model_unchanged_and_says_so(case, training):
    prepared = _prepared()
    model = asrfx.fold(prepared, example_inputs=(X,)) if "folded" in case else prepared
    model.train(training)
    entry = asrfx.prepare if case.startswith("prepare") else asrfx.fold
    again = entry(model, example_inputs=(X,))
    rep = again.asrfx_report
    done = "folded" if "folded" in case else "prepared"
    assert any(f"already {done}" in n and "returned unchanged" in n for n in rep.notes), rep.notes
    assert f"already {done}" in str(rep) and "nothing to do" in str(rep)
    assert rep.count() == 0 and rep.params_before == rep.params_after
    assert again is not model and again.code == model.code
    assert again.meta["asrfx"]["stage"] == model.meta["asrfx"]["stage"]
    # a prepared model keeps its mode; fold always returns eval mode
    assert again.training is (training and entry is asrfx.prepare)
    assert model.training is training
    sd, sd2 = model.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    model.eval()
    again.eval()
    with torch.no_grad():
        xi = _x(3, 3, 8, 8, seed=1)
        assert torch.equal(again(xi), model(xi))


@pytest.mark.parametrize("case", ["fold linear-only", "fold without fuse_bn",
                                  "prepare linear-only"])
def test_a_model_with_nothing_to_do_comes_back_equivalent_and_the_report_says_so(case):
    if "linear" in case:
        model, x = LinearOnly(), _x(4, 6)
    else:
        model, x = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), 1), X
    entry = asrfx.prepare if case.startswith("prepare") else asrfx.fold
    out = entry(model, example_inputs=(x,), **({"fuse_bn": False} if "fuse_bn" in case else {}))
    rep = out.asrfx_report
    assert str(rep).startswith(f"asrfx {entry.__name__}: nothing to do")
    assert rep.params_before == rep.params_after
    note = "no channel attention found" if entry is asrfx.prepare else "nothing was folded"
    assert any(note in n for n in rep.notes), rep.notes
    model.eval()
    out.eval()
    with torch.no_grad():
        for xi in (x, torch.randn(5, *x.shape[1:])):
            torch.testing.assert_close(out(xi), model(xi))


# --------------------------------------------------------------------------------------------
# 3. fold of a model in train mode


def _flags(model: nn.Module) -> dict[str, bool]:
    return {n: m.training for n, m in model.named_modules()}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k])
                                        for k in a)


@pytest.mark.parametrize("what", ["plain model", "prepared model", "dual-mode prepared model"])
@pytest.mark.parametrize("flags", ["train", "mixed"])
def test_fold_of_a_training_model_folds_in_eval_mode_and_keeps_every_flag(what, flags):
    torch.manual_seed(0)
    if what == "plain model":
        model = randomize_bn(SENet(), 1)
    else:
        model = _prepared(DropPathNet if what.startswith("dual") else SENet)
        if what.startswith("dual"):
            assert isinstance(model, asrfx.DualModeGraphModule)
    model.train()
    if flags == "mixed":  # a frozen norm and a frozen branch inside a training model
        model.get_submodule("bn").eval()
        model.get_submodule("se.fc1").eval()
    before_flags, before_state = _flags(model), _state(model)
    folded = asrfx.fold(model, example_inputs=(X,))
    assert _flags(model) == before_flags  # each submodule's own flag, mixed ones too
    assert _same_state(before_state, _state(model))  # no BatchNorm statistic moved
    assert not any(_flags(folded).values())
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        for seed in (1, 2):
            xi = _x(3, 3, 8, 8, seed=seed)
            assert rel_err(reference(xi), folded(xi)) <= REL_TOL  # eval-mode semantics
    assert _flags(model) == before_flags


# --------------------------------------------------------------------------------------------
# 4. half precision and devices


@pytest.fixture
def no_tf32():
    """Compare in full fp32 on GPUs (TF32 convs round to 10 bits); restored afterwards."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_folds_in_float64_and_keeps_its_dtype(dtype, device, no_tf32):
    eps = torch.finfo(dtype).eps
    prepared = _prepared().to(device=device, dtype=dtype)
    x = X.to(device=device, dtype=dtype)
    folded = asrfx.fold(prepared, example_inputs=(x,))
    tensors = dict(folded.named_parameters()) | dict(folded.named_buffers())
    assert tensors
    for k, t in tensors.items():
        assert t.dtype == dtype, (k, t.dtype)
        assert t.device.type == device, (k, t.device)
    prepared.eval()
    reference = copy.deepcopy(prepared).double()  # the exact function, in float64
    with torch.no_grad():
        for seed in (1, 2):
            xi = _x(4, 3, 8, 8, seed=seed, dtype=dtype, device=device)
            out = folded(xi)
            assert out.dtype == dtype
            eager = prepared(xi)
            exact = reference(xi.double())
            assert rel_err(eager, out) <= 8 * eps
            # the folded model is about as close to the exact function as the eager one
            assert rel_err(exact, out) <= max(2 * rel_err(exact, eager), 4 * eps)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bn_fusion_weights_are_the_float64_result_rounded_once(dtype):
    """conv -> BN in half precision: the fused weights equal torch's fusion formula evaluated in
    float64 and rounded once to the model's dtype -- bit for bit."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), 5)
    with torch.no_grad():  # a tiny variance: (var + eps) is far off in half-precision math
        model[1].running_var[:4] = torch.tensor([1e-6, 3e-6, 1e-7, 2e-5])
    model = model.to(dtype)
    folded = asrfx.fold(model, example_inputs=(X.to(dtype),))
    conv, bn = model[0], model[1]
    d = lambda t: t.detach().double()  # noqa: E731
    w, b = fuse_conv_bn_weights(d(conv.weight), d(conv.bias), d(bn.running_mean),
                                d(bn.running_var), bn.eps, d(bn.weight), d(bn.bias))
    (fw, fb), = [(m.weight, m.bias) for m in folded.modules() if isinstance(m, nn.Conv2d)]
    assert fw.dtype == fb.dtype == dtype
    assert torch.equal(fw, w.to(dtype)) and torch.equal(fb, b.to(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_parameters_stay_on_their_device(device, no_tf32):
    prepared = _prepared().to(device)
    assert all(t.device.type == device for t in prepared.state_dict().values())
    x = X.to(device)
    again = asrfx.prepare(SENet().to(device), example_inputs=(x,))
    folded = asrfx.fold(prepared, example_inputs=(x,))
    for m in (again, folded):
        for k, t in list(m.named_parameters()) + list(m.named_buffers()):
            assert t.device.type == device, (k, t.device)
    prepared.eval()
    with torch.no_grad():
        assert rel_err(prepared(x), folded(x)) <= REL_TOL


# --------------------------------------------------------------------------------------------
# 5. nothing lost


def _tensors_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a model holds: parameters, buffers and plain tensor attributes."""
    out = {}
    for path, m in model.named_modules(remove_duplicate=False):
        for k, v in vars(m).items():
            if isinstance(v, torch.Tensor):
                out[f"{path}.{k}"] = v
        for k, v in list(m._parameters.items()) + list(m._buffers.items()):
            if v is not None:
                out[f"{path}.{k}"] = v
    return out


def _storages(model: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in _tensors_of(model).values()
            if t.untyped_storage().nbytes()}


def _hooks(model: nn.Module) -> dict[str, tuple]:
    return {n: tuple(tuple(getattr(m, h).items()) for h in
                     ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                      "_backward_pre_hooks"))
            for n, m in model.named_modules()}


def _callers_model(case: str) -> nn.Module:
    if case.endswith("prepared model") or case.endswith("folded model"):
        model = _prepared()
    else:
        torch.manual_seed(0)
        model = randomize_bn(SENet(), 1)
    if case.endswith("folded model"):
        model = asrfx.fold(model, example_inputs=(X,))
    model.train()
    model.get_submodule("bn" if "folded" not in case else "conv").eval()
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append("pre"))
    model.get_submodule("conv").register_forward_hook(lambda m, args, out: None)
    return model


CALLS = {
    "prepare": lambda m: asrfx.prepare(m, example_inputs=(X,)),
    "prepare mode=both": lambda m: asrfx.prepare(m, example_inputs=(X,), mode="both"),
    "prepare insert=se": lambda m: asrfx.prepare(m, example_inputs=(X,), insert="se",
                                                 where="every_bn"),
    "prepare calibrate": lambda m: asrfx.prepare(m, example_inputs=(X,), init="calibrate",
                                                 calibration_data=[X, X + 1]),
    "fold a plain model": lambda m: asrfx.fold(m, example_inputs=(X,)),
    "fold a prepared model": lambda m: asrfx.fold(m, example_inputs=(X,)),
    "prepare a prepared model": lambda m: asrfx.prepare(m, example_inputs=(X,)),
    "fold a folded model": lambda m: asrfx.fold(m, example_inputs=(X,)),
}


@pytest.mark.parametrize("case", list(CALLS))
def test_the_callers_model_is_never_touched_and_shares_no_storage(case):
    model = _callers_model(case)
    state, flags, hooks = _state(model), _flags(model), _hooks(model)
    tensors = {k: (v.dtype, v.device, tuple(v.shape)) for k, v in _tensors_of(model).items()}
    out = CALLS[case](model)
    assert _same_state(state, _state(model))
    assert _flags(model) == flags
    assert _hooks(model) == hooks
    assert {k: (v.dtype, v.device, tuple(v.shape)) for k, v in _tensors_of(model).items()} \
        == tensors
    shared = _storages(model) & _storages(out)
    assert not shared, f"{len(shared)} storages shared with the caller's model"
    # training the result leaves the caller's model alone too
    if out.training:
        opt = torch.optim.SGD(out.parameters(), lr=0.1)
        out(X).square().mean().backward()
        opt.step()
        assert _same_state(state, _state(model))


def test_the_working_copy_keeps_ties_views_and_flags_and_shares_nothing():
    """clone_module (every prepare and fold works on one) copies parameters and buffers the
    way copy.deepcopy does: tied weights stay tied, buffers viewing one storage still do,
    requires_grad and dtypes carry over, and no storage is shared with the original."""
    from asrfx.passes.graph_utils import clone_module

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight
            self.a.bias.requires_grad_(False)
            self.register_buffer("table", torch.arange(8.0))
            self.register_buffer("window", self.table[2:6])
            self.register_buffer("steps", torch.tensor(3))

    model = Tied()
    copy_ = clone_module(model)
    assert copy_.b.weight is copy_.a.weight
    assert type(copy_.a.weight) is nn.Parameter and not copy_.a.bias.requires_grad
    assert copy_.steps.dtype == torch.int64 and int(copy_.steps) == 3
    with torch.no_grad():
        copy_.table[3] = 100.0
    assert float(copy_.window[1]) == 100.0 and float(model.window[1]) == 3.0
    assert not _storages(model) & _storages(copy_)
    for k, v in _tensors_of(model).items():
        assert torch.equal(v, _tensors_of(copy_)[k]) or k in (".table", ".window")


STAGES = {
    "prepared": lambda cls, seed: _prepared(cls, seed),
    "prepared mode=both": lambda cls, seed: _prepared(cls, seed, mode="both"),
    "folded": lambda cls, seed: asrfx.fold(_prepared(cls, seed), example_inputs=(X,)),
}


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("cls", [SENet, KeptConst, DropPathNet])
def test_state_dict_round_trip_is_bit_exact(stage, cls, tmp_path):
    built = STAGES[stage](cls, 0)
    path = tmp_path / "model.pt"
    torch.save(built.state_dict(), path)
    state = torch.load(path, weights_only=True)
    fresh = STAGES[stage](cls, 10)  # built the same way, other weights
    assert fresh.code == built.code
    fresh.load_state_dict(state)  # strict: same keys, same shapes
    built.eval()
    fresh.eval()
    with torch.no_grad():
        for seed in (1, 2):
            xi = _x(3, 3, 8, 8, seed=seed)
            assert torch.equal(fresh(xi), built(xi))


def _checkpoint_of_a_trained_model(factory, tmp_path):
    torch.manual_seed(0)
    prepared = asrfx.prepare(factory.make(), example_inputs=(X,))
    randomize_bn(prepared, 1)
    randomize_psi(prepared, 2)  # "trained": psi far from its initial value
    ckpt = tmp_path / "trained.pt"
    torch.save(prepared.state_dict(), ckpt)
    return prepared.eval(), ckpt


def _check_deploy_files(out, prepared: nn.Module) -> None:
    from asrfx.runtimes import load_program, onnx_session, run_onnx

    assert (out / "fold.txt").is_file()
    program = load_program(out / "deploy.pt2")
    assert "sigmoid" not in program.code  # the attention is gone
    session = onnx_session(out / "deploy.onnx", threads=1)
    with torch.no_grad():
        for b in (1, 3):
            xi = _x(b, 3, 8, 8, seed=b)
            ref = prepared(xi)
            assert rel_err(ref, program(xi)) <= REL_TOL
            assert rel_err(ref, run_onnx(session, xi)[0]) <= REL_TOL


def test_fold_cli_turns_a_prepared_checkpoint_into_deploy_files(tmp_path, factory, capsys):
    prepared, ckpt = _checkpoint_of_a_trained_model(factory, tmp_path)
    out = tmp_path / "deploy"
    assert _fold_cli(f"{FACTORY_MODULE}:make", ckpt, out) == 0
    text = capsys.readouterr().out
    assert "folded" in text and "pt2:" in text and "onnx:" in text
    assert "no psi" not in text
    _check_deploy_files(out, prepared)
    # the checkpoint's psi, not the initial one, went into the deploy model
    from asrfx.runtimes import load_program

    untrained = asrfx.prepare(factory.make(), example_inputs=(X,))
    untrained.load_state_dict({k: v for k, v in torch.load(ckpt, weights_only=True).items()
                               if not k.endswith("psi")}, strict=False)
    untrained.eval()
    with torch.no_grad():
        xi = _x(3, 3, 8, 8, seed=9)
        assert rel_err(untrained(xi), load_program(out / "deploy.pt2")(xi)) > 1e-3


def test_fold_cli_on_the_original_models_checkpoint_says_how_to_calibrate(tmp_path, factory,
                                                                          capsys):
    """The original model's attention depends on the input: folding psi at its initial value
    would deploy something nobody trained. Without data the command says what to type."""
    original = randomize_bn(factory.make(), 3)
    ckpt = tmp_path / "original.pt"
    torch.save(original.state_dict(), ckpt)
    assert _fold_cli(f"{FACTORY_MODULE}:make", ckpt, tmp_path / "deploy") == 2
    err = capsys.readouterr().err
    assert "has no psi" in err and "asrfx convert --model" in err and "--data" in err
    assert not (tmp_path / "deploy" / "deploy.pt2").exists()


def test_fold_cli_calibrates_the_original_models_checkpoint_on_data(tmp_path, factory, capsys):
    import numpy as np

    torch.manual_seed(0)
    original = randomize_bn(factory.make(), 3)
    ckpt = tmp_path / "original.pt"
    torch.save(original.state_dict(), ckpt)
    g = torch.Generator().manual_seed(1)
    np.savez(tmp_path / "data.npz", x=torch.randn(20, 3, 8, 8, generator=g).numpy(),
             y=(torch.arange(20) % 4).numpy())
    out = tmp_path / "deploy"
    assert _fold_cli(f"{FACTORY_MODULE}:make", ckpt, out, "--formats", "pt2", "--data",
                     str(tmp_path / "data.npz")) == 0
    assert "psi calibrated on" in capsys.readouterr().out
    # the deploy model is the original with each gate at its mean over the training inputs
    from asrfx.data import load_dataset
    from asrfx.runtimes import load_program

    split = load_dataset(str(tmp_path / "data.npz"))
    reference = asrfx.prepare(original, example_inputs=(X,), init="calibrate",
                              calibration_data=[split.x_train]).eval()
    with torch.no_grad():
        xi = _x(3, 3, 8, 8, seed=4)
        assert rel_err(reference(xi), load_program(out / "deploy.pt2")(xi)) <= REL_TOL


def test_fold_cli_with_a_zoo_name(tmp_path, capsys):
    from asrfx.cli import load_model

    torch.manual_seed(0)
    prepared = asrfx.prepare(load_model("resnet20-se"), example_inputs=(X,))
    randomize_bn(prepared, 1)
    randomize_psi(prepared, 2)
    ckpt = tmp_path / "r20.pt"
    torch.save(prepared.state_dict(), ckpt)
    out = tmp_path / "deploy"
    assert _fold_cli("resnet20-se", ckpt, out) == 0
    assert "9 folded" in capsys.readouterr().out  # one SE per block
    _check_deploy_files(out, prepared.eval())


def test_the_backbone_of_an_untraceable_model_converts_and_folds_as_the_error_says():
    model = Detector().eval()
    prepared = asrfx.prepare(model.backbone, example_inputs=(X,))
    assert prepared.asrfx_report.count(action="converted") > 0
    deploy = asrfx.fold(prepared, example_inputs=(X,))
    model.backbone = deploy
    with torch.no_grad():
        assert rel_err(prepared.eval()(X), deploy(X)) <= REL_TOL
        assert model(X).dim() == 1  # the head runs on the folded backbone's scores
