"""The equivalence check of a fold: comparing outputs, tolerances, non-finite values.

Pure comparisons on outputs (nested tuples/lists/dicts of tensors), plus the interpreter that
finds the first non-finite value in a graph. The pipeline (:mod:`asrfx.pipeline`) decides what
to compare; this module says how.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from asrfx.passes.graph_utils import get_attr_path, module_path

__all__ = ["relative_error", "nonfinite", "count_nonfinite", "first_nonfinite",
           "half_precision", "tolerance", "full_fp32_precision"]


def relative_error(ref: Any, out: Any) -> float:
    """max |ref - out| / max |ref| over all tensors of two (nested) outputs, in float64.

    NaN when either side holds a NaN (or infinities that do not cancel), inf when ``ref`` is
    finite and ``out`` is not: a non-finite output never reads as a small error.
    """
    a, _ = tree_flatten(ref)
    b, _ = tree_flatten(out)
    num, den = 0.0, 0.0
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.numel():
            x64, y64 = x.detach().double(), y.detach().double()
            diff = torch.where(x64 == y64, 0.0, (x64 - y64).abs())  # inf == inf: no error
            d, r = diff.max().item(), x64.abs().max().item()
            if math.isnan(d) or math.isnan(r) or bool(diff.isnan().any()):
                return math.nan
            num, den = max(num, d), max(den, r)
    if math.isinf(den):
        return math.nan if num else 0.0
    return num / max(den, 1e-12)


def nonfinite(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and \
        not bool(torch.isfinite(t).all())


def count_nonfinite(t: torch.Tensor) -> str:
    nan, inf = int(t.isnan().sum()), int(t.isinf().sum())
    return ", ".join(p for p in (f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else "") if p)


def first_nonfinite(gm: fx.GraphModule, inputs: tuple) -> str:
    """Where ``gm``'s output first becomes NaN/Inf on ``inputs``: the input, a parameter or
    buffer (e.g. a BatchNorm's running variance), or the first node computing one."""
    for i, t in enumerate(inputs):
        if nonfinite(t):
            return f"example input {i} holds {count_nonfinite(t)} values"
    found: list[str] = []

    class Finder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if not found and n.op != "get_attr" and \
                    any(nonfinite(t) for t in tree_flatten(out)[0]):
                found.append(_describe_nonfinite(gm, n))
            return out

    with torch.no_grad():
        Finder(gm).run(*inputs)
    return found[0] if found else "an unknown place"


def _describe_nonfinite(gm: fx.GraphModule, n: fx.Node) -> str:
    path = module_path(n) or "(top)"
    if n.op == "call_module":
        mod = gm.get_submodule(str(n.target))
        what = f"{n.target} ({type(mod).__name__})"
        tensors = list(mod.named_parameters()) + list(mod.named_buffers())
    else:
        what = f"{getattr(n.target, '__name__', n.target)} in {path}"
        tensors = [(str(a.target), get_attr_path(gm, str(a.target)))
                   for a in n.all_input_nodes if a.op == "get_attr"]
    bad = [f"{k} holds {count_nonfinite(t)} values" for k, t in tensors if nonfinite(t)]
    if bad:
        return f"{what}: {'; '.join(bad)}"
    return f"{what}: its output is the first non-finite value (its inputs are finite)"


def half_precision(out: Any) -> str | None:
    """"float16" / "bfloat16" when an output tensor is of that dtype."""
    for t in tree_flatten(out)[0]:
        if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16):
            return str(t.dtype).replace("torch.", "")
    return None


def tolerance(tol: float, out: Any) -> float:
    """The check's tolerance: ``tol``, widened for half-precision outputs (whose rounding alone
    exceeds 1e-4); the fold itself is computed in float64 either way."""
    leaves, _ = tree_flatten(out)
    for t in leaves:
        if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16):
            tol = max(tol, 8 * torch.finfo(t.dtype).eps)
    return tol


@contextlib.contextmanager
def full_fp32_precision():
    """No TF32 while folding: on Ampere and later GPUs cuDNN convolutions default to TF32
    (10-bit mantissa), whose rounding differs between the original and the folded weights by
    ~1e-3 -- the check would compare rounding noise, not the fold."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul
