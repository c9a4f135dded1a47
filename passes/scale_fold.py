"""Folding per-channel constants into neighbouring layers.

After constant evaluation an ASR site is ``x * v`` with ``v`` a constant buffer. This pass
collects chains of per-channel affine ops on one tensor (``x * s``, ``x + t``, ``x - t``,
``x / s``, and the residual gate ``x * g + x``) into one map ``x -> x * s + t`` and folds it:

1. into the producer of ``x`` when nothing else reads ``x``: a producer fold target
   (:mod:`.targets`: a BatchNorm's or other norm's affine, a Conv's / Linear's output rows),
   reached through ops the map commutes with, and into every part of a sum or concatenation;
2. else into the consumers, when every reader of the result leads to a consumer fold target
   (a Conv's / Linear's input columns, a BatchNorm's input side);
3. else the multiply by a constant buffer stays, and the record says why (with a code).

Planning is pure: :func:`plan_producer` and :func:`plan_consumers` return a plan (or a
:class:`~.targets.Refusal`) without changing anything; :func:`apply_plan` writes it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Iterator, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from asrfx.report import Site
from .find_attention import permute_dims
from .graph_utils import (ADD_OPS, MUL_OPS, SUB_OPS, get_attr_path, is_op, module_path,
                          reads_shape_of, reads_shape_only, shapes_only, submodule,
                          tensor_shape, value_dependent, value_readers)
from .layers import (CATS, DIV_OPS, SPLITS, ELEMENTWISE, FLATTENS, GLOBAL_AVG_FUNCTIONS,
                     GLOBAL_AVG_MODULES, LINEAR_FUNCTIONS, LINEAR_MODULES, PASS_THROUGH,
                     POSITIVE_HOMOGENEOUS_FUNCTIONS, POSITIVE_HOMOGENEOUS_MODULES, exact,
                     in_place, mutates_its_input)
from .protocol import PassContext, Step, record, run_steps
from .targets import Fold, Refusal, consumer_target, producer_target

__all__ = ["fold_scales", "scale_steps", "Chain", "plan_producer", "plan_consumers",
           "apply_plan", "forward_folds", "cat_parts", "Parts", "split_whole", "split_ranges",
           "rows_source"]

_MAX_DEPTH = 8
# refusals that say only that no target was reached; a more specific one names the reason
_GENERIC = {"no-fold-target", "producer-read-elsewhere", "no-producer-target",
            "no-consumer-target"}


@dataclass
class Chain:
    """``members`` (ops, in order, ending at the root) compute ``base * scale + shift`` over
    channel ``axis``; ``scale`` and ``shift`` are float64 ``(C,)``."""

    base: fx.Node
    scale: torch.Tensor
    shift: torch.Tensor
    members: list[fx.Node] = field(default_factory=list)
    axis: int = 1  # the channel dim: 1 (channels first) or -1 (tokens (N, L, C))

    @property
    def root(self) -> fx.Node:
        return self.members[-1]


@dataclass
class Through:
    """A plan reached through an op the map commutes with (``what``)."""

    inner: "Plan"
    what: str


@dataclass
class Parts:
    """One plan per part of a sum (``total``) or a channel concatenation."""

    plans: list
    total: bool


Plan = Union[Fold, Through, Parts, list]  # a list: consumer folds, one per reader


def _per_channel_const(gm: fx.GraphModule, node: Any, xshape: tuple, dep: set
                       ) -> torch.Tensor | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr" or node in dep:
        return None
    value = get_attr_path(gm, str(node.target))
    if not isinstance(value, torch.Tensor) or len(xshape) < 2:
        return None
    cs = tuple(value.shape)
    if len(cs) > len(xshape):
        return None
    cs = (1,) * (len(xshape) - len(cs)) + cs
    c = xshape[1]
    if cs[0] != 1 or cs[1] not in (1, c) or any(d != 1 for d in cs[2:]):
        return None
    return value.detach().reshape(-1).expand(c).to(torch.float64)


def _token_const(gm: fx.GraphModule, node: Any, xshape: tuple, dep: set) -> torch.Tensor | None:
    """The per-channel vector of a constant ``(1, .., 1, C)`` / ``(C,)`` scaling the last dim of
    tokens ``(N, L, C)`` or a channels-last map ``(N, *S, C)``, or None.

    On a rank >= 4 tensor the last dim may as well be a width: folding is exact either way,
    because the only targets of a last-dim scale are layers that act on the last dim
    (LayerNorm over it, Linear).
    """
    if not isinstance(node, fx.Node) or node.op != "get_attr" or node in dep or len(xshape) < 3:
        return None
    value = get_attr_path(gm, str(node.target))
    if not isinstance(value, torch.Tensor) or value.dim() > len(xshape):
        return None
    cs = (1,) * (len(xshape) - value.dim()) + tuple(value.shape)
    if any(d != 1 for d in cs[:-1]) or cs[-1] != xshape[-1] or xshape[-1] == 1:
        return None
    return value.detach().reshape(-1).to(torch.float64)


def _const(gm: fx.GraphModule, node: Any, xshape: tuple, dep: set
           ) -> tuple[torch.Tensor, int] | None:
    """(per-channel vector, channel axis) of a constant operand, channels first preferred."""
    v = _per_channel_const(gm, node, xshape, dep)
    if v is not None and (_token_const(gm, node, xshape, dep) is None or xshape[1] == xshape[-1]):
        return v, 1
    v = _token_const(gm, node, xshape, dep)
    return (v, -1) if v is not None else None


def _collect_chains(gm: fx.GraphModule) -> list[Chain]:
    dep = value_dependent(gm.graph)
    chains: dict[fx.Node, Chain] = {}

    def start(x: fx.Node, axis: int, device: torch.device) -> Chain | None:
        c = tensor_shape(x)[axis]
        if x in chains and len(x.users) == 1:
            if chains[x].axis != axis:
                return None
            return chains.pop(x)
        ones = torch.ones(c, dtype=torch.float64, device=device)  # where the constants live
        return Chain(x, ones, torch.zeros_like(ones), axis=axis)

    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method") or len(n.args) != 2 or n.kwargs:
            continue
        if not any(isinstance(k, fx.Node) and (k.op == "get_attr" or k in chains)
                   for k in n.args):
            continue  # a chain starts at a constant operand or continues one (shapes unread)
        shape = tensor_shape(n)
        if shape is None or len(shape) < 2 or n not in dep:
            continue
        a, b = n.args
        chain = None
        if in_place(n) and isinstance(a, fx.Node) and \
                value_readers(a) > 1:
            continue  # later readers of a would see the in-place result: not a local chain
        for x, k in ((a, b), (b, a)):
            if not (isinstance(x, fx.Node) and x in dep and tensor_shape(x) == shape):
                continue
            found = _const(gm, k, shape, dep)
            if found is not None:
                const, axis = found
                kind = ("mul" if is_op(n, MUL_OPS) else "add" if is_op(n, ADD_OPS) else
                        "sub" if is_op(n, SUB_OPS) and x is a else
                        "div" if is_op(n, DIV_OPS) and x is a else None)
                chain = start(x, axis, const.device) if kind else None
                if chain is None:
                    break
                if kind == "mul":
                    chain.scale, chain.shift = chain.scale * const, chain.shift * const
                elif kind == "add":
                    chain.shift = chain.shift + const
                elif kind == "sub":
                    chain.shift = chain.shift - const
                else:
                    chain.scale, chain.shift = chain.scale / const, chain.shift / const
                break
            # residual gate: (x * s + t) + x
            if is_op(n, ADD_OPS) and isinstance(k, fx.Node) and x in chains and \
                    len(x.users) == 1 and chains[x].base is k:
                chain = chains.pop(x)
                chain.scale = chain.scale + 1
                break
        if chain is not None:
            chain.members.append(n)
            chains[n] = chain
    return list(chains.values())


def _commutes(gm: fx.GraphModule, node: fx.Node, s: torch.Tensor, t: torch.Tensor,
              axis: int = 1) -> str | None:
    """Why ``op(z) * s == op(z * s)`` holds for this node, or None.

    A per-channel scale moves through a per-channel positively homogeneous op (ReLU,
    LeakyReLU, max pooling) when it is non-negative, and through a linear per-channel op
    (average pooling, eval-mode dropout, identity) whatever its sign. ReLU6 is not homogeneous
    (it clips at 6). A shift moves only through the identity and eval-mode dropout (pooling
    averages it with zero padding; a nonlinearity does not commute with it). With the channels
    last (``axis=-1``) only the elementwise ones qualify: a pooling op would pool the channels.
    """
    if _identity(gm, node):
        return getattr(node.target, "__name__", None) or \
            type(submodule(gm, node.target)).__name__
    if bool(torch.any(t != 0)):
        return None
    nonneg = bool(torch.all(s >= 0))
    if node.op == "call_module":
        mod = submodule(gm, node.target)
        if type(mod) is nn.ReLU6 or (axis != 1 and type(mod) not in ELEMENTWISE):
            return None
        if exact(mod, POSITIVE_HOMOGENEOUS_MODULES):
            return type(mod).__name__ if nonneg else None
        if exact(mod, LINEAR_MODULES):
            return type(mod).__name__
        return None
    if node.op in ("call_function", "call_method"):
        if axis != 1 and node.target not in ELEMENTWISE:
            return None
        name = getattr(node.target, "__name__", str(node.target))
        if node.target in POSITIVE_HOMOGENEOUS_FUNCTIONS:
            return name if nonneg else None
        if node.target in LINEAR_FUNCTIONS and not node.kwargs.get("training", False):
            if node.target is F.dropout and (len(node.args) > 2 and node.args[2]):
                return None
            return name
    return None


def _identity(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``node`` returns its input unchanged in eval mode: ``nn.Identity``, an eval-mode dropout
    module, ``F.dropout(..., training=False)``."""
    if node.op == "call_module":
        mod = submodule(gm, node.target)
        return exact(mod, PASS_THROUGH) and (type(mod) is nn.Identity or not mod.training)
    if node.op == "call_function" and node.target is F.dropout:
        training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
        inplace = node.args[3] if len(node.args) > 3 else node.kwargs.get("inplace", False)
        return training is False and not inplace
    return False


