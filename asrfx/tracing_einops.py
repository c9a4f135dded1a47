"""einops inside a traced model: ``rearrange`` / ``reduce`` / ``repeat`` / ``einsum`` /
``parse_shape`` and the ``Rearrange`` / ``Reduce`` / ``EinMix`` layers, traced into the torch
operators they stand for.

einops (Rogozhnikov, "Einops: Clear and Reliable Tensor Manipulations with Einstein-like
Notation", ICLR 2022) writes a squeeze-excitation's pooling as ``Reduce('b c h w -> b c',
'mean')`` and its broadcast as ``Rearrange('b c -> b c 1 1')`` (vit-pytorch's MaxViT, many
research models). Under plain torch.fx both fail: the functions look up a backend by the
tensor's type and know no ``Proxy``; the layers pick their recipe by ``input.ndim``, a proxy fx
cannot use as a dict key. The blocks around them became opaque calls, and no attention inside
was found.

While :class:`asrfx.tracing.AsrTracer` traces, :func:`tracing_backend` registers a backend for
fx proxies in einops' backend table (and removes it afterwards): it does what einops' torch
backend does -- ``reshape``, ``permute``, ``mean`` / ``sum`` / ``amax`` ..., ``unsqueeze`` +
``expand``, ``repeat``, ``cat``, ``einsum`` -- as recorded operations on the proxy; ``pack`` and
``unpack`` are recorded as one call each (:func:`einops_autowrap`). The sizes the backend hands
einops are read from the traced shape (``x.shape[i]``, nodes of the graph), so a reshape that
splits or merges axes follows the input's size; only the *rank* (how many axes) is taken from the
example inputs, as for ``len(x.shape)``. ``x.ndim`` of a traced tensor is answered the same way
(:func:`traced_ndim`).

Errors: without example inputs the rank is unknown; einops code then fails with a trace error
that makes the tracer retry with the example values, or, with none given, keeps the submodule
as an opaque call (a warning names it).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.fx as fx

__all__ = ["tracing_backend", "traced_ndim", "einops_autowrap", "RANK_UNKNOWN"]

#: the start of the trace error raised when a rank is needed and no example value gives it;
#: :func:`asrfx.tracing._needs_values` retries the trace with example values on it
RANK_UNKNOWN = "the rank of a traced value is read from the example inputs"


def _example(x: fx.Proxy) -> Any:
    """The example value of the traced ``x`` (None without one, or under another tracer)."""
    value_of = getattr(x.tracer, "value_of", None)
    return value_of(x.node) if value_of is not None else None


def rank(x: fx.Proxy) -> int:
    """How many axes the traced tensor ``x`` has, from its example value.

    Raises:
        torch.fx.proxy.TraceError: no example value (a trace without example inputs).
    """
    value = _example(x)
    if not isinstance(value, torch.Tensor):
        what = (f"{x.node.name}, a forward argument the example inputs do not give"
                if x.node.op == "placeholder" and getattr(x.tracer, "values", None) is not None
                else x.node.name)
        raise fx.proxy.TraceError(f"einops on {what}: {RANK_UNKNOWN}; give "
                                  f"example_inputs=(...)")
    return value.dim()


def traced_ndim(self: fx.Proxy) -> Any:
    """``x.ndim`` of a traced value: its example value's rank (an int), as ``len(x.shape)`` is
    answered; a proxy of the attribute, as in fx, where the value is no tensor (a shape)."""
    if getattr(self.tracer, "values", None) is None:  # no example values in this trace
        raise fx.proxy.TraceError(f"ndim of {self.node.name}: {RANK_UNKNOWN}; give "
                                  f"example_inputs=(...)")
    value = _example(self)
    if isinstance(value, torch.Tensor):
        return value.dim()
    return fx.proxy.Attribute(self, "ndim")


class _ProxyBackend:
    """The operations einops asks of a backend, recorded on fx proxies (those of einops'
    ``TorchBackend``, with sizes read from the traced shape)."""

    framework_name = "asrfx.fx"

    def is_appropriate_type(self, tensor: Any) -> bool:
        return isinstance(tensor, fx.Proxy)

    def shape(self, x: fx.Proxy) -> list:
        # a list (unhashable): einops then skips its shape-keyed cache, which would keep the
        # proxies (and their graph) alive
        return [x.shape[i] for i in range(rank(x))]

    def reshape(self, x: fx.Proxy, shape: Any) -> fx.Proxy:
        return x.reshape(shape)

    def transpose(self, x: fx.Proxy, axes: Any) -> fx.Proxy:
        return x.permute(axes)

    def reduce(self, x: fx.Proxy, operation: str, reduced_axes: Any) -> fx.Proxy:
        if operation in ("min", "max"):
            return getattr(x, "a" + operation)(dim=reduced_axes)
        if operation in ("sum", "mean"):
            return getattr(x, operation)(dim=reduced_axes)
        if operation in ("any", "all", "prod"):  # one axis at a time in torch
            for i in sorted(reduced_axes)[::-1]:
                x = getattr(x, operation)(dim=i)
            return x
        raise NotImplementedError(f"einops reduction {operation!r}")

    def stack_on_zeroth_dimension(self, tensors: list) -> fx.Proxy:
        return torch.stack(tensors)

    def add_axis(self, x: fx.Proxy, new_position: int) -> fx.Proxy:
        return torch.unsqueeze(x, new_position)

    def add_axes(self, x: fx.Proxy, n_axes: int, pos2len: dict) -> fx.Proxy:
        repeats: list[Any] = [-1] * n_axes
        for position, length in pos2len.items():
            x = torch.unsqueeze(x, position)
            repeats[position] = length
        return x.expand(repeats)

    def tile(self, x: fx.Proxy, repeats: Any) -> fx.Proxy:
        return x.repeat(repeats)

    def concat(self, tensors: list, axis: int) -> fx.Proxy:
        return torch.cat(tensors, dim=axis)

    def is_float_type(self, x: fx.Proxy) -> bool:
        value = _example(x)
        # without an example value: a mean of an integer tensor fails when the graph runs
        return value.is_floating_point() if isinstance(value, torch.Tensor) else True

    def einsum(self, pattern: str, *x: Any) -> fx.Proxy:
        return torch.einsum(pattern, *x)


def einops_autowrap() -> tuple[tuple, list]:
    """einops' ``pack`` and ``unpack`` (when einops is imported) for fx's ``autowrap_functions``,
    and the einops modules that hold them (where fx also patches them, for ``einops.pack(...)``).

    Called on traced values, each is recorded as one call, run by the graph on the real
    tensors: they work out the sizes of the packed parts in Python (``int(size == -1)``), which
    a traced size cannot answer; as calls, the parts follow the input's sizes."""
    einops = sys.modules.get("einops")
    fns = tuple(f for f in (getattr(einops, "pack", None), getattr(einops, "unpack", None))
                if callable(f))
    modules = [m for m in (einops, sys.modules.get("einops.packing")) if m is not None]
    return fns, (modules if fns else [])


def _proxy_types() -> list[type]:
    out, todo = [], [fx.Proxy]
    while todo:
        t = todo.pop()
        out.append(t)
        todo.extend(t.__subclasses__())
    return out


@contextmanager
def tracing_backend() -> Iterator[None]:
    """Inside: einops (if imported) handles fx proxies with :class:`_ProxyBackend`. Only the
    proxy types are added to einops' type-to-backend table, and they are removed on exit, so
    einops outside a trace is untouched."""
    backends = sys.modules.get("einops._backends")
    table = getattr(backends, "_type2backend", None)
    if not isinstance(table, dict):
        yield
        return
    backend = _ProxyBackend()
    added = [t for t in _proxy_types() if t not in table]
    for t in added:
        table[t] = backend
    try:
        yield
    finally:
        for t in added:
            table.pop(t, None)
