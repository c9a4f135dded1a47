"""Horizontal batching of the ASR excitations: one call for every structurally identical site.

In the ASR training form each converted site computes its gate ``g = A(psi)`` from parameters
only (psi and the excitation's weights); the value is one row per site whatever the batch. A
ResNet-164 with SE runs 54 such excitations per step, each a handful of tiny ops (flatten, two
linear layers, ReLU, sigmoid) forward and backward: about 12 ms of per-op overhead per training
step on one CPU thread, independent of the batch size, where the convolutions of a batch of 16
take 580 ms. Sites whose excitations are the same computation on parameters of the same shapes
(every block of a stage, typically) are computed together instead: their parameters are stacked
(``torch.stack``, differentiable: gradients reach every site's own parameters) and the shared
computation runs once under :func:`torch.func.vmap` -- batched ``matmul`` instead of K ``addmm``.
The vmap call itself costs more than the arithmetic it batches (about 0.15 ms per call and as
much in the backward pass on one CPU thread), so each batched call runs the graph of aten
operators vmap dispatches to instead, traced once per input signature with fake tensors and
functionalized (:func:`_trace_batched`); vmap runs where it cannot (under ``torch.compile``,
a tracer, a functorch transform of the model, a failed trace).
Horizontal fusion of identical small subgraphs is what deep-learning compilers do for
multi-branch and multi-head models (e.g. TVM/Relay's ``CombineParallelConv2D`` / ``CombineParallelDense``
passes); here it needs no new parameters, so checkpoints are unchanged.

Sizes an excitation reads from its map (``b, c = x.shape[:2]`` ... ``view(b, c)``) that no input
changes -- the channel count the layers fix, the batch extent :func:`~.batch_rows.one_row` made
1 -- are constants of the batched call, so the step reads no shape for it and checks no site's
sizes against the batch's (a size that varies, a height, stays read and checked). The batched
calls then depend on parameters alone and run first in the step, together, not each between
a stage's large convolutions (an excitation that draws random numbers is not batched: it
would draw one mask over the stacked sites).

The batched graph computes the same values as the per-site one (vmap applies the same ops to
each slice; the rounding of a batched matmul may differ from K single ones in the last bits).
Parameter-free modules (activations) run as they are; ``nn.Linear`` and ``nn.Conv1d/2d/3d`` are
called through their functional form on the stacked weights; an excitation with any other
module holding parameters or buffers, a module with hooks, or a value the input reaches (not
even through its shape) keeps its own per-site computation.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from asrfx.errors import InputError
from .find_attention import AttentionSite
from .sizes import VARIES, fixed_size, input_dependence, is_size
from .layers import batch_norm_args
from .graph_utils import get_attr_path, module_hooks, safe_dce, stable_toposort, unique_name

__all__ = ["BatchedExcitations", "batch_excitations", "excitation_row"]

_RESHAPES = {"view", "reshape", "flatten", "unsqueeze", "squeeze", "expand", "expand_as"}
_CONVS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


class BatchedExcitations(nn.Module):
    """K identical excitations computed together.

    ``forward(*inputs)``: ``template`` applied to each slice of its stacked tensor inputs
    (:func:`torch.func.vmap` over dim 0 of the inputs ``in_dims`` marks 0; the others are sizes,
    the first site's), i.e. ``torch.stack([template(<slice k>) for k in range(count)])``, shape
    ``(count, *gate shape)``. :func:`excitation_row` hands each site its row.

    ``template`` is a GraphModule of one site's excitation; it holds no tensors, so this module
    adds nothing to a state_dict."""

    asrfx_pure = True  # no side effects: dead-code elimination may drop an unread call

    def __init__(self, template: fx.GraphModule, in_dims: tuple[int | None, ...],
                 count: int, idle_dropouts: tuple[nn.Module, ...] = ()) -> None:
        super().__init__()
        self.template = template
        self.in_dims = tuple(in_dims)
        self.count = count
        # every site's dropouts of rate 0 (they draw nothing: timm's ConvMlp(drop=0.)); held,
        # not registered (they are the sites' own modules), to check their rate stays 0
        self.idle_dropouts = tuple(idle_dropouts)

    def forward(self, *inputs: Any) -> torch.Tensor:
        for drop in getattr(self, "idle_dropouts", ()):
            rate = drop.p
            if rate != 0 and self.training:
                raise InputError(
                    f"asrfx: a dropout in the excitations this batched call computes for "
                    f"{self.count} sites now has p={rate}; it had p=0 (no random draws) when "
                    f"prepare(fused=True) batched them, and one call cannot draw each site's "
                    f"own mask. Set the rate before prepare, and prepare the model again: "
                    f"excitations with a dropout are then left unbatched.")
        traced = self._traced(inputs)
        if traced is not None:
            return traced(*inputs)
        return torch.func.vmap(self.template, in_dims=self.in_dims)(*inputs)

    def _traced(self, inputs: tuple) -> fx.GraphModule | None:
        """The batched computation for inputs like these as a graph of aten operators, traced
        once per input signature (:func:`_trace_batched`), or None where the vmap call has to
        run (a compiler or tracer is at work, an input is not a plain tensor or int, the trace
        failed)."""
        key = _signature(inputs, self.in_dims)
        if key is None:
            return None
        key = (self.training, key)
        cache = self.__dict__.setdefault("_asrfx_traced", {})
        if key not in cache:
            cache[key] = _trace_batched(self.template, self.in_dims, inputs)
        return cache[key]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_asrfx_traced", None)  # traced again on first use
        return state

    def row(self, k: int, inputs: tuple, own: tuple) -> torch.Tensor:
        """Site ``k``'s value computed alone, with its own sizes."""
        it = iter(own)
        return self.template(*(a[k] if d == 0 else next(it)
                               for a, d in zip(inputs, self.in_dims)))

    def extra_repr(self) -> str:
        return f"count={self.count}"


def _signature(inputs: tuple, in_dims: tuple[int | None, ...]) -> tuple | None:
    """What a traced batched graph is specific to: each stacked tensor's shape, strides, dtype
    and device, each size's value; None if one is anything else, or a compiler, a tracer or
    autocast runs (autocast's casts would be baked into the trace)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting() or \
            _autocast_on():
        return None
    key: list[Any] = []
    for a, d in zip(inputs, in_dims):
        if d is None:
            if type(a) is not int:
                return None
            key.append(a)
        elif type(a) in (torch.Tensor, nn.Parameter) and a.layout is torch.strided and \
                not torch._C._functorch.is_functorch_wrapped_tensor(a):
            key.append((tuple(a.shape), a.stride(), a.dtype, a.device))
        else:
            return None
    return tuple(key)


def _autocast_on() -> bool:
    """Autocast is enabled for some device type."""
    for device in ("cpu", "cuda", "xpu", "mps"):
        try:
            if torch.is_autocast_enabled(device):
                return True
        except (TypeError, RuntimeError):  # a build without that device type's autocast
            continue
    return False


_ATEN = torch.ops.aten
_SAME_SHAPE_VIEWS = {_ATEN.view.default, _ATEN._unsafe_view.default, _ATEN.expand.default,
                     _ATEN.reshape.default}


def _trace_batched(template: fx.GraphModule, in_dims: tuple[int | None, ...], inputs: tuple
                   ) -> fx.GraphModule | None:
    """``vmap(template, in_dims)`` for inputs of the shapes of ``inputs`` as a graph of the aten
    operators vmap dispatches to (:func:`torch.fx.experimental.proxy_tensor.make_fx` on fake
    tensors, functionalized), without the views of a tensor to its own shape and the products
    with 1 it records (both exact). It computes what the vmap call computes, bit for bit and
    with the same gradients, without vmap's per-call cost (about 0.15 ms per call and as much
    again in the backward pass on one CPU thread, for a few microseconds of arithmetic). None
    if the trace fails; the vmap call is then used."""
    from torch.fx.experimental.proxy_tensor import make_fx

    fn = torch.func.functionalize(torch.func.vmap(template, in_dims=in_dims))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = make_fx(fn, tracing_mode="fake")(*inputs)
    except Exception:  # noqa: BLE001 - any op fake tensors or functionalization cannot run
        return None
    graph = gm.graph
    for n in list(graph.nodes):
        if n.op != "call_function" or not n.args or not isinstance(n.args[0], fx.Node):
            continue
        src, val = n.args[0], n.meta.get("val")
        before = src.meta.get("val")
        if not isinstance(val, torch.Tensor) or not isinstance(before, torch.Tensor):
            continue
        same = n.target in _SAME_SHAPE_VIEWS and list(before.shape) == list(n.args[1]) or \
            n.target is _ATEN.mul.Scalar and n.args[1] == 1 and before.dtype == val.dtype
        if same:
            n.replace_all_uses_with(src)
            graph.erase_node(n)
    graph.eliminate_dead_code()
    gm.recompile()
    return gm


_DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
             F.feature_alpha_dropout, torch.dropout}
_RANDOM_FUNCTIONS = {torch.bernoulli, torch.rand,
                     torch.randn, torch.rand_like, torch.randn_like, torch.randint,
                     torch.randint_like, torch.normal, torch.multinomial, torch.randperm,
                     torch.poisson, F.rrelu, torch.rrelu, F.gumbel_softmax}
_RANDOM_METHODS = {"bernoulli", "bernoulli_", "uniform_", "normal_", "random_", "exponential_",
                   "geometric_", "log_normal_", "cauchy_"}


def _draws_random(n: fx.Node, mod: nn.Module | None = None) -> bool:
    """Template node ``n`` (calling ``mod``) draws random numbers: a dropout of a rate above
    0, RReLU, a sampling function or method. Batched, it would draw one mask or sample over
    the stacked sites (``vmap`` refuses it in its default randomness mode), not each site's
    own in the multiply form's order; such an excitation keeps its own per-site computation."""
    if n.op == "call_module":
        # a dropout of rate 0 draws nothing (BatchedExcitations checks the rate stays 0)
        return isinstance(mod, nn.modules.dropout._DropoutNd) and mod.p != 0 or \
            isinstance(mod, nn.RReLU)
    if n.op == "call_function" and n.target in _DROPOUTS:
        rate = n.args[1] if len(n.args) > 1 else n.kwargs.get("p", 0.5)
        return not (isinstance(rate, (int, float)) and rate == 0)
    return n.op == "call_function" and n.target in _RANDOM_FUNCTIONS or \
        n.op == "call_method" and n.target in _RANDOM_METHODS


