"""The ASR rewrite: attention branches read a learnable constant psi instead of the feature map.

``mode="replace"`` (the paper's ASR(SE)): every pooled statistic the branch reads is replaced by a
parameter psi of the statistic's shape with batch 1, expanded to the batch size of ``x`` so that
third-party code that reads ``b, c = x.shape[:2]`` keeps working. The branch then depends on ``x``
only through its shape; fold evaluates it to a constant.

``mode="both"`` (ASR(SE)+SE): the original branch stays; a copy of it with fresh weights reads psi
and scales ``x`` before the original attention sees it.
"""

from __future__ import annotations

import copy
import math
import operator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from asrfx.report import Site
from .find_attention import AttentionSite
from .batch_rows import collapse_batch
from .sizes import pin_sizes
from .graph_utils import (get_attr_path, module_device, module_path, reads_shape_only, set_attr_path,
                          stable_toposort, tensor_shape, value_dependent)
from .layers import batch_norm_args

__all__ = ["apply_asr", "make_psi", "fresh_module", "refuse_batch_statistic_sites",
           "gates_before_batch_norm"]


def make_psi(shape: tuple[int, ...], init: Any, dtype: torch.dtype, device: torch.device
             ) -> nn.Parameter:
    """A new psi of ``shape``: ``init`` is a float, a broadcastable tensor, or ``"normal"``.

    ``"normal"`` draws ``|N(0, 1)|``: positive like the reference's constant 0.1, because some
    statistics are never negative (variance, sum of squares) and their branches take square
    roots or logarithms of them.
    """
    if isinstance(init, str):
        if init != "normal":
            raise ValueError(f"unknown psi init {init!r}")
        value = torch.randn(shape, dtype=dtype, device=device).abs()
    elif isinstance(init, torch.Tensor):
        value = init.detach().to(dtype=dtype, device=device).clone()
        try:
            value = value.reshape(shape) if value.numel() == math.prod(shape) else \
                value.expand(shape).clone()
        except RuntimeError:
            raise ValueError(f"psi init of shape {tuple(init.shape)} does not fit the pooled "
                             f"statistic's shape {shape}") from None
    else:
        value = torch.full(shape, float(init), dtype=dtype, device=device)
    return nn.Parameter(value)


def fresh_module(mod: nn.Module) -> nn.Module:
    """A deep copy of ``mod`` with every parameter re-initialised by its layer's own rule."""
    new = copy.deepcopy(mod)
    for m in new.modules():
        if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
            m.reset_parameters()
    return new


def _fresh_param(root: nn.Module | None, target: str, current: torch.Tensor) -> torch.Tensor:
    owner_path, _, field = target.rpartition(".")
    if root is not None:
        try:
            owner = root.get_submodule(owner_path) if owner_path else root
            if hasattr(owner, "reset_parameters") and isinstance(getattr(owner, field, None),
                                                                  torch.Tensor):
                value = getattr(fresh_module(owner), field)
                if value.shape == current.shape:
                    return nn.Parameter(value.detach().clone()) if isinstance(
                        current, nn.Parameter) else value.detach().clone()
        except AttributeError:
            pass
    value = current.detach().clone()
    if isinstance(current, nn.Parameter):
        if value.dim() >= 2:
            nn.init.kaiming_uniform_(value, a=math.sqrt(5))
        else:
            nn.init.zeros_(value)
        return nn.Parameter(value)
    return value


def _batch_source(site: AttentionSite, stat: fx.Node, both: bool) -> fx.Node:
    """The node whose batch size psi is expanded to: the statistic's input; in mode "both" the
    site's ``x`` where it has the same batch, because the original attention will read
    ``x * A(psi)`` and a pooled map computed from ``x`` (split attention's ``sum(parts)`` over
    parts that are also the sites' ``x``) would then depend on psi's own expansion."""
    src = stat.args[0]
    if both:
        xs, ss = tensor_shape(site.x), tensor_shape(src)
        if xs and ss and xs[0] == ss[0]:
            return site.x
    return src


