"""Small graph queries shared by the passes: shapes, input dependence, module paths, op kinds."""

from __future__ import annotations

import builtins
import collections
import copy
import math
import operator
from typing import Any, Iterable

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["tensor_shape", "size_dim", "value_dependent", "module_path", "is_op", "to_networkx",
           "MUL_OPS", "ADD_OPS", "SUB_OPS", "SHAPE_ATTRS", "SHAPE_METHODS", "call_sites",
           "node_module", "set_attr_path", "reads_shape_only", "stable_toposort", "clone_module", "safe_dce", "has_side_effects", "module_device", "shapes_only", "get_attr_path", "unique_name",
           "module_hooks", "describe_hooks", "deepcopy_module", "submodule", "to_eval",
           "drop_dead"]

MUL_OPS = {operator.mul, operator.imul, torch.mul, "mul", "mul_", torch.Tensor.mul}
ADD_OPS = {operator.add, operator.iadd, torch.add, "add", "add_", torch.Tensor.add}
SUB_OPS = {operator.sub, operator.isub, torch.sub, "sub", "sub_"}
SHAPE_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "layout"}
SHAPE_METHODS = {"size", "dim", "numel", "type_as_shape", "get_device", "ndimension", "nelement"}


def is_op(node: fx.Node, ops: set) -> bool:
    """True when ``node`` is a call_function or call_method whose target is in ``ops`` (never
    for an unhashable target, e.g. a bound method of an unhashable object)."""
    if node.op not in ("call_function", "call_method"):
        return False
    try:
        return node.target in ops
    except TypeError:
        return False


def tensor_shape(node: Any) -> tuple[int, ...] | None:
    """Shape recorded by shape propagation, or None for non-tensors / unknown."""
    if not isinstance(node, fx.Node):
        return None
    tm = node.meta.get("tensor_meta")
    shape = getattr(tm, "shape", None)
    return tuple(shape) if shape is not None else None