def plan_producer(gm: fx.GraphModule, chain: Chain, depth: int = 0) -> Plan | Refusal:
    """Where the chain's map folds on the producer side, or why it does not. Pure."""
    x = chain.base
    members = set(chain.members)
    # shape reads (x.shape, x.size(), or a stack read only for its shape) see the same shape
    # after the fold
    if any(u not in members and not reads_shape_of(u, x) and not shapes_only(u)
           for u in x.users):
        return Refusal("producer-read-elsewhere", f"{x.name} is read elsewhere too")
    deeper = depth < _MAX_DEPTH
    dims = permute_dims(x)
    if dims is not None:
        return _plan_through_permute(gm, chain, dims, depth) if deeper else \
            Refusal("no-producer-target", "")
    inner = _plan_through(gm, chain, depth) if deeper else Refusal("no-producer-target", "")
    if not isinstance(inner, Refusal):
        return inner
    if chain.axis == 1 and deeper:
        parts = _sum_parts(x, chain.scale, chain.shift) or cat_parts(x, chain.scale, chain.shift)
        if parts is not None:
            return _plan_parts(gm, x, parts, depth)
        whole = split_whole(x, chain.scale, chain.shift)
        if whole is not None:
            z, s, t = whole
            inner = plan_producer(gm, Chain(z, s, t, [x.args[0]]), depth + 1)
            return inner if isinstance(inner, Refusal) else Through(inner, "split")
        tokens = rows_source(x)
        if tokens is not None:
            inner = plan_producer(gm, Chain(tokens, chain.scale, chain.shift, [x], axis=-1),
                                  depth + 1)
            return inner if isinstance(inner, Refusal) else Through(inner, "flatten")
    target = producer_target(gm, x)
    if target is None:
        return inner if inner.reason else \
            Refusal("no-producer-target", f"{_describe(gm, x)} is not a fold target")
    return target.check(gm, x, chain.scale, chain.shift, chain.axis) or \
        Fold(target, x, chain.scale, chain.shift)