def _psi_node(gm: fx.GraphModule, site: AttentionSite, stat: fx.Node, name: str,
              init: Any, created: dict[str, Any], both: bool = False) -> fx.Node:
    shape = tensor_shape(stat)
    assert shape is not None
    psi_shape = (1, *shape[1:])
    psi = created.get(name)
    if psi is None:
        tm = stat.meta["tensor_meta"]
        device = module_device(gm)
        if isinstance(init, dict) and name not in init:
            raise KeyError(f"init has no value for {name!r}; psi names of this model: see "
                           f"the prepare report, or pass a float")
        this_init = init[name] if isinstance(init, dict) else init
        psi = make_psi(psi_shape, this_init, tm.dtype, device)
        created[name] = psi
    set_attr_path(gm, name, psi)
    g = gm.graph
    p = g.get_attr(name)
    n = g.call_method("size", (_batch_source(site, stat, both), 0))
    e = g.call_method("expand", (p, n, *([-1] * (len(psi_shape) - 1))))
    return e


def psi_names(sites: list[AttentionSite]) -> list[list[str]]:
    """Deterministic psi names (``<site path>.psi``, ``.stat1_psi``...) for each site's stats."""
    seen: dict[str, int] = {}
    out = []
    for site in sites:
        k = seen.get(site.path, 0)
        seen[site.path] = k + 1
        tag = "" if k == 0 else f"site{k}_"
        prefix = f"{site.path}." if site.path else ""
        out.append([f"{prefix}{tag}{'' if i == 0 else f'stat{i}_'}psi"
                    for i in range(len(site.stats))])
    return out


def apply_asr(gm: fx.GraphModule, sites: list[AttentionSite], *, mode: str = "replace",
              init: Any = 0.1, created: dict[str, Any] | None = None,
              root: nn.Module | None = None, site_modes: list[str] | None = None,
              one_row: bool = True) -> list[list[str]]:
    """Rewrite ``sites`` of ``gm`` into ASR form, in place.

    Args:
        gm: the graph module the sites were found in.
        sites: from :func:`find_attention_sites`.
        mode: "replace" or "both".
        site_modes: a mode per site ("replace", "both" or "keep": left as it is), overriding
            ``mode``; psi names are assigned over all sites either way.
        init: psi initial value: a float, a tensor, "normal", or a dict psi name -> any of those.
        created: psi parameters and ASR modules already made for the other mode's graph of the
            same model, keyed by attribute path; new ones are added to it, existing ones reused.
        root: the original model, used to re-initialise copied parameters in mode "both".
        one_row: compute each excitation once on psi (batch 1) and broadcast its gate, where the
            graph allows (see :func:`_one_row`); False keeps psi expanded to the batch (the
            form before this rewrite, kept for benchmarks).

    Returns:
        The psi names of each site.
    """
    created = {} if created is None else created
    graph = gm.graph
    all_names = psi_names(sites)
    modes = site_modes if site_modes is not None else [mode] * len(sites)
    # gates that share a statistic (selective-kernel attention: one pooled descriptor, a softmax
    # over branches) share its psi: one statistic, one constant
    shared: dict[fx.Node, tuple[fx.Node, str]] = {}
    # norms frozen so far -> their new calls: sites sharing a branch (split attention's radix
    # gates, one excitation for every branch) freeze its norms once
    frozen_calls: dict[fx.Node, fx.Node] = {}
    for i, (site, names, mode) in enumerate(zip(sites, all_names, modes)):
        if mode == "keep":
            continue
        for j, stat in enumerate(site.stats):
            if mode == "replace" and stat in shared:
                names[j] = shared[stat][1]
        psis = {}
        for stat, name in zip(site.stats, names):
            if mode == "replace" and stat in shared:
                psis[stat] = shared[stat][0]
                continue
            # right after the statistic, before every node that will read psi instead: the
            # graph stays in order (the sort below has nothing to do)
            with graph.inserting_before(stat.next):
                psis[stat] = _psi_node(gm, site, stat, name, init, created, mode == "both")
            if mode == "replace":
                shared[stat] = (psis[stat], name)
        with graph.inserting_before(site.mul):
            if mode == "replace":
                branch = set(site.branch)
                # a gate that is the statistic itself (``x * x.mean((2, 3), keepdim=True)``):
                # the multiplies read psi directly
                appliers = {site.mul, *site.more_muls} \
                    if site.gate in site.stats else set()
                for stat, e in psis.items():
                    for user in list(stat.users):
                        if user in branch or (stat is site.gate and user in appliers):
                            user.replace_input_with(stat, e)
                site.frozen_norms = _freeze_norms(gm, site.branch, frozen_calls)
            elif mode == "both":
                _add_copy(gm, site, psis, created, root)
            else:
                raise ValueError(f"unknown mode {mode!r}")
            site.psi_nodes = list(psis.values())
    stable_toposort(graph)
    if one_row:
        _one_row(gm, [s for s, m in zip(sites, modes) if m != "keep"])
    _move_gates_past_norms(gm, [s for s, m in zip(sites, modes) if m == "replace"])
    return all_names


