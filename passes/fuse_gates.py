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

A gated map that no norm produces (the SE of an inverted-residual block scales the map after
its SiLU / hard-swish, which no scale crosses) but that only convolutions read goes into their
kernels' input columns instead: with ``C_g = C_in / groups`` input channels per group, output
channel ``o`` reads input channel ``(o // (C_out / groups)) * C_g + j`` through ``W[o, j]``, so

    conv(x * g, W) = conv(x, W'),   W'[o, j, ...] = W[o, j, ...] * g[(o // (C_out/groups)) * C_g + j]

for every padding mode (a padded value is a copy of a channel's value or zero, scaled alike).
One multiply per weight instead of per element, and the map ``x * g`` is never stored for the
backward pass; the bias is unchanged. The identity behind the fold of a scale into a consuming
conv (:func:`asrfx.foldmath.fold_scale_into_conv_in`), applied at every step.

A ``torch.nn`` BatchNorm or convolution module becomes its ``Gated`` twin in place (same
parameters, buffers and state_dict names; ``forward(x)`` as before, ``forward(x, scale)``
fused); a traced-through ``F.batch_norm`` call gets ``weight * g`` and ``bias * g``.
:func:`unfuse_gates` turns a fused graph back into ``BN(x) * g`` and ``conv(x * g)`` (fold
does, then folds as usual).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from asrfx.foldmath import column_scale
from .asr_rewrite import positive_gate
from .find_attention import AttentionSite
from .graph_utils import (module_hooks, reads_shape_only, safe_dce, stable_toposort, submodule,
                          tensor_shape)
from .layers import FUNCTIONAL_CONVS, batch_norm_args, functional_conv_arg

__all__ = ["GatedBatchNorm1d", "GatedBatchNorm2d", "GatedBatchNorm3d", "GatedConv1d",
           "GatedConv2d", "GatedConv3d", "fuse_gates", "unfuse_gates", "GATED", "GATED_CONV",
           "PLAIN"]


class _Gated:
    """``forward(x, scale)``: the BatchNorm of ``x`` with weight and bias scaled per channel by
    ``scale`` (any shape with ``num_features`` elements), i.e. ``scale * BN(x)``; without
    ``scale`` exactly the BatchNorm. Statistics, momentum and the batch counter behave as in
    ``torch.nn.BatchNorm``.

    ``forward(x, scale, affine=(weight * s, bias * s))``: the same with the scaled affine
    computed by the caller from this norm's own parameters (``s``: ``scale`` flattened; the
    batched excitations compute every norm of a group in one product,
    :func:`asrfx.passes.batch_excitations.batch_gate_affines`); ``scale`` is then not read
    here but stays the call's gate, which :func:`unfuse_gates` applies again."""

    def forward(self, input: torch.Tensor, scale: torch.Tensor | None = None,
                affine: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if scale is None:
            return super().forward(input)  # type: ignore[misc]
        self._check_input_dim(input)  # type: ignore[attr-defined]
        # each parameter and buffer read once (a module attribute read costs a Python call)
        training, momentum = self.training, self.momentum  # type: ignore[attr-defined]
        factor = 0.0 if momentum is None else momentum
        tracked = self.track_running_stats  # type: ignore[attr-defined]
        if training and tracked:
            counter = self.num_batches_tracked  # type: ignore[attr-defined]
            if counter is not None:
                counter.add_(1)
                if momentum is None:
                    factor = 1.0 / float(counter)
        if not training or tracked:
            mean, var = self.running_mean, self.running_var  # type: ignore[attr-defined]
        else:
            mean = var = None
        use_batch = training or (mean is None and var is None)
        if affine is None:
            weight, bias = self.weight, self.bias  # type: ignore[attr-defined]
            s = scale.reshape(-1)
            affine = (s if weight is None else weight * s, None if bias is None else bias * s)
        return F.batch_norm(input, mean, var, affine[0], affine[1], use_batch, factor,
                            self.eps)  # type: ignore[attr-defined]


class GatedBatchNorm1d(_Gated, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` that also takes a per-channel ``scale`` (see :class:`_Gated`)."""


class GatedBatchNorm2d(_Gated, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that also takes a per-channel ``scale`` (see :class:`_Gated`)."""


class GatedBatchNorm3d(_Gated, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` that also takes a per-channel ``scale`` (see :class:`_Gated`)."""


class _GatedConv:
    """``forward(x, scale)``: the convolution of ``x * scale`` (``scale``: one value per input
    channel, any shape with ``in_channels`` elements) computed as the convolution of ``x`` with
    the kernel's input columns scaled (:func:`scaled_kernel`); without ``scale`` exactly the
    convolution."""

    def forward(self, input: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        if scale is None:
            return super().forward(input)  # type: ignore[misc]
        return self._conv_forward(  # type: ignore[attr-defined]
            input, scaled_kernel(self.weight, scale, self.groups),  # type: ignore[attr-defined]
            self.bias)  # type: ignore[attr-defined]


class GatedConv1d(_GatedConv, nn.Conv1d):
    """``nn.Conv1d`` that also takes a per-input-channel ``scale`` (see :class:`_GatedConv`)."""


class GatedConv2d(_GatedConv, nn.Conv2d):
    """``nn.Conv2d`` that also takes a per-input-channel ``scale`` (see :class:`_GatedConv`)."""


class GatedConv3d(_GatedConv, nn.Conv3d):
    """``nn.Conv3d`` that also takes a per-input-channel ``scale`` (see :class:`_GatedConv`)."""


GATED = {nn.BatchNorm1d: GatedBatchNorm1d, nn.BatchNorm2d: GatedBatchNorm2d,
         nn.BatchNorm3d: GatedBatchNorm3d}
GATED_CONV = {nn.Conv1d: GatedConv1d, nn.Conv2d: GatedConv2d, nn.Conv3d: GatedConv3d}
PLAIN = {v: k for k, v in [*GATED.items(), *GATED_CONV.items()]}
_GATED_NORMS = frozenset(GATED.values())  # (a norm the other mode's graph already gated)


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
        mod = submodule(gm, n.target)
        return (type(mod) in GATED or type(mod) in _GATED_NORMS) and len(n.args) == 1 and \
            not n.kwargs and not module_hooks(mod)
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
    if not _per_channel(site, x):
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


def _per_channel(site: AttentionSite, x: fx.Node) -> bool:
    """The gate is one value per channel of ``x`` (``(1 or N, C, 1, ...)``) and the multiply
    has ``x``'s shape."""
    xs, gs = tensor_shape(x), tensor_shape(site.gate)
    return xs is not None and gs is not None and len(gs) == len(xs) and gs[1] == xs[1] and \
        all(d == 1 for d in gs[2:]) and tensor_shape(site.mul) == xs


def gate_affine(param: torch.Tensor | None, scale: torch.Tensor,
                product: torch.Tensor | None = None) -> torch.Tensor:
    """A norm's ``weight`` or ``bias`` (None: the weight of a norm without one, 1) times the
    per-channel ``scale`` (any shape with ``num_features`` elements): the affine of ``scale *
    BN(x)``. A function, so that a fused ``F.batch_norm`` call's gate can be found again
    (:func:`unfuse_gates`). ``product``: that product, computed by the caller (a batched
    group's, :func:`asrfx.passes.batch_excitations.batch_gate_affines`), returned as it is."""
    if product is not None:
        return product
    s = scale.reshape(-1)
    return s if param is None else param * s


def scaled_kernel(weight: torch.Tensor, scale: torch.Tensor, groups: int) -> torch.Tensor:
    """``weight`` with its input columns scaled by ``scale``: the kernel for which
    ``conv(x, scaled_kernel(w, g, groups)) == conv(x * g, w)`` (see
    :func:`asrfx.foldmath.column_scale`). A function, so that a fused functional conv
    (``F.conv2d(x, w)`` of a traced-through layer) is ``F.conv2d(x, scaled_kernel(w, g,
    groups))``: constant once psi is, which fold evaluates."""
    return weight * column_scale(scale, weight, groups)


def _functional_conv(n: fx.Node) -> tuple[fx.Node, int] | None:
    """(the weight node, groups) of an ``F.conv{1,2,3}d`` call with a node weight and constant
    groups, else None."""
    if n.op != "call_function" or n.target not in FUNCTIONAL_CONVS:
        return None
    weight = functional_conv_arg(n, 1, "weight", None)
    groups = functional_conv_arg(n, 6, "groups", 1)
    if not isinstance(weight, fx.Node) or not isinstance(groups, int):
        return None
    return weight, groups


def _conv_readers(gm: fx.GraphModule, site: AttentionSite
                  ) -> tuple[list[tuple[fx.Node, list[fx.Node]]], str]:
    """([(conv call, the identities / dropouts from the gated map to it)] for every reader of
    the map's values, when each is a ``torch.nn`` convolution module (without hooks) or an
    ``F.conv*d`` call, reached directly or through modules a per-channel scale crosses, each
    read by nothing else; [] otherwise; why not)."""
    if site.fusion != "mul" or site.more_muls or site.rows is not None:
        return [], "not one multiply of a per-channel gate"
    x = _map_of(site)
    if x is None or not _per_channel(site, x):
        return [], "not one multiply of a per-channel gate"
    why = "nor do only torch convolutions read the gated map"
    found = []
    for r in [u for u in site.mul.users if not reads_shape_only(u)]:
        chain, prev = [], site.mul
        while _passes_through(gm, r) is prev:
            readers = [u for u in r.users if not reads_shape_only(u)]
            if len(readers) != 1:
                return [], why
            chain.append(r)
            prev, r = r, readers[0]
        if r.op == "call_module":
            mod = submodule(gm, r.target)
            if not (type(mod) in GATED_CONV or isinstance(mod, _GatedConv)) or \
                    module_hooks(mod) or r.args != (prev,) or r.kwargs:
                return [], why
        elif _functional_conv(r) is None or functional_conv_arg(r, 0, "input", None) is not prev:
            return [], why
        found.append((r, chain))
    return (found, "") if found else ([], why)


def _fuse_into_convs(gm: fx.GraphModule, site: AttentionSite,
                     convs: list[tuple[fx.Node, list[fx.Node]]]) -> None:
    """``conv(x * g)`` -> ``gated_conv(x, g)`` (``F.conv2d(x * g, w)`` -> ``F.conv2d(x,
    scaled_kernel(w, g))``) for every conv reading the gated map, through its chain."""
    graph = gm.graph
    x = _map_of(site)
    site.mul.replace_all_uses_with(x)  # shape readers and chain heads: same shape, no gate
    for conv, chain in convs:
        src = chain[-1] if chain else x
        if conv.op == "call_module":
            mod = submodule(gm, conv.target)
            mod.__class__ = GATED_CONV.get(type(mod), type(mod))  # same object, names kept
            conv.args = (src, site.gate)
            continue
        weight, groups = _functional_conv(conv)  # type: ignore[misc]
        with graph.inserting_before(conv):
            w = graph.call_function(scaled_kernel, (weight, site.gate, groups))
        conv.replace_input_with(weight, w)
    graph.erase_node(site.mul)
    site.mul = convs[0][0]


def fuse_gates(gm: fx.GraphModule, sites: list[AttentionSite]) -> tuple[list[str], int]:
    """Fold each converted site's gate into the affine of the BatchNorm producing its map (also
    through a ReLU for a positive gate), else into the kernels of the convolutions reading it,
    in the training graph ``gm`` (shapes recorded before the ASR rewrite). Returns a note per
    site left as a multiply, saying why (the form is exact either way), and how many sites went
    into convolutions."""
    graph = gm.graph
    notes = []
    into_convs = 0
    for site in sites:
        why, norm, chain = _why_not(gm, site)
        if norm is None:
            convs, why_conv = _conv_readers(gm, site)
            if convs:
                _fuse_into_convs(gm, site, convs)
                into_convs += 1
                continue
            notes.append(f"{site.path or '(top)'}: the gate stays a multiply in the training "
                         f"form ({why}; {why_conv})")
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
            # same object: parameters and names kept (already gated by the other mode's graph)
            mod.__class__ = GATED.get(type(mod), type(mod))
            with graph.inserting_before(mul):
                fused = graph.call_module(str(norm.target), (norm.args[0], site.gate))
            fused.meta = dict(norm.meta)
            norm.replace_all_uses_with(fused)  # value readers: the ReLU, or the multiply
            _erase_with_dead_readers(norm)
        else:
            args = batch_norm_args(norm)
            with graph.inserting_before(mul):
                w = graph.call_function(gate_affine, (args["weight"], site.gate))
                b = None if args["bias"] is None else graph.call_function(
                    gate_affine, (args["bias"], site.gate))
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
    return notes, into_convs


def _erase_with_dead_readers(n: fx.Node) -> None:
    """Erase ``n`` (the unfused norm call) and what reads it without being read (the statistics
    psi replaced). DCE keeps a training-mode norm call: it updates buffers, and left in place
    it would update them twice per step."""
    for u in list(n.users):
        if not u.users:
            _erase_with_dead_readers(u)
    if not n.users:
        n.graph.erase_node(n)


def _unfuse_functional(graph: fx.Graph) -> int:
    """``F.batch_norm(x, ..., gate_affine(w, g), gate_affine(b, g))`` -> ``F.batch_norm(x, ...,
    w, b) * g`` and ``F.conv2d(x, scaled_kernel(w, g, groups), ...)`` -> ``F.conv2d(x * g, w,
    ...)``; the number of calls rewritten."""
    count = 0
    if not any(n.op == "call_function" and n.target in (gate_affine, scaled_kernel)
               for n in graph.nodes):
        return 0  # (nothing fused: the common case, a scan instead of a parse of every call)
    for n in list(graph.nodes):
        args = batch_norm_args(n)
        if args is not None:
            aff = [args[k] for k in ("weight", "bias") if isinstance(args[k], fx.Node) and
                   args[k].target is gate_affine]
            gates = {a.args[1] for a in aff}
            if not aff or len(gates) != 1 or (args["bias"] is not None and len(aff) != 2):
                continue
            gate = gates.pop()
            n.args = (args["input"], args["running_mean"], args["running_var"])
            n.kwargs = {k: (args[k].args[0] if args[k] in aff else args[k])
                        for k in ("weight", "bias", "training", "momentum", "eps")}
            with graph.inserting_after(n):
                scaled = graph.call_function(operator.mul, (n, gate))
            n.replace_all_uses_with(scaled, delete_user_cb=lambda u: u is not scaled)
            count += 1
            continue
        conv = _functional_conv(n)
        if conv is not None and conv[0].target is scaled_kernel:
            kernel = conv[0]
            weight, gate, _ = kernel.args
            x = functional_conv_arg(n, 0, "input", None)
            with graph.inserting_before(n):
                scaled = graph.call_function(operator.mul, (x, gate))
            n.replace_input_with(x, scaled)
            n.replace_input_with(kernel, weight)
            count += 1
    for n in reversed(list(graph.nodes)):  # the scaled parameters nothing reads any more
        if n.op == "call_function" and n.target in (gate_affine, scaled_kernel) and \
                not n.users:
            graph.erase_node(n)
    return count


def unfuse_gates(gm: fx.GraphModule) -> int:
    """Turn every fused norm call of ``gm`` back into ``BN(x) * scale`` and every fused conv
    call into ``conv(x * scale)``, with the plain classes (what fold's passes read; the gate
    folds and is reported as in the multiply form); the number of calls rewritten."""
    graph = gm.graph
    count = 0
    gated = set()
    precomputed = False
    for n in list(graph.nodes):
        if n.op != "call_module":
            # (a batched group's products, read by each traced-through norm's gate_affine)
            precomputed |= n.target is gate_affine and len(n.args) > 2
            continue
        mod = submodule(gm, n.target)
        if type(mod) not in PLAIN:
            continue
        gated.add(mod)
        precomputed |= "affine" in n.kwargs  # (a batched group's products)
        if len(n.args) < 2:
            continue
        if isinstance(mod, _GatedConv):
            with graph.inserting_before(n):
                scaled = graph.call_function(operator.mul, (n.args[0], n.args[1]))
            n.args = (scaled,)
        else:
            with graph.inserting_after(n):
                scaled = graph.call_function(operator.mul, (n, n.args[1]))
            n.replace_all_uses_with(scaled, delete_user_cb=lambda u: u is not scaled)
            n.args = (n.args[0],)
            n.kwargs = {}  # (a batched group's precomputed affine: dead code now)
        count += 1
    count += _unfuse_functional(graph)
    if precomputed:
        safe_dce(gm)  # the batched groups' affine products, read by no norm now
    for mod in gated:  # after every call is rewritten: a module may be called more than once
        mod.__class__ = PLAIN[type(mod)]
    if count:
        gm.recompile()
    return count