def _torch_modules_only(template: fx.GraphModule) -> bool:
    """Every module ``template`` calls is one of torch's own: a user's parameter-free module
    might sample inside, where :func:`_draws_random` cannot see."""
    return all(type(template.get_submodule(str(n.target))).__module__.startswith("torch.nn")
               for n in template.graph.nodes if n.op == "call_module")


def excitation_row(batched: BatchedExcitations, rows: Any, k: int, inputs: tuple,
                   own: tuple) -> Any:
    """Site ``k``'s gate: ``rows[k]`` of the batched call (``rows``: its output unbound) when
    the sizes site ``k`` reads from the input's shape, where it computes them (``own``), are
    those the batch used (the first site's, in ``inputs``); else its value computed alone
    (:meth:`BatchedExcitations.row`), so the result is always what the site computes. A plain
    function, not a module call: it runs once per site and step."""
    if isinstance(rows, fx.Proxy):  # re-traced (a pickled GraphModule loading back): record it
        return rows.tracer.create_proxy("call_function", excitation_row,
                                        (batched, rows, k, inputs, own), {})
    used = [a for a, d in zip(inputs, batched.in_dims) if d is None]
    if list(own) == used:
        return rows[k]
    return batched.row(k, inputs, own)


def _core(gate: fx.Node, vdep: set[fx.Node]) -> fx.Node | None:
    """The last parameter-only value on the way to ``gate``: ``gate`` itself, or what a chain of
    reshapes reading the input's values (``g.expand_as(x)``) starts from."""
    n = gate
    while n in vdep:
        if n.op != "call_method" or n.target not in _RESHAPES or not n.args or \
                not isinstance(n.args[0], fx.Node):
            return None
        n = n.args[0]
    return n


