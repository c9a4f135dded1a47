"""SyncBatchNorm -> BatchNorm1d/2d/3d, so a model trained with SyncBatchNorm folds like any other.

``nn.SyncBatchNorm.convert_sync_batchnorm`` turns every BatchNorm of a model into one
``SyncBatchNorm`` class that accepts any input of rank >= 2. In eval mode (and without a process
group) a SyncBatchNorm computes exactly what a BatchNorm does, but the fold passes only take
*exact* ``BatchNorm1d/2d/3d`` (a subclass's forward may differ), so a SyncBatchNorm would keep
its scale and never fuse into its conv. :func:`revert_sync_batchnorm` undoes the conversion on a
GraphModule: the class is read from the rank of each call site's input (``tensor_meta`` from
shape propagation), parameters and buffers are the same tensors under the same names.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch import nn

from asrfx.inputs import normalize_inputs

from asrfx.report import Site

from .graph_utils import set_attr_path, submodule, tensor_shape
from .protocol import PassContext, record
from .shapes import propagate_shapes

__all__ = ["revert_sync_batchnorm"]

# input rank -> the BatchNorm class whose _check_input_dim accepts it
_BY_RANK = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _graphs(gm: fx.GraphModule) -> list[fx.Graph]:
    graphs = [gm.graph]
    # a DualModeGraphModule's second graph, read through its public ``eval_graph`` (a plain
    # GraphModule has none); duck-typed, so that no pass imports the tracer
    eval_graph = getattr(gm, "eval_graph", None)
    if isinstance(eval_graph, fx.Graph) and eval_graph is not gm.graph:
        graphs.append(eval_graph)
    return graphs


def _input_rank(node: fx.Node) -> int | None:
    src = node.args[0] if node.args else node.kwargs.get("input")
    shape = tensor_shape(src)
    return None if shape is None else len(shape)


def _batchnorm_like(sync: nn.SyncBatchNorm, cls: type) -> nn.Module:
    """A ``cls`` holding ``sync``'s parameters and buffers (the same tensors) and settings."""
    bn = cls(sync.num_features, eps=sync.eps, momentum=sync.momentum, affine=sync.affine,
             track_running_stats=sync.track_running_stats, device="meta")
    # the same Parameter / buffer objects: state_dict names, dtype, device, requires_grad and
    # any optimizer holding them stay valid
    for name in ("weight", "bias"):
        bn._parameters[name] = sync._parameters.get(name)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        bn._buffers[name] = sync._buffers.get(name)
    bn.training = sync.training
    if hasattr(sync, "qconfig"):
        bn.qconfig = sync.qconfig
    return bn


def revert_sync_batchnorm(gm: fx.GraphModule, ctx: PassContext | None = None, *,
                          example_inputs: Any = None) -> list[Site]:
    """Replace every exact ``nn.SyncBatchNorm`` that ``gm`` calls by ``BatchNorm1d/2d/3d``, in place.

    The dimensionality comes from the rank of the input at the module's call sites (2 or 3 ->
    1d, 4 -> 2d, 5 -> 3d), read from the nodes' shape metadata; ``example_inputs`` (a tuple of
    tensors), when given, refreshes that metadata first. The new module keeps the old one's
    name, parameters, buffers (the same tensors), eps, momentum, affine, track_running_stats and
    train/eval flag; the process group is dropped. Subclasses of SyncBatchNorm are left alone.
    A module is kept (and its record says why) when the rank of an input is unknown, above 5,
    or maps to different classes at different call sites. For a DualModeGraphModule the call
    sites of both graphs count.

    Returns:
        One "SyncBatchNorm" record per SyncBatchNorm called: action ``"reverted"`` with the
        new class name as target, or ``"kept"`` with a reason and a code (``rank-unknown``,
        ``rank-unsupported``, ``ranks-differ``).
    """
    if example_inputs is not None:
        inputs = normalize_inputs(example_inputs, gm)
        if inputs is not None:
            propagate_shapes(gm, inputs)
    ranks: dict[str, set] = {}
    for graph in _graphs(gm):
        for node in graph.nodes:
            if node.op != "call_module":
                continue
            target = str(node.target)
            if type(submodule(gm, target)) is nn.SyncBatchNorm:
                ranks.setdefault(target, set()).add(_input_rank(node))
    records = []
    for target, rs in ranks.items():
        sync = submodule(gm, target)
        rec = record(f"syncbn:{target}", target, "SyncBatchNorm", sync.num_features)
        records.append(rec)
        if None in rs:
            rec.code, rec.reason = "rank-unknown", ("the rank of its input is unknown (no "
                                                    "shape metadata); pass example_inputs")
            continue
        classes = {_BY_RANK.get(r) for r in rs}
        if None in classes:
            rec.code, rec.reason = ("rank-unsupported",
                                    f"input of rank {max(rs)}: no BatchNorm class takes it")
            continue
        if len(classes) > 1:
            rec.code, rec.reason = "ranks-differ", (f"called on inputs of ranks {sorted(rs)}: "
                                                    f"no one BatchNorm class takes them all")
            continue
        (cls,) = classes
        set_attr_path(gm, target, _batchnorm_like(sync, cls))
        rec.action, rec.target = "reverted", cls.__name__
    return records