def _site_nodes(site: AttentionSite) -> tuple[set[fx.Node], set[fx.Node]]:
    """(the constant branch of a rewritten site, the nodes that apply its gate to x)."""
    psis = site.psi_nodes
    if site.asr_mul is not None:  # mode "both": the copy reads psi, one multiply applies it
        nodes, frontier = set(), list(psis)
        while frontier:  # everything downstream of psi up to the ASR multiply
            n = frontier.pop()
            if n in nodes or n is site.asr_mul:
                continue
            nodes.add(n)
            frontier.extend(n.users)
        outs = {site.asr_mul}
    else:
        nodes = set(site.branch) | set(psis)
        outs = {site.mul, *site.more_muls}
    nodes |= {a for e in psis for a in e.all_input_nodes if a.op == "get_attr"}
    for m in list(outs):  # x * g.expand_as(x): the expand broadcasts the gate too
        for a in m.all_input_nodes:
            if a not in nodes and a.op == "call_method" and a.target in ("expand_as", "expand") \
                    and a.args[0] in nodes and len(a.users) == 1:
                outs.add(a)
    return nodes, outs


def _one_row(gm: fx.GraphModule, sites: list[AttentionSite]) -> None:
    """The excitation of each rewritten site runs once per step on psi (batch 1) rather than on
    N expanded copies of it; the multiply by x broadcasts the result over the batch. Sites that
    share a psi are rewritten together. Where the branch needs the batch size for more than its
    shapes (:func:`batch_rows.collapse_batch`), psi stays expanded and the reason is recorded in
    ``site.rows``."""
    groups: list[tuple[list[AttentionSite], set[fx.Node], set[fx.Node]]] = []
    for site in sites:
        nodes, outs = _site_nodes(site)
        merged = [g for g in groups if g[1] & nodes]
        for g in merged:
            groups.remove(g)
            nodes |= g[1]
            outs |= g[2]
        groups.append(([s for g in merged for s in g[0]] + [site], nodes, outs))
    dep = value_dependent(gm.graph)
    graph = gm.graph
    pinned: set[fx.Node] = set()
    for group_sites, nodes, outs in groups:
        _, reason = collapse_batch(gm, nodes, outs, dep)
        for site in group_sites:
            site.rows = reason
        if reason is not None:
            continue
        for e in {e for s in group_sites for e in s.psi_nodes}:
            # expand(psi, one_row(n), -1, ...) is psi itself now
            e.replace_all_uses_with(e.args[0])
            graph.erase_node(e)
        pinned |= nodes | outs
    stable_toposort(graph)
    # the channel counts and the batch extent 1 the branches read are numbers from now on
    pin_sizes(gm, [n for n in graph.nodes if n in pinned])


def _add_copy(gm: fx.GraphModule, site: AttentionSite, psis: dict[fx.Node, fx.Node],
              created: dict[str, Any], root: nn.Module | None) -> None:
    graph = gm.graph
    prefix = f"{site.path}.asr" if site.path else "asr"
    mapping: dict[fx.Node, fx.Node] = dict(psis)

    def rel(target: str) -> str:
        t = str(target)
        return t[len(site.path) + 1:] if site.path and t.startswith(site.path + ".") else t

    def arg_map(a: fx.Node) -> fx.Node:
        if a in mapping:
            return mapping[a]
        if a.op == "get_attr":
            value = get_attr_path(gm, str(a.target))
            if isinstance(value, nn.Parameter):
                name = f"{prefix}.{rel(a.target)}"
                if name not in created:
                    created[name] = _fresh_param(root, str(a.target), value)
                set_attr_path(gm, name, created[name])
                mapping[a] = graph.get_attr(name)
                return mapping[a]
        return a

    for n in site.branch:
        new = graph.node_copy(n, arg_map)
        if n.op == "call_module":
            name = f"{prefix}.{rel(n.target)}"
            if name not in created:
                created[name] = fresh_module(gm.get_submodule(str(n.target)))
            set_attr_path(gm, name, created[name])
            new.target = name
        mapping[n] = new
    combine = operator.mul if site.fusion == "mul" else operator.add
    scaled = graph.call_function(combine, (site.x, mapping[site.gate]))
    scaled.meta["nn_module_stack"] = dict(site.mul.meta.get("nn_module_stack") or {})
    # ASR sits right after the producer of x: every value reader of x (the original attention,
    # anything else) now sees x * A(psi). Shape reads stay on x: the shape is the same, and the
    # ASR copy itself may size its output from them (moving them would close a cycle).
    site.x.replace_all_uses_with(
        scaled, delete_user_cb=lambda u: u is not scaled and not reads_shape_only(u))
    site.asr_mul = scaled
    site.frozen_norms = _freeze_norms(
        gm, [mapping[n] for n in site.branch if n in mapping])