def _cone(core: fx.Node, dep: set[fx.Node], vdep: set[fx.Node]
          ) -> tuple[list[fx.Node], list[fx.Node]]:
    """(``core`` and everything it is computed from up to sizes, in graph order; those sizes)."""
    seen: set[fx.Node] = set()
    sizes: set[fx.Node] = set()
    todo = [core]
    while todo:
        n = todo.pop()
        if n in seen or n in sizes:
            continue
        if n is not core and is_size(n, dep, vdep):
            sizes.add(n)
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    order = list(core.graph.nodes)
    return [n for n in order if n in seen], [n for n in order if n in sizes]


class _Template:
    """One site's excitation as a template: ``inputs`` (attribute paths of the tensors it
    reads, or the size nodes it reads, in order), ``in_dims`` (0 for a tensor, None for a size),
    ``graph`` (a function of those) and ``key`` (equal for excitations that compute the same
    thing on tensors of the same shapes)."""

    def __init__(self) -> None:
        self.graph = fx.Graph()
        self.inputs: list[Any] = []
        self.in_dims: list[int | None] = []
        self.modules: dict[str, nn.Module] = {}
        self.key: list[Any] = []
        self.idle_dropouts: list[nn.Module] = []  # the dropouts of rate 0 it calls

    def leaf(self, path: str, value: torch.Tensor) -> fx.Node:
        self.inputs.append(path)
        self.in_dims.append(0)
        self.key.append(("leaf", tuple(value.shape), value.dtype, value.device,
                         value.requires_grad))
        return self.graph.placeholder(f"t{len(self.inputs)}")

    def size(self, node: fx.Node) -> fx.Node:
        self.inputs.append(node)
        self.in_dims.append(None)
        self.key.append(("size",))
        return self.graph.placeholder(f"s{len(self.inputs)}")

    @property
    def sizes(self) -> list[fx.Node]:
        return [a for a, d in zip(self.inputs, self.in_dims) if d is None]


