"""``prepare`` and ``fold``: the two calls a user makes.

They check their arguments and hand the work to :mod:`asrfx.pipeline`, which runs the passes
(:mod:`asrfx.passes`) on the captured graphs (:mod:`asrfx.capture`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import gc
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx
from torch import nn

from asrfx.passes.graph_utils import clone_module, deepcopy_module

from .check import full_fp32_precision, relative_error
from .errors import InputError
from .inputs import check_example_inputs, infer_example_inputs, normalize_inputs
from .pipeline import (PrepareOptions, attach_report, count_params, fold_model, meta_of,
                       prepare_model)
from .report import Report

__all__ = ["prepare", "fold", "relative_error"]

_MODES = ("replace", "both", "keep")


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_model(model: nn.Module, entry: str) -> None:
    """Refuse models whose weights asrfx cannot compute with: on the meta device (no values),
    complex or exotic floating dtypes (the fold computes in float64 and casts back, which would
    drop an imaginary part), integer weights of the layers a fold rewrites."""
    folded_types = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase,
                    nn.GroupNorm, nn.LayerNorm)
    if _weights_ok(model, folded_types):
        return  # (the common case, checked without naming every tensor)
    name = type(model).__name__
    # one walk over the modules (named_parameters and named_buffers would walk it again per
    # call): every parameter, then every buffer, each once; those of the layers a fold rewrites
    params: list[tuple[str, torch.Tensor]] = []
    buffers: list[tuple[str, torch.Tensor]] = []
    folded: list[tuple[str, nn.Module, str, torch.Tensor]] = []
    seen: set[int] = set()
    for path, mod in model.named_modules():
        for table, out in ((mod._parameters, params), (mod._buffers, buffers)):
            for key, t in table.items():
                if t is None:
                    continue
                if isinstance(mod, folded_types):
                    folded.append((path, mod, key, t))
                if id(t) not in seen:
                    seen.add(id(t))
                    out.append((f"{path}.{key}" if path else key, t))
    for key, t in params + buffers:
        if t.device.type == "meta":
            raise InputError(f"asrfx.{entry}: {name}.{key} is on the meta device (shapes without "
                             f"values): constants cannot be evaluated nor the result checked; "
                             f"materialize the weights first (model.to_empty(device='cpu') and "
                             f"load_state_dict)")
        if t.is_complex() or (t.is_floating_point() and t.dtype not in _DTYPES):
            fix = ("hold the real and imaginary parts as two real tensors (torch.view_as_real)"
                   if t.is_complex() else "convert the model with model.float() first")
            raise InputError(f"asrfx.{entry}: {name}.{key} is {str(t.dtype).replace('torch.', '')}"
                             f"; asrfx folds real-valued float16, bfloat16, float32 and float64 "
                             f"models: {fix}")
    for path, mod, key, t in folded:
        if key != "num_batches_tracked" and not t.is_floating_point():
            raise InputError(f"asrfx.{entry}: {name}.{path}.{key} ({type(mod).__name__}) is "
                             f"{str(t.dtype).replace('torch.', '')}: asrfx folds floating-point "
                             f"layers; dequantize the model (float weights) first")


def _weights_ok(model: nn.Module, folded_types: tuple) -> bool:
    """No tensor of ``model`` that :func:`_check_model` refuses: on the meta device, complex or
    of another floating dtype than :data:`_DTYPES`, or not floating in a layer a fold rewrites
    (``num_batches_tracked`` aside)."""
    for mod in model.modules():
        folded = isinstance(mod, folded_types)
        for table in (mod._parameters, mod._buffers):
            for key, t in table.items():
                if t is None or (t.dtype in _DTYPES and not t.is_meta):
                    continue
                if t.is_meta or t.is_floating_point() or t.is_complex() or \
                        (folded and key != "num_batches_tracked"):
                    return False
    return True


def _inputs_for(model: nn.Module, example_inputs: Any) -> tuple:
    inputs = normalize_inputs(example_inputs, model)
    if inputs is not None:
        check_example_inputs(inputs, model)
        return inputs
    specs = meta_of(model).get("input_specs")
    if specs:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
        gen = torch.Generator().manual_seed(0)

        def make(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
            if dtype.is_floating_point and first is not None and first.dtype.is_floating_point:
                dtype = first.dtype  # the model was cast (e.g. .half()) after prepare
            return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)

        return tuple(make(shape, dtype) for shape, dtype in specs)
    return infer_example_inputs(model)


def _check_init(init: Any, calibration_data: Any) -> None:
    if init == "calibrate":
        if calibration_data is None:
            raise InputError("init='calibrate' needs calibration_data=: an iterable of input "
                             "batches (tensors, or tuples whose first element is the input)")
        return
    if isinstance(init, (int, float, torch.Tensor, dict)) and not isinstance(init, bool):
        return
    if init == "normal":
        return
    raise InputError(f"init must be a float, a tensor, 'normal', 'calibrate' or a dict of those, "
                     f"got {init!r}")


def _attention_factory(insert: Any) -> Callable[[int, int, bool], nn.Module]:
    """``insert=`` resolved by :func:`asrfx.attention.attention_factory` (checked at once):
    ``(channels, dims, tokens) -> nn.Module``."""
    from .attention import attention_factory

    return attention_factory(insert)


def _site_selector(sites: Any) -> Callable[[str, str], bool] | None:
    """``prepare(sites=...)`` as a predicate ``(module path, gate form) -> bool``.

    Raises:
        InputError: neither None, a pattern, a list of patterns nor a callable.
    """
    if sites is None:
        return None
    if isinstance(sites, str):
        sites = [sites]
    if isinstance(sites, (list, tuple)) and all(isinstance(p, str) for p in sites):
        patterns = list(sites)
        return lambda path, form: any(fnmatch.fnmatchcase(path, p) for p in patterns)
    if callable(sites):
        return lambda path, form: bool(sites(path, form))
    raise InputError(f"sites must be None, a module-path pattern, a list of patterns or a "
                     f"predicate (module path, gate form) -> bool, got {sites!r}")


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the duration (as it was before, afterwards).

    Tracing and copying a model create hundreds of thousands of objects; the collections they
    trigger scan every live object (torch's included) and took about a quarter of prepare +
    fold of ResNet-164 (853 -> 638 ms, medians of 7). The cycles a pass leaves are collected
    after it.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def prepare(model: nn.Module, *, example_inputs: Any = None, mode: str | None = None,
            init: Any = 0.1, calibration_data: Any = None, insert: Any = None,
            where: Any = "block_output", every: int = 1, sites: Any = None,
            fused: bool = False, leaf_modules: Sequence[str | type] = ()) -> fx.GraphModule:
    """Turn every channel attention of ``model`` into its ASR training form.

    Args:
        model: any ``nn.Module``; it is not modified.
        example_inputs: a tensor or tuple of tensors the model accepts (shapes are read from
            them). When omitted, a batch is guessed from the first conv/linear layer.
        mode: what happens to the attention already in the model. ``"replace"`` (the default
            without ``insert``) — each pooled statistic an attention branch reads becomes a
            learnable psi (ASR(SE)); ``"both"`` — the original attention stays and an ASR copy
            with fresh weights is added in front of it (ASR(SE)+SE); ``"keep"`` (the default
            with ``insert``) — left as it is.
        insert: add new ASR attention to the model: a library name (``"se"``, ``"eca"``, ...,
            see :mod:`asrfx.attention`) or a callable ``channels -> nn.Module``. Inserted
            attention is always converted to its ASR form.
        where: insertion points: ``"block_output"`` (after the last norm of each residual
            block, before the add: the paper's placement), ``"every_bn"``, or a predicate
            ``(module path, node) -> bool``.
        every: keep every k-th insertion point (the paper's insertion-frequency ablation).
        init: psi's initial value: a float (0.1, as in the reference), a tensor broadcastable to
            the statistic's shape, ``"normal"``, ``"calibrate"``, or a dict psi name -> one of
            those. ``"calibrate"`` starts each psi at the mean of the statistic it replaces over
            ``calibration_data`` — training-free conversion of a trained attention model.
        calibration_data: for ``init="calibrate"``: an iterable of input batches (tensors, or
            tuples whose first element is the input, e.g. a DataLoader).
        sites: which of the model's attention sites to convert: None (all), module-path
            patterns (``"layers.*.se"``, a string or a list; ``fnmatch`` rules), or a
            predicate ``(module path, gate form) -> bool`` with the form as the report names
            it (``"sigmoid gate"``, ``"softmax gate"``, ``"additive context"``,
            ``"unbounded gate"``, ...). Sites left out stay as they are and are reported
            (code ``not-selected``). Inserted attention is always converted.
        fused: the fused training form: each converted gate whose map a ``torch.nn``
            BatchNorm (or a traced-through ``F.batch_norm``) produces is applied through that
            norm's affine, ``F.batch_norm(x, ..., weight * g, bias * g)`` (exactly ``g *
            BN(x)`` in training and eval mode), one multiply per channel instead of per
            element; the norm module becomes its ``Gated`` twin with the same parameters and
            names. A gated map that no such norm produces but only convolutions read (an SE
            after a SiLU, before a projection) goes into their kernels' input columns
            instead: ``conv(x * g, W) = conv(x, W * g)`` per input channel, one multiply per
            weight (the conv becomes its ``Gated`` twin; an ``F.conv2d`` call gets
            ``scaled_kernel(W, g, groups)``). Other sites keep the multiply (the report's notes
            say why). Not with ``SyncBatchNorm``: convert to it before ``prepare`` (a
            SyncBatchNorm is not fused).
        leaf_modules: module names or types to keep opaque while tracing.

    Returns:
        A GraphModule in the training form (same mode as ``model``), with original parameter
        names, new ``...psi`` parameters and a report in ``.asrfx_report``.

    Example:
        >>> train_model = asrfx.prepare(model, example_inputs=(torch.randn(2, 3, 32, 32),))
        >>> print(train_model.asrfx_report)
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"asrfx.prepare expects an nn.Module, got {type(model).__name__}")
    if mode is None:
        mode = "replace" if insert is None else "keep"
    if mode not in _MODES:
        raise InputError(f"mode must be one of {_MODES}, got {mode!r}")
    factory = _attention_factory(insert) if insert is not None else None
    if not (isinstance(every, int) and every >= 1):
        raise InputError(f"every must be a positive integer, got {every!r}")
    if not (callable(where) or where in ("block_output", "every_bn", "after_norm")):
        raise InputError(f"where must be 'block_output', 'every_bn', 'after_norm' or a predicate "
                         f"(module path, node) -> bool, got {where!r}")
    _check_init(init, calibration_data)
    select = _site_selector(sites)
    _check_model(model, "prepare")
    stage = meta_of(model).get("stage")
    if stage in ("prepare", "fold"):
        out = deepcopy_module(model)
        done = {"prepare": "prepared", "fold": "folded"}[stage]
        report = Report("prepare", params_before=count_params(model),
                        params_after=count_params(out),
                        notes=[f"model is already {done} (asrfx.{stage}); returned unchanged "
                               f"(a copy)"])
        attach_report(out, report, **{k: v for k, v in meta_of(model).items() if k != "stage"})
        out.meta["asrfx"]["stage"] = stage
        return out
    if not isinstance(fused, bool):
        raise InputError(f"fused must be True or False, got {fused!r}")
    opts = PrepareOptions(mode, init, calibration_data, factory, where, every, select, fused)
    with gc_paused():
        work = clone_module(model)
        return prepare_model(model, work, _inputs_for(work, example_inputs), opts, leaf_modules)