def reads_shape_only(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is builtins.getattr:
        return len(node.args) > 1 and node.args[1] in SHAPE_ATTRS
    if node.op == "call_method" and node.target in SHAPE_METHODS:
        return True
    if node.op == "call_function" and node.target is builtins.len:
        return True
    return False


def size_dim(node: fx.Node) -> Any:
    """The ``dim`` of an ``x.size(dim)`` call node (positional or keyword), None for
    ``x.size()``."""
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")


#: methods reading their second argument's shape only (``y.reshape_as(x)``)
_AS_SHAPE_OF = {"reshape_as", "view_as", "expand_as"}


def reads_shape_of(user: fx.Node, node: fx.Node) -> bool:
    """``user`` reads only the shape of ``node``: :func:`reads_shape_only`, or ``node`` is only
    the shape template of ``y.reshape_as(node)`` (LeViT's ``bn(y.flatten(0, 1)).reshape_as(y)``
    reads ``y``'s values through the norm and its shape here)."""
    if reads_shape_only(user):
        return True
    return user.op == "call_method" and user.target in _AS_SHAPE_OF and \
        len(user.args) == 2 and user.args[1] is node and user.args[0] is not node and \
        not user.kwargs


def value_readers(node: fx.Node) -> int:
    """How many users of ``node`` read its values, not only its shape
    (:func:`reads_shape_of`): a layer whose output only one op reads can take a fold."""
    return sum(1 for u in node.users if not reads_shape_of(u, node))


def shapes_only(node: fx.Node) -> bool:
    """Every reader of ``node`` reads only its shape (``torch.stack(parts).shape`` in an
    assertion): a fold that keeps shapes cannot change what they see."""
    return bool(node.users) and all(reads_shape_only(u) for u in node.users) and \
        not node.is_impure()


def value_dependent(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose *values* depend on the graph inputs.

    A node that reads only the shape of an input (``x.shape``, ``x.size(0)``, ``x.dim()``) is not
    value-dependent, nor is anything computed from parameters and such shapes alone: those are the
    constants of an input-independent branch (an ASR branch sizes its output from ``x.shape``).
    """
    dep: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            dep.add(node)
        elif node.op in ("call_function", "call_method", "call_module"):
            if reads_shape_only(node):
                continue
            if any(a in dep for a in node.all_input_nodes):
                dep.add(node)
        elif node.op == "output":
            continue
    return dep


def module_path(node: fx.Node) -> str:
    """The deepest module a node was traced in ('' for the top level)."""
    if node.op == "call_module":
        parts = str(node.target).rsplit(".", 1)
        stack = node.meta.get("nn_module_stack")
        if stack and len(stack) >= 2:
            return list(stack.keys())[-2]
        return parts[0] if len(parts) > 1 else ""
    stack = node.meta.get("nn_module_stack")
    if stack:
        return list(stack.values())[-1][0] if isinstance(list(stack.values())[-1], tuple) \
            else list(stack.keys())[-1]
    return ""


def submodule(root: nn.Module, target: Any) -> nn.Module:
    """``root.get_submodule(target)`` for a ``call_module`` node's target or a module path,
    walked through the registered submodules (``_modules``): about 15x faster (the passes ask
    thousands of times per model). A path that does not name registered submodules all the way
    is answered by ``get_submodule`` itself, with its error."""
    mod = root
    for part in str(target).split("."):
        mod = mod._modules.get(part)
        if mod is None:
            return root.get_submodule(str(target))
    return mod


def to_eval(model: nn.Module) -> None:
    """``model.eval()``: when no submodule has a ``train`` of its own (which ``eval`` would
    call), only the flags still True are set. Setting the flag of every module of a large model
    takes milliseconds; the pipeline asks several times."""
    train = nn.Module.train
    mods = list(model.modules())
    if any(type(m).train is not train for m in mods):
        model.eval()
        return
    for m in mods:  # what eval() does, setting only the flags that change (a new GraphModule
        if m.training:  # over eval-mode modules: its own flag alone)
            m.training = False


def node_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    return submodule(gm, node.target)


_FxNodeTable = getattr(fx.graph, "_FindNodesLookupTable", None)


if _FxNodeTable is not None:
    class _CallSiteTable(_FxNodeTable):  # type: ignore[misc, valid-type]
        """fx's side table of a graph's nodes (every node added, erased or given a new op or
        target goes through ``insert`` / ``remove``), also counting the call_module nodes per
        target."""

        def __init__(self, table: Any):
            super().__init__()
            self.table = table.table
            self.calls = collections.Counter(
                str(n.target) for n in self.table[("call_module", None)])

        def insert(self, node: fx.Node) -> None:
            super().insert(node)
            if node.op == "call_module":
                self.calls[str(node.target)] += 1

        def remove(self, node: fx.Node) -> None:
            super().remove(node)
            if node.op == "call_module":
                self.calls[str(node.target)] -= 1


def call_sites(graph: fx.Graph, target: str) -> int:
    """How many call_module nodes call the module ``target``.

    Answered from a count kept with fx's node table (installed on the graph at the first
    question): a fold asks once per fused layer, and counting by a scan made it quadratic in
    the graph's size. Without that table (another torch), by a scan."""
    table = getattr(graph, "_find_nodes_lookup_table", None)
    if _FxNodeTable is None or type(table) not in (_FxNodeTable, _CallSiteTable):
        return len(graph.find_nodes(op="call_module", target=target, sort=False))
    if type(table) is _FxNodeTable:
        try:
            counted = _CallSiteTable(table)
        except (AttributeError, KeyError, TypeError):  # fx's private table changed shape
            return len(graph.find_nodes(op="call_module", target=target, sort=False))
        table = graph._find_nodes_lookup_table = counted
    return table.calls[str(target)]


def get_attr_path(mod: nn.Module, target: str) -> Any:
    obj: Any = mod
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_attr_path(mod: nn.Module, target: str, value: Any) -> None:
    """Set ``mod.<target>`` creating plain container modules along the way."""
    *prefix, field = target.split(".")
    for part in prefix:
        nxt = getattr(mod, part, None)
        if nxt is None:
            nxt = nn.Module()
            setattr(mod, part, nxt)
        mod = nxt
    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        if field in mod._parameters:
            del mod._parameters[field]
        mod.register_buffer(field, value)
    else:
        if isinstance(value, nn.Parameter) and field in mod._buffers:
            del mod._buffers[field]
        setattr(mod, field, value)


def unique_name(mod: nn.Module, base: str) -> str:
    """``base`` or ``base_1``, ``base_2``... whichever is not an attribute path of ``mod`` yet."""
    def exists(name: str) -> bool:
        try:
            get_attr_path(mod, name)
            return True
        except AttributeError:
            return False
    if not exists(base):
        return base
    k = 1
    while exists(f"{base}_{k}"):
        k += 1
    return f"{base}_{k}"


def to_networkx(graph: fx.Graph, nodes: Iterable[fx.Node] | None = None) -> nx.DiGraph:
    """The data-flow graph (edge u -> v when v reads u), optionally restricted to ``nodes``."""
    keep = set(nodes) if nodes is not None else None
    g = nx.DiGraph()
    for n in graph.nodes:
        if keep is not None and n not in keep:
            continue
        g.add_node(n)
        for a in n.all_input_nodes:
            if keep is None or a in keep:
                g.add_edge(a, n)
    return g


def prod(xs: Iterable[int]) -> int:
    return int(math.prod(xs))


def _in_order(nodes: list[fx.Node], index: dict[fx.Node, int]) -> bool:
    """Every node of ``nodes`` (a graph's order; ``index``: position) after its inputs, the
    placeholders first and the output last."""
    seen_other = False
    for i, n in enumerate(nodes):
        if n.op == "placeholder":
            if seen_other:
                return False
        else:
            seen_other = True
            if n.op == "output" and i != len(nodes) - 1:
                return False
        if any(index[a] >= i for a in n.all_input_nodes):
            return False
    return True


def stable_toposort(graph: fx.Graph) -> None:
    """Reorder ``graph`` so every node follows its inputs, keeping the current order otherwise.

    Rewrites insert nodes at a convenient point and then rewire earlier nodes to them; this puts
    the graph back into a valid order (placeholders stay first, the output stays last).
    """
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    if _in_order(nodes, index):
        # the sort below would return this very order: among the nodes still to place, the
        # earliest is always ready, and the placeholder-first / output-last key agrees with it
        return
    g = to_networkx(graph)
    order = list(nx.lexicographical_topological_sort(g, key=lambda n: (
        0 if n.op == "placeholder" else 2 if n.op == "output" else 1, index[n])))
    if order == nodes:
        return
    prev = order[0]
    if nodes[0] is not prev:
        nodes[0].prepend(prev)
    for n in order[1:]:
        prev.append(n)
        prev = n


_ATOMIC = (int, float, complex, str, bytes, bool, type(None), torch.dtype, torch.device)
_ATOMIC_TYPES = frozenset(_ATOMIC)
_EMPTY_COPIES = (dict, set, list, collections.OrderedDict)  # copied empty as new ones


#: the hook dicts ``Module.__call__`` runs (``_forward_hooks_with_kwargs`` and friends only hold
#: flags keyed like these)
CALL_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def inert_hook(hook: Any) -> bool:
    """``hook`` does nothing unless the model's own forward asks it to while that forward runs:
    transformers' output-capturing hooks (``transformers.utils.output_capturing``, installed by
    every model whose forward is decorated with ``capture_outputs``, e.g. each backbone's
    hidden states) record a layer's output only while the decorated forward has a collector
    active, and return nothing. Traced through, such a hook runs while the forward is traced
    (it records the traced value, which the forward returns); called by a graph, it finds no
    collector and does nothing."""
    return getattr(hook, "__module__", None) == "transformers.utils.output_capturing" and \
        getattr(hook, "__name__", None) == "output_capturing_hook"


def module_hooks(mod: nn.Module) -> list[str]:
    """What runs when ``mod`` is called besides its ``forward``: its forward (pre-)hooks and
    backward (pre-)hooks, described in words (``"forward hook"``, ``"legacy weight_norm"``...);
    empty when there are none. Global hooks (``register_module_forward_hook``) are not counted,
    nor inert ones (:func:`inert_hook`).
    """
    if not any(getattr(mod, attr, None) for attr in CALL_HOOK_DICTS):
        return []
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    kinds: list[str] = []
    for attr, word in zip(CALL_HOOK_DICTS, ("forward pre-hook", "forward hook",
                                            "backward pre-hook", "backward hook")):
        for hook in (getattr(mod, attr, None) or {}).values():
            if inert_hook(hook):
                continue
            kind = "legacy weight_norm" if isinstance(hook, WeightNorm) else \
                "legacy spectral_norm" if isinstance(hook, SpectralNorm) else \
                "pruning" if isinstance(hook, BasePruningMethod) else word
            if kind not in kinds:
                kinds.append(kind)
    return kinds


def describe_hooks(kinds: list[str]) -> str:
    """``["forward hook", "legacy weight_norm"]`` -> "a forward hook and a legacy weight_norm
    hook", for messages."""
    words = [f"a {k} hook" if k.startswith("legacy") or k == "pruning" else f"a {k}"
             for k in kinds]
    return " and ".join(words) if len(words) <= 2 else ", ".join(words)


def _nonleaf_copy(v: torch.Tensor, memo: dict) -> torch.Tensor:
    """A copy of a tensor attribute computed with autograd (legacy ``weight_norm`` keeps
    ``weight`` so, recomputing it from ``weight_g``/``weight_v`` before every call), which
    ``copy.deepcopy`` refuses: the values, detached (the graph it came from is the caller's)."""
    got = memo.get(id(v))
    if got is None:
        got = memo[id(v)] = v.detach().clone()
    return got


def _share_hooks(hooks: dict, memo: dict) -> dict:
    """A new hook dict holding the caller's hooks themselves, so that what a hook records lands
    where the caller looks (a counter, a list of activations). A hook bound to a module (a
    method of it, or a module) follows the copy of that module instead."""
    import types

    out = type(hooks)()
    for k, h in hooks.items():
        bound = getattr(h, "__self__", None)
        if isinstance(h, nn.Module):
            h = clone_module(h, memo)
        elif isinstance(h, types.MethodType) and isinstance(bound, nn.Module):
            h = types.MethodType(h.__func__, clone_module(bound, memo))
        out[k] = h
    return out


def _copy_tensor(t: torch.Tensor, memo: dict) -> torch.Tensor | None:
    """``copy.deepcopy(t, memo)`` for the common parameter or buffer -- an exact ``Parameter``,
    or a plain dense CPU/CUDA tensor without gradient, autograd flag or attributes of its own --
    done the way torch's ``__deepcopy__`` does it (a Parameter's values cloned; a tensor's
    storage copied once, in ``memo``, so tensors sharing it still do), without its generic
    checks: about 3x faster. None for any other tensor (``copy.deepcopy`` then)."""
    got = memo.get(id(t))
    if got is not None:
        return got
    if type(t) is nn.Parameter:
        new = nn.Parameter(t.data.clone(memory_format=torch.preserve_format), t.requires_grad)
    elif type(t) is torch.Tensor and t.layout is torch.strided and \
            t.device.type in ("cpu", "cuda") and not t.is_quantized and not t.requires_grad \
            and t.grad is None and not t.is_conj() and not t.is_neg() and not t.__dict__:
        storages = memo.setdefault("torch", {})  # the memo of UntypedStorage.__deepcopy__
        storage = t.untyped_storage()
        copied = storages.get(storage._cdata)
        if copied is None:
            copied = storages[storage._cdata] = storage.clone()
        new = t.new_empty([]).set_(copied, t.storage_offset(), t.size(), t.stride())
    else:
        return None
    memo[id(t)] = new
    memo.setdefault(id(memo), []).append(t)  # as copy.deepcopy keeps the original alive
    return new


def _copy_value(v: Any, memo: dict) -> Any:
    kind = type(v)
    if kind in _ATOMIC_TYPES:  # (the common cases first: a module holds ~20 values)
        return v
    if kind in _EMPTY_COPIES and not v:
        return kind()
    if isinstance(v, _ATOMIC):
        return v
    if isinstance(v, torch.Tensor):
        if not v.is_leaf:
            return _nonleaf_copy(v, memo)
        new = _copy_tensor(v, memo)
        if new is not None:
            return new
    if kind is tuple and all(isinstance(e, _ATOMIC) for e in v):
        return v
    return copy.deepcopy(v, memo)


def clone_module(mod: nn.Module, memo: dict | None = None) -> nn.Module:
    """A deep copy of ``mod``, about twice as fast as ``copy.deepcopy`` on large models.

    Parameters and buffers are deep-copied (tied weights stay tied through ``memo``); module
    state that is atomic (numbers, strings, tuples of them) is shared, the hooks a call runs are
    the caller's own (see :func:`_share_hooks`), a tensor attribute computed with autograd
    (legacy ``weight_norm``'s ``weight``) is copied detached, everything else is deep-copied.
    Classes with their own ``__deepcopy__`` or ``__slots__`` go through :func:`deepcopy_module`.
    """
    memo = {} if memo is None else memo
    got = memo.get(id(mod))
    if got is not None:
        return got
    cls = type(mod)
    if getattr(cls, "__deepcopy__", None) is not None or "__slots__" in vars(cls):
        return deepcopy_module(mod, memo)
    new = object.__new__(cls)
    memo[id(mod)] = new
    d: dict[str, Any] = {}
    for k, v in mod.__dict__.items():
        if k == "_modules":
            d[k] = {n: (None if c is None else clone_module(c, memo)) for n, c in v.items()}
        elif k in ("_parameters", "_buffers"):
            d[k] = {n: (None if t is None else _copy_value(t, memo)) for n, t in v.items()}
        elif k in CALL_HOOK_DICTS and v:
            d[k] = _share_hooks(v, memo)
        else:
            d[k] = _copy_value(v, memo)
    new.__dict__ = d
    return new


def deepcopy_module(mod: nn.Module, memo: dict | None = None) -> nn.Module:
    """``copy.deepcopy(mod)`` that also copies tensor attributes computed with autograd (legacy
    ``weight_norm``/``spectral_norm`` after a forward with gradients), detached, where
    ``copy.deepcopy`` raises "Only Tensors created explicitly by the user (graph leaves)..."."""
    memo = {} if memo is None else memo
    for m in mod.modules():
        for v in vars(m).values():
            if isinstance(v, torch.Tensor) and not v.is_leaf:
                _nonleaf_copy(v, memo)
    return copy.deepcopy(mod, memo)


def _mutates(node: fx.Node, gm: nn.Module | None) -> bool:
    if node.op == "call_method" and isinstance(node.target, str):
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if node.target in (operator.not_, operator.and_, operator.or_):
            return False  # Python's logical operators, not in-place tensor ops
        if node.kwargs.get("inplace") or (name.endswith("_") and not name.endswith("__")):
            return True
        return node.target in (operator.iadd, operator.isub, operator.imul,
                               operator.itruediv, operator.setitem)
    if node.op == "call_module" and gm is not None:
        try:
            return bool(getattr(submodule(gm, node.target), "inplace", False))
        except AttributeError:
            return True
    return False


# layers and ops that return a new tensor (never their input or a view of it): an in-place op
# on their result can only be seen by the nodes that read that result afterwards
_FRESH_MODULES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase,
                  nn.GroupNorm, nn.LayerNorm, nn.modules.pooling._AdaptiveAvgPoolNd,
                  nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.pooling._AvgPoolNd,
                  nn.modules.pooling._MaxPoolNd, nn.Sigmoid, nn.Tanh, nn.Softmax, nn.GELU,
                  nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU,
                  nn.Mish, nn.ELU)