def _template(gm: fx.GraphModule, core: fx.Node, cone: list[fx.Node], sizes: list[fx.Node],
              fixed: dict[fx.Node, Any]) -> _Template | str:
    """``core``'s excitation as a :class:`_Template`, or why it cannot be batched. A size in
    ``fixed`` (its value for every input) is a constant of the template and part of its key."""
    t = _Template()
    env: dict[fx.Node, fx.Node] = {}
    index = {n: i for i, n in enumerate(sizes + cone)}

    def arg(a: Any) -> Any:
        return fx.map_arg(a, lambda n: env[n])

    def shape_key(a: Any) -> Any:  # node arguments by position; constants as they are
        return repr(fx.map_arg(a, lambda n: f"%{index[n]}"))

    for n in sizes:
        if n in fixed:
            env[n] = fixed[n]
            t.key.append(("fixed", repr(fixed[n])))
        else:
            env[n] = t.size(n)
    for n in cone:
        if n.op == "get_attr":
            try:
                value = gm.get_parameter(str(n.target))
            except AttributeError:
                try:
                    value = gm.get_buffer(str(n.target))
                except AttributeError:
                    return f"{n.target} is not a tensor of the model"
            env[n] = t.leaf(str(n.target), value)
            continue
        if n.op == "call_module":
            mod = gm.get_submodule(str(n.target))
            if module_hooks(mod):
                return f"{n.target} has hooks"
            conv = _CONVS.get(type(mod))
            if type(mod) is nn.Linear or conv is not None:
                if n.kwargs or len(n.args) != 1 or conv is not None and \
                        mod.padding_mode != "zeros":
                    return f"{n.target}: an unusual call"
                w = t.leaf(f"{n.target}.weight", mod.weight)
                b = None if mod.bias is None else t.leaf(f"{n.target}.bias", mod.bias)
                if conv is None:
                    env[n] = t.graph.call_function(F.linear, (env[n.args[0]], w, b))
                    t.key.append(("linear", index[n.args[0]]))
                else:
                    conf = (mod.stride, mod.padding, mod.dilation, mod.groups)
                    env[n] = t.graph.call_function(conv, (env[n.args[0]], w, b, *conf))
                    t.key.append((conv.__name__, index[n.args[0]], conf))
                continue
            if any(True for _ in mod.parameters()) or any(True for _ in mod.buffers()):
                return f"{n.target} ({type(mod).__name__}) holds tensors"
            if _draws_random(n, mod):
                return f"{n.target} ({type(mod).__name__}) draws random numbers"
            if isinstance(mod, nn.modules.dropout._DropoutNd):
                t.idle_dropouts.append(mod)
            name = f"m{len(t.modules)}"
            t.modules[name] = mod
            env[n] = t.graph.call_module(name, arg(n.args), arg(n.kwargs))
            # torch's own modules print their settings; any other module is only the same
            # computation as itself (its attributes need not show in its repr)
            same = repr(mod) if type(mod).__module__.startswith("torch.nn") else id(mod)
            t.key.append(("module", type(mod), same, shape_key(n.args), shape_key(n.kwargs)))
            continue
        if n.op in ("call_function", "call_method"):
            if _draws_random(n):
                return f"{n.name} draws random numbers"
            if n.op == "call_method" and str(n.target).endswith("_") or \
                    n.kwargs.get("inplace") or n.kwargs.get("out") is not None:
                return f"{n.name} changes a tensor in place"
            make = t.graph.call_function if n.op == "call_function" else t.graph.call_method
            env[n] = make(n.target, arg(n.args), arg(n.kwargs))
            t.key.append((n.op, n.target, shape_key(n.args), shape_key(n.kwargs)))
            continue
        return f"{n.name}: {n.op}"
    t.graph.output(env[core])
    return t