def _batch_statistic_norm(gm: fx.GraphModule, n: fx.Node) -> str | None:
    """A description of ``n`` when it normalises with the statistics of the batch it is given
    in some mode and has no running statistics to use instead (so :func:`_freeze_norms` cannot
    fix it), else None."""
    if n.op == "call_module":
        mod = gm.get_submodule(str(n.target))
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_mean is None:
            return f"{n.target} ({type(mod).__name__} without running statistics)"
        if isinstance(mod, nn.modules.instancenorm._InstanceNorm) and mod.track_running_stats \
                and mod.running_mean is None:
            return f"{n.target} ({type(mod).__name__})"
        return None
    if n.op == "call_function" and n.target is torch.nn.functional.batch_norm:
        # batch statistics in training are fine where running ones exist: the branch's norm
        # is frozen to them (_freeze_batch_norm_call)
        mean = n.args[1] if len(n.args) > 1 else n.kwargs.get("running_mean")
        if not (isinstance(mean, fx.Node) and mean.op == "get_attr"):
            return f"{module_path_of(n)} (batch_norm with batch statistics)"
    elif n.op == "call_function" and n.target is torch.batch_norm:
        return f"{module_path_of(n)} (batch_norm with batch statistics)"
    return None


def module_path_of(n: fx.Node) -> str:
    return module_path(n) or n.name


def refuse_batch_statistic_sites(gm: fx.GraphModule, sites: list[AttentionSite]
                                 ) -> tuple[list[AttentionSite], list[tuple[AttentionSite, Site]]]:
    """Split ``sites`` into those whose branch can read psi and those (with their record, code
    ``batch-stats-norm-in-branch``) with a norm inside the branch that normalises with batch
    statistics and has no running ones.

    psi is one value for the whole batch: such a norm would see identical rows, output its bias
    whatever psi is, and give psi a zero gradient (psi would never train), and on one row it
    cannot run in training mode at all. Those sites keep their input-dependent attention.
    """
    keep, refused = [], []
    for site in sites:
        norms = [d for n in site.branch if (d := _batch_statistic_norm(gm, n)) is not None]
        if norms:
            refused.append(site.refused(
                f"the branch normalises with batch statistics ({', '.join(norms)}): fed psi, "
                f"one value for the whole batch, it would output its bias and psi would never "
                f"train; the input-dependent attention is kept (give the norm running "
                f"statistics to convert it)", "batch-stats-norm-in-branch"))
        else:
            keep.append(site)
    return keep, refused


def _batch_norm_reading(gm: fx.GraphModule, n: fx.Node, m: fx.Node, any_mode: bool
                        ) -> str | None:
    """The name of ``n`` when it is a BatchNorm normalising ``m`` that uses batch statistics
    while training (a ``_BatchNorm`` module in train mode, or ``batch_norm(..., training=True)``);
    ``any_mode``: any BatchNorm of ``m`` (in another mode's graph, where the same norm runs on its
    running statistics)."""
    if not n.args or n.args[0] is not m:
        return None
    if n.op == "call_module":
        mod = gm.get_submodule(str(n.target))
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and \
                (any_mode or mod.training or mod.running_mean is None) and \
                type(mod).__module__.startswith("torch.nn"):
            return f"{n.target} ({type(mod).__name__})"
        return None
    if n.op == "call_function" and n.target in (torch.nn.functional.batch_norm,
                                                torch.batch_norm):
        training = n.kwargs.get("training", n.args[5] if len(n.args) > 5 else False)
        if training is True or any_mode:
            return f"{module_path_of(n)} (batch_norm)"
    return None