def fold(model: nn.Module, *, example_inputs: Any = None, check: bool = True,
         fuse_bn: bool = True, tol: float = 1e-4,
         leaf_modules: Sequence[str | type] = ()) -> fx.GraphModule:
    """Fold a model's ASR branches (and BatchNorms) away: the deploy form.

    Every input-independent branch is evaluated to its constant (eval mode); per-channel
    constants fold into the producing BatchNorm / Conv / Linear, or into the consuming Conv /
    Linear; each Conv -> BatchNorm pair becomes one Conv.

    Args:
        model: a model from :func:`prepare`, or any ``nn.Module`` (then only BN fusion and any
            constant scales apply). It is not modified and keeps its mode.
        example_inputs: inputs for evaluating constants and checking the result. Defaults to the
            shapes recorded by ``prepare``, else a batch guessed from the first layer.
        check: compare outputs with the unfolded model in eval mode.
        fuse_bn: fuse Conv -> BatchNorm pairs.
        tol: the largest relative error (max |a-b| / max |a|) the check accepts.

    Returns:
        A GraphModule in eval mode with ``.asrfx_report``.

    Raises:
        FoldMismatch: the check failed; names the site whose fold alone errs most.

    Example:
        >>> deploy = asrfx.fold(train_model, example_inputs=(x,))
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"asrfx.fold expects an nn.Module, got {type(model).__name__}")
    _check_model(model, "fold")
    if meta_of(model).get("stage") == "fold":
        out = deepcopy_module(model).eval()
        report = Report("fold", params_before=count_params(model),
                        params_after=count_params(out), notes=["model is already folded "
                                                                "(asrfx.fold); returned "
                                                                "unchanged (a copy)"])
        attach_report(out, report, **{k: v for k, v in meta_of(model).items() if k != "stage"})
        return out
    inputs = _inputs_for(model, example_inputs)
    with full_fp32_precision(), gc_paused():
        return fold_model(model, inputs, check, fuse_bn, tol, leaf_modules)