def _exclusive(cone: list[fx.Node], core: fx.Node) -> bool:
    """Nothing outside the excitation reads its intermediate values (leaves may be shared:
    they are read again, not moved)."""
    inside = set(cone)
    return all(n is core or n.op == "get_attr" or all(u in inside for u in n.users)
               for n in cone)


@dataclass
class _NormAffine:
    """Where one batched gate row is applied in a norm's affine: the weight and bias (their
    attribute paths) and how the precomputed products replace the norm's own (``use(w, b)``)."""

    weight: str
    bias: str
    use: Callable[[fx.Node, fx.Node], None]


def _norm_affine(gm: fx.GraphModule, row: fx.Node) -> _NormAffine | None:
    """How the batched gate ``row`` scales a fused norm's weight and bias (Parameters): a
    fused module's call ``bn(x, row)`` (:class:`~.fuse_gates._Gated`), or the two
    ``gate_affine(param, row)`` of a traced-through ``F.batch_norm``; None for any other
    reader."""
    from .fuse_gates import _Gated, gate_affine

    if row.target is not operator.getitem:
        return None  # (a row read through excitation_row may be the site's own value)
    users = list(row.users)
    if len(users) == 1 and users[0].op == "call_module":
        (call,) = users
        mod = gm.get_submodule(call.target)
        if len(call.args) != 2 or call.args[1] is not row or call.kwargs or \
                not isinstance(mod, _Gated) or not isinstance(mod.weight, nn.Parameter) or \
                not isinstance(mod.bias, nn.Parameter):
            return None

        def use_module(w: fx.Node, b: fx.Node) -> None:
            call.kwargs = {"affine": (w, b)}
        return _NormAffine(f"{call.target}.weight", f"{call.target}.bias", use_module)
    if len(users) != 2 or any(u.target is not gate_affine or len(u.args) != 2 or
                              u.args[1] is not row or not isinstance(u.args[0], fx.Node) or
                              u.args[0].op != "get_attr" for u in users):
        return None  # (a norm without weight: gate_affine(None, row))
    norms = [(u, k) for u in users for n in u.users
             if (args := batch_norm_args(n)) is not None for k in ("weight", "bias")
             if args[k] is u]
    if len(norms) != 2 or len({n for u in users for n in u.users}) != 1:
        return None
    by = {k: u for u, k in norms}
    if set(by) != {"weight", "bias"} or not all(
            isinstance(get_attr_path(gm, by[k].args[0].target), nn.Parameter) for k in by):
        return None

    def use_functional(w: fx.Node, b: fx.Node) -> None:
        by["weight"].args = (*by["weight"].args, w)
        by["bias"].args = (*by["bias"].args, b)
    return _NormAffine(by["weight"].args[0].target, by["bias"].args[0].target, use_functional)


def batch_gate_affines(gm: fx.GraphModule, out: fx.Node, parts: fx.Node,
                       rows: list[fx.Node]) -> bool:
    """Compute the scaled affines of a batched group's fused norms in one product: when every
    gate row of the group (``rows``, read from ``parts = out.unbind(0)``) scales a fused
    BatchNorm's weight and bias, all of one shape, ``stack(weights) * out.reshape(k, -1)``
    and the same for the biases, unbound, become each norm's scaled affine (a fused module's
    ``affine`` argument, :class:`~.fuse_gates._Gated`; the ``product`` of a traced-through
    ``F.batch_norm``'s :func:`~.fuse_gates.gate_affine`): the same elementwise products as
    each norm's ``weight * s``, ``bias * s``, but two multiplies per group instead of two per
    norm, forward and backward (placed with the batched call: at the start of the step;
    ResNet-164 with SE, batch 2, one thread: 1.5-6.7 ms less per step). Returns whether the
    group's norms got them."""
    found = [_norm_affine(gm, r) for r in rows]
    if any(f is None for f in found):
        return False
    params = [get_attr_path(gm, path) for f in found for path in (f.weight, f.bias)]
    like = params[0]
    if any(p.shape != like.shape or p.dtype != like.dtype or p.device != like.device
           for p in params):
        return False
    graph = gm.graph
    with graph.inserting_before(parts.next):  # (in this order, after the batched call)
        gate = graph.call_method("reshape", (out, len(rows), -1))
        weights, biases = (
            graph.call_method("unbind", (graph.call_function(operator.mul, (graph.call_function(
                torch.stack, ([graph.get_attr(getattr(f, attr)) for f in found],)), gate)),
                0)) for attr in ("weight", "bias"))
    for k, (f, row) in enumerate(zip(found, rows)):
        with graph.inserting_before(min(row.users)):
            f.use(graph.call_function(operator.getitem, (weights, k)),
                  graph.call_function(operator.getitem, (biases, k)))
    return True


