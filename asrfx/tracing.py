"""The torch.fx front end: capturing models as torch.fx graphs.

Callers reach it through :func:`asrfx.capture.capture` (the one seam to the front ends), or
:func:`trace` for a single GraphModule. Example inputs are checked in :mod:`asrfx.inputs`; shape
metadata is recorded by :mod:`asrfx.passes.shapes`.

Tracing degrades instead of crashing: a submodule whose forward cannot be traced symbolically is
retried as a leaf (an opaque call), with a warning naming it. Only a failure at the top level is
an error, a :class:`~asrfx.errors.TraceError` that names the reason and the fix.

fx bakes Python branches on ``self.training`` into the graph (drop-path, stochastic depth, aux
heads). We therefore trace a model in train mode and in eval mode; when the two graphs differ, the
result is a :class:`DualModeGraphModule` whose ``forward`` runs the train-mode graph while
``self.training`` is set and the eval-mode graph otherwise, over one set of modules and parameters.
"""

from __future__ import annotations

import bisect
import builtins
import dis
import math
import operator
import sys
import warnings
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.fx.graph_module import GraphModule, _copy_attr, _forward_from_src

from .errors import InputError, TraceError
from .inputs import check_example_inputs, inputs_failure, normalize_inputs, short_error, \
    top_level_hint
from .passes.graph_utils import (PARTS_GUARD, describe_hooks, module_hooks, reads_shape_only,
                                 submodule, to_eval)
from .passes.shapes import ShapeRecorder, propagate_shapes
from .tracing_einops import RANK_UNKNOWN, einops_autowrap, traced_ndim, tracing_backend

__all__ = ["trace", "AsrTracer", "preserve_modes", "DualModeGraphModule", "TraceResult", "Leaves",
           "trace_modes", "hooked_leaves", "warn_own_hooks"]

# Norm and dropout layers decide their behaviour on self.training at run time; a subclass of
# one of them traced through would freeze that decision, so they stay opaque calls.
_MODE_DEPENDENT_BASES: tuple[type, ...] = (
    nn.modules.batchnorm._NormBase,
    nn.modules.dropout._DropoutNd,
)


def traced_norm(m: nn.Module) -> bool:
    """A BatchNorm subclass from outside torch (timm's ``BatchNormAct2d``, a user's norm with a
    built-in activation) is traced through, in train and in eval mode: its ``F.batch_norm``
    call on its own parameters and buffers is then a fold and fusion target like a BatchNorm,
    and what it adds (an activation, a drop) is ordinary graph. torch's own norms stay leaves;
    a subclass whose forward does not trace stays one too (with a warning). SyncBatchNorm
    subclasses stay leaves: their forward decides at run time whether to synchronise across
    processes, which a trace would freeze. So do norms with ``momentum=None`` (a cumulative
    average): their update factor is ``1 / num_batches_tracked``, a Python number at trace time.
    Buffers are traced as ``get_attr`` (see :class:`AsrTracer`), so the counter's increment is
    carried into the training form with the statistics' update."""
    own = type(m).__module__.startswith(("torch.", "asrfx."))  # asrfx's fused-gate norms too
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and \
        not isinstance(m, nn.SyncBatchNorm) and not own \
        and m.momentum is not None  # a cumulative average reads num_batches_tracked as a number


_SHAPE_FUNCTIONS = {operator.getitem, operator.eq, operator.ne, operator.lt, operator.le,
                    operator.gt, operator.ge, operator.add, operator.sub, operator.mul,
                    operator.floordiv, operator.mod, operator.not_, operator.and_, operator.or_,
                    operator.truediv, operator.neg, builtins.len, builtins.getattr, math.ceil,
                    math.floor}


def _shape_only(node: fx.Node, depth: int = 16) -> bool:
    """``node`` is computed from shapes (``x.shape``, ``x.size()``, ``x.dim()``, ``x.ndim``)
    and constants alone: Python arithmetic, comparisons and indexing on them."""
    if reads_shape_only(node):
        return True
    if depth == 0 or node.op != "call_function" or node.target not in _SHAPE_FUNCTIONS:
        return False
    return all(_shape_only(a, depth - 1) for a in node.all_input_nodes)


def _describe_condition(node: fx.Node) -> str:
    names = {operator.eq: "==", operator.ne: "!=", operator.lt: "<", operator.le: "<=",
             operator.gt: ">", operator.ge: ">="}
    if node.target in names and len(node.args) == 2:
        return f"({node.args[0]} {names[node.target]} {node.args[1]})"
    return node.name


class _SubmoduleTraceFailure(Exception):
    def __init__(self, path: str, error: BaseException):
        super().__init__(path)
        self.path = path
        self.error = error


#: argument types fx records as they are (see :meth:`AsrTracer.create_arg`)
_PLAIN_ARGS = frozenset({int, float, bool, str, type(None)})