_POSITIVE_GATES = {torch.sigmoid, torch.nn.functional.sigmoid, torch.nn.functional.hardsigmoid,
                   torch.softmax, torch.nn.functional.softmax, torch.exp, "sigmoid", "softmax",
                   "exp"}
# ops that commute with a positive per-channel scale: f(x * g) = f(x) * g for g > 0
_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.modules.pooling._MaxPoolNd,
                        nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
                        nn.modules.pooling._AdaptiveMaxPoolNd, nn.Identity)
_HOMOGENEOUS_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.leaky_relu,
                          torch.nn.functional.max_pool1d, torch.nn.functional.max_pool2d,
                          torch.nn.functional.max_pool3d, torch.nn.functional.avg_pool1d,
                          torch.nn.functional.avg_pool2d, torch.nn.functional.avg_pool3d,
                          "relu", "relu_"}


def positive_gate(gm: fx.GraphModule, g: fx.Node) -> bool:
    """The gate is positive by construction (its last op is a sigmoid, softmax, exp...)."""
    if g.op == "call_module":
        return isinstance(gm.get_submodule(str(g.target)), (nn.Sigmoid, nn.Hardsigmoid,
                                                             nn.Softmax))
    if g.op in ("call_function", "call_method"):
        if g.target in _POSITIVE_GATES:
            return True
        if g.target in ("view", "reshape", "unsqueeze", "flatten", "expand", "expand_as") or \
                g.target in (torch.reshape, torch.unsqueeze, torch.flatten):
            return isinstance(g.args[0], fx.Node) and positive_gate(gm, g.args[0])
    return False


def _norms_reading(gm: fx.GraphModule, m: fx.Node, positive: bool, depth: int = 6,
                   dying: set = frozenset(), products: dict | None = None,
                   any_mode: bool = False) -> list[tuple[str, fx.Node]] | None:
    """The training-mode BatchNorms (name, node) that are all the readers of ``m`` (through ops
    that commute with the gate: ReLU / pooling for a positive scale, depthwise convs, other
    converted sites' constant gates), or None if anything else reads it. ``dying`` readers
    (feeding only statistics that psi replaces) do not count."""
    products = products or {}
    readers = [u for u in m.users if not reads_shape_only(u) and u not in dying]
    if not readers:
        return None
    found: list[tuple[str, fx.Node]] = []
    for u in readers:
        name = _batch_norm_reading(gm, u, m, any_mode)
        if name is not None:
            found.append((name, u))
            continue
        mod = gm.get_submodule(str(u.target)) if u.op == "call_module" else None
        crosses = u in products and products[u].x is m
        # depthwise: channel c of the output reads channel c alone, linearly (a scale of either
        # sign crosses; its bias is a per-channel shift the norm removes too)
        crosses = crosses or (type(mod) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and
                              mod.groups == mod.in_channels == mod.out_channels and
                              bool(u.args) and u.args[0] is m)
        homogeneous = (mod is not None and isinstance(mod, _HOMOGENEOUS_MODULES) and
                       type(mod).__module__.startswith("torch.nn")) or \
            (u.op in ("call_function", "call_method") and u.target in _HOMOGENEOUS_FUNCTIONS)
        crosses = crosses or (positive and homogeneous and bool(u.args) and u.args[0] is m)
        deeper = _norms_reading(gm, u, positive, depth - 1, dying, products, any_mode) \
            if crosses and depth > 0 else None
        if deeper is None:
            return None
        found += deeper
    return found