def _describe(gm: fx.GraphModule, x: fx.Node) -> str:
    if x.op == "call_module":
        return f"{x.target} ({type(submodule(gm, x.target)).__name__})"
    return f"{x.name} ({getattr(x.target, '__name__', x.target)})"


def _plan_through(gm: fx.GraphModule, chain: Chain, depth: int) -> Plan | Refusal:
    """Through an op the map commutes with (ReLU, pooling, ...), to the op's input."""
    x = chain.base
    through = _commutes(gm, x, chain.scale, chain.shift, chain.axis)
    src = x.args[0] if x.args else None
    if through is None:
        op = _commutes(gm, x, chain.scale.abs(), torch.zeros_like(chain.shift), chain.axis)
        if op is not None and bool(torch.any(chain.shift != 0)):
            return Refusal("shift-before-nonlinearity", f"a shift does not move through {op}")
        if op is not None:
            return Refusal("negative-scale-before-nonlinearity",
                           f"a scale with negative entries does not move through {op}")
    if through is None or not isinstance(src, fx.Node) or tensor_shape(src) is None:
        return Refusal("no-producer-target", "")
    shape, sshape = tensor_shape(x), tensor_shape(src)
    if chain.axis == 1:
        if len(sshape) != len(shape) or sshape[1] != shape[1]:
            return Refusal("no-producer-target", "")
    elif sshape != shape or any(u is not x and not reads_shape_only(u) for u in src.users):
        return Refusal("no-producer-target", "")
    inner = plan_producer(gm, Chain(src, chain.scale, chain.shift, [x], axis=chain.axis),
                          depth + 1)
    return inner if isinstance(inner, Refusal) else Through(inner, through)