class AsrTracer(fx.Tracer):
    """fx tracer that keeps standard ``torch.nn`` layers, norm/dropout subclasses, any
    user-named modules and every submodule with hooks (forward, forward-pre, backward: they
    run when the module is *called*, and an inlined module is never called) as leaves, and
    reports which submodule a tracing failure came from.

    With ``example_inputs`` it also computes every node's example value while tracing, so
    ``len(x.shape)`` (the rank, which does not depend on the batch or image size) can be
    answered; any other use of a traced value in Python control flow still fails.

    Buffers read as attributes are traced as ``get_attr`` (``proxy_buffer_attributes``): fx's
    default bakes ``f(self.running_var)`` into a constant at trace time, which goes stale as
    training updates the buffer (a diverse-branch block's pad value is computed so).
    """

    proxy_buffer_attributes = True

    def __init__(self, leaf_modules: Iterable[str | type] = (), example_inputs: tuple | None = None):
        # einops' pack / unpack compute their split sizes in Python: recorded as calls, whether
        # a forward calls them by name (``from einops import pack``) or as ``einops.pack``
        wrap, modules = einops_autowrap()
        super().__init__(autowrap_functions=wrap)
        search = getattr(self, "_autowrap_search", None)
        if isinstance(search, list):
            search.extend(modules)
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.example_inputs = list(example_inputs) if example_inputs is not None else None
        self.values: dict[fx.Node, Any] | None = {} if example_inputs is not None else None
        self._computing = False  # True while running real layers for example values
        # nodes whose example value is not computed yet: values are computed in creation order
        # when a question needs one (a trace that asks none runs no layer)
        self._pending: list[fx.Node] = []
        # (code, instruction offset) -> how many items an unpacking there takes (None: it is
        # no unpacking), see _proxy_iter
        self.unpack_at: dict[tuple[Any, int], int | None] = {}
        # (node, code, instruction offset) -> the items iter() / len() read there, see
        # _site_parts
        self.parts: dict[tuple[fx.Node, Any, int], list[fx.Proxy] | None] = {}

    def create_node(self, kind: str, target: Any, args: Any, kwargs: Any, name: Any = None,
                    type_expr: Any = None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if self.values is not None and not self._computing:
            self._pending.append(node)
        return node

    def value_of(self, node: fx.Node) -> Any:
        """The example value of ``node`` (None without one), computing every pending value up
        to it, in the order the nodes were made."""
        if self.values is None:
            return None
        if node not in self.values and node in self._pending:
            upto = self._pending.index(node) + 1
            todo, self._pending = self._pending[:upto], self._pending[upto:]
            self._computing = True
            try:
                for n in todo:
                    self._record_value(n)
            finally:
                self._computing = False
        return self.values.get(node)

    def create_arg(self, a: Any) -> Any:
        """fx's ``create_arg`` with the common cases first: a proxy, a number, a string, None
        and plain tuples / lists of them, which fx returns as they are after a dozen checks for
        parameters, constants and opaque types (a fifth of the tracing time of a ResNet)."""
        kind = type(a)
        if kind is fx.Proxy:
            return a.node
        if kind in _PLAIN_ARGS:
            return a
        if kind is tuple or kind is list:
            return kind(self.create_arg(e) for e in a)
        return super().create_arg(a)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self._computing:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def _record_value(self, node: fx.Node) -> None:
        values = self.values
        try:
            if node.op == "placeholder":
                if not self.example_inputs:
                    return
                values[node] = self.example_inputs.pop(0)
                return
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: values[n])
            with torch.no_grad():
                if node.op == "get_attr":
                    obj: Any = self.root
                    for part in str(node.target).split("."):
                        obj = getattr(obj, part)
                    values[node] = obj
                elif node.op == "call_function":
                    values[node] = node.target(*args, **kwargs)
                elif node.op == "call_method":
                    values[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
                elif node.op == "call_module":
                    values[node] = self.root.get_submodule(str(node.target))(*args, **kwargs)
        except Exception:  # noqa: BLE001 - values are a best-effort aid; no value, no answer
            return

    def to_bool(self, obj: fx.Proxy) -> bool:
        """A Python ``if`` on a traced value: answered from the example when the value is
        computed from shapes alone (``if g.shape[-1] != 1:``, ``if x.dim() != 4: raise``), with
        a guard in the graph -- ``torch._assert`` -- that fails, naming the condition, on an
        input for which the answer would differ. Any other condition fails as in fx."""
        value = self.value_of(obj.node)
        if not (isinstance(value, (bool, torch.SymBool)) or type(value) is bool) or \
                not _shape_only(obj.node):
            return super().to_bool(obj)
        answer = bool(value)
        cond = obj if answer else self.create_proxy("call_function", operator.not_, (obj,), {})
        self.create_proxy("call_function", torch._assert,
                          (cond, f"asrfx: the traced graph assumed {_describe_condition(obj.node)}"
                                 f" is {answer} (as for the example inputs); this input's shapes "
                                 f"make it {not answer}: trace/prepare with inputs of this shape"),
                          {})
        return answer

    def rank_of(self, proxy: fx.Proxy) -> int | None:
        """len() of a traced shape, when its example value is known."""
        value = self.value_of(proxy.node)
        return len(value) if isinstance(value, torch.Size) else None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.is_plain_leaf(m, module_qualified_name):
            return True
        return bool(module_qualified_name) and bool(module_hooks(m))

    def is_plain_leaf(self, m: nn.Module, module_qualified_name: str) -> bool:
        """A leaf whether or not it has hooks."""
        if module_qualified_name in self.leaf_names:
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        if isinstance(m, _MODE_DEPENDENT_BASES) and not traced_norm(m):
            return True
        if getattr(m, "asrfx_pure", False):  # asrfx's own batched excitations (vmap inside)
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        if self._computing:  # a real call made while computing an example value
            return forward(*args, **kwargs)
        try:
            return super().call_module(m, forward, args, kwargs)
        except _SubmoduleTraceFailure:
            raise
        except Exception as e:  # noqa: BLE001 - any failure inside a submodule makes it a leaf
            path = self.path_of_module(m)
            if self.is_leaf_module(m, path):
                raise
            raise _SubmoduleTraceFailure(path, e) from e


def _patch_keyword_targets() -> None:
    """Let fx generate code for module / attribute paths with a Python keyword in them.

    fx writes ``self.blocks.in.conv(x)`` for a submodule ``blocks["in"]`` (a ModuleDict key or
    an ``add_module`` name such as "in", "class", "for"): its code generator only checks
    ``str.isidentifier()``, which keywords pass, and compiling the generated forward then fails
    with a SyntaxError. Such names are legal in PyTorch, so the generator is made to spell them
    ``getattr(self.blocks, "in")`` -- as it already does for ``"0"`` -- where torch does not.
    """
    import keyword

    import torch.fx.graph as fx_graph

    original = getattr(fx_graph, "_format_target", None)
    if original is None or getattr(original, "_asrfx_keywords", False):
        return
    try:
        if original("self", "a.in") != "self.a.in":
            return  # this torch already spells keywords safely
    except Exception:  # noqa: BLE001 - an fx internal we do not recognise: leave it alone
        return

    def _format_target(base: str, target: str) -> str:
        r = base
        for e in target.split("."):
            r = f'getattr({r}, "{e}")' if not e.isidentifier() or keyword.iskeyword(e) \
                else f"{r}.{e}"
        return r

    _format_target._asrfx_keywords = True  # type: ignore[attr-defined]
    fx_graph._format_target = _format_target


_patch_keyword_targets()

_fx_len = fx.Proxy.__len__
_fx_iter = fx.Proxy.__iter__
_JIT_ISINSTANCE = torch.jit.isinstance
_VARIABLE = torch.autograd.variable.Variable


def _traced_variable(cls: type, data: Any = None, *args: Any, **kwargs: Any) -> Any:
    """``torch.autograd.Variable(x)`` while tracing (the pre-0.4 wrapper, still in older model
    code: CondenseNet's ``index_select(x, 1, Variable(self.index))``): of a traced tensor
    without other arguments it is ``x.detach()``, as in eager mode (a new tensor sharing
    ``x``'s data, no gradient); anything else as torch does it."""
    if isinstance(data, fx.Proxy) and not args and not kwargs:
        return data.tracer.create_proxy("call_method", "detach", (data,), {})
    return torch._C._LegacyVariableBase.__new__(cls, data, *args, **kwargs)


def _traced_jit_isinstance(obj: Any, target_type: Any) -> bool:
    """``torch.jit.isinstance`` while tracing: a traced value is answered by its example
    value's type (MONAI's ``UpCat`` tests ``torch.jit.isinstance(x_e, torch.Tensor)``, which is
    False for any proxy, and fx would trace the branch without the skip connection). The type
    of a traced value does not depend on the input, so no guard is needed. Without example
    values it fails as control flow on a traced value does (the trace is retried with them)."""
    proxy = _proxy_in(obj)
    if proxy is None:
        return _JIT_ISINSTANCE(obj, target_type)
    tracer = proxy.tracer
    missing = object()

    def value(p: fx.Proxy) -> Any:
        v = tracer.value_of(p.node) if isinstance(tracer, AsrTracer) else None
        return missing if v is None else v

    values = fx.node.map_aggregate(obj, lambda a: value(a) if isinstance(a, fx.Proxy) else a)
    flat: list[Any] = []
    fx.node.map_aggregate(values, lambda a: flat.append(a))
    if any(v is missing for v in flat):
        raise fx.proxy.TraceError("torch.jit.isinstance of a traced value: symbolically traced "
                                  "variables cannot be used as inputs to control flow")
    return _JIT_ISINSTANCE(values, target_type)


def _proxy_len(self: fx.Proxy) -> int:
    """``len()`` of a traced shape (its rank) or of a traced tuple of tensors (``chunk``,
    ``split``; asked by ``(q, *t.chunk(2, -1))`` before it iterates), from the example value;
    fx's error for anything else."""
    tracer = self.tracer
    if isinstance(tracer, AsrTracer):
        n = tracer.rank_of(self)
        if n is not None:
            return n
        parts = _site_parts(tracer, self, sys._getframe(1))
        if parts is not None:
            return len(parts)
    return _fx_len(self)


def _site_parts(tracer: "AsrTracer", proxy: fx.Proxy, frame: Any) -> list[fx.Proxy] | None:
    """:func:`_parts_of`, read once per traced tuple and bytecode instruction: a star in a
    display (``(q, *t.chunk(2, -1))``) or ``list(t)`` asks ``iter()`` and ``len()`` of it at one
    instruction, and both take the same items (one guard)."""
    key = (proxy.node, frame.f_code, frame.f_lasti)
    if key not in tracer.parts:
        tracer.parts[key] = _parts_of(tracer, proxy)
    return tracer.parts[key]


def _proxy_iter(self: fx.Proxy) -> Any:
    """fx's ``Proxy.__iter__`` (``b, c = x.shape[:2]`` unpacks the proxy into that many items;
    any other iteration is the tracer's error), with the answer remembered per call site for
    the trace: fx reads all of the calling function's bytecode at every call (54 SE modules:
    8 ms of a ResNet-164 trace)."""
    tracer = self.tracer
    if not isinstance(tracer, AsrTracer):
        return _fx_iter(self)
    frame = sys._getframe(1)
    key = (frame.f_code, frame.f_lasti)
    if key not in tracer.unpack_at:
        insts = list(dis.get_instructions(frame.f_code))
        i = bisect.bisect_left(insts, frame.f_lasti, key=lambda x: x.offset) \
            if sys.version_info >= (3, 11) else frame.f_lasti // 2
        inst = insts[i] if i < len(insts) else None
        tracer.unpack_at[key] = inst.argval if inst is not None and \
            inst.opname == "UNPACK_SEQUENCE" else None
    n = tracer.unpack_at[key]
    if n is None:
        parts = _site_parts(tracer, self, frame)
        return tracer.iter(self) if parts is None else iter(parts)
    return (self[i] for i in range(n))


def _parts_of(tracer: AsrTracer, proxy: fx.Proxy) -> list[fx.Proxy] | None:
    """The items of a traced tuple or list of tensors, or of a traced shape, iterated in Python
    (``for p in torch.split(x, sizes, 1)``, ``zip(x.chunk(4, 1), self.convs)``, ``tuple(2 * s
    for s in x.shape[2:])``): as many items as its example value has, each read from the
    traced value (a size stays computed from the input), with a guard in the graph --
    ``torch._assert`` -- that fails, naming the count, on an input that makes another number
    of parts (a split along a spatial dim at another size). None without an example value
    (the trace is retried with one) or for anything else."""
    value = tracer.value_of(proxy.node)
    if not isinstance(value, (tuple, list)) or not all(
            isinstance(v, torch.Tensor) for v in value) and not isinstance(value, torch.Size):
        return None
    count = len(value)
    length = tracer.create_proxy("call_function", len, (proxy,), {})
    same = tracer.create_proxy("call_function", operator.eq, (length, count), {})
    tracer.create_proxy("call_function", torch._assert, (
        same, f"{PARTS_GUARD} {count} parts of {proxy.node.name} "
              f"(as for the example inputs); this input makes another number of parts: "
              f"trace/prepare with inputs of this shape"), {})
    return [proxy[i] for i in range(count)]


def _proxy_ceil(self: fx.Proxy) -> fx.Proxy:
    return self.tracer.create_proxy("call_function", math.ceil, (self,), {})


def _proxy_floor(self: fx.Proxy) -> fx.Proxy:
    return self.tracer.create_proxy("call_function", math.floor, (self,), {})


def set_items(t: torch.Tensor, index: Any, value: Any) -> torch.Tensor:
    """``t`` with ``t[index] = value`` applied, as a new tensor (``t`` is unchanged).

    The traced form of an item assignment (``out[:, :, :1, :] = v``, e.g. the border fill of a
    diverse-branch block's pad-with-the-norm's-shift): graph passes reason about values, and a
    new tensor keeps every node's value fixed once computed.
    """
    out = t.clone()
    out[index] = value
    return out


#: ops whose result is a new tensor no other value shares memory with (an item assignment to it
#: changes nothing else): the only targets an assignment is traced for
_FRESH = {torch.nn.functional.pad, torch.zeros, torch.ones, torch.full, torch.empty, torch.cat,
          torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, torch.clone,
          "clone", set_items}


def _proxy_setitem(self: fx.Proxy, index: Any, value: Any) -> None:
    node = self.node
    if node.op not in ("call_function", "call_method") or node.target not in _FRESH:
        raise TypeError(f"item assignment to {node.name}: only a tensor that F.pad, a factory, "
                        f"cat or clone just made is traced (anything else may share memory "
                        f"with another value)")
    # every later use of this proxy reads the assigned tensor
    self.node = self.tracer.create_proxy("call_function", set_items, (self, index, value),
                                         {}).node


# Tensor factories take sizes, not tensors, so a size read from a traced shape
# (``torch.rand(x.shape[0], 1, 1, 1)`` in drop-path code) reaches them as a Proxy that torch's
# argument parser rejects. While tracing, these names are wrapped to record a call instead.
_FACTORIES = ("rand", "randn", "zeros", "ones", "empty", "full", "randint", "arange",
              "as_tensor")


_AS_TENSOR = torch.as_tensor


def _proxy_in(obj: Any) -> fx.Proxy | None:
    found = []
    fx.node.map_aggregate(obj, lambda a: found.append(a) if isinstance(a, fx.Proxy) else None)
    return found[0] if found else None


def _wrap_factory(fn: Any) -> Any:
    """``fn`` recording a call in the graph when it is given a traced value (torch's own
    dispatch does not: ``torch.zeros(x.shape)``, or ``torch.as_tensor(x)``, which would read a
    proxy as an array). ``torch.as_tensor`` of a traced tensor alone is that tensor (MONAI's
    HighResNet wraps its blocks' outputs in it)."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        proxy = _proxy_in((args, kwargs))
        if proxy is None:
            return fn(*args, **kwargs)
        if fn is _AS_TENSOR and len(args) == 1 and args[0] is proxy and \
                all(v is None for v in kwargs.values()):
            return proxy
        return proxy.tracer.create_proxy("call_function", fn, args, kwargs)

    wrapper.__wrapped__ = fn
    return wrapper


class OpaqueAutogradFunction(RuntimeError):
    """Raised while tracing when a ``torch.autograd.Function`` is applied to a traced value: fx
    would record the operations of its ``forward`` and a graph training with them would run
    autograd's backward of those operations instead of the Function's own ``backward`` (a
    gradient-reversal layer's sign, a straight-through estimator, a memory-saving swish). The
    submodule calling it becomes an opaque leaf, which calls the Function as the model does."""


_FUNCTION_APPLY = torch.autograd.Function.__dict__["apply"]


def _guarded_apply(cls: type, *args: Any, **kwargs: Any) -> Any:
    if _proxy_in((args, kwargs)) is not None:
        raise OpaqueAutogradFunction(
            f"it applies the autograd Function {cls.__module__}.{cls.__qualname__}, whose own "
            f"backward a graph of its forward's operations would not run")
    # a classmethod in some torch releases, a C classmethod_descriptor (no __func__) in others:
    # bind it to cls as attribute lookup would
    return _FUNCTION_APPLY.__get__(None, cls)(*args, **kwargs)


class Leaves(set):
    """The paths of the submodules a trace keeps as opaque calls because they could not be
    captured faithfully, with why (``why[path]``): they run as the model calls them, and no
    pass sees inside them, which fold and prepare report (``untraceable-module``)."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.why: dict[str, str] = {}

    def keep(self, paths: Iterable[str], reason: str) -> None:
        for p in paths:
            self.add(p)
            self.why[p] = reason


def _trace_once(model: nn.Module, leaves: set[str], user_leaves: Sequence[str | type],
                example_inputs: tuple | None = None) -> fx.Graph:
    tracer = AsrTracer(list(user_leaves) + sorted(leaves), example_inputs)
    originals = {name: getattr(torch, name) for name in _FACTORIES}
    saved = None
    if example_inputs is not None:
        # computing example values runs the layers; keep BatchNorm statistics as they were
        saved = {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()
                 if not isinstance(v, nn.Parameter)}
        fx.Proxy.__len__ = _proxy_len
        fx.Proxy.__ceil__ = _proxy_ceil  # math.ceil of a size (timm's "same" padding)
        fx.Proxy.__floor__ = _proxy_floor
    for name, fn in originals.items():
        setattr(torch, name, _wrap_factory(fn))
    fx.Proxy.__setitem__ = _proxy_setitem
    fx.Proxy.__iter__ = _proxy_iter
    torch.autograd.Function.apply = classmethod(_guarded_apply)  # type: ignore[assignment]
    torch.jit.isinstance = _traced_jit_isinstance
    _VARIABLE.__new__ = _traced_variable  # type: ignore[method-assign]
    fx.Proxy.ndim = property(traced_ndim)  # type: ignore[attr-defined]
    attrs = _module_attributes(model)
    try:
        with tracing_backend():  # einops functions on traced values
            graph = tracer.trace(model)
        for node in graph.nodes:
            # a forward annotated under `from __future__ import annotations` gives placeholders
            # the annotation as a string, which breaks pickling the GraphModule (torch.save of
            # the whole model): keep real types only
            if isinstance(node.type, str):
                node.type = None
        return graph
    finally:
        torch.autograd.Function.apply = _FUNCTION_APPLY  # type: ignore[assignment]
        torch.jit.isinstance = _JIT_ISINSTANCE
        if "__new__" in vars(_VARIABLE):
            del _VARIABLE.__new__
        for name, fn in originals.items():
            setattr(torch, name, fn)
        fx.Proxy.__len__ = _fx_len
        fx.Proxy.__iter__ = _fx_iter
        for name in ("__ceil__", "__floor__", "__setitem__", "ndim"):
            if name in vars(fx.Proxy):
                delattr(fx.Proxy, name)
        _drop_traced_attributes(attrs)
        if saved is not None:
            state = model.state_dict(keep_vars=True)
            with torch.no_grad():
                for k, v in saved.items():
                    state[k].copy_(v)


def _module_attributes(model: nn.Module) -> list[tuple[nn.Module, dict]]:
    """Each submodule with a shallow copy of its plain attributes (see
    :func:`_drop_traced_attributes`)."""
    return [(m, dict(vars(m))) for m in model.modules()]


def _drop_traced_attributes(saved: list[tuple[nn.Module, dict]]) -> None:
    """Undo what a trace wrote into the model: an attribute a forward set to a traced value
    (transformers' Swin stores ``self.window_size = min(input_resolution)`` when the input is
    small) holds a proxy of a finished trace, which the next trace (the other mode's) or a
    call would read. Such attributes get their value from before the trace back (or go, if
    the trace added them); others stay as the forward left them."""
    for m, before in saved:
        now = vars(m)
        for key in [k for k, v in now.items() if v is not before.get(k, _MISSING)]:
            if _proxy_in(now[key]) is None:
                continue
            if key in before:
                now[key] = before[key]
            else:
                del now[key]


_MISSING = object()


def _needs_values(e: BaseException) -> bool:
    """A trace failed on what example values can answer: ``len()`` of a shape, a Python
    condition on a traced value (answered when it is computed from shapes alone), an iteration
    over the parts of a split, the rank of a traced tensor (``x.ndim``, einops)."""
    text = str(e)
    return "'len'" in text or "control flow" in text or "__ceil__" in text or \
        "__floor__" in text or "cannot be iterated" in text or RANK_UNKNOWN in text


def _trace_with_fallback(model: nn.Module, user_leaves: Sequence[str | type],
                         leaves: Leaves, example_inputs: tuple | None = None) -> fx.Graph:
    name = type(model).__name__
    with_values = False
    for _ in range(1000):
        try:
            return _trace_once(model, leaves, user_leaves,
                               example_inputs if with_values else None)
        except _SubmoduleTraceFailure as f:
            if example_inputs is not None and not with_values and _needs_values(f.error):
                with_values = True  # retry, answering len(x.shape) and shape-only conditions
                continue  # from example values
            if f.path in leaves:  # cannot happen unless the tracer misbehaves; avoid a loop
                raise TraceError(f.path, str(f.error), "pass leaf_modules=[...] naming it") from None
            cls = type(model.get_submodule(f.path))
            if isinstance(f.error, OpaqueAutogradFunction):
                # every module of the class applies it: one warning, one retrace
                same = [p for p, m in model.named_modules() if type(m) is cls and p and
                        p not in leaves and not any(p.startswith(q + ".") for q in leaves)]
                warnings.warn(
                    f"asrfx: {len(same)} submodule(s) of type {cls.__name__} ('{same[0]}'"
                    f"{', ...' if len(same) > 1 else ''}) are kept as opaque leaves: "
                    f"{short_error(f.error)}. They run as in the model; nothing inside them "
                    f"will be converted.", stacklevel=3)
                leaves.keep(same, short_error(f.error))
                continue
            warnings.warn(
                f"asrfx: submodule '{f.path}' ({cls.__name__}) "
                f"cannot be traced symbolically ({short_error(f.error)}); it is kept as an opaque leaf "
                f"and nothing inside it will be converted.", stacklevel=3)
            leaves.keep([f.path], f"cannot be traced symbolically ({short_error(f.error)})")
        except Exception as e:  # noqa: BLE001 - the top level itself failed
            if example_inputs is not None and not with_values and _needs_values(e):
                with_values = True
                continue
            if isinstance(e, OpaqueAutogradFunction):
                raise TraceError(
                    "", f"{short_error(e)} (in {name}.forward)",
                    "apply the Function inside a submodule: a submodule that applies one stays "
                    "an opaque call, trained with the Function's own backward") from None
            hint = top_level_hint(model, example_inputs)
            raise TraceError(
                "", f"{type(e).__name__}: {short_error(e)} (in {name}.forward)",
                "remove data-dependent Python control flow from the top-level forward, or wrap the "
                "offending part in a submodule and pass its name in leaf_modules=[...] "
                "(asrfx.trace / asrfx.prepare accept leaf_modules)" +
                (f"; {hint}" if hint else "")) from None
    raise TraceError("", "too many untraceable submodules", "pass leaf_modules=[...]")


def _graph_signature(graph: fx.Graph) -> list[tuple]:
    names = {}
    sig = []
    for i, n in enumerate(graph.nodes):
        names[n] = i
        args = fx.node.map_arg((n.args, n.kwargs), lambda a: ("%", names.get(a, -1)))
        sig.append((n.op, str(n.target), repr(args)))
    return sig


class TraceResult:
    """The graphs of a model: ``train`` and ``eval`` (the same graph object when they agree).

    ``hooked`` maps the path of each submodule kept a leaf only because it has hooks to what
    hooks it has (see :func:`hooked_leaves`). ``shaped`` is True when the eval graph's shape
    metadata was recorded with the example inputs it was traced with (a checked trace); its
    ``output`` is then what that run of the eval graph returned (else None).
    """

    def __init__(self, root: nn.Module, train: GraphModule, eval: GraphModule, leaves: set[str]):
        self.root = root
        self.train = train
        self.eval = eval
        self.leaves = leaves
        self.hooked: dict[str, list[str]] = {}
        self.shaped = False
        self.output: Any = None

    @property
    def dual(self) -> bool:
        return self.train is not self.eval

    def modules(self) -> list[GraphModule]:
        return [self.train] if not self.dual else [self.train, self.eval]

    def build(self) -> GraphModule:
        """One module for both modes (a plain GraphModule when the graphs agree)."""
        for gm in self.modules():
            gm.graph.lint()
            gm.recompile()
        if not self.dual:
            return self.train
        return DualModeGraphModule(self.train, self.train.graph, self.eval.graph,
                                   class_name=type(self.root).__name__)


def trace_modes(model: nn.Module, leaf_modules: Sequence[str | type] = (),
                example_inputs: tuple | None = None) -> TraceResult:
    """Trace ``model`` in train and in eval mode (restoring its mode afterwards).

    With ``example_inputs`` the eval graph is validated against the eager model: fx silently
    drops Python branches that test a proxy (``isinstance(proxy, Tensor)`` is False while
    tracing), so a graph can trace fine and compute something else. A submodule whose traced
    graph fails or disagrees is retraced as a leaf, innermost first, with a warning.
    """
    leaves = Leaves()
    if example_inputs is None:
        return _report_hooks(model, _trace_modes(model, leaf_modules, leaves), leaf_modules)
    reference = eager_eval(model, example_inputs)
    for _ in range(200):
        tr = _trace_modes(model, leaf_modules, leaves, example_inputs)
        culprit, out = _validate(tr.eval, example_inputs, reference, leaves, leaf_modules)
        if culprit is None:
            tr.shaped = True  # the check ran the eval graph on the inputs, recording shapes
            tr.output = out
            return _report_hooks(model, tr, leaf_modules)
        path, why = culprit
        if path == "" and why.startswith("computes different"):
            path = _find_unfaithful_module(model, tr, leaf_modules, leaves, example_inputs,
                                           reference) or ""
        if path == "":
            hint = top_level_hint(model, example_inputs)
            raise TraceError("", f"the traced graph of {type(model).__name__} {why}",
                             "pass leaf_modules=[...] naming the submodule with Python control "
                             "flow on tensors (isinstance/None checks on inputs, len(x.shape))" +
                             (f"; {hint}" if hint else ""))
        warnings.warn(f"asrfx: submodule '{path}' ({type(model.get_submodule(path)).__name__}) "
                      f"traces to a graph that {why}; it is kept as an opaque leaf and nothing "
                      f"inside it will be converted.", stacklevel=3)
        leaves.keep([path], f"traces to a graph that {why}")
    raise TraceError("", "could not find a faithful graph", "pass leaf_modules=[...]")


def trace_eval(model: nn.Module, leaf_modules: Sequence[str | type] = (),
               example_inputs: tuple | None = None) -> TraceResult:
    """The eval-mode graph of ``model`` alone, not run: ``train`` and ``eval`` are that one
    graph, ``shaped`` is False. The example inputs only answer shape questions while tracing.

    For a caller that checks the end result against the eager model itself (fold): a graph
    that traced unfaithfully fails that check, and the caller then captures with
    :func:`trace_modes`, which finds and names the culprit.
    """
    return _report_hooks(model, _trace_eval_mode(model, leaf_modules, Leaves(), example_inputs),
                         leaf_modules)


def hooked_leaves(tr: TraceResult, leaf_modules: Sequence[str | type] = ()
                  ) -> dict[str, list[str]]:
    """The submodules the graphs of ``tr`` call only because they have hooks (a module that is
    a leaf anyway, a ``Conv2d``, is not listed), each with what hooks it has."""
    tracer = AsrTracer(list(leaf_modules) + sorted(tr.leaves))
    found: dict[str, list[str]] = {}
    for gm in tr.modules():
        for node in gm.graph.nodes:
            if node.op != "call_module" or str(node.target) in found:
                continue
            mod = submodule(tr.root, node.target)
            kinds = module_hooks(mod)
            if kinds and not tracer.is_plain_leaf(mod, str(node.target)):
                found[str(node.target)] = kinds
    return found


def _report_hooks(model: nn.Module, tr: TraceResult, leaf_modules: Sequence[str | type]
                  ) -> TraceResult:
    """Name the hooks a trace keeps (hooked submodules stay leaves) and those it cannot run
    (hooks on the model itself: the result is a new module), in warnings."""
    tr.hooked = hooked_leaves(tr, leaf_modules)
    for path, kinds in tr.hooked.items():
        warnings.warn(f"asrfx: submodule '{path}' ({type(model.get_submodule(path)).__name__}) "
                      f"has {describe_hooks(kinds)}; it is kept as an opaque leaf so that its "
                      f"hooks run, and nothing inside it will be converted or folded (remove "
                      f"them with handle.remove() before asrfx to convert it).", stacklevel=3)
    warn_own_hooks(model)
    return tr


def warn_own_hooks(model: nn.Module) -> None:
    """Warn that hooks registered on ``model`` itself do not carry over to a result built from
    its graph (a new module); a hook that changes the output fails the trace's check instead
    (see :func:`asrfx.inputs.top_level_hint`)."""
    own = module_hooks(model)
    if own:
        warnings.warn(f"asrfx: {type(model).__name__} has {describe_hooks(own)} on itself, "
                      f"which the result (a new module) does not run: register it on the "
                      f"result.", stacklevel=4)


def _find_unfaithful_module(model: nn.Module, tr: TraceResult,
                            leaf_modules: Sequence[str | type], leaves: set[str],
                            inputs: tuple, reference: Any, limit: int = 64) -> str | None:
    """The innermost traced-through submodule whose becoming a leaf makes the graph faithful."""
    paths: set[str] = set()
    for node in tr.eval.graph.nodes:
        stack = list((node.meta.get("nn_module_stack") or {}).keys())
        if node.op == "call_module" and stack and stack[-1] == node.target:
            stack = stack[:-1]
        paths.update(p for p in stack if p and p not in leaves)
    # a module whose traced forward emitted no node at all (a skipped branch) is in no stack
    called = {str(n.target) for n in tr.eval.graph.nodes if n.op == "call_module"}
    for name, _ in model.named_modules():
        if name and name not in leaves and not any(
                name == c or name.startswith(c + ".") for c in called):
            paths.add(name)
    for path in sorted(paths, key=lambda p: (-p.count("."), p))[:limit]:
        trial_leaves = Leaves(leaves | {path})
        trial = _trace_modes(model, leaf_modules, trial_leaves, inputs)
        if _validate(trial.eval, inputs, reference, trial_leaves, leaf_modules)[0] is None:
            return path
    return None


def eager_eval(model: nn.Module, inputs: tuple) -> Any:
    """``model``'s eval-mode output on ``inputs`` without gradients (its mode kept).

    Raises:
        InputError: the model fails on the inputs (names its signature and the inputs).
    """
    with preserve_modes(model):
        to_eval(model)
        try:
            with torch.no_grad():
                return model(*inputs)
        except Exception as e:  # noqa: BLE001
            raise InputError(inputs_failure(model, inputs, e)) from None


def _validate(gm: GraphModule, inputs: tuple, reference: Any, leaves: set[str],
              user_leaves: Sequence[str | type]) -> tuple[tuple[str, str] | None, Any]:
    """(None when ``gm`` (eval) reproduces ``reference``, else (module path to make a leaf,
    why); ``gm``'s output, None when it failed to run)."""
    from torch.utils._pytree import tree_flatten

    modes = preserve_modes(gm)
    to_eval(gm)
    runner = ShapeRecorder(gm)
    try:
        with torch.no_grad():
            out = runner.propagate(*inputs)
    except Exception as e:  # noqa: BLE001
        node = runner.current
        stack = list((node.meta.get("nn_module_stack") or {}).keys()) if node is not None else []
        if node is not None and node.op == "call_module" and stack and stack[-1] == node.target:
            stack = stack[:-1]  # the leaf being called is not the culprit; its caller is
        for path in reversed(stack):
            if path not in leaves and path not in user_leaves:
                return (path, f"fails to run ({short_error(e.__cause__ or e)})"), None
        return ("", f"fails to run ({short_error(e.__cause__ or e)})"), None
    finally:
        modes.__exit__()
    a, _ = tree_flatten(reference)
    b, _ = tree_flatten(out)
    same = len(a) == len(b) and all(
        (not isinstance(x, torch.Tensor)) or (isinstance(y, torch.Tensor) and x.shape == y.shape
                                              and _close(x, y))
        for x, y in zip(a, b))
    if same:
        return None, out
    return ("", "computes different outputs from the eager model"), out


def _close(x: torch.Tensor, y: torch.Tensor) -> bool:
    """The traced graph's output ``y`` is the eager ``x``: within 1e-4 of the largest finite
    magnitude (the graph runs the same kernels; only a different computation errs more), and
    NaN / Inf exactly where eager has them (the check of fold reports those)."""
    if not x.is_floating_point():
        return bool(torch.equal(x, y))
    finite = x[torch.isfinite(x)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    return bool(torch.allclose(x, y, rtol=1e-4, atol=1e-4 * scale, equal_nan=True))


def _code_names(code: Any, seen: set) -> set[str]:
    names = set(code.co_names)
    for c in code.co_consts:
        if hasattr(c, "co_names") and id(c) not in seen:
            seen.add(id(c))
            names |= _code_names(c, seen)
    return names


_MODE_READ_CACHE: dict[type, bool] = {}
# containers are never called, so they are not leaves in the sense that matters here
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential, nn.ParameterList, nn.ParameterDict)


def _class_reads_training(cls: type) -> bool:
    """Whether any method a class defines (outside torch.nn itself) reads ``.training``."""
    if cls not in _MODE_READ_CACHE:
        found = False
        for klass in cls.__mro__:
            if klass.__module__.startswith("torch.nn") or klass is object:
                continue
            for v in vars(klass).values():
                fn = getattr(v, "__func__", v)
                code = getattr(fn, "__code__", None)
                if code is not None and "training" in _code_names(code, set()):
                    found = True
                    break
            if found:
                break
        _MODE_READ_CACHE[cls] = found
    return _MODE_READ_CACHE[cls]


def _may_depend_on_mode(model: nn.Module, leaf_modules: Sequence[str | type],
                        leaves: set[str]) -> bool:
    """False when no traced-through module's code reads ``self.training`` (one trace suffices)."""
    tracer = AsrTracer(list(leaf_modules) + sorted(leaves))

    def reads(m: nn.Module, name: str) -> bool:  # (a leaf's insides are not traced)
        if name and tracer.is_leaf_module(m, name) and not isinstance(m, _CONTAINERS):
            return False
        if _class_reads_training(type(m)) or traced_norm(m):
            return True
        return any(reads(c, f"{name}.{k}" if name else k)
                   for k, c in m._modules.items() if c is not None)

    return reads(model, "")


def uncompiled_graph_module(root: nn.Module, graph: fx.Graph, name: str) -> GraphModule:
    """``GraphModule(root, graph, name)`` without generating its Python code (about 25 ms for a
    ResNet-164 graph). For graphs that passes only read, rewrite and interpret: the module has
    no ``forward`` until ``recompile()`` (calling it fails loudly), and every consumer of one
    compiles its final module (:meth:`TraceResult.build`, fold's cleanup)."""
    original = GraphModule.recompile
    GraphModule.recompile = lambda self: None  # type: ignore[method-assign]
    try:
        return GraphModule(root, graph, name)
    finally:
        GraphModule.recompile = original  # type: ignore[method-assign]


def _trace_eval_mode(model: nn.Module, leaf_modules: Sequence[str | type], leaves: Leaves,
                     example_inputs: tuple | None = None) -> TraceResult:
    """The graph of ``model`` in eval mode, as both graphs of the result (its modes kept)."""
    with preserve_modes(model):
        to_eval(model)
        graph = _trace_with_fallback(model, leaf_modules, leaves, example_inputs)
    gm = uncompiled_graph_module(model, graph, type(model).__name__)
    return TraceResult(model, gm, gm, leaves)


def _trace_modes(model: nn.Module, leaf_modules: Sequence[str | type], leaves: Leaves,
                 example_inputs: tuple | None = None) -> TraceResult:
    if not _may_depend_on_mode(model, leaf_modules, leaves):
        return _trace_eval_mode(model, leaf_modules, leaves, example_inputs)
    modes = preserve_modes(model)
    name = type(model).__name__
    try:
        model.train()
        g_train = _trace_with_fallback(model, leaf_modules, leaves, example_inputs)
        n_leaves = len(leaves)
        model.eval()
        g_eval = _trace_with_fallback(model, leaf_modules, leaves, example_inputs)
        if len(leaves) != n_leaves:
            # a module became a leaf only in eval mode: both graphs must agree on leaves
            model.train()
            g_train = _trace_with_fallback(model, leaf_modules, leaves, example_inputs)
    finally:
        modes.__exit__()
    gm_train = uncompiled_graph_module(model, g_train, name)
    if _graph_signature(g_train) == _graph_signature(g_eval):
        return TraceResult(model, gm_train, gm_train, leaves)
    gm_eval = uncompiled_graph_module(model, g_eval, name)
    _share_attributes(gm_train, gm_eval)
    return TraceResult(model, gm_train, gm_eval, leaves)


def _share_attributes(a: GraphModule, b: GraphModule) -> None:
    """Make ``b`` use the very same container modules as ``a`` wherever both have a path."""
    for name, mod in list(b.named_children()):
        if hasattr(a, name):
            setattr(b, name, getattr(a, name))
        else:
            setattr(a, name, mod)
    for name, t in list(b.named_parameters(recurse=False)) + list(b.named_buffers(recurse=False)):
        if not hasattr(a, name):
            _copy_attr(b, a, name)


class DualModeGraphModule(GraphModule):
    """A GraphModule with a second graph for eval mode.

    ``forward`` runs ``self.graph`` (traced in train mode) when ``self.training`` is True and
    ``self.eval_graph`` otherwise. Both graphs address the same submodules and parameters, so
    there is one ``state_dict``, and ``.to()``, optimizers and hooks see one set of weights.
    """

    def __init__(self, root: nn.Module | dict, graph: fx.Graph, eval_graph: fx.Graph,
                 class_name: str = "GraphModule"):
        self._asrfx_eval_graph_pending = eval_graph
        super().__init__(root, graph, class_name)
        for node in eval_graph.nodes:
            if node.op in ("get_attr", "call_module"):
                try:
                    self.get_submodule(node.target) if node.op == "call_module" else \
                        _getattr_path(self, node.target)
                except AttributeError:
                    _copy_attr(root, self, node.target)
        self.eval_graph = eval_graph
        del self._asrfx_eval_graph_pending
        self.recompile()

    @property
    def eval_graph(self) -> fx.Graph:
        return self.__dict__["_asrfx_eval_graph"]

    @eval_graph.setter
    def eval_graph(self, g: fx.Graph) -> None:
        self.__dict__["_asrfx_eval_graph"] = g

    def recompile(self):
        code = super().recompile()
        if "_asrfx_eval_graph" not in self.__dict__:
            return code
        cls = type(self)
        train_forward = cls.forward
        ecode = self.eval_graph.python_code(root_module="self")
        self.eval_code = ecode.src
        eval_forward = _forward_from_src(ecode.src, ecode.globals)

        def forward(self, *args, **kwargs):
            fn = train_forward if self.training else eval_forward
            return fn(self, *args, **kwargs)

        cls.forward = forward
        return code

    def _deepcopy_init(self):
        def init(res, fake_root, graph):
            DualModeGraphModule.__init__(res, fake_root, graph,
                                         fake_root.__dict__["_asrfx_eval_graph"])
        return init

    def __reduce__(self):
        raise TypeError("a DualModeGraphModule is saved through its state_dict: "
                        "torch.save(model.state_dict(), path), then asrfx.prepare the original "
                        "architecture again and load_state_dict")


class preserve_modes:
    """Context manager restoring every submodule's own train/eval flag on exit.

    ``model.train(flag)`` sets the flag of every submodule; a model in a deliberately mixed state
    (a frozen BatchNorm in eval mode inside a training model) would lose it.
    """

    def __init__(self, model: nn.Module):
        self.modes = [(m, m.training) for m in model.modules()]

    def __enter__(self) -> "preserve_modes":
        return self

    def __exit__(self, *exc: Any) -> None:
        for m, flag in self.modes:
            if m.training != flag:  # (setting a module attribute is slow; most are unchanged)
                m.training = flag


def _getattr_path(mod: nn.Module, target: str) -> Any:
    obj: Any = mod
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def trace(model: nn.Module, example_inputs: Any = None, *,
          leaf_modules: Sequence[str | type] = ()) -> GraphModule:
    """Capture ``model`` as a torch.fx GraphModule.

    Args:
        model: any ``nn.Module``. It is not modified (its mode is restored after tracing).
        example_inputs: a tensor or tuple of tensors; when given, every node gets shape metadata
            (``node.meta["tensor_meta"]``).
        leaf_modules: qualified module names or module types to keep as opaque calls.

    Returns:
        A GraphModule sharing parameters with ``model``; a :class:`DualModeGraphModule` when the
        model's forward differs between train and eval mode.

    Raises:
        TraceError: the top-level forward cannot be traced (names the reason and the fix).
        InputError: ``model`` is not an ``nn.Module``, ``example_inputs`` are not tensors, or
            the model fails on them.

    Example:
        >>> gm = asrfx.trace(model, torch.randn(1, 3, 32, 32))
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"asrfx.trace expects an nn.Module, got {type(model).__name__}")
    inputs = normalize_inputs(example_inputs, model)
    if inputs is not None:
        check_example_inputs(inputs, model)
    from .capture import capture  # the seam imports this module

    tr = capture(model, inputs, leaf_modules)
    if inputs is not None:
        for gm in tr.modules():
            propagate_shapes(gm, inputs)
    return tr.build()
