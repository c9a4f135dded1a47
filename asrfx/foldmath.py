"""The fold identities, as pure tensor functions (no torch.fx here).

Each function takes and returns plain tensors, computes in float64 and casts the results back to
the dtype of the weights it was given. A per-channel affine map ``x -> x * s + t`` is the common
currency: ASR's constant attention is ``s = A(psi)``, ``t = 0``; a residual gate ``x + x * g`` is
``s = 1 + g``; an additive context block is ``s = 1``, ``t = f(psi)``.

Aliasing: no function modifies its inputs, and every tensor returned is a new, contiguous tensor
that shares no memory with an input. That holds in float64 too, where the conversions
``t.to(torch.float64)`` / ``r.to(dtype)`` return their argument itself (or, for ``expand``, a
view with zero strides): a caller may wrap a result in a Parameter, or change it in place,
without touching the layer it came from.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "batchnorm_affine",
    "fold_scale_into_norm",
    "fold_scale_into_batchnorm_input",
    "fold_scale_into_conv_out",
    "fold_scale_into_conv_transpose_out",
    "fold_scale_into_conv_in",
    "column_scale",
    "fold_scale_into_linear_in",
    "compose_affine",
    "pad_kernel",
    "identity_kernel",
    "merge_parallel_convs",
    "merge_sequential_convs",
    "avg_pool_kernel",
]


def _f64(t: Tensor | None) -> Tensor | None:
    """``t`` in float64, for reading only: for a float64 ``t`` this is ``t`` itself (detached),
    so nothing may write into it."""
    return None if t is None else t.detach().to(torch.float64)


def _out(t: Tensor, dtype: torch.dtype) -> Tensor:
    """A result: ``t`` cast to ``dtype`` as a new contiguous tensor -- never ``t`` itself, a view
    of it, or an input (``t.to(dtype)`` is ``t`` when the dtype already matches)."""
    return t.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)


def _shape_for(vec: Tensor, ndim: int, dim: int = 0) -> Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return vec.reshape(shape)


def compose_affine(s1: Tensor, t1: Tensor, s2: Tensor, t2: Tensor) -> tuple[Tensor, Tensor]:
    """Compose two per-channel affine maps: ``(x*s1 + t1)*s2 + t2 = x*(s1*s2) + (t1*s2 + t2)``."""
    return s1 * s2, t1 * s2 + t2


def fold_scale_into_norm(weight: Tensor | None, bias: Tensor | None, scale: Tensor,
                         shift: Tensor | None = None, num_features: int | None = None,
                         dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Fold ``y = norm(x) * s + t`` into the norm's affine parameters.

    A normalisation layer ends with ``gamma * xhat + beta``; then
    ``(gamma * xhat + beta) * s + t = (gamma * s) * xhat + (beta * s + t)``, so
    ``gamma' = gamma * s`` and ``beta' = beta * s + t``. A non-affine norm has
    ``gamma = 1, beta = 0``.

    Args:
        dtype: the dtype of the results; by default that of ``weight``, else of ``bias``, else
            of ``scale``. A norm without affine parameters has none to take it from: pass the
            dtype of the values it normalises (the scale is usually float64).

    Returns:
        (gamma', beta') in ``dtype``, new tensors.
    """
    if dtype is None:
        dtype = next(p.dtype for p in (weight, bias, scale) if p is not None)
    n = num_features if num_features is not None else scale.numel()
    s = _f64(scale).reshape(-1).expand(n)
    t = torch.zeros_like(s) if shift is None else _f64(shift).reshape(-1).expand(n)
    g = torch.ones_like(s) if weight is None else _f64(weight)
    b = torch.zeros_like(s) if bias is None else _f64(bias)
    return _out(g * s, dtype), _out(b * s + t, dtype)


