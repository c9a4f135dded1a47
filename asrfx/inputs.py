"""Checking the example inputs a caller gives, and saying what to pass instead.

Every entry point (``trace``, ``prepare``, ``fold``, the runtimes) turns its ``example_inputs``
into a tuple with :func:`normalize_inputs` and refuses inputs nothing can be checked with in
:func:`check_example_inputs`. When a model fails on its inputs, :func:`inputs_failure` writes the
message: the model's ``forward`` signature, what was given (:func:`describe_inputs`) and a dtype
hint. :func:`infer_example_inputs` guesses a batch when the caller gives none.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .errors import InputError

__all__ = ["normalize_inputs", "check_example_inputs", "describe_inputs", "forward_signature",
           "inputs_failure", "top_level_hint", "infer_example_inputs", "short_error"]


def short_error(e: BaseException) -> str:
    """The first line of ``e``'s message (at most 300 characters), or its type's name."""
    msg = str(e).strip().splitlines()
    return msg[0][:300] if msg else type(e).__name__


def normalize_inputs(example_inputs: Any, model: nn.Module) -> tuple | None:
    """Return example inputs as a tuple, or None. A single tensor becomes a 1-tuple.

    Raises:
        InputError: a numpy array (alone or in the tuple), or anything that is neither a tensor
            nor a list / tuple; the message names ``model`` and the conversion to make.
    """
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if _is_array(example_inputs):
        raise InputError(f"example_inputs for {type(model).__name__} must be torch tensors, got "
                         f"a {type(example_inputs).__name__}: pass "
                         f"example_inputs=(torch.from_numpy(a),)")
    if isinstance(example_inputs, (list, tuple)):
        arrays = [i for i, a in enumerate(example_inputs) if _is_array(a)]
        if arrays:
            raise InputError(f"example_inputs for {type(model).__name__} must be torch tensors, "
                             f"got a {type(example_inputs[arrays[0]]).__name__} at position "
                             f"{arrays[0]}: convert it with torch.from_numpy(a)")
        return tuple(example_inputs)
    raise InputError(f"example_inputs for {type(model).__name__} must be a tensor or a tuple of "
                     f"tensors, got {type(example_inputs).__name__}; pass example_inputs=(x,) "
                     f"or (x, y, ...) in the order {forward_signature(model)} takes them")


def _is_array(obj: Any) -> bool:
    """A numpy array (or another array type with a numpy-like interface), not a tensor."""
    return not isinstance(obj, torch.Tensor) and hasattr(obj, "__array__") and \
        hasattr(obj, "dtype") and hasattr(obj, "shape")


def check_example_inputs(inputs: tuple, model: nn.Module) -> None:
    """Refuse example inputs no check can be made with: no tensor at all, or an empty batch.

    Raises:
        InputError: naming the model, what was given and what to pass instead.
    """
    from torch.utils._pytree import tree_flatten

    name = type(model).__name__
    tensors = [t for t in tree_flatten(list(inputs))[0] if isinstance(t, torch.Tensor)]
    if inputs and not tensors:
        raise InputError(f"example_inputs for {name} hold no tensor (got "
                         f"{describe_inputs(inputs)}); pass example_inputs=(x,) with x a "
                         f"torch.Tensor batch the model accepts, e.g. torch.randn(2, 3, 32, 32)")
    if tensors and tensors[0].numel() == 0 and tensors[0].dim() > 0:
        raise InputError(f"the example input of {name} is empty (shape "
                         f"{tuple(tensors[0].shape)}): nothing could be checked on it; pass "
                         f"example_inputs=(x,) with a batch of at least one sample, e.g. 2")


def describe_inputs(inputs: Any) -> str:
    """``[(2, 3, 8, 8) float32, 'int']``: each input's shape and dtype, or its type."""
    def one(t: Any) -> str:
        if isinstance(t, torch.Tensor):
            return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" + \
                (f" on {t.device}" if t.device.type != "cpu" else "")
        return type(t).__name__
    return "[" + ", ".join(one(t) for t in inputs) + "]"


def forward_signature(model: nn.Module) -> str:
    """``SENet.forward(x)``: the model's forward with its parameters, for messages (without
    them when ``inspect`` cannot read them)."""
    try:
        return f"{type(model).__name__}.forward{inspect.signature(model.forward)}"
    except (TypeError, ValueError):
        return f"{type(model).__name__}.forward"


