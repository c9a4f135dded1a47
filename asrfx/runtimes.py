"""Deployment runtimes for a folded model: ONNX / onnxruntime, torch.export (.pt2), torch.compile.

A model from :func:`asrfx.fold` (or any ``nn.Module``) is exported, loaded back and checked
against the eager model in eval mode on fresh inputs of several batch sizes::

    deploy = asrfx.fold(train_model, example_inputs=(x,))
    err = check_onnx(deploy, (x,), "model.onnx")          # exports, runs onnxruntime, compares
    session = onnx_session("model.onnx", threads=1)
    (logits,) = run_onnx(session, x)

    check_program(deploy, (x,), "model.pt2")              # torch.export.save / load round trip
    model_c, why = compiled(deploy, (x,))                 # None, reason where inductor can't run

Every export runs the model in eval mode and restores the caller's train/eval flags afterwards.
Failures raise :class:`asrfx.errors.ExportError` naming the model, the runtime, the exporter's
first error line and what to do. ``onnx``, ``onnxscript`` and ``onnxruntime`` are optional
(``pip install 'asrfx[deploy]'``); :func:`available` says which runtimes this machine has.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.fx as fx
from torch import nn

from .api import relative_error
from .errors import ExportError, InputError
from .inputs import normalize_inputs
from .passes.graph_utils import module_device
from .tracing import preserve_modes

__all__ = ["export_onnx", "onnx_session", "run_onnx", "check_onnx", "export_program",
           "load_program", "check_program", "compiled", "available"]

_DEPLOY_EXTRA = "pip install 'asrfx[deploy]' (onnx>=1.16, onnxruntime>=1.18, onnxscript>=0.1)"

# loggers whose warnings the exporters emit on every call (torchvision ops skipped by the ONNX
# registry, unbacked-symbol notes of a failing torch.export); raised to ERROR while exporting
_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._export",
                  "torch.fx.experimental.symbolic_shapes")
_BATCH_FIX = ("the model fixes its batch size (e.g. a reshape to a constant batch); use "
              "x.flatten(1) / x.shape[0] in forward, or pass dynamic_batch=False")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_USER_FRAME = re.compile(r'The following call raised this error:\s*\n'
                         r'\s*File "([^"]+)", line (\d+), in (\S+)\n\s*(.+)')


# --------------------------------------------------------------------------------------- helpers

def _has(module: str) -> bool:
    """Whether ``module`` is importable, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _model_name(model: Any) -> str:
    name = type(model).__name__
    if isinstance(model, fx.GraphModule):
        meta = model.meta.get("asrfx", {}) if isinstance(getattr(model, "meta", None), dict) else {}
        if meta.get("stage"):
            return f"{name} (asrfx.{meta['stage']} output)"
    return name


def _inputs(model: nn.Module, example_inputs: Any) -> tuple:
    inputs = normalize_inputs(example_inputs, model)
    if inputs is None or not any(isinstance(t, torch.Tensor) for t in inputs):
        raise InputError(f"example_inputs for {_model_name(model)} must hold at least one tensor")
    return inputs


def _to(inputs: Sequence[Any], device: torch.device | str) -> tuple:
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in inputs)


def _root_cause(e: BaseException) -> BaseException:
    seen = {id(e)}
    while True:
        nxt = e.__cause__ or getattr(e, "inner_exception", None)
        if nxt is None or id(nxt) in seen:
            return e
        seen.add(id(nxt))
        e = nxt


