"""Dead-code elimination and removal of parameters, buffers and modules no node uses."""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from .graph_utils import safe_dce, submodule

__all__ = ["cleanup", "drop_identities"]

_IDENTITIES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
               nn.AlphaDropout, nn.FeatureAlphaDropout)


def drop_identities(gm: fx.GraphModule) -> int:
    """Bypass calls of ``nn.Identity`` and of dropout modules in eval mode (both return their
    input unchanged); returns how many. Exact types only: a subclass may do more."""
    n = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs or \
                not isinstance(node.args[0], fx.Node):
            continue
        mod = submodule(gm, node.target)
        if type(mod) in _IDENTITIES and (type(mod) is nn.Identity or not mod.training):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            n += 1
    return n


def cleanup(gm: fx.GraphModule, other_graphs: tuple[fx.Graph, ...] = ()) -> None:
    """Remove dead nodes, then every submodule, parameter and buffer the graph no longer reads
    (nor any of ``other_graphs``: the other mode's graph of a dual-mode model shares them)."""
    safe_dce(gm)
    gm.graph.lint()
    nodes = [n for g in (gm.graph, *other_graphs) for n in g.nodes]
    used_modules = {str(n.target) for n in nodes if n.op == "call_module"}
    used_attrs = {str(n.target) for n in nodes if n.op == "get_attr"}

    def drop_unread(mod: nn.Module, prefix: str) -> None:
        """Drop the parameters and buffers no get_attr reads, outside the called modules."""
        for table in (mod._parameters, mod._buffers):
            for field in [f for f, t in table.items() if t is not None]:
                if (f"{prefix}.{field}" if prefix else field) not in used_attrs:
                    mod._parameters.pop(field, None)
                    mod._buffers.pop(field, None)
        for cname, child in mod._modules.items():
            full = f"{prefix}.{cname}" if prefix else cname
            if child is not None and full not in used_modules:  # (a called module keeps all)
                drop_unread(child, full)

    drop_unread(gm, "")

    def prune(mod: nn.Module, prefix: str) -> bool:
        """Drop unused children; True when ``mod`` itself holds nothing and can go."""
        for cname, child in list(mod.named_children()):
            full = f"{prefix}.{cname}" if prefix else cname
            if full in used_modules:
                continue
            if prune(child, full):
                delattr(mod, cname)
        # (a layer without bias keeps a ``bias: None`` entry: it holds nothing either)
        return (not mod._modules and all(v is None for v in mod._parameters.values())
                and all(v is None for v in mod._buffers.values())
                and not any(a == prefix or a.startswith(prefix + ".") for a in used_attrs))

    prune(gm, "")
    gm.recompile()