_FRESH_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.linear, F.batch_norm, F.group_norm,
                    F.layer_norm, torch.sigmoid, torch.tanh, F.silu, F.gelu, F.relu, F.hardswish,
                    F.hardsigmoid, torch.relu, operator.add, operator.mul, operator.sub,
                    operator.truediv, torch.add, torch.mul, torch.sub, torch.div, torch.cat,
                    torch.mean, torch.sum, torch.matmul, operator.matmul, F.softmax,
                    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d}
_FRESH_METHODS = {"sigmoid", "tanh", "relu", "add", "mul", "sub", "div", "mean", "sum", "clone",
                  "softmax", "matmul", "pow", "sqrt", "exp", "abs"}


def _fresh(node: fx.Node, gm: nn.Module | None) -> bool:
    """Whether ``node`` certainly produced a new tensor (not an input, parameter, buffer, or an
    alias or view of one)."""
    if node.op == "call_module" and gm is not None:
        try:
            mod = submodule(gm, node.target)
        except AttributeError:
            return False
        return type(mod).__module__.startswith("torch.nn") and \
            isinstance(mod, _FRESH_MODULES) and not getattr(mod, "inplace", False) and \
            not module_hooks(mod)  # a forward hook may return anything
    if node.op == "call_function":
        return node.target in _FRESH_FUNCTIONS and not node.kwargs.get("inplace")
    if node.op == "call_method":
        return node.target in _FRESH_METHODS
    return False


