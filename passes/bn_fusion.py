"""Conv -> BatchNorm (and Linear -> BatchNorm1d) fusion for the deploy graph.

An eval-mode BatchNorm is a per-channel affine map (:func:`asrfx.foldmath.batchnorm_affine`),
so fusing it is folding that map into the producer's output rows: the same producer fold
targets as :mod:`.scale_fold` (:mod:`.targets`), restricted to those marked
``fuses_batchnorm`` (convolutions and Linear layers, module or functional), also when the
norm reads a channel concatenation of such layers (each takes its slice). Preconditions: an
exact BatchNorm type with running statistics, and a producer whose output nothing else reads. A
layer called at several places is cloned for the fused call site.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.fx as fx

from asrfx import foldmath
from asrfx.report import Site
from .graph_utils import module_path, submodule, value_readers
from .layers import BATCH_NORM_TYPES, batch_norm_call
from .protocol import PassContext, Step, record, run_steps
from .scale_fold import Parts, cat_parts, apply_plan, forward_folds, rows_source
from .targets import Fold, Refusal, producer_target

__all__ = ["fuse_batchnorm", "batchnorm_steps"]


def _fuse(gm: fx.GraphModule, bn_node: fx.Node, bn: Any, path: str) -> list[Site]:
    """Fuse one norm: ``bn`` is the BatchNorm module called, or the eval-mode
    ``F.batch_norm`` call of a traced-through subclass (:class:`~.layers.BatchNormCall`, same
    attribute names); ``path`` names it while it is kept."""
    rec = record(f"bn:{bn_node.name}", path, "conv+bn", bn.num_features)
    if bn.running_mean is None:
        rec.reason, rec.code = ("no running statistics (uses batch statistics in eval)",
                                "no-running-stats")
        return [rec]
    src = bn_node.args[0] if bn_node.args else bn_node.kwargs.get("input")
    if not isinstance(src, fx.Node):
        rec.reason, rec.code = "no input node", "no-input-node"
        return [rec]
    if value_readers(src) != 1:
        rec.reason, rec.code = "its input is read elsewhere too", "producer-read-elsewhere"
        return [rec]
    s, t = foldmath.batchnorm_affine(bn.running_mean, bn.running_var, bn.eps, bn.weight,
                                     bn.bias)
    return _fuse_affine(gm, bn_node, src, s, t, rec, module_path(bn_node) or path)


def _fuse_affine(gm: fx.GraphModule, bn_node: fx.Node, src: fx.Node, s: torch.Tensor,
                 t: torch.Tensor, rec: Site, path: str) -> list[Site]:
    """Fold the norm's affine map ``x * s + t`` into the layer producing ``src`` (Conv ->
    BatchNorm fusion), else forward into every layer reading the norm (a BatchNorm1d before a
    Linear head: its input columns), and drop the norm; or say why not."""
    # (M, C) rows of a layer's (..., C) tokens: the norm's channels are the layer's last dim
    tokens = rows_source(src)
    layer, axis = (src, 1) if tokens is None else (tokens, -1)
    target = producer_target(gm, layer)
    if target is not None and target.fuses_batchnorm and value_readers(layer) == 1 and \
            not target.check(gm, layer, s, t, axis):
        rec.target = target.apply(gm, layer, s, t).rpartition(" (")[0]
    elif (parts := _concatenated_convs(gm, src, s, t)) is not None:
        rec.target = apply_plan(gm, parts)
    else:
        sinks = forward_folds(gm, bn_node, s, t, 0, set())
        if isinstance(sinks, Refusal):
            rec.reason, rec.code = "not preceded by an exact Conv/Linear", "no-conv-producer"
            return [rec]
        rec.target = apply_plan(gm, sinks)
    bn_node.replace_all_uses_with(src)
    gm.graph.erase_node(bn_node)
    rec.action, rec.path = "fused", path
    return [rec]


def _concatenated_convs(gm: fx.GraphModule, src: fx.Node, s: torch.Tensor, t: torch.Tensor
                        ) -> Parts | None:
    """A norm after a channel concatenation of layers only the concatenation reads
    (``BN(cat([conv_a(x), conv_b(y)], 1))``, MixNet's mixed depthwise convolutions): each
    layer takes its slice of the affine map, ``cat([conv_a'(x), conv_b'(y)], 1)``. All parts
    or none; None when a part is not such a layer."""
    parts = cat_parts(src, s, t)
    if parts is None:
        return None
    folds = []
    for p, sp, tp in parts:
        if value_readers(p) != 1:
            return None
        target = producer_target(gm, p)
        if target is None or not target.fuses_batchnorm or target.check(gm, p, sp, tp, 1):
            return None
        folds.append(Fold(target, p, sp, tp))
    return Parts(folds, total=False)


def _norm(gm: fx.GraphModule, node: fx.Node) -> tuple[Any, str] | None:
    """(norm, its name) when ``node`` calls an exact BatchNorm module, or is an eval-mode
    ``F.batch_norm`` on get_attr statistics; else None."""
    if node.op == "call_module":
        mod = submodule(gm, node.target)
        return (mod, str(node.target)) if type(mod) in BATCH_NORM_TYPES else None
    bn = batch_norm_call(gm, node)
    return None if bn is None else (bn, module_path(node) or bn.owner)


def batchnorm_steps(gm: fx.GraphModule) -> Iterator[Step]:
    """One step per call of an exact BatchNorm, or eval-mode ``F.batch_norm`` on get_attr
    statistics (key ``"bn:<node name>"``); each reads the norm when it runs."""
    for bn_node in list(gm.graph.nodes):
        if _norm(gm, bn_node) is not None:
            yield Step(f"bn:{bn_node.name}", lambda n=bn_node: _fuse(gm, n, *_norm(gm, n)))


def fuse_batchnorm(gm: fx.GraphModule, ctx: PassContext | None = None) -> list[Site]:
    """Fuse every eligible conv/linear -> BatchNorm pair of ``gm`` (which must be in eval mode).

    Returns:
        One "conv+bn" record per BatchNorm looked at; kept ones say why, with a code
        (``no-running-stats``, ``producer-read-elsewhere``, ``no-conv-producer``).
    """
    return run_steps(batchnorm_steps(gm), ctx)