def _first_line(e: BaseException) -> str:
    """The root cause's type and first non-empty line, plus the user's line it names (if any)."""
    root = _root_cause(e)
    text = _ANSI.sub("", str(root))
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    out = f"{type(root).__name__}: {line}" if line else type(root).__name__
    m = None
    cur: BaseException | None = e
    while cur is not None and m is None:
        m = _USER_FRAME.search(_ANSI.sub("", str(cur)))
        cur = cur.__cause__
    if m:
        out += f" (at {os.path.basename(m.group(1))}:{m.group(2)} in {m.group(3)}: " \
               f"`{m.group(4).strip()}`)"
    return out


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' prints (stdout and stderr), warnings and log warnings."""
    loggers = [logging.getLogger(n) for n in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    sink = io.StringIO()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), \
                warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torchvision.*")
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec.*")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode; every submodule's own train/eval flag is restored on exit."""
    with preserve_modes(model):
        model.eval()
        yield model


def _export_setup(model: nn.Module, example_inputs: Any, dynamic_batch: bool,
                  path: str | os.PathLike) -> tuple[tuple, Any, Path]:
    """(example args on the model's device, dynamic shapes, the output path with its folder
    created) for an exporter."""
    inputs = _to(_inputs(model, example_inputs), module_device(model))
    args, shapes = _export_args(inputs, dynamic_batch)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return args, shapes, path


def _export_args(inputs: tuple, dynamic_batch: bool) -> tuple[tuple, tuple | None]:
    """Export-time inputs and ``dynamic_shapes``: dim 0 of every tensor with the first tensor's
    batch size becomes one shared ``Dim("batch")``. A batch of 1 is repeated to 2 first, since
    torch.export specializes sizes 0 and 1."""
    if not dynamic_batch:
        return inputs, None
    first = next(t for t in inputs if isinstance(t, torch.Tensor))
    if first.dim() == 0:
        raise InputError("dynamic_batch=True needs a batch dimension: the first example input "
                         "is a scalar tensor; pass dynamic_batch=False")
    size = first.shape[0]
    batch = torch.export.Dim("batch", min=1)
    args, shapes = [], []
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == size:
            args.append(torch.cat([t, t]) if size == 1 else t)
            shapes.append({0: batch})
        else:
            args.append(t)
            shapes.append(None)
    return tuple(args), tuple(shapes)


def _export_fix(e: BaseException, dynamic_batch: bool, runtime: str) -> str:
    """What to do about an exporter error, by the stage it failed in."""
    kinds = {type(x).__name__ for x in (e, _root_cause(e))}
    text = _ANSI.sub("", str(e))
    if dynamic_batch and any(k in text for k in ("ConstraintViolation", "Constraints violated")):
        return _BATCH_FIX
    if "ConversionError" in kinds or "DispatchError" in kinds:
        return ("an operator has no ONNX translation: save a torch.export program instead "
                "(asrfx.runtimes.export_program), or register one with torch.onnx.export's "
                "custom_translation_table")
    if runtime == "ONNX" and "TorchExportError" not in kinds:
        return ("rerun torch.onnx.export(model, args, dynamo=True, report=True) for the full "
                "report, and please report the model")
    return ("torch.export could not capture forward: replace Python control flow on tensor "
            "values (if t.sum() > 0, .item(), bool(t)) by tensor ops (torch.where) or torch.cond; "
            "see https://pytorch.org/docs/stable/generated/exportdb/index.html")


def _fresh_inputs(inputs: tuple, batch: int, seed: int) -> tuple:
    """Random inputs like ``inputs`` (dtype, device, trailing shape) with dim 0 = ``batch``."""
    gen = torch.Generator().manual_seed(seed)
    size = next(t for t in inputs if isinstance(t, torch.Tensor)).shape[:1]
    out = []
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[:1] == size:
            shape = (batch, *t.shape[1:])
            if t.dtype.is_floating_point:
                v = torch.randn(shape, generator=gen, dtype=torch.float64).to(t.dtype)
            elif t.dtype == torch.bool:
                v = torch.rand(shape, generator=gen) < 0.5
            else:  # integer inputs (indices): keep to the example's range
                lo, hi = int(t.min()), int(t.max())
                v = torch.randint(lo, hi + 1, shape, generator=gen, dtype=t.dtype)
            out.append(v.to(t.device))
        else:
            out.append(t)
    return tuple(out)