def has_side_effects(node: fx.Node, gm: nn.Module | None = None) -> bool:
    """Conservative impurity: fx's own notion; in-place ops (``x.mul_(g)``,
    ``F.relu(x, inplace=True)``, ``nn.ReLU(inplace=True)``) whose effect can be observed: the
    mutated tensor is not certainly a fresh one (it may be an input, parameter, buffer or a view
    of one), or a node after the op reads it; calls of modules outside ``torch.nn`` (opaque
    leaves, unless their class says ``asrfx_pure = True``) and of modules with hooks (the hook
    runs even when nothing reads the output).

    An in-place op on a fresh tensor that nothing reads afterwards (``t = conv(s);
    t.mul_(t.sigmoid())`` with ``t`` unused later) is dead: the reads before it saw the old
    value either way.
    """
    if node.op == "call_module" and gm is not None and node.graph.owning_module is gm:
        try:  # (fx's is_impure looks the module up with get_submodule, ~15x slower)
            mod = submodule(gm, node.target)
        except AttributeError:
            return True
        if getattr(mod, "_is_impure", False):
            return True
    elif node.is_impure():
        return True
    if _mutates(node, gm):
        first = node.args[0] if node.args else None
        if not isinstance(first, fx.Node):
            return False
        if node.op == "call_function" and node.target is operator.setitem:
            return True  # a write through an index: kept
        if not _fresh(first, gm):
            return True
        return any(u is not node and not reads_shape_only(u) and u > node
                   for u in first.users)
    if node.op == "call_module" and gm is not None:
        try:
            mod = submodule(gm, node.target)
        except AttributeError:
            return True
        pure = type(mod).__module__.startswith("torch.nn") or getattr(mod, "asrfx_pure", False)
        return not pure or bool(module_hooks(mod))
    return False