def gates_before_batch_norm(gm: fx.GraphModule, sites: list[AttentionSite],
                            expected: dict[tuple[str, int, int], tuple[str, ...]] | None = None
                            ) -> tuple[dict[tuple[str, int, int], tuple[str, ...]],
                                       list[tuple[AttentionSite, Site]]]:
    """Find the sites whose gated map is read only by BatchNorms that use batch statistics in
    training, and mark each to apply its constant gate to those norms' outputs instead
    (``site.after_norms``, done by :func:`apply_asr`).

    Such a norm subtracts each channel's batch mean and divides by its batch standard deviation:
    ``BN(x * g) = sign(g) BN(x)`` and ``BN(x + t) = BN(x)`` for per-channel constants, up to the
    norm's eps. An ASR gate left before it would cancel while training (psi's gradient measured
    1e-6..1e-8 of its excitation weights' in random networks) and deploy whatever psi started
    as. Behind the norm it scales (or shifts) the normalised channels like the paper's ASR after
    a block's last norm, trains, and folds into the norm's affine. A positive gate (sigmoid,
    hard-sigmoid, softmax) also crosses ReLU, LeakyReLU and pooling on its way to the norm (they
    commute with a positive per-channel scale), and any gate crosses a depthwise conv (channel
    c reads channel c alone): those stay in front of the moved gate.

    Args:
        gm: one mode's graph, with shapes.
        sites: the sites to be converted in mode "replace".
        expected: for the eval graph of a model whose modes trace differently: the train
            graph's answer (site key -> norm names). A site is moved here when it is moved
            there and the same norms read its map (they run on running statistics here).

    Returns:
        (site key ``(path, channels, k)`` (the k-th site of that path in graph order) -> names
        of the norms the gate moves behind, records of
        the sites that cannot move: code ``gate-before-batch-norm``; their input-dependent
        attention stays).
    """
    # what the conversion of the other sites changes about the readers of a gated map: the
    # nodes that only feed statistics stop reading it (psi replaces the statistics), and another
    # site's product becomes a per-channel constant scale (or shift), which a gate crosses
    stats = {st for site in sites for st in site.stats}
    dying = set(stats)
    for n in reversed(list(gm.graph.nodes)):
        if n.users and all(u in dying for u in n.users):
            dying.add(n)
    products = {m: site for site in sites
                for m in (site.mul, *site.more_muls)}
    moved: dict[tuple[str, int, int], tuple[str, ...]] = {}
    refused = []
    seen: dict[tuple[str, int], int] = {}
    for site in sites:
        # a module called twice makes two sites of one path: told apart by their order
        calls = seen[site.path, site.channels] = seen.get((site.path, site.channels), -1) + 1
        key = (site.path, site.channels, calls)
        if expected is not None and key not in expected:
            continue
        positive = site.fusion == "mul" and positive_gate(gm, site.gate)
        found = [_norms_reading(gm, m, positive, dying=dying, any_mode=expected is not None,
                                products={k: v for k, v in products.items() if v is not site})
                 for m in (site.mul, *site.more_muls)]
        if not all(found):
            if expected is not None:
                refused.append(site.refused(
                    "the gated map is read only by BatchNorms in the training graph but not in "
                    "the eval graph: the gate cannot move behind them in both; the "
                    "input-dependent attention is kept", "gate-before-batch-norm"))
            continue
        pairs = list(dict.fromkeys(pair for f in found for pair in f))
        others = {k: v for k, v in products.items() if v is not site}
        for _ in range(len(gm.graph.nodes)):
            # behind a norm whose output again reaches only training-mode norms (through
            # ops the gate crosses: another gate, a depthwise conv) it would cancel there too:
            # it goes on behind those
            further = [_norms_reading(gm, norm, positive, dying=dying,
                                      any_mode=expected is not None, products=others)
                       for _, norm in pairs]
            if not all(further):
                break
            pairs = list(dict.fromkeys(pair for f in further for pair in f))
        names = tuple(sorted({name for name, _ in pairs}))
        why = _unmovable(site, expected, key, names)
        if why is not None:
            refused.append(site.refused(
                f"the gated map is read only by {', '.join(names)}, which normalises each "
                f"channel by its batch statistics in training (a constant gate there cancels), "
                f"and the gate cannot move behind it: {why}; the input-dependent attention is "
                f"kept (ASR belongs after the norm, e.g. insert=..., where='block_output')",
                "gate-before-batch-norm"))
            continue
        site.after_norms = pairs
        moved[key] = names
    return moved, refused


def _unmovable(site: AttentionSite, expected: dict | None, key: tuple[str, int, int],
               names: tuple[str, ...]) -> str | None:
    """Why ``site``'s gate cannot be applied to the outputs of the norms ``names``, or None."""
    if site.more_muls:
        return "the gate scales more than one map"
    if expected is not None and expected[key] != names:
        return "the train and eval graphs read the map with different norms"
    xs, gs = tensor_shape(site.x), tensor_shape(site.gate)
    if xs is None or gs is None or len(gs) != len(xs) or len(xs) < 2 or \
            gs[1] != site.channels or any(d != 1 for d in gs[2:]) or gs[0] not in (1, xs[0]):
        return f"its gate (shape {gs}) is not one value per channel in the map's layout {xs}"
    return None