def _plan_parts(gm: fx.GraphModule, x: fx.Node,
                parts: list[tuple[fx.Node, torch.Tensor, torch.Tensor]], depth: int
                ) -> Plan | Refusal:
    """Each part's share into that part's producer, all or none. Of a sum, one summand takes
    the shift: the first whose producer can."""
    trials = [parts]
    if _is_sum(x):
        shift = parts[0][2]
        n = len(parts) if bool(torch.any(shift != 0)) else 1
        # (a - b) * s + t = a * s - (b * s - t): a subtrahend takes the shift negated
        signs = [1, -1] if is_op(x, SUB_OPS) else [1] * len(parts)
        trials = [[(p, sc, signs[j] * shift if j == i else torch.zeros_like(shift))
                   for j, (p, sc, _) in enumerate(parts)] for i in range(n)]
    refusal = None
    for trial in trials:
        plans = [plan_producer(gm, Chain(p, sc, sh, [x]), depth + 1) for p, sc, sh in trial]
        refusal = next((p for p in plans if isinstance(p, Refusal)), None)
        if refusal is None:
            return Parts(plans, _is_sum(x))
    return refusal


def _plan_through_permute(gm: fx.GraphModule, chain: Chain, dims: tuple[int, ...],
                          depth: int) -> Plan | Refusal:
    """``permute(z, dims) * s`` scales dim ``dims[axis]`` of ``z``: continue on ``z`` when that
    is its channel dim (1, channels first) or its last dim (channels last / tokens).
    ConvNeXt's ``x.permute(0, 3, 1, 2)`` turns a channels-first scale after the block into a
    last-dim scale of its final Linear."""
    x = chain.base
    src = x.args[0] if x.args else None
    shape = tensor_shape(src) if isinstance(src, fx.Node) else None
    if shape is None or len(shape) != len(dims):
        return Refusal("no-producer-target", "")
    moved = dims[1 if chain.axis == 1 else len(dims) - 1]
    axis = 1 if moved == 1 else -1 if moved == len(dims) - 1 else None
    if axis is None:
        return Refusal("channel-axis", "a permute moves the channels to a middle dim")
    inner = plan_producer(gm, Chain(src, chain.scale, chain.shift, [x], axis=axis), depth + 1)
    return inner if isinstance(inner, Refusal) else Through(inner, "permute")


def _is_sum(x: fx.Node) -> bool:
    return is_op(x, ADD_OPS) or is_op(x, SUB_OPS)


def apply_plan(gm: fx.GraphModule, plan: Plan) -> str:
    """Write a plan from :func:`plan_producer` / :func:`plan_consumers`; returns what took
    the map, for the report."""
    if isinstance(plan, Fold):
        return plan.apply(gm)
    if isinstance(plan, Through):
        return f"{apply_plan(gm, plan.inner)} through {plan.what}"
    if isinstance(plan, Parts):
        names = [apply_plan(gm, p) for p in plan.plans]
        return " + ".join(names) if plan.total else f"cat({', '.join(names)})"
    return ", ".join(apply_plan(gm, p) for p in plan)


def _sum_parts(x: fx.Node, s: torch.Tensor, t: torch.Tensor
               ) -> list[tuple[fx.Node, torch.Tensor, torch.Tensor]] | None:
    """``(a + b) * s + t = (a * s + t) + b * s`` (and ``a - b`` alike): the summands with their
    share of the chain, when both have the sum's shape (no broadcasting). The shift goes to
    one summand (:func:`_fold_into_parts` picks which)."""
    sub = is_op(x, SUB_OPS)
    if not (is_op(x, ADD_OPS) or sub) or len(x.args) != 2 or x.kwargs:
        return None
    a, b = x.args
    shape = tensor_shape(x)
    if not all(isinstance(v, fx.Node) and tensor_shape(v) == shape for v in (a, b)):
        return None
    if a is b:  # x + x = 2x: fold (s, t / 2) once; x - x is constant zero: leave it
        return None if sub else [(a, s, t / 2)]
    zero = torch.zeros_like(t)
    return [(a, s, t), (b, s, zero)]


