"""Modules with hooks stay called, as they are.

A forward (pre-)hook or backward hook runs when its module is *called*. The tracer keeps every
hooked submodule a leaf (one ``call_module`` node, see :mod:`asrfx.tracing`), so its hooks run
in the traced graph. The passes must then leave that call alone: folding a scale or a
BatchNorm into the module, moving a scale through it, or evaluating it away would change what
the hook sees or drop the hook.

* :func:`protect_hooked_calls` turns each ``call_module`` of a hooked module into a call of
  :func:`call_hooked` -- a function no fold pass knows (so none folds into or through it) and
  one fx counts as impure (so dead-code elimination keeps it); :func:`restore_hooked_calls`
  turns them back, so the result calls the module itself again.
* :func:`refuse_hooked_sites` keeps an attention site as it is when its branch calls a hooked
  module: the ASR form would call it on psi (and, for a pooling, not at all).
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch import nn

from .graph_utils import describe_hooks, module_hooks, submodule

__all__ = ["call_hooked", "hook_fix", "protect_hooked_calls", "restore_hooked_calls",
           "refuse_hooked_sites"]


def call_hooked(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``module(*args, **kwargs)``: a call of a hooked module while the fold passes run."""
    return module(*args, **kwargs)


# impure for fx (Node.is_impure), so dead-code elimination keeps a call nobody reads: what
# torch.fx.node.has_side_effect does, on every torch this project supports
fx.node._side_effectful_functions.add(call_hooked)


def hook_fix(kinds: list[str], stage: str = "prepare") -> str:
    """How to let asrfx convert (``stage="prepare"``) or fold (``"fold"``) a module with hooks
    of these ``kinds`` (see :func:`~asrfx.passes.graph_utils.module_hooks`), for a message."""
    fixes = []
    if "legacy weight_norm" in kinds:
        fixes.append("call torch.nn.utils.remove_weight_norm(module) first" if stage == "fold"
                     else "use torch.nn.utils.parametrizations.weight_norm instead of the "
                          "legacy torch.nn.utils.weight_norm (or call "
                          "torch.nn.utils.remove_weight_norm(module) first)")
    if "legacy spectral_norm" in kinds:
        fixes.append("call torch.nn.utils.remove_spectral_norm(module) first" if stage == "fold"
                     else "use torch.nn.utils.parametrizations.spectral_norm instead of the "
                          "legacy torch.nn.utils.spectral_norm")
    if "pruning" in kinds:
        fixes.append("make the pruning permanent with torch.nn.utils.prune.remove(module, "
                     "name) first")
    if any(k not in ("legacy weight_norm", "legacy spectral_norm", "pruning") for k in kinds):
        fixes.append("remove the hook (handle.remove()) before asrfx and register it on the "
                     "result")
    return "; or ".join(fixes)


def protect_hooked_calls(gm: fx.GraphModule) -> list[dict[str, Any]]:
    """Make every call of a hooked module opaque to the passes (see the module docstring).

    Returns:
        One record per hooked module called: ``{"path", "kinds", "nodes": [(call, attr)],
        "reason"}``; give it to :func:`restore_hooked_calls`.
    """
    graph = gm.graph
    records: dict[str, dict[str, Any]] = {}
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        target = str(node.target)
        mod = submodule(gm, target)
        kinds = module_hooks(mod)
        if not kinds:
            continue
        with graph.inserting_before(node):
            attr = graph.get_attr(target)
            call = graph.call_function(call_hooked, (attr, *node.args), dict(node.kwargs))
        call.meta = node.meta
        node.replace_all_uses_with(call)
        graph.erase_node(node)
        rec = records.setdefault(target, {
            "path": target, "kinds": kinds, "nodes": [],
            "reason": f"has {describe_hooks(kinds)}: kept as it is, nothing folded into or "
                      f"through it (its hook would see other values); to fold it, "
                      f"{hook_fix(kinds, 'fold')}"})
        rec["nodes"].append((call, attr))
    if records:
        gm.recompile()
    return list(records.values())


def restore_hooked_calls(gm: fx.GraphModule, records: list[dict[str, Any]]) -> None:
    """Undo :func:`protect_hooked_calls`: each protected call calls its module again."""
    graph = gm.graph
    for rec in records:
        for call, attr in rec.pop("nodes"):
            if call.graph is not graph:  # erased by a pass (it should not be: it is impure)
                continue
            with graph.inserting_before(call):
                node = graph.call_module(rec["path"], tuple(call.args[1:]), dict(call.kwargs))
            node.meta = call.meta
            call.replace_all_uses_with(node)
            graph.erase_node(call)
            if not attr.users:
                graph.erase_node(attr)
    if records:
        gm.recompile()


def refuse_hooked_sites(gm: fx.GraphModule, sites: list, skip: set = frozenset()
                        ) -> tuple[list, list[tuple[Any, Any]]]:
    """Split attention ``sites`` into those that may be rewritten and those whose statistics or
    branch call a hooked module, with their record (code ``hooked-module-in-branch``). Sites whose multiply is in ``skip`` (attention
    asrfx inserted itself) are never refused."""
    keep, refused = [], []
    for site in sites:
        hooked = None
        if site.mul not in skip:
            for n in [*site.stats, *site.branch]:
                kinds = module_hooks(submodule(gm, n.target)) \
                    if n.op == "call_module" else []
                if kinds:
                    hooked = (n, kinds)
                    break
        if hooked is None:
            keep.append(site)
            continue
        n, kinds = hooked
        what = "no longer call (psi replaces its output)" if n in site.stats else \
            "call on psi instead of the pooled input"
        refused.append(site.refused(f"{n.target} has {describe_hooks(kinds)}, which the ASR form "
                                    f"would {what}, and fold would then evaluate away; kept as "
                                    f"it is: to convert it, {hook_fix(kinds)}",
                                    "hooked-module-in-branch"))
    return keep, refused