def _param_dtypes(model: nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters() if p.is_floating_point()}


def inputs_failure(model: nn.Module, inputs: tuple, e: BaseException) -> str:
    """Why ``model(*inputs)`` failed with ``e`` and what to pass instead (a message, for an
    :class:`~asrfx.errors.InputError`): the model's signature, the inputs given, and a cast to
    make when their dtype is not one of the model's parameters'."""
    dtypes = _param_dtypes(model)
    wrong = [t.dtype for t in inputs if isinstance(t, torch.Tensor) and dtypes
             and t.dtype not in dtypes]
    hint = ""
    if wrong:
        want = ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes))
        hint = (f"; the model's parameters are {want}, the inputs "
                f"{', '.join(str(d).replace('torch.', '') for d in wrong)}: cast them (x.to("
                f"{next(iter(sorted(dtypes, key=str)))})) if the model takes such values")
    return (f"{type(model).__name__} fails on the example inputs ({short_error(e)}); pass "
            f"example_inputs=(x,) with tensors {forward_signature(model)} accepts (given: "
            f"{describe_inputs(inputs)}){hint}")


def top_level_hint(model: nn.Module, inputs: tuple | None) -> str:
    """Extra advice for a top-level trace failure: causes the control-flow advice misses
    (hooks on the model itself; optional ``forward`` arguments ``inputs`` leave out).
    "" when there is none."""
    hints = []
    if model._forward_hooks or model._forward_pre_hooks or \
            getattr(model, "_forward_hooks_with_kwargs", None):
        hints.append(f"{type(model).__name__} has forward hooks on itself, which a traced graph "
                     f"does not run: remove them (handle.remove()) before asrfx, or register "
                     f"them on the result")
    if inputs is not None:
        try:
            params = list(inspect.signature(model.forward).parameters.values())
        except (TypeError, ValueError):
            params = []
        optional = [p.name for p in params[len(inputs):]
                    if p.default is not inspect.Parameter.empty
                    and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if optional:
            hints.append(f"{forward_signature(model)} has optional arguments {optional} that "
                         f"example_inputs do not give; asrfx traces them as inputs, so a branch "
                         f"on them (e.g. `if mask is None`) cannot be traced: give them in "
                         f"example_inputs, or wrap the model in a module whose forward(x) calls "
                         f"model(x)")
    trunks = [n for n, _ in model.named_children() if n in _TRUNK_NAMES]
    if trunks:
        hints.append(f"or convert the traceable part alone, e.g. model.{trunks[0]} = "
                     f"asrfx.prepare(model.{trunks[0]}, example_inputs=...) (then asrfx.fold "
                     f"it the same way): detectors and other models with data-dependent "
                     f"heads keep their attention in the {trunks[0]}")
    return "; ".join(hints)


#: names of the child that holds a model's feature extractor in torchvision's detection and
#: segmentation models, segmentation_models_pytorch, MONAI and others
_TRUNK_NAMES = ("backbone", "encoder", "body", "features", "trunk")


def infer_example_inputs(model: nn.Module, size: int = 32, batch: int = 2) -> tuple:
    """Guess one input batch from the first conv or linear layer (channels, dims).

    Used only when the caller gives no example inputs; the guess is checked by running it.

    Returns:
        ``(x,)`` with ``x`` of shape ``(batch, in_channels, size, ...)`` (one ``size`` per
        spatial dim of the first ``ConvNd``) or ``(batch, in_features)`` for a first ``Linear``,
        on that layer's device and dtype.

    Raises:
        InputError: the model has no conv or linear layer to read a shape from.
    """
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd) and not isinstance(
                m, nn.modules.conv._ConvTransposeNd):
            nd = len(m.kernel_size)
            return (torch.randn(batch, m.in_channels, *([size] * nd),
                                device=m.weight.device, dtype=m.weight.dtype),)
        if isinstance(m, nn.Linear):
            return (torch.randn(batch, m.in_features, device=m.weight.device,
                                dtype=m.weight.dtype),)
    raise InputError(f"cannot guess an input for {type(model).__name__}: pass example_inputs=(x,)")
