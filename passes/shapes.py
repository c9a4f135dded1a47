"""Shape recording: every node's example shape and dtype in ``node.meta["tensor_meta"]``.

The passes read shapes from that metadata (:func:`graph_utils.tensor_shape`), so a graph is run
once on example inputs before them, and again after an edit that adds nodes.
:func:`propagate_shapes` does that for a whole module; :class:`ShapeRecorder` is the interpreter
underneath, for callers that also want some nodes' values or to know which node failed.
:func:`defer_shapes` puts off that run until a pass first reads a shape: fold's passes read
none on most graphs (a plain ResNet's), and then the run is saved.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx as fx
from torch.fx.graph_module import GraphModule
from torch.fx.passes.shape_prop import TensorMetadata

from asrfx.errors import InputError
from asrfx.inputs import inputs_failure
from .graph_utils import to_eval

__all__ = ["ShapeRecorder", "propagate_shapes", "defer_shapes", "drop_deferred"]


def _light_meta(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return TensorMetadata(obj.shape, obj.dtype, obj.requires_grad, (), None, False, {})
    if isinstance(obj, (list, tuple)):
        metas = [_light_meta(o) for o in obj]
        return type(obj)(metas) if any(m is not None for m in metas) and \
            not hasattr(obj, "_fields") else None
    return None


class ShapeRecorder(fx.Interpreter):
    """Runs a GraphModule once, recording each node's shape and dtype in ``meta["tensor_meta"]``.

    Lighter than ``torch.fx.passes.shape_prop.ShapeProp`` (no strides or memory-format probes,
    no traceback printing); remembers the node being run (``current``) so a failure can be
    traced to its module, and keeps the values of the nodes in ``keep`` (in ``values``, tensors
    detached and cloned). Runs in whatever mode ``gm`` is in, with gradients as the caller set
    them; an exception of the graph propagates as raised.
    """

    def __init__(self, gm: GraphModule, keep: Iterable[fx.Node] = ()):
        super().__init__(gm)
        self.current: fx.Node | None = None
        self.keep = set(keep)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        # fx's run_node without its per-node debug log and current-node context (which only
        # tracing interpreters read): a third of the interpreter's own time
        self.current = n
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        out = getattr(self, n.op)(n.target, args, kwargs)
        meta = _light_meta(out)
        if meta is not None:
            n.meta["tensor_meta"] = meta
        if n in self.keep:
            self.values[n] = out.detach().clone() if isinstance(out, torch.Tensor) else out
        return out

    def propagate(self, *args: Any) -> Any:
        out = self.run(*args)
        drop_deferred(self.graph)  # every tensor node now has its shape; the rest has none
        return out

    def fetch_attr(self, target: str) -> Any:
        """The submodule, parameter or buffer ``target`` names, looked up in the registered
        submodules (see :func:`asrfx.passes.graph_utils.submodule`); anything else as fx does."""
        *path, last = target.split(".")
        mod = self.module
        for part in path:
            mod = mod._modules.get(part)
            if mod is None:
                return super().fetch_attr(target)
        for table in (mod._modules, mod._parameters, mod._buffers):
            found = table.get(last)
            if found is not None:
                return found
        return super().fetch_attr(target)


def propagate_shapes(gm: GraphModule, example_inputs: tuple) -> None:
    """Record ``tensor_meta`` (shape, dtype) on every node by running ``gm`` in eval mode.

    Runs without gradients and in eval mode, and puts every buffer back afterwards: a
    traced-through norm's ``F.batch_norm(..., training=True)`` in a train graph (its flag is
    baked in) would otherwise update its running statistics and counter. Every submodule's own
    train/eval flag is restored too.

    Raises:
        InputError: ``gm`` fails on ``example_inputs`` (the message names its signature and the
            inputs given).
    """
    modes = [(m, m.training) for m in gm.modules()]  # each submodule's own flag
    buffers = [(b, b.clone()) for b in gm.buffers()]
    to_eval(gm)
    try:
        with torch.no_grad():
            ShapeRecorder(gm).propagate(*example_inputs)
    except Exception as e:  # noqa: BLE001
        raise InputError(inputs_failure(gm, example_inputs, e)) from None
    finally:
        for m, flag in modes:
            m.training = flag
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


class _Deferred:
    """The one shape-recording run owed to the nodes of ``gm`` (see :func:`defer_shapes`)."""

    def __init__(self, gm: GraphModule, inputs: tuple):
        self.gm, self.inputs, self.done = gm, inputs, False
        self.error: Exception | None = None

    def resolve(self) -> None:
        if self.error is not None:  # every later read fails too: never a silent "no shape"
            raise InputError(f"the shapes of this graph could not be recorded: {self.error}")
        if not self.done:
            self.done = True
            try:
                propagate_shapes(self.gm, self.inputs)  # drops every deferred entry
            except Exception as e:
                self.error = e
                raise


class DeferredTensorMeta:
    """Stands in ``node.meta["tensor_meta"]`` for metadata not yet recorded.

    Reading any attribute (``.shape``, ``.dtype``; ``getattr(meta, "shape", None)``,
    ``hasattr``) first runs the graph once on the example inputs (:func:`propagate_shapes`),
    which replaces this entry on every tensor-valued node and removes it from the others, and
    then answers from the recorded metadata: a reader sees what it would have seen had the
    shapes been recorded up front, or an ``AttributeError`` for a node without a tensor. When
    that run fails, this read and every later one raises
    :class:`~asrfx.errors.InputError` (never an ``AttributeError``, which
    ``getattr(meta, "shape", None)`` would turn into a silent "no shape").
    """

    __slots__ = ("_deferred", "_node")

    def __init__(self, deferred: _Deferred, node: fx.Node):
        self._deferred, self._node = deferred, node

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # copy / pickle protocol probes read no shape
            raise AttributeError(name)
        self._deferred.resolve()
        meta = self._node.meta.get("tensor_meta")
        if meta is None or isinstance(meta, DeferredTensorMeta):
            raise AttributeError(name)
        return getattr(meta, name)


def defer_shapes(gm: GraphModule, example_inputs: tuple) -> None:
    """Give every node of ``gm`` a :class:`DeferredTensorMeta`: the graph runs on
    ``example_inputs`` (as :func:`propagate_shapes`) only when a shape is first read, or not at
    all. A :class:`ShapeRecorder` run of ``gm`` in the meantime records them as well.

    The caller must be able to stand a failure at the first read (the graph may fail to run,
    with :class:`~asrfx.errors.InputError`) and should call :func:`drop_deferred` when done.
    """
    deferred = _Deferred(gm, example_inputs)
    for n in gm.graph.nodes:
        n.meta["tensor_meta"] = DeferredTensorMeta(deferred, n)


def drop_deferred(graph: fx.Graph) -> None:
    """Remove the :class:`DeferredTensorMeta` entries still on ``graph``'s nodes."""
    for n in graph.nodes:
        if isinstance(n.meta.get("tensor_meta"), DeferredTensorMeta):
            del n.meta["tensor_meta"]