def _move_gates_past_norms(gm: fx.GraphModule, sites: list[AttentionSite]) -> None:
    """Apply each marked site's gate to its norms' outputs, and drop its multiply (or add)."""
    if not any(site.after_norms for site in sites):
        return
    graph = gm.graph
    combine = {"mul": operator.mul, "add": operator.add}
    replaced: dict[fx.Node, fx.Node] = {}
    for site in sites:
        if not site.after_norms:
            continue
        x = site.x
        while x in replaced:
            x = replaced[x]
        site.x = x
        site.mul.replace_all_uses_with(x)
        replaced[site.mul] = x
        graph.erase_node(site.mul)
        applied = []
        for _, norm in site.after_norms:
            with graph.inserting_after(norm):
                out = graph.call_function(combine[site.fusion], (norm, site.gate))
            out.meta = dict(norm.meta)  # same shape as the norm's output, same module
            norm.replace_all_uses_with(out, delete_user_cb=lambda u, out=out: u is not out)
            # a later site whose map is this norm's output (two gates in a row) now scales
            # ``out``: resolved through ``replaced`` like an erased multiply
            replaced[norm] = out
            applied.append(out)
        site.mul, site.more_muls = applied[0], applied[1:]
    stable_toposort(graph)


def _freeze_norms(gm: fx.GraphModule, nodes: list[fx.Node],
                  frozen_calls: dict[fx.Node, fx.Node] | None = None) -> list[str]:
    """Batch norms inside an ASR branch normalise with their running statistics, always.

    The branch's input is psi, the same for every sample: batch statistics of identical rows
    have zero variance, would map every value to beta and give psi no gradient. With running
    statistics the norm is a fixed affine map of psi (gamma and beta still train), the same in
    train and eval mode, and fold evaluates it exactly.

    ``frozen_calls`` maps each norm call already replaced (by another site sharing the branch)
    to its replacement; ``nodes`` then lists the replacement, and new ones are added to it.
    Returns the paths of the norms this call froze.
    """
    frozen = []
    graph = gm.graph
    frozen_calls = {} if frozen_calls is None else frozen_calls
    for i, n in enumerate(list(nodes)):
        if n in frozen_calls:
            nodes[i] = frozen_calls[n]
            continue
        if batch_norm_args(n) is not None:
            name = _freeze_batch_norm_call(n)
            if name is not None:
                frozen.append(name)
            continue
        if n.op != "call_module":
            continue
        mod = gm.get_submodule(str(n.target))
        if not isinstance(mod, nn.modules.batchnorm._BatchNorm) or mod.running_mean is None:
            continue
        t = str(n.target)
        with graph.inserting_before(n):
            rm, rv = graph.get_attr(f"{t}.running_mean"), graph.get_attr(f"{t}.running_var")
            w = graph.get_attr(f"{t}.weight") if mod.weight is not None else None
            b = graph.get_attr(f"{t}.bias") if mod.bias is not None else None
            new = graph.call_function(torch.nn.functional.batch_norm,
                                      (n.args[0], rm, rv, w, b, False, 0.0, mod.eps))
        new.meta = dict(n.meta)
        n.replace_all_uses_with(new)
        graph.erase_node(n)
        nodes[i] = frozen_calls[n] = new  # the site's branch lists the norm's call from now on
        frozen.append(t)
    return frozen


def _freeze_batch_norm_call(n: fx.Node) -> str | None:
    """``F.batch_norm(x, mean, var, ..., training=True)`` with running statistics (a traced
    BatchNorm subclass in the train graph) normalises with them instead (training False,
    momentum 0: they are not updated from psi either); the norm's path, or None."""
    args = batch_norm_args(n)
    mean = args["running_mean"]
    if not (isinstance(mean, fx.Node) and mean.op == "get_attr") or args["training"] is not True:
        return None
    n.args = (args["input"], mean, args["running_var"], args["weight"], args["bias"], False,
              0.0, args["eps"])
    n.kwargs = {}
    return str(mean.target).rpartition(".")[0] or n.name