def cat_parts(x: fx.Node, s: torch.Tensor, t: torch.Tensor
               ) -> list[tuple[fx.Node, torch.Tensor, torch.Tensor]] | None:
    """``cat([a, b], 1) * s + t = cat([a * s_a + t_a, b * s_b + t_b], 1)``: the parts of a
    concatenation over the channels, each with its slice of the chain."""
    if x.op != "call_function" or x.target not in CATS:
        return None
    seq = x.args[0] if x.args else x.kwargs.get("tensors")
    dim = x.args[1] if len(x.args) > 1 else x.kwargs.get("dim", 0)
    shape = tensor_shape(x)
    if not isinstance(seq, (list, tuple)) or shape is None or not isinstance(dim, int) or \
            dim % len(shape) != 1:
        return None
    if not all(isinstance(p, fx.Node) and tensor_shape(p) is not None for p in seq) or \
            len(set(seq)) != len(seq):
        return None  # a part listed twice would need two scales at once
    widths = [tensor_shape(p)[1] for p in seq]
    if sum(widths) != s.numel():
        return None
    out, start = [], 0
    for p, w in zip(seq, widths):
        out.append((p, s[start:start + w], t[start:start + w]))
        start += w
    return out


def split_whole(x: fx.Node, s: torch.Tensor, t: torch.Tensor
                ) -> tuple[fx.Node, torch.Tensor, torch.Tensor] | None:
    """``split(z, sizes, 1)[i] * s + t``: the same part of ``split(z * s' + t', sizes, 1)``
    with ``s'`` (``t'``) ``s`` (``t``) on part ``i``'s channels of ``z`` and 1 (0) on the
    others, which leaves every other part as it was; ``(z, s', t')``, or None when ``x`` is not
    a part of a channel split (:func:`split_ranges`) or another reader of the split reads part
    ``i`` too. ResNeSt's split attention scales each radix part of one conv's output this way
    (Zhang et al., "ResNeSt: Split-Attention Networks", 2022)."""
    if not (x.op == "call_function" and x.target is operator.getitem and len(x.args) == 2 and
            isinstance(x.args[1], int) and isinstance(x.args[0], fx.Node)):
        return None
    sp, i = x.args
    ranges = split_ranges(sp)
    if ranges is None or not -len(ranges) <= i < len(ranges) or ranges[i][1] != s.numel():
        return None
    i %= len(ranges)
    # every other reader of the split must read another part (or only the count of parts):
    # a second read of part i (Python iterating the parts twice) would be scaled too
    for u in sp.users:
        if u is not x and not reads_shape_only(u) and not (
                u.op == "call_function" and u.target is operator.getitem and
                isinstance(u.args[1], int) and u.args[1] % len(ranges) != i):
            return None
    z, (start, width) = sp.args[0], ranges[i]
    c = tensor_shape(z)[1]
    whole_s = torch.ones(c, dtype=s.dtype, device=s.device)
    whole_t = torch.zeros(c, dtype=t.dtype, device=t.device)
    whole_s[start:start + width], whole_t[start:start + width] = s, t
    return z, whole_s, whole_t


def rows_source(x: fx.Node) -> fx.Node | None:
    """``z`` when ``x`` is ``z`` (rank >= 3, channels last) with its leading dims merged into
    rows, ``(M, C)`` (``z.flatten(0, -2)``, a reshape or view to ``(-1, C)``): a map over
    ``x``'s channels (dim 1) is one over ``z``'s last dim. LeViT normalises each Linear's
    tokens this way, ``bn(linear(x).flatten(0, 1)).reshape_as(...)`` (Graham et al., 2021)."""
    if not is_op(x, FLATTENS) or not x.args or not isinstance(x.args[0], fx.Node):
        return None
    z = x.args[0]
    xs, zs = tensor_shape(x), tensor_shape(z)
    if xs is None or zs is None or len(xs) != 2 or len(zs) < 3 or xs[1] != zs[-1]:
        return None
    rows = 1
    for d in zs[:-1]:
        rows *= d
    return z if rows == xs[0] else None


def split_ranges(sp: fx.Node) -> list[tuple[int, int]] | None:
    """``(start, width)`` of each part's channels when ``sp`` splits a tensor along its
    channels (dim 1; ``torch.split`` / ``chunk`` / ``tensor_split`` or their method forms) and
    the parts' shapes were recorded; else None. The parts are consecutive channel ranges in
    order; their widths are the recorded ones (the sizes may be computed from the input's
    shape in the graph, and channels do not change with the input)."""
    if not is_op(sp, SPLITS) or not sp.args or not isinstance(sp.args[0], fx.Node):
        return None
    shape = tensor_shape(sp.args[0])
    dim = sp.args[2] if len(sp.args) > 2 else sp.kwargs.get("dim", 0)
    metas = sp.meta.get("tensor_meta")
    if shape is None or len(shape) < 2 or not isinstance(dim, int) or \
            dim % len(shape) != 1 or not isinstance(metas, (list, tuple)) or not metas:
        return None
    widths = [getattr(m, "shape", (None, None))[1] for m in metas]
    if any(not isinstance(w, int) for w in widths) or sum(widths) != shape[1]:
        return None
    starts = [sum(widths[:k]) for k in range(len(widths))]
    return list(zip(starts, widths))


