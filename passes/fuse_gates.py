"""The fused training form: a converted gate applied through its BatchNorm's affine.

After the ASR rewrite a converted site computes ``BN(x) * g`` with ``g = A(psi)`` one value per
channel (its excitation runs once per step, on psi). Multiplying the whole map by ``g`` costs a
pass over every element in the forward and two in the backward; folding ``g`` into the norm's
affine costs one multiply per channel:

    g * (gamma * xhat + beta) = (g * gamma) * xhat + (g * beta)

in training mode (batch statistics) as in eval mode (running ones), since ``xhat`` does not
depend on ``gamma`` or ``beta``; the running statistics are updated from ``x`` either way. ``g``
is recomputed from psi at every step, so gradients reach psi, the excitation and the norm
alike. This is online re-parameterization in the sense of OREPA (Hu et al., "Online
Convolutional Re-parameterization", CVPR 2022): training-time structure collapsed while training.

The gate also crosses what lies between the norm and the map when it commutes with a
per-channel scale: ``nn.Identity``, torch's dropouts (an elementwise mask) and, for a positive
gate, (leaky) ReLUs -- timm's ``BatchNormAct2d`` is ``F.batch_norm -> drop -> act``.

A ``torch.nn`` BatchNorm module becomes its ``Gated`` twin in place (same parameters, buffers and
state_dict names; ``forward(x)`` as before, ``forward(x, scale)`` fused); a traced-through
``F.batch_norm`` call gets ``weight * g`` and ``bias * g``. :func:`unfuse_gates` turns a fused
graph back into ``BN(x) * g`` (fold does, then folds as usual).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .asr_rewrite import positive_gate
from .find_attention import AttentionSite
from .graph_utils import module_hooks, reads_shape_only, safe_dce, stable_toposort, tensor_shape
from .layers import batch_norm_args

__all__ = ["GatedBatchNorm1d", "GatedBatchNorm2d", "GatedBatchNorm3d", "fuse_gates",
           "unfuse_gates", "GATED", "PLAIN"]


class _Gated:
    """``forward(x, scale)``: the BatchNorm of ``x`` with weight and bias scaled per channel by
    ``scale`` (any shape with ``num_features`` elements), i.e. ``scale * BN(x)``; without
    ``scale`` exactly the BatchNorm. Statistics, momentum and the batch counter behave as in
    ``torch.nn.BatchNorm``."""

    def forward(self, input: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        if scale is None:
            return super().forward(input)  # type: ignore[misc]
        self._check_input_dim(input)  # type: ignore[attr-defined]
        s = scale.reshape(-1)
        factor = 0.0 if self.momentum is None else self.momentum  # type: ignore[attr-defined]
        tracked = self.training and self.track_running_stats  # type: ignore[attr-defined]
        if tracked and self.num_batches_tracked is not None:  # type: ignore[attr-defined]
            self.num_batches_tracked.add_(1)  # type: ignore[attr-defined]
            if self.momentum is None:  # type: ignore[attr-defined]
                factor = 1.0 / float(self.num_batches_tracked)  # type: ignore[attr-defined]
        stats = not self.training or self.track_running_stats  # type: ignore[attr-defined]
        mean = self.running_mean if stats else None  # type: ignore[attr-defined]
        var = self.running_var if stats else None  # type: ignore[attr-defined]
        use_batch = self.training or (mean is None and var is None)
        weight = s if self.weight is None else self.weight * s  # type: ignore[attr-defined]
        bias = None if self.bias is None else self.bias * s  # type: ignore[attr-defined]
        return F.batch_norm(input, mean, var, weight, bias, use_batch, factor,
                            self.eps)  # type: ignore[attr-defined]


class GatedBatchNorm1d(_Gated, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` that also takes a per-channel ``scale`` (see :class:`_Gated`)."""