def batchnorm_affine(running_mean: Tensor, running_var: Tensor, eps: float,
                     weight: Tensor | None = None, bias: Tensor | None = None
                     ) -> tuple[Tensor, Tensor]:
    """An eval-mode BatchNorm as the per-channel affine map it is: ``bn(x) = x * s + t`` with
    ``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s`` (Ioffe & Szegedy, 2015; the
    identity behind every conv-BN fusion). A norm without affine parameters has ``gamma = 1``,
    ``beta = 0``.

    Returns:
        (s, t), float64 tensors of shape ``(C,)``, new (never an input).
    """
    sd = torch.sqrt(_f64(running_var) + eps)
    g = torch.ones_like(sd) if weight is None else _f64(weight)
    b = torch.zeros_like(sd) if bias is None else _f64(bias)
    s = g / sd
    return s, b - _f64(running_mean) * s


def fold_scale_into_batchnorm_input(weight: Tensor | None, bias: Tensor | None,
                                    running_mean: Tensor, running_var: Tensor, eps: float,
                                    scale: Tensor, shift: Tensor | None = None,
                                    dtype: torch.dtype | None = None
                                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Fold ``y = bn(x * s + t)`` (eval mode) into the norm.

    With ``a = gamma / sqrt(var + eps)``, ``bn(x s + t) = a (x s + t - m) + beta``: the same norm
    with running mean 0, ``gamma' = gamma s`` and ``beta' = beta + a (t - m)`` (the variance is
    unchanged, so ``a`` keeps its meaning).

    Returns:
        (gamma', beta', running_mean'), new tensors in ``dtype`` (default: the running
        variance's); the new running mean is zeros.
    """
    dtype = running_var.dtype if dtype is None else dtype
    sd = torch.sqrt(_f64(running_var) + eps)
    g = torch.ones_like(sd) if weight is None else _f64(weight)
    b = torch.zeros_like(sd) if bias is None else _f64(bias)
    s = _f64(scale).reshape(-1).expand(sd.numel())
    t = torch.zeros_like(sd) if shift is None else _f64(shift).reshape(-1).expand(sd.numel())
    m = _f64(running_mean)
    return _out(g * s, dtype), _out(b + g / sd * (t - m), dtype), \
        torch.zeros_like(running_mean, memory_format=torch.contiguous_format)


def fold_scale_into_conv_out(weight: Tensor, bias: Tensor | None, scale: Tensor,
                             shift: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Fold ``y = conv(x) * s + t`` (or ``linear(x) * s + t``) into the layer.

    Output channel ``o`` of a conv or linear is ``sum_i W[o, i, ...] * x_i + b[o]``, so scaling it
    by ``s[o]`` and adding ``t[o]`` gives ``W'[o] = s[o] * W[o]`` and ``b'[o] = s[o] * b[o] + t[o]``.
    Grouping does not matter on the output side.

    Returns:
        (W', b'), new tensors; ``b'`` is always a tensor (zeros-based when the layer had no bias).
    """
    dtype = weight.dtype
    w = weight.detach()  # times a float64 scale: computed in float64 (type promotion converts
    out = w.shape[0]  # each weight exactly, as _f64 would, without a float64 copy of them all)
    s = _f64(scale).reshape(-1).expand(out)
    t = torch.zeros_like(s) if shift is None else _f64(shift).reshape(-1).expand(out)
    b = torch.zeros_like(s) if bias is None else _f64(bias)
    return _out(w * _shape_for(s, w.dim()), dtype), _out(b * s + t, dtype)


def fold_scale_into_conv_transpose_out(weight: Tensor, bias: Tensor | None, scale: Tensor,
                                       shift: Tensor | None = None, groups: int = 1
                                       ) -> tuple[Tensor, Tensor]:
    """Fold ``y = conv_transpose(x) * s + t`` into the layer.

    A transposed conv's weight is ``(C_in, C_out / groups, *k)``: output channel
    ``o = g * Og + j`` (``Og = C_out / groups``) is written only through ``W[i, j]`` with input
    channel ``i`` in group ``g`` (``i // Cg == g``, ``Cg = C_in / groups``), so
    ``W'[i, j] = W[i, j] * s[(i // Cg) * Og + j]`` and ``b'[o] = s[o] * b[o] + t[o]``.

    Returns:
        (W', b'), new tensors; ``b'`` is always a tensor.
    """
    dtype = weight.dtype
    w = _f64(weight)
    cin, og = w.shape[0], w.shape[1]
    out = og * groups
    s = _f64(scale).reshape(-1).expand(out)
    t = torch.zeros_like(s) if shift is None else _f64(shift).reshape(-1).expand(out)
    b = torch.zeros_like(s) if bias is None else _f64(bias)
    per_row = s.reshape(groups, 1, og).expand(groups, cin // groups, og).reshape(cin, og)
    return _out(w * per_row.reshape(cin, og, *([1] * (w.dim() - 2))), dtype), \
        _out(b * s + t, dtype)


def fold_scale_into_conv_in(weight: Tensor, bias: Tensor | None, scale: Tensor,
                            shift: Tensor | None = None, groups: int = 1
                            ) -> tuple[Tensor, Tensor]:
    """Fold ``y = conv(x * s + t)`` into the conv's input columns.

    With ``groups`` groups, output channel ``o`` in group ``g`` reads input channels
    ``g*Cg .. g*Cg + Cg - 1`` (``Cg = C_in / groups``) through ``W[o, j]``; so
    ``W'[o, j, ...] = W[o, j, ...] * s[g*Cg + j]`` and
    ``b'[o] = b[o] + sum_{j,k} W[o, j, k] * t[g*Cg + j]``.

    The bias identity holds only where the kernel never reads padding: with zero padding the
    padded border sees 0, not ``t``. Callers must pass ``shift=None`` (or zeros) unless the conv
    has no padding. Scaling alone is exact with zero padding, because ``0 * s = 0``.

    Returns:
        (W', b'), new tensors (``b'`` too when there is no shift: not the layer's bias).
    """
    dtype = weight.dtype
    w = _f64(weight)
    out, cg = w.shape[0], w.shape[1]
    w2 = w * column_scale(_f64(scale).reshape(-1).expand(cg * groups), w, groups)
    b = torch.zeros(out, dtype=torch.float64, device=w.device) if bias is None else _f64(bias)
    if shift is not None:
        t = _f64(shift).reshape(-1).expand(cg * groups)
        b = b + (w * column_scale(t, w, groups)).flatten(1).sum(1)
    return _out(w2, dtype), _out(b, dtype)


def column_scale(scale: Tensor, weight: Tensor, groups: int) -> Tensor:
    """The factor of each weight of a conv whose input is scaled per channel by ``scale``
    (``in_channels`` values, any shape), broadcastable against ``weight`` (``(C_out, C_in /
    groups, *kernel)``): with ``C_g = C_in / groups``, output channel ``o`` reads input channel
    ``(o // (C_out / groups)) * C_g + j`` through ``W[o, j]``, so ``weight * column_scale(...)``
    is the kernel computing ``conv(x * scale)`` from ``x``. Differentiable in ``scale`` (the
    fused training form scales kernels with it at every step)."""
    out, cg = weight.shape[0], weight.shape[1]
    tail = [1] * (weight.dim() - 2)
    if groups == 1:
        return scale.reshape(1, cg, *tail)
    col = scale.reshape(groups, 1, cg).expand(groups, out // groups, cg)
    return col.reshape(out, cg, *tail)


def fold_scale_into_linear_in(weight: Tensor, bias: Tensor | None, scale: Tensor,
                              shift: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Fold ``y = linear(x * s + t)``: ``W' = W diag(s)``, ``b' = b + W t``; new tensors."""
    dtype = weight.dtype
    w = _f64(weight)
    s = _f64(scale).reshape(-1).expand(w.shape[1])
    b = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) if bias is None else _f64(bias)
    if shift is not None:
        b = b + w @ _f64(shift).reshape(-1).expand(w.shape[1])
    return _out(w * s.reshape(1, -1), dtype), _out(b, dtype)


def pad_kernel(weight: Tensor, size: tuple[int, ...]) -> Tensor:
    """Zero-pad a conv kernel ``(O, I, *k)`` to ``(O, I, *size)``, centred.

    A kxk conv with padding p and a jxj conv (j < k, both odd) with padding p - (k-j)/2 read the
    same window centres; the small kernel placed in the middle of a kxk block of zeros computes
    the same output, so kernels of parallel branches can be summed once padded to a common size.
    Returns a new tensor, also when no padding is needed.
    """
    pads: list[int] = []
    for have, want in zip(reversed(weight.shape[2:]), reversed(size)):
        extra = want - have
        if extra < 0 or extra % 2:
            raise ValueError(f"cannot centre a kernel of size {tuple(weight.shape[2:])} in {size}")
        pads += [extra // 2, extra // 2]
    return _out(torch.nn.functional.pad(weight, pads), weight.dtype)


def identity_kernel(channels: int, groups: int, size: tuple[int, ...], dtype: torch.dtype,
                    device: torch.device | None = None) -> Tensor:
    """The kernel of a conv that copies its input: ``(C, C/groups, *size)``, a 1 at the centre
    of channel ``i``'s own input column ``i mod (C/groups)``."""
    cg = channels // groups
    w = torch.zeros(channels, cg, *size, dtype=dtype, device=device)
    centre = tuple(s // 2 for s in size)
    for i in range(channels):
        w[(i, i % cg) + centre] = 1
    return w


def merge_parallel_convs(weights: list[Tensor], biases: list[Tensor | None]) -> tuple[Tensor, Tensor]:
    """Sum parallel branches ``sum_b conv_b(x) + bias_b`` that read the same input with the same
    stride, groups and window centres: one conv with the summed (centre-padded) kernels and the
    summed biases. Computed in float64, cast back to the first kernel's dtype."""
    size = tuple(max(w.shape[2 + d] for w in weights) for d in range(weights[0].dim() - 2))
    dtype = weights[0].dtype
    w = sum(pad_kernel(_f64(k), size) for k in weights)
    b = sum(torch.zeros(weights[0].shape[0], dtype=torch.float64, device=weights[0].device)
            if bb is None else _f64(bb) for bb in biases)
    return _out(w, dtype), _out(b, dtype)


def merge_sequential_convs(w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None
                           ) -> tuple[Tensor, Tensor]:
    """Compose ``conv2(conv1x1(x))`` (both groups 1, the 1x1 with stride 1 and no padding) into
    one conv with ``conv2``'s geometry: ``W[o, i] = sum_m W2[o, m] * W1[m, i]`` and
    ``b[o] = b2[o] + sum_{m, k} W2[o, m, k] * b1[m]``.

    The bias identity holds only where conv2 never reads padding: its zero padding would have to
    hold ``b1``, not 0 (DBB pads with the bias for this reason). Callers check that ``b1`` is
    zero or conv2 has no padding.
    """
    dtype = w2.dtype
    a, b = _f64(w1).flatten(1), _f64(w2)
    w = torch.einsum("om...,mi->oi...", b, a)
    bias = torch.zeros(b.shape[0], dtype=torch.float64, device=b.device) if b2 is None \
        else _f64(b2)
    if b1 is not None:
        bias = bias + torch.einsum("om...,m->o", b, _f64(b1))
    return _out(w, dtype), _out(bias, dtype)


def avg_pool_kernel(weight: Tensor, pool: tuple[int, ...]) -> Tensor:
    """``avgpool_k(conv1x1(x))`` as one conv: the 1x1 kernel spread uniformly over the pool
    window, ``W[o, i, *k] = W1[o, i] / prod(k)`` (stride and padding those of the pool). A new
    contiguous tensor (not the zero-stride ``expand`` of the 1x1 kernel)."""
    n = 1
    for k in pool:
        n *= k
    w = _f64(weight).flatten(1) / n
    return _out(w.reshape(*w.shape, *([1] * len(pool))).expand(*w.shape, *pool), weight.dtype)