def plan_consumers(gm: fx.GraphModule, chain: Chain) -> Plan | Refusal:
    """Folds into the layers that read the chain's result (every reader must take it), or
    why not. Pure.

    Channels first, the scale (and shift) also moves forward through what it commutes with --
    pass-through modules, ReLU / pooling (:func:`_commutes`), averages over the positions,
    the flatten of a pooled ``(N, C, 1, ...)`` map to ``(N, C)``, a channel concatenation (the
    other parts scaled by one) -- to a consumer fold target. Tokens / channels last, only
    pass-through modules lead to one (a Linear reads the last dim).
    """
    if chain.axis == -1:
        return _token_sinks(gm, chain)
    return forward_folds(gm, chain.root, chain.scale, chain.shift, 0, set())


def _sink(gm: fx.GraphModule, u: fx.Node, node: fx.Node, s: torch.Tensor, t: torch.Tensor,
          axis: int) -> Fold | Refusal | None:
    """``u`` as a consumer target of ``node``'s map: a fold, a refusal, or None (no target)."""
    target = consumer_target(gm, u)
    if target is None:
        return None
    if not _only_first_arg(u, node):
        return Refusal("no-consumer-target", f"{u.name} reads the map other than as its input")
    return target.check(gm, u, s, t, axis) or Fold(target, u, s, t)


def forward_folds(gm: fx.GraphModule, node: fx.Node, s: torch.Tensor, t: torch.Tensor,
                   depth: int, seen: set) -> list[Fold] | Refusal:
    """The consumer folds of the per-channel map ``node * s + t`` (channels first), when every
    value reader of ``node`` leads to one, else why not. Pure: plans only (apply with
    :func:`apply_plan`)."""
    shape = tensor_shape(node)
    if shape is None or len(shape) < 2 or depth > _MAX_DEPTH:
        return Refusal("no-consumer-target", "no fold target within reach")
    out: list[Fold] = []
    for u in list(node.users):
        if reads_shape_only(u):
            continue  # the shape is the same after the fold
        if u in seen:  # reached twice: the two paths would need one combined scale
            return Refusal("no-consumer-target", f"{u.name} is reached on two paths")
        seen.add(u)
        if u.op == "call_module":
            if not _only_first_arg(u, node):
                return Refusal("no-consumer-target", f"{u.name} reads it other than as input")
            if _identity(gm, u):
                more = forward_folds(gm, u, s, t, depth + 1, seen)
                if isinstance(more, Refusal):
                    return more
                out += more
                continue
        sink = _sink(gm, u, node, s, t, 1)
        if isinstance(sink, Fold):
            out.append(sink)
            continue
        if (ranges := split_ranges(u)) is not None and _only_first_arg(u, node):
            more = _split_folds(gm, u, ranges, s, t, depth, seen)
            if isinstance(more, Refusal):
                return more
            out += more
            continue
        step = _forward_step(gm, u, node, s, t)
        if step is None:
            return sink or Refusal("no-consumer-target", f"{_describe(gm, u)} does not take it")
        s2, t2, what = step
        more = forward_folds(gm, u, s2, t2, depth + 1, seen)
        if isinstance(more, Refusal):
            return more
        out += [Fold(f.target, f.node, f.scale, f.shift, (what,) + f.via) for f in more]
    return out or Refusal("no-consumer-target", "nothing reads it")


def _split_folds(gm: fx.GraphModule, sp: fx.Node, ranges: list[tuple[int, int]],
                 s: torch.Tensor, t: torch.Tensor, depth: int, seen: set
                 ) -> list[Fold] | Refusal:
    """``split(x * s + t, sizes, 1)[k] = split(x, sizes, 1)[k] * s_k + t_k``: each part read
    takes its slice of the map to its own consumers (MixNet's mixed convolutions: one kernel
    size per part)."""
    out: list[Fold] = []
    for g in sp.users:
        if reads_shape_only(g):
            continue
        if not (g.op == "call_function" and g.target is operator.getitem and
                isinstance(g.args[1], int) and -len(ranges) <= g.args[1] < len(ranges)):
            return Refusal("no-consumer-target", f"{g.name} reads the split other than a part")
        start, width = ranges[g.args[1]]
        more = forward_folds(gm, g, s[start:start + width], t[start:start + width], depth + 1,
                             seen)
        if isinstance(more, Refusal):
            return more
        out += [Fold(f.target, f.node, f.scale, f.shift, ("split",) + f.via) for f in more]
    return out or Refusal("no-consumer-target", "nothing reads the split's parts")