def _tensors(out: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_flatten

    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def _compare(model: nn.Module, run: Any, inputs: tuple, runtime: str, tol: float,
             batches: Sequence[int], fix: str) -> float:
    """Worst relative error of ``run(*inputs)`` against ``model`` in eval mode over ``batches``."""
    worst = 0.0
    with _eval(model), torch.no_grad():
        for i, b in enumerate(batches):
            xs = _fresh_inputs(inputs, int(b), seed=1000 + i)
            try:
                ref = [t.detach().cpu() for t in _tensors(model(*xs))]
            except Exception as e:  # noqa: BLE001
                raise InputError(f"{_model_name(model)} fails in eager mode on a batch of {b} "
                                 f"({_first_line(e)}); pass batches= with sizes it accepts") \
                    from None
            try:
                got = [t.detach().cpu() for t in run(xs)]
            except ExportError:
                raise
            except Exception as e:  # noqa: BLE001 - a runtime failure must name the model
                raise ExportError(_model_name(model), runtime,
                                  f"running a batch of {b} failed: {_first_line(e)}",
                                  "export with dynamic_batch=True, or check only the batch size "
                                  "it was exported with (batches=(n,))") from None
            if len(got) != len(ref):
                raise ExportError(_model_name(model), runtime,
                                  f"returns {len(got)} outputs, the eager model {len(ref)}", fix)
            err = relative_error(ref, got)
            worst = max(worst, err)
            if not err <= tol:  # also catches nan
                raise ExportError(_model_name(model), runtime,
                                  f"outputs differ from the eager model in eval mode: relative "
                                  f"error {err:.3e} > {tol:.1e} at batch {b}", fix, rel_error=err)
    return worst


@contextlib.contextmanager
def _target(path: str | os.PathLike | None, suffix: str) -> Iterator[tuple[Path, bool]]:
    """(file path, whether it exists already); ``None`` is a file in a temporary directory."""
    if path is not None:
        p = Path(path)
        yield p, p.exists()
        return
    with tempfile.TemporaryDirectory(prefix="asrfx-") as d:
        yield Path(d) / f"model{suffix}", False


# ------------------------------------------------------------------------------------------ ONNX

def export_onnx(model: nn.Module, example_inputs: tuple, path: str | os.PathLike, *,
                dynamic_batch: bool = True, opset_version: int | None = None) -> Path:
    """Export ``model`` to an ONNX file with the torch.export-based exporter (``dynamo=True``).

    The model is exported in eval mode on its own device (the example inputs are moved there); the
    caller's train/eval flags are restored afterwards. The weights are stored inside the file
    (an external ``.data`` file only past ONNX's 2 GB limit). The exporter's progress prints and
    its warnings (torchvision ops it skips) are silenced.

    Args:
        model: a model from :func:`asrfx.fold`, or any ``nn.Module``.
        example_inputs: a tensor or tuple of inputs the model accepts.
        path: the ``.onnx`` file to write (parent directories are created).
        dynamic_batch: make dim 0 of the inputs (those with the first input's batch size) one
            dynamic ``batch`` dimension; otherwise every shape is fixed to the example's.
        opset_version: the ONNX opset (the exporter's default when None).

    Returns:
        The path written.

    Raises:
        ExportError: onnx / onnxscript is not installed, or the exporter rejects the model
            (names the model class, the exporter's first error line and what to do).
    """
    name = _model_name(model)
    missing = [m for m in ("onnx", "onnxscript") if not _has(m)]
    if missing:
        raise ExportError(name, "ONNX", f"{' and '.join(missing)} not installed", _DEPLOY_EXTRA)
    args, shapes, path = _export_setup(model, example_inputs, dynamic_batch, path)
    try:
        with _eval(model), _quiet():
            program = torch.onnx.export(model, args, str(path), dynamo=True, verbose=False,
                                        dynamic_shapes=shapes, external_data=False,
                                        opset_version=opset_version)
    except Exception as e:  # noqa: BLE001 - every exporter failure becomes an ExportError
        raise ExportError(name, "ONNX", _first_line(e), _export_fix(e, dynamic_batch, "ONNX")) \
            from None
    if shapes is not None:
        # on a batch-size constraint violation the exporter quietly retries with the sizes
        # torch.export suggests, i.e. a fixed batch: refuse that rather than write it
        graph_inputs = list(program.model.graph.inputs)
        tensor_shapes = [s for t, s in zip(args, shapes) if isinstance(t, torch.Tensor)]
        fixed = [str(i.name) for i, s in zip(graph_inputs, tensor_shapes)
                 if s is not None and i.shape is not None and isinstance(i.shape[0], int)]
        if fixed:
            path.unlink(missing_ok=True)
            raise ExportError(name, "ONNX", f"the batch dimension of input(s) {fixed} came out "
                              f"fixed: forward specializes it", _BATCH_FIX)
    return path


def onnx_session(path: str | os.PathLike, threads: int | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` for an ONNX file on the ``CPUExecutionProvider``.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (onnxruntime's default, all cores, when None). Fix it when
            timing: onnxruntime's default thread pool spins on cores other processes hold.

    Raises:
        ExportError: onnxruntime is not installed, or cannot load the file.
    """
    if not _has("onnxruntime"):
        raise ExportError(Path(path).name, "onnxruntime", "onnxruntime not installed",
                          _DEPLOY_EXTRA)
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only
    if threads is not None:
        if not (isinstance(threads, int) and threads >= 1):
            raise InputError(f"threads must be a positive integer or None, got {threads!r}")
        opts.intra_op_num_threads = threads
    # no busy-waiting between runs: spinning workers would steal the cores from whatever runs
    # next (the eager models timed interleaved with this session)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=opts,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        if not Path(path).exists():
            raise FileNotFoundError(f"no ONNX file at {path}") from None
        raise ExportError(Path(path).name, "onnxruntime", _first_line(e),
                          "re-export the model with asrfx.runtimes.export_onnx") from None


def run_onnx(session: Any, *inputs: torch.Tensor,
             device: torch.device | str | None = None) -> list[torch.Tensor]:
    """Run an onnxruntime session on torch tensors.

    Args:
        session: from :func:`onnx_session`.
        *inputs: one tensor per graph input, in order (moved to CPU; non-tensor example inputs
            were baked into the graph at export and are not passed).
        device: where the outputs go (default: the first input's device).

    Returns:
        The session's outputs as tensors.
    """
    names = [i.name for i in session.get_inputs()]
    if len(inputs) != len(names) or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise InputError(f"the ONNX graph takes {len(names)} tensor input(s) {names}, got "
                         f"{[type(t).__name__ for t in inputs]}")
    if device is None:
        device = inputs[0].device if inputs else torch.device("cpu")
    feed = {n: t.detach().cpu().contiguous().numpy() for n, t in zip(names, inputs)}
    return [torch.from_numpy(o).to(device) for o in session.run(None, feed)]


def check_onnx(model: nn.Module, example_inputs: tuple, path: str | os.PathLike | None = None, *,
               tol: float = 1e-4, batches: Sequence[int] = (1, 3), dynamic_batch: bool = True,
               threads: int | None = 1) -> float:
    """Check an ONNX export of ``model`` against the model in eval mode, in onnxruntime.

    Exports to ``path`` if no file is there (an existing file is checked as it is: the export
    from :func:`export_onnx`); ``path=None`` exports to a temporary file. Runs fresh random
    inputs of each batch size (same trailing shapes and dtypes as the example, on the model's
    device) through onnxruntime (CPU) and the eager model.

    Args:
        tol: the largest relative error accepted.
        batches: the batch sizes to check (export with ``dynamic_batch=False`` fixes the batch
            to the example's: check only that size then).
        dynamic_batch: as in :func:`export_onnx`, when this call exports.
        threads: onnxruntime intra-op threads (see :func:`onnx_session`).

    Returns:
        The worst relative error (max |a-b| / max |a|) over ``batches``.

    Raises:
        ExportError: the export or a run failed, or the error exceeds ``tol`` (``.rel_error``).
    """
    inputs = _to(_inputs(model, example_inputs), module_device(model))
    with _target(path, ".onnx") as (file, exists):
        if not exists:
            export_onnx(model, inputs, file, dynamic_batch=dynamic_batch)
        session = onnx_session(file, threads=threads)
        tensors = lambda xs: [t for t in xs if isinstance(t, torch.Tensor)]  # noqa: E731
        return _compare(model, lambda xs: run_onnx(session, *tensors(xs), device="cpu"), inputs,
                        "onnxruntime", tol, batches,
                        "an operator's ONNX translation differs from torch: please report the "
                        "model; if the file predates the model's weights, delete it and re-export")


# --------------------------------------------------------------------------------- torch.export

def export_program(model: nn.Module, example_inputs: tuple, path: str | os.PathLike, *,
                   dynamic_batch: bool = True) -> Path:
    """Save ``model`` as a ``torch.export`` program (a ``.pt2`` archive: graph and weights, no
    pickle of the module), in eval mode on the model's own device.

    Args:
        model: a model from :func:`asrfx.fold`, or any ``nn.Module``; its train/eval flags are
            restored afterwards.
        example_inputs: a tensor or tuple of inputs the model accepts (moved to its device).
        path: the file to write (``.pt2`` by convention; parent directories are created).
        dynamic_batch: as in :func:`export_onnx`.

    Raises:
        ExportError: torch.export rejects the model.
    """
    name = _model_name(model)
    args, shapes, path = _export_setup(model, example_inputs, dynamic_batch, path)
    try:
        with _eval(model), _quiet():
            ep = torch.export.export(model, args, dynamic_shapes=shapes)
    except Exception as e:  # noqa: BLE001
        raise ExportError(name, "torch.export", _first_line(e),
                          _export_fix(e, dynamic_batch, "torch.export")) from None
    try:
        with _quiet():
            torch.export.save(ep, str(path))
    except Exception as e:  # noqa: BLE001
        raise ExportError(name, "torch.export", f"saving failed: {_first_line(e)}",
                          "check that the directory is writable; custom ops and opaque objects "
                          "must be registered for serialization") from None
    return path


def load_program(path: str | os.PathLike, device: torch.device | str | None = None) -> nn.Module:
    """Load a program saved by :func:`export_program` as a callable module.

    Args:
        path: the ``.pt2`` file.
        device: move the program (weights and device-bound constants) there; None keeps the
            device it was exported on.

    Raises:
        FileNotFoundError: no file at ``path``.
        ExportError: the file is not a loadable torch.export program.
    """
    if not Path(path).exists():
        raise FileNotFoundError(f"no torch.export program at {path}")
    try:
        with _quiet():
            ep = torch.export.load(str(path))
            if device is not None:
                from torch.export.passes import move_to_device_pass

                ep = move_to_device_pass(ep, torch.device(device))
            return ep.module()
    except Exception as e:  # noqa: BLE001
        raise ExportError(Path(path).name, "torch.export", f"loading failed: {_first_line(e)}",
                          "re-export with asrfx.runtimes.export_program (with the same torch "
                          "version)") from None


def check_program(model: nn.Module, example_inputs: tuple, path: str | os.PathLike | None = None,
                  *, tol: float = 1e-4, batches: Sequence[int] = (1, 3),
                  dynamic_batch: bool = True, device: torch.device | str | None = None) -> float:
    """Check a torch.export program of ``model`` against the model in eval mode.

    Like :func:`check_onnx`: exports to ``path`` if no file is there (``None``: a temporary
    file), loads it (onto ``device``, default the model's device) and compares on fresh inputs of
    each batch size.

    Returns:
        The worst relative error over ``batches``.

    Raises:
        ExportError: the export, load or a run failed, or the error exceeds ``tol``.
    """
    inputs = _to(_inputs(model, example_inputs), module_device(model))
    target = torch.device(device) if device is not None else module_device(model)
    with _target(path, ".pt2") as (file, exists):
        if not exists:
            export_program(model, inputs, file, dynamic_batch=dynamic_batch)
        program = load_program(file, device=target)
        return _compare(model, lambda xs: _tensors(program(*_to(xs, target))), inputs,
                        "torch.export", tol, batches,
                        "please report the model; if the file predates the model's weights, "
                        "delete it and re-export")


# --------------------------------------------------------------------------------- torch.compile

def _cxx_compiler() -> str | None:
    """The C++ compiler inductor would use on CPU (``$CXX``, else g++ / clang++ / c++), or None."""
    for cand in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if cand and shutil.which(cand):
            return cand
    return None


def _compile_reason(device: torch.device) -> str:
    """Why torch.compile (inductor) cannot run on ``device`` here; "" if it should."""
    if device.type == "cuda":
        return "" if _has("triton") else "triton is not installed (inductor's GPU code generator)"
    if device.type == "cpu":
        return "" if _cxx_compiler() else ("no C++ compiler found (inductor compiles CPU "
                                           "kernels with $CXX, g++ or clang++)")
    return ""


def compiled(model: nn.Module, example_inputs: tuple, *, mode: str | None = None,
             tol: float | None = 1e-4) -> tuple[nn.Module | None, str]:
    """``torch.compile(model)``, tried once on this machine.

    Compilation is lazy, so the compiled model is called once on ``example_inputs`` (moved to the
    model's device, under ``torch.no_grad()``, in the model's current train/eval mode: put a
    deploy model in eval mode first) and, with ``tol``, compared with the eager output.

    Args:
        model: the model to compile (not modified; the compiled wrapper shares its weights).
        example_inputs: a tensor or tuple of inputs.
        mode: ``torch.compile``'s mode (``None``, ``"reduce-overhead"``, ``"max-autotune"``...).
        tol: the largest relative error accepted against eager; None skips the comparison.

    Returns:
        ``(compiled model, "")`` when the first call works, else ``(None, reason)`` (no C++
        compiler, an inductor or dynamo error, a mismatch): never raises for those.
    """
    inputs = _to(_inputs(model, example_inputs), module_device(model))
    reason = _compile_reason(module_device(model))
    if reason:
        return None, reason
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # inductor's first import trips torch's own torch.jit deprecation warnings
            warnings.filterwarnings("ignore", category=DeprecationWarning,
                                    message=".*torch.jit.*")
            cmodel = torch.compile(model, mode=mode)
            out = cmodel(*inputs)
            ref = model(*inputs) if tol is not None else None
    except Exception as e:  # noqa: BLE001 - any compile failure is a reason, not a crash
        return None, f"torch.compile failed: {_first_line(e)}"
    if tol is not None:
        err = relative_error(ref, out)
        if not err <= tol:
            return None, f"compiled outputs differ from eager: relative error {err:.3e} > {tol:.1e}"
    return cmodel, ""


# ------------------------------------------------------------------------------------- available

def available(device: torch.device | str = "cpu") -> dict[str, bool]:
    """Which deployment runtimes this machine has, without importing them.

    Returns:
        ``{"onnx": ..., "onnxruntime": ..., "onnxscript": ..., "torch.compile": ...}``;
        ``torch.compile`` means inductor's toolchain for ``device`` is there (a C++ compiler on
        CPU, triton on CUDA), not that every model compiles: :func:`compiled` tries it.
    """
    return {"onnx": _has("onnx"), "onnxruntime": _has("onnxruntime"),
            "onnxscript": _has("onnxscript"),
            "torch.compile": not _compile_reason(torch.device(device))}