class GatedBatchNorm2d(_Gated, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that also takes a per-channel ``scale`` (see :class:`_Gated`)."""


class GatedBatchNorm3d(_Gated, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` that also takes a per-channel ``scale`` (see :class:`_Gated`)."""


GATED = {nn.BatchNorm1d: GatedBatchNorm1d, nn.BatchNorm2d: GatedBatchNorm2d,
         nn.BatchNorm3d: GatedBatchNorm3d}
PLAIN = {v: k for k, v in GATED.items()}


def _map_of(site: AttentionSite) -> fx.Node | None:
    """The tensor ``site``'s multiply scales (its other operand is the gate, maybe expanded)."""
    mul = site.mul
    if mul.op == "call_method" and mul.target != "mul" or \
            mul.op == "call_function" and mul.target not in (operator.mul, torch.mul):
        return None  # an in-place ``mul_`` changes its operand: leave it
    for a, b in ((mul.args[0], mul.args[1]), (mul.args[1], mul.args[0])):
        gate = b.args[0] if isinstance(b, fx.Node) and b.op == "call_method" and \
            b.target in ("expand", "expand_as") else b
        if gate is site.gate and isinstance(a, fx.Node):
            return a
    return None


_RELUS = (nn.ReLU, nn.LeakyReLU)
_RELU_CALLS = {F.relu, torch.relu, F.leaky_relu, "relu"}


def _value_readers(n: fx.Node, mul: fx.Node) -> list[fx.Node]:
    """Readers of ``n``'s values: not its shape, and not ``g.expand_as(n)`` feeding ``mul``."""
    return [u for u in n.users if not reads_shape_only(u) and not (
        u.op == "call_method" and u.target == "expand_as" and u.args[1] is n and
        list(u.users) == [mul])]


def _relu_input(gm: fx.GraphModule, n: fx.Node) -> fx.Node | None:
    """The input of ``n`` when it is a (leaky) ReLU: a positive per-channel scale crosses it,
    ``relu(g * y) = g * relu(y)``."""
    if n.op == "call_module" and type(gm.get_submodule(str(n.target))) in _RELUS or \
            n.op in ("call_function", "call_method") and n.target in _RELU_CALLS:
        return n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
    return None


def _norm_call(gm: fx.GraphModule, n: fx.Node) -> bool:
    """``n`` is a torch BatchNorm module call (without hooks: they would see the scale as a
    second input) or an ``F.batch_norm`` whose affine is nodes."""
    if n.op == "call_module":
        mod = gm.get_submodule(str(n.target))
        return type(mod) in GATED and len(n.args) == 1 and not n.kwargs and \
            not module_hooks(mod)
    args = batch_norm_args(n)
    return args is not None and all(args[k] is None or isinstance(args[k], fx.Node)
                                    for k in ("weight", "bias"))


_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def _passes_through(gm: fx.GraphModule, n: fx.Node) -> fx.Node | None:
    """The input of ``n`` when it is an ``nn.Identity`` or a torch dropout module (a per-channel
    scale crosses it: dropout multiplies each element by its mask)."""
    if n.op == "call_module" and len(n.args) == 1 and not n.kwargs and \
            isinstance(n.args[0], fx.Node):
        mod = gm.get_submodule(str(n.target))
        if type(mod) in _PASS_THROUGH and not module_hooks(mod):
            return n.args[0]
    return None


def _why_not(gm: fx.GraphModule, site: AttentionSite
             ) -> tuple[str, fx.Node | None, list[fx.Node]]:
    """Why ``site``'s gate cannot go into a norm's affine ('' when it can), the norm, and the
    nodes from the norm's output to the gated map (identities, dropouts and, for a positive
    gate, (leaky) ReLUs, which a per-channel scale crosses: timm's ``BatchNormAct2d`` is
    ``F.batch_norm`` -> ``drop`` (Identity) -> ``act``)."""
    if site.fusion != "mul" or site.more_muls:
        return "not one multiply by the gate", None, []
    if site.rows is not None:
        return "its excitation runs on psi expanded to the batch", None, []
    x = _map_of(site)
    if x is None:
        return "the multiply is in place or does not read the gate directly", None, []
    if _value_readers(x, site.mul) != [site.mul]:
        return "the norm's output is read elsewhere too", None, []
    xs, gs = tensor_shape(x), tensor_shape(site.gate)
    if xs is None or gs is None or len(gs) != len(xs) or gs[1] != xs[1] or \
            any(d != 1 for d in gs[2:]) or tensor_shape(site.mul) != xs:
        return "the gate is not one value per channel of the norm's output", None, []
    chain: list[fx.Node] = []
    y = x
    while not _norm_call(gm, y):
        nxt = _passes_through(gm, y)
        if nxt is None:
            nxt = _relu_input(gm, y)  # relu(BN(z)) * g = relu(g * BN(z)) for g > 0
            if nxt is not None and not positive_gate(gm, site.gate):
                nxt = None
        if nxt is None or [u for u in nxt.users if not reads_shape_only(u)] != [y]:
            return "the gated map is not a torch BatchNorm's output (or one through " \
                   "identities, dropouts and, for a positive gate, ReLUs)", None, []
        chain.append(y)
        y = nxt
    return "", y, chain


def fuse_gates(gm: fx.GraphModule, sites: list[AttentionSite]) -> list[str]:
    """Fold each converted site's gate into the affine of the BatchNorm producing its map (also
    through a ReLU for a positive gate), in the training graph ``gm`` (shapes recorded before
    the ASR rewrite). Returns a note per site left as a multiply, saying why (the form is exact
    either way)."""
    graph = gm.graph
    notes = []
    for site in sites:
        why, norm, chain = _why_not(gm, site)
        if norm is None:
            notes.append(f"{site.path or '(top)'}: the gate stays a multiply in the training "
                         f"form ({why})")
            continue
        mul, x = site.mul, _map_of(site)
        source = norm.args[0] if norm.op == "call_module" else batch_norm_args(norm)["input"]
        # shape reads of the norm and of what follows it to the map (an SE's ``b, c =
        # x.size()[:2]`` sizing its gate, which the fused norm now reads) read the norm's
        # input: same shape
        for n in [norm, *chain]:
            n.replace_all_uses_with(source, delete_user_cb=reads_shape_only)
        if norm.op == "call_module":
            mod = gm.get_submodule(str(norm.target))
            mod.__class__ = GATED[type(mod)]  # same object: parameters and names kept
            with graph.inserting_before(mul):
                fused = graph.call_module(str(norm.target), (norm.args[0], site.gate))
            fused.meta = dict(norm.meta)
            norm.replace_all_uses_with(fused)  # value readers: the ReLU, or the multiply
            _erase_with_dead_readers(norm)
        else:
            args = batch_norm_args(norm)
            with graph.inserting_before(mul):
                s = graph.call_method("reshape", (site.gate, -1))
                w = s if args["weight"] is None else graph.call_function(
                    operator.mul, (args["weight"], s))
                b = None if args["bias"] is None else graph.call_function(
                    operator.mul, (args["bias"], s))
            kwargs = {k: args[k] for k in ("training", "momentum", "eps")}
            norm.args = (args["input"], args["running_mean"], args["running_var"])
            norm.kwargs = dict(kwargs, weight=w, bias=b)
            fused = norm
        out = fused if x is norm else x  # the end of the chain (a ReLU...) reading the norm
        mul.replace_all_uses_with(out)
        graph.erase_node(mul)
        site.mul = out
    stable_toposort(graph)  # a scaled affine reads a gate computed after the norm call
    safe_dce(gm)
    return notes


def _erase_with_dead_readers(n: fx.Node) -> None:
    """Erase ``n`` (the unfused norm call) and what reads it without being read (the statistics
    psi replaced). DCE keeps a training-mode norm call: it updates buffers, and left in place
    it would update them twice per step."""
    for u in list(n.users):
        if not u.users:
            _erase_with_dead_readers(u)
    if not n.users:
        n.graph.erase_node(n)


def unfuse_gates(gm: fx.GraphModule) -> int:
    """Turn every fused norm call of ``gm`` back into ``BN(x) * scale`` with the plain
    BatchNorm class (what fold's passes read); the number of calls rewritten. Fused
    ``F.batch_norm`` calls need nothing: their ``weight * g`` is a constant to fold."""
    graph = gm.graph
    count = 0
    gated = set()
    for n in list(graph.nodes):
        if n.op != "call_module" or type(gm.get_submodule(str(n.target))) not in PLAIN:
            continue
        gated.add(gm.get_submodule(str(n.target)))
        if len(n.args) < 2:
            continue
        with graph.inserting_after(n):
            scaled = graph.call_function(operator.mul, (n, n.args[1]))
        n.replace_all_uses_with(scaled, delete_user_cb=lambda u: u is not scaled)
        n.args = (n.args[0],)
        count += 1
    for mod in gated:  # after every call is rewritten: a module may be called more than once
        mod.__class__ = PLAIN[type(mod)]
    if count:
        gm.recompile()
    return count