def _token_sinks(gm: fx.GraphModule, chain: Chain) -> list[Fold] | Refusal:
    """Tokens / channels last: each reader, past pass-through modules, must be a target."""
    root = chain.root
    out: list[Fold] = []
    for user in root.users:
        if reads_shape_only(user):
            continue
        c = _consumer(gm, user)
        if c is not user and user.args[0] is not root:
            return Refusal("no-consumer-target", f"{user.name} reads the map other than as "
                                                 f"its input")
        inp = root if c is user else (c.args[0] if c.args else None)
        sink = _sink(gm, c, inp, chain.scale, chain.shift, -1)
        if sink is None:
            return Refusal("no-consumer-target", f"{_describe(gm, c)} does not take it")
        if isinstance(sink, Refusal):
            return sink
        out.append(sink)
    return out or Refusal("no-consumer-target", "nothing reads it")


def _consumer(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """Follow pass-through modules (Identity, eval-mode Dropout) to the consuming layer."""
    while node.op == "call_module" and exact(submodule(gm, node.target), PASS_THROUGH) \
            and len(node.users) == 1:
        node = next(iter(node.users))
    return node


def _only_first_arg(u: fx.Node, node: fx.Node) -> bool:
    """``node`` is ``u``'s first argument and none of its others."""
    if not u.args or u.args[0] is not node:
        return False
    others: list = []
    fx.node.map_arg((u.args[1:], u.kwargs), lambda n: others.append(n) or n)
    return node not in others


def _forward_step(gm: fx.GraphModule, u: fx.Node, node: fx.Node, s: torch.Tensor,
                  t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str] | None:
    """``u(node * s + t) = u(node) * s' + t'`` for a reader ``u`` of ``node``: (s', t', what u
    is), or None."""
    shape, ushape = tensor_shape(node), tensor_shape(u)
    if ushape is None or u.op == "output" or mutates_its_input(gm, u):
        return None
    if u.op == "call_function" and u.target in CATS:
        seq = u.args[0] if u.args else u.kwargs.get("tensors")
        dim = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim", 0)
        if not isinstance(seq, (list, tuple)) or not isinstance(dim, int) or \
                dim % len(ushape) != 1 or sum(1 for p in seq if p is node) != 1 or \
                not all(isinstance(p, fx.Node) and tensor_shape(p) is not None for p in seq):
            return None
        s2, t2 = [], []
        for p in seq:
            w = tensor_shape(p)[1]
            s2.append(s if p is node else torch.ones(w, dtype=s.dtype, device=s.device))
            t2.append(t if p is node else torch.zeros(w, dtype=t.dtype, device=t.device))
        return torch.cat(s2), torch.cat(t2), "cat"
    if not _only_first_arg(u, node) or len(ushape) < 2 or tuple(ushape[:2]) != tuple(shape[:2]):
        return None  # every step below keeps (N, C) in place
    through = _commutes(gm, u, s, t)
    if through is not None and len(ushape) == len(shape):
        return s, t, through
    # an average over the positions (any scale, any shift): a global pooling or mean
    spatial_gone = all(d == 1 for d in ushape[2:])
    if spatial_gone and len(ushape) in (2, len(shape)):
        if u.op == "call_module" and exact(submodule(gm, u.target), GLOBAL_AVG_MODULES):
            return s, t, type(submodule(gm, u.target)).__name__
        if u.op in ("call_function", "call_method") and u.target in GLOBAL_AVG_FUNCTIONS:
            return s, t, str(getattr(u.target, "__name__", u.target))
    # (N, C, 1, ...) -> (N, C): channels map one to one
    if len(ushape) == 2 and all(d == 1 for d in shape[2:]):
        if (u.op in ("call_function", "call_method") and u.target in FLATTENS) or \
                (u.op == "call_module" and exact(submodule(gm, u.target),
                                                  (nn.Flatten,))):
            return s, t, "flatten"
    return None


def _chain_paths(chain: Chain) -> list[str]:
    """The module paths a chain's records are reported under: the root's, or -- when the chain
    joins the constants of several evaluated attention branches (two attention sites, or two
    calls of one attention module, scaling one tensor in a row) -- one per site, in graph order,
    so that no site's multiply is folded or kept unreported under another site's record."""
    paths = [module_path(m) for m in chain.members if _from_attention(m)]
    return paths if len(paths) > 1 else [module_path(chain.root)]


def _from_attention(m: fx.Node) -> bool:
    """``m`` applies a constant that constant evaluation made of an attention branch."""
    return any(isinstance(a, fx.Node) and a.op == "get_attr" and
               str(a.target).rpartition(".")[2].startswith("asrfx_const") for a in m.args)


#: the report group of per-channel constants that are not attention (layer scale, residual
#: gains, a learned per-channel scale): printed as one line
NOT_ATTENTION = "constant scales that are not attention"


def _kept(producer: Refusal, consumers: Refusal) -> tuple[str, str]:
    """(code, reason) of a chain neither side takes: the more specific refusal's code."""
    code = next((r.code for r in (producer, consumers) if r.code not in _GENERIC),
                "no-fold-target")
    why = "; ".join(r.reason for r in (producer, consumers) if r.reason)
    return code, "no exact BatchNorm/Conv/Linear producer or consumer takes it" + \
        (f" ({why})" if why else "")


def _fold_chain(gm: fx.GraphModule, chain: Chain, replaced: dict[fx.Node, fx.Node]
                ) -> list[Site]:
    while chain.base in replaced:  # this chain scales the result of a chain folded before
        chain.base = replaced[chain.base]
    root = chain.root
    recs = [record(f"scale:{root.name}", path, "channel scale", chain.scale.numel())
            for path in _chain_paths(chain)]
    if not any(_from_attention(m) for m in chain.members):
        for rec in recs:
            rec.group = NOT_ATTENTION
    plan = plan_producer(gm, chain)
    if isinstance(plan, Refusal):
        producer_refusal, plan = plan, plan_consumers(gm, chain)
        if isinstance(plan, Refusal):
            code, reason = _kept(producer_refusal, plan)
            for rec in recs:
                rec.reason, rec.code = reason, code
            return recs
    target = apply_plan(gm, plan)
    root.replace_all_uses_with(chain.base)
    replaced[root] = chain.base
    for m in reversed(chain.members):
        if not m.users:
            gm.graph.erase_node(m)
    for rec in recs:
        rec.action, rec.target = "folded", target
    return recs


def _leftovers(gm: fx.GraphModule, covered: set[str]) -> list[Site]:
    """Nothing is skipped silently: a record for every per-channel constant op still in the
    graph that no chain covered."""
    out = []
    dep = value_dependent(gm.graph)
    for n in gm.graph.nodes:
        if n.name in covered or n.op not in ("call_function", "call_method") \
                or len(n.args) != 2 or n not in dep:
            continue
        if not (is_op(n, MUL_OPS) or is_op(n, ADD_OPS) or is_op(n, SUB_OPS) or is_op(n, DIV_OPS)):
            continue
        if not any(isinstance(k, fx.Node) and k.op == "get_attr" for k in n.args):
            continue  # only a constant operand (a get_attr, see _const) is reported
        shape = tensor_shape(n)
        if shape is None or len(shape) < 2:
            continue
        found = next((f for f in (_const(gm, k, shape, dep) for k in n.args) if f), None)
        if found is None:
            continue
        if in_place(n):
            reason, code = "in-place op on a tensor that is read again later", "in-place-reread"
        else:
            reason = "no exact BatchNorm/Conv/Linear producer or consumer takes it"
            code = "no-fold-target"
        out.append(record(f"scale:{n.name}", module_path(n), "channel scale", shape[found[1]],
                          reason=reason, code=code))
        if not _from_attention(n):
            out[-1].group = NOT_ATTENTION
    return out


def scale_steps(gm: fx.GraphModule) -> Iterator[Step]:
    """The steps of :func:`fold_scales`: one per chain (key ``"scale:<root node>"``), then the
    report of per-channel constant ops left over."""
    covered: set[str] = set()
    replaced: dict[fx.Node, fx.Node] = {}  # folded chain root -> the node that now stands for it
    for chain in _collect_chains(gm):
        covered.update(m.name for m in chain.members)
        yield Step(f"scale:{chain.root.name}",
                   lambda chain=chain: _fold_chain(gm, chain, replaced))
    yield Step(None, lambda: _leftovers(gm, covered))


def fold_scales(gm: fx.GraphModule, ctx: PassContext | None = None) -> list[Site]:
    """Fold every per-channel affine chain of ``gm`` (eval mode) into a neighbouring layer.

    Args:
        gm: a GraphModule with shape metadata, whose constants are get_attr buffers
            (run :func:`~.const_eval.evaluate_constants` first).
        ctx: ``ctx.select`` picks the chains that fold (by key ``"scale:<node name>"``).

    Returns:
        One "channel scale" record per chain (per attention site when a chain joins several),
        and one per constant op left over; kept records carry a code (``no-fold-target``,
        ``shift-before-padded-conv``, ``in-place-reread``, ...).
    """
    return run_steps(scale_steps(gm), ctx)


