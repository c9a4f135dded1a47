"""Tests of :mod:`asrfx.runtimes`: ONNX / onnxruntime, torch.export (.pt2) and torch.compile.

The ResNet-20 is exported once per module (~5 s); the other tests use models of a few layers.
The real torch.compile run (~20 s with a cold inductor cache on 2 cores) is marked slow.
"""

from __future__ import annotations

import zipfile

import pytest
import torch
from torch import nn

import asrfx
from asrfx import runtimes
from asrfx.errors import ASRError, ExportError, InputError
from asrfx.zoo import cifar_resnet
from helpers import REL_TOL, rand_images, randomize_bn, rel_err

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")


def _modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


class Tiny(nn.Module):
    """conv -> BN -> ReLU -> conv -> pool -> linear: a few layers, fast to export and compile."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(torch.relu(self.bn(self.conv1(x))))
        return self.fc(y.mean((2, 3)))


class DataDependent(nn.Module):
    """Python control flow on a tensor value: torch.export (hence the ONNX exporter) rejects it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > 0:
            return y * 2
        return y - 1


class FixedBatch(nn.Module):
    """Reshapes to a constant batch of 2: exports only with a fixed batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).reshape(2, -1))


def _tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return randomize_bn(Tiny(), seed=seed)


@pytest.fixture(scope="module")
def folded() -> nn.Module:
    """A ResNet-20 with SE attention, prepared, BN-randomized and folded (eval mode)."""
    torch.manual_seed(0)
    x = rand_images(2, 0)
    prepared = asrfx.prepare(cifar_resnet(20, attention="se"), example_inputs=(x,))
    randomize_bn(prepared, seed=5)
    return asrfx.fold(prepared, example_inputs=(x,))


@pytest.fixture(scope="module")
def folded_onnx(folded, tmp_path_factory):
    """The folded ResNet-20 exported once, from train mode (export must switch to eval)."""
    path = tmp_path_factory.mktemp("onnx") / "r20.onnx"
    folded.train()
    try:
        assert runtimes.export_onnx(folded, (rand_images(2, 1),), path) == path
        assert folded.training  # the caller's mode is back
    finally:
        folded.eval()
    return path


# ------------------------------------------------------------------------------------------ ONNX

def test_onnx_export_and_check_folded_resnet(folded, folded_onnx):
    assert folded_onnx.is_file()
    assert not folded_onnx.with_name(folded_onnx.name + ".data").exists()  # weights inside
    err = runtimes.check_onnx(folded, (rand_images(2, 1),), folded_onnx, batches=(1, 3, 5))
    assert isinstance(err, float) and 0.0 <= err <= REL_TOL


def test_onnx_dynamic_batch(folded, folded_onnx):
    import onnx

    graph_input = onnx.load(str(folded_onnx)).graph.input[0]
    assert graph_input.type.tensor_type.shape.dim[0].dim_param  # symbolic, not a fixed size
    session = runtimes.onnx_session(folded_onnx, threads=1)
    for b in (1, 5):
        x = rand_images(b, 10 + b)
        (out,) = runtimes.run_onnx(session, x)
        with torch.no_grad():
            ref = folded(x)
        assert out.shape == ref.shape and out.shape[0] == b
        assert rel_err(ref, out) <= REL_TOL


def test_run_onnx_wrong_inputs(folded_onnx):
    session = runtimes.onnx_session(folded_onnx)
    with pytest.raises(InputError, match="takes 1 tensor input"):
        runtimes.run_onnx(session, rand_images(1, 0), rand_images(1, 1))


def test_export_uses_eval_mode_and_restores_mixed_modes(tmp_path):
    model = _tiny().train()
    model.bn.eval()  # a deliberately mixed state must survive too
    before = _modes(model)
    x = rand_images(1, 3, size=8)  # batch 1 with a dynamic batch: the exporter must not fix it to 1
    onnx_path = runtimes.export_onnx(model, (x,), tmp_path / "tiny.onnx")
    pt2_path = runtimes.export_program(model, x, tmp_path / "tiny.pt2")
    assert _modes(model) == before
    # BatchNorm in train mode would normalise with batch statistics: the exports must match eval
    assert runtimes.check_onnx(model, (x,), onnx_path, batches=(1, 4)) <= REL_TOL
    assert runtimes.check_program(model, (x,), pt2_path, batches=(1, 4)) <= REL_TOL
    assert _modes(model) == before


def test_check_onnx_detects_stale_export(tmp_path):
    model = _tiny().eval()
    x = rand_images(2, 0, size=8)
    path = runtimes.export_onnx(model, (x,), tmp_path / "tiny.onnx")
    with torch.no_grad():
        model.conv2.bias.add_(1.0)  # the file no longer matches the model
    with pytest.raises(ExportError, match="Tiny to onnxruntime.*relative error") as info:
        runtimes.check_onnx(model, (x,), path)
    assert info.value.rel_error is not None and info.value.rel_error > REL_TOL
    # path=None exports afresh to a temporary file
    assert runtimes.check_onnx(model, (x,), batches=(2,)) <= REL_TOL


@pytest.mark.parametrize("export", [runtimes.export_onnx, runtimes.export_program],
                         ids=["onnx", "torch.export"])
def test_export_error_names_model_and_line(export, tmp_path):
    path = tmp_path / "model.out"
    with pytest.raises(ExportError) as info:
        export(DataDependent(), (rand_images(2, 0, size=8),), path)
    msg = str(info.value)
    assert isinstance(info.value, ASRError)
    assert "DataDependent" in msg
    assert "data-dependent" in msg and "if y.sum() > 0:" in msg  # the exporter's error, the line
    assert "fix:" in msg and "torch.cond" in msg
    assert not path.exists()


def test_fixed_batch_is_refused_not_silently_exported(tmp_path):
    x, model = rand_images(2, 0, size=8), FixedBatch().eval()
    for export, name in ((runtimes.export_onnx, "m.onnx"), (runtimes.export_program, "m.pt2")):
        with pytest.raises(ExportError, match="(?s)FixedBatch.*dynamic_batch=False"):
            export(model, (x,), tmp_path / name)
        assert not (tmp_path / name).exists()
    path = runtimes.export_program(model, (x,), tmp_path / "m.pt2", dynamic_batch=False)
    assert runtimes.check_program(model, (x,), path, batches=(2,)) == 0.0


def test_missing_packages_raise_export_error(monkeypatch, tmp_path):
    real = runtimes._has
    monkeypatch.setattr(runtimes, "_has", lambda m: False if m.startswith("onnx") else real(m))
    with pytest.raises(ExportError, match=r"(?s)Tiny to ONNX: onnx and onnxscript not installed"
                                          r".*asrfx\[deploy\]"):
        runtimes.export_onnx(_tiny(), (rand_images(2, 0, size=8),), tmp_path / "t.onnx")
    with pytest.raises(ExportError, match="onnxruntime not installed"):
        runtimes.onnx_session(tmp_path / "t.onnx")
    got = runtimes.available()
    assert not (got["onnx"] or got["onnxruntime"] or got["onnxscript"])


# --------------------------------------------------------------------------------- torch.export

def test_program_round_trip_is_bit_exact(folded, tmp_path):
    path = runtimes.export_program(folded, (rand_images(2, 1),), tmp_path / "r20.pt2")
    assert path.suffix == ".pt2"
    with zipfile.ZipFile(path) as z:
        assert not [n for n in z.namelist() if n.endswith(".pkl")]  # no pickled module
    for device in (None, "cpu"):
        loaded = runtimes.load_program(path, device=device)
        for b in (1, 2, 5):
            x = rand_images(b, 20 + b)
            with torch.no_grad():
                assert torch.equal(loaded(x), folded(x))
    assert runtimes.check_program(folded, (rand_images(2, 1),), path, batches=(1, 3)) == 0.0


def test_load_program_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        runtimes.load_program(tmp_path / "missing.pt2")
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not an archive")
    with pytest.raises(ExportError, match="bad.pt2 to torch.export: loading failed"):
        runtimes.load_program(bad)


# --------------------------------------------------------------------------------- torch.compile

def test_compiled_without_compiler_gives_reason(monkeypatch):
    monkeypatch.setattr(runtimes, "_cxx_compiler", lambda: None)
    model, reason = runtimes.compiled(_tiny().eval(), (rand_images(2, 0, size=8),))
    assert model is None and "C++ compiler" in reason
    assert runtimes.available()["torch.compile"] is False


def test_compiled_failure_gives_reason():
    model, reason = runtimes.compiled(_tiny().eval(), (rand_images(2, 0, size=8),),
                                      mode="no-such-mode")
    assert model is None and reason.startswith("torch.compile failed") and "no-such-mode" in reason


@pytest.mark.slow
def test_compiled_tiny_model_matches_eager():
    if not runtimes.available()["torch.compile"]:
        pytest.skip("no C++ compiler for inductor")
    model = _tiny().eval()
    cmodel, reason = runtimes.compiled(model, (rand_images(2, 0, size=8),))
    assert reason == "" and cmodel is not None
    x = rand_images(3, 1, size=8)
    with torch.no_grad():
        assert rel_err(model(x), cmodel(x)) <= REL_TOL


# ------------------------------------------------------------------------------------- available

def test_available_keys():
    got = runtimes.available()
    assert set(got) == {"onnx", "onnxruntime", "onnxscript", "torch.compile"}
    assert all(isinstance(v, bool) for v in got.values())
    assert got["onnx"] and got["onnxruntime"] and got["onnxscript"]  # importorskip'd above
    assert runtimes.available("cpu")["torch.compile"] == (runtimes._cxx_compiler() is not None)