def drop_dead(gm: fx.GraphModule, region: set[fx.Node]) -> None:
    """Erase the calls of ``region`` that nothing reads, opaque module calls included (which
    :func:`safe_dce` keeps in case they have side effects): for a caller that knows what the
    region was (an attention branch it bypassed, calls constant evaluation ran). An in-place
    write stays. Last to first, so dead chains go in one pass."""
    for n in reversed(list(gm.graph.nodes)):
        if n in region and not n.users and \
                n.op in ("call_module", "call_function", "call_method") and not _mutates(n, gm):
            gm.graph.erase_node(n)


def safe_dce(gm: fx.GraphModule) -> bool:
    """Dead-code elimination that never drops a node with side effects (see has_side_effects).

    Nodes are visited last to first, so a chain of dead nodes goes in one pass, and only a node
    without users is asked about side effects. Unlike fx's ``eliminate_dead_code`` it neither
    lints the graph first (a third of its time; the passes keep the graph in order, and the
    pipeline lints each result once: fold's cleanup, the capture's ``build``) nor visits nested
    GraphModules (symbolic tracing makes none)."""
    graph = gm.graph
    changed = False
    for node in reversed(graph.nodes):
        if not node.users and (not has_side_effects(node, gm) or _moot_parts_guard(node)):
            graph.erase_node(node)
            changed = True
    return changed