def batch_excitations(gm: fx.GraphModule, sites: list[AttentionSite]) -> tuple[int, int]:
    """Compute the gates of ``sites`` (converted, one row each) in one
    :class:`BatchedExcitations` call per group of identical excitations (two sites or more).
    Edits ``gm`` in place; returns (sites batched, groups). A site whose excitation cannot be
    batched, or is alone of its kind, is left as it is."""
    graph = gm.graph
    dep, vdep = input_dependence(graph)
    groups: dict[str, list[tuple[fx.Node, _Template]]] = {}
    alive = set(graph.nodes)
    memo: dict[fx.Node, Any] = {}
    for site in sites:
        # a gate node an earlier rewrite replaced (a module called at two sites) is not asked
        if site.rows is not None or site.gate not in alive:
            continue
        core = _core(site.gate, vdep)
        if core is None or core.op in ("get_attr", "placeholder") or is_size(core, dep, vdep):
            continue
        cone, sizes = _cone(core, dep, vdep)
        if any(n in vdep or n.op == "placeholder" for n in cone) or \
                not _exclusive(cone, core):
            continue
        fixed = {n: v for n in sizes if (v := fixed_size(gm, n, dep, memo)) is not VARIES}
        t = _template(gm, core, cone, sizes, fixed)
        if isinstance(t, str):
            continue
        groups.setdefault(repr(t.key), []).append((core, t))
    batched = count = 0
    top = next(n for n in graph.nodes if n.op != "placeholder")  # the hoisted calls go before
    for members in groups.values():
        if len(members) < 2:
            continue
        t0 = members[0][1]
        root = nn.Module()
        for name, mod in t0.modules.items():
            root.add_module(name, mod)
        template = fx.GraphModule(root, t0.graph, class_name="Excitation")
        name = unique_name(gm, "asrfx_excitations")
        gm.add_module(name, BatchedExcitations(
            template, tuple(t0.in_dims), len(members),
            tuple(d for _, t in members for d in t.idle_dropouts)))
        # placed first in the graph, the topological sort below moving it after any size it
        # reads: computed from parameters only, the gates of every group are then computed
        # together at the start of the step, not each group between large convolutions
        # (ResNet-164 SE, batch 2, one thread: -2 ms of the fused form's ~11.5 ms over the
        # backbone). Known random ops are not batched at all; a call of a user's module (which
        # might sample inside) stays before the first site's use, in the multiply form's order
        first = top if _torch_modules_only(template) else \
            min(u for core, _ in members for u in core.users)  # fx nodes compare by position
        with graph.inserting_before(first):
            inputs = []
            for j, d in enumerate(t0.in_dims):
                if d is None:
                    inputs.append(t0.inputs[j])
                    continue
                leaves = [graph.get_attr(t.inputs[j]) for _, t in members]
                inputs.append(graph.call_function(torch.stack, (leaves,)))
            out = graph.call_module(name, tuple(inputs))
            parts = graph.call_method("unbind", (out, 0))
        rows = []
        for k, (core, t) in enumerate(members):
            with graph.inserting_before(min(core.users)):
                if k == 0 or not t.sizes:
                    part = graph.call_function(operator.getitem, (parts, k))
                else:  # checked against the site's own sizes, read where it reads them
                    part = graph.call_function(excitation_row, (
                        graph.get_attr(name), parts, k, tuple(inputs), tuple(t.sizes)))
            part.meta = {key: v for key, v in core.meta.items() if key == "tensor_meta"}
            core.replace_all_uses_with(part)
            rows.append(part)
        batch_gate_affines(gm, out, parts, rows)
        batched += len(members)
        count += 1
    if count:
        safe_dce(gm)  # the per-site excitations the batched calls replaced
        stable_toposort(graph)
    return batched, count