#: how the message of the guard the tracer adds for a tuple iterated in Python begins (see
#: ``asrfx.tracing``: ``torch._assert(len(parts) == n, ...)``)
PARTS_GUARD = "asrfx: the traced graph iterates over the"


def _moot_parts_guard(node: fx.Node) -> bool:
    """``node`` is the tracer's guard on the number of parts of a split (or other tuple) that
    nothing reads parts of any more (a constant branch baked away): it guards no iteration."""
    if not (node.op == "call_function" and node.target is torch._assert and
            len(node.args) == 2 and isinstance(node.args[1], str) and
            node.args[1].startswith(PARTS_GUARD)):
        return False
    same = node.args[0]
    length = same.args[0] if isinstance(same, fx.Node) and same.target is operator.eq and \
        same.args else None
    if not (isinstance(length, fx.Node) and length.target is builtins.len and
            isinstance(length.args[0], fx.Node)):
        return False
    return all(u.op == "call_function" and u.target is builtins.len
               for u in length.args[0].users)


def module_device(mod: nn.Module) -> torch.device:
    """The device of ``mod``: its first parameter's, else its first buffer's, else the CPU.

    A module without tensors runs wherever its inputs are; the CPU is the answer then.
    """
    for t in mod.parameters():
        return t.device
    for t in mod.buffers():
        return t.device
    return torch.device("cpu")

