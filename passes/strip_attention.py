"""Bypass every channel-attention site: the backbone of a model nobody wrote a plain version of.

At each site :func:`~asrfx.passes.find_attention.find_attention_sites` finds, the multiply that
applies the gate (``x * g``, or ``x + g`` for additive global-context attention, and any further
multiply by the same gate) is replaced by ``x``; the branch computing ``g`` is then dead and is
removed, with every submodule, parameter and buffer only it used. The result computes the model
with every gate forced to 1 (to 0 for additive attention). The benchmarks time it as the
backbone of third-party models (``asrfx bench``).
"""

from __future__ import annotations

from typing import Sequence

import torch.fx as fx

from asrfx.report import Site

from .cleanup import cleanup
from .find_attention import find_attention_sites, unexpand
from .graph_utils import drop_dead, safe_dce
from .protocol import record

__all__ = ["strip_attention"]


def _map_operand(mul: fx.Node, gate: fx.Node) -> fx.Node:
    """The operand of ``mul`` that is not the gate (nor the gate expanded, ``g.expand_as(x)``)."""
    a, b = mul.args[:2]
    return b if a is gate or unexpand(a, b) is gate else a


def strip_attention(graphs: fx.GraphModule | Sequence[fx.GraphModule]) -> list[Site]:
    """Bypass every channel-attention site of ``graphs``, in place.

    Args:
        graphs: a GraphModule, or the GraphModules of one model's modes (train and eval graphs
            of a dual-mode model, as ``TraceResult.modules()`` lists them; they share
            submodules, so they are cleaned up together: nothing another graph still reads is
            removed). Every node must carry ``meta["tensor_meta"]`` (run
            ``asrfx.passes.shapes.propagate_shapes`` first): sites are found from shapes.

    Returns:
        One :class:`asrfx.report.Site` per bypassed site and graph (kind
        ``"channel-attention"``, action ``"removed"``, ``key`` the gating node's name). Sites
        the finder refuses (e.g. spatial attention) are left as they are and not recorded.

    Each GraphModule is recompiled; its input and output shapes are unchanged.
    """
    gms = [graphs] if isinstance(graphs, fx.GraphModule) else list(graphs)
    records: list[Site] = []
    for gm in gms:
        sites, _ = find_attention_sites(gm)
        branches: set[fx.Node] = set()
        for site in sites:
            for mul in [site.mul] + site.more_muls:
                mul.replace_all_uses_with(_map_operand(mul, site.gate))
                # an in-place ``y.mul_(g)`` would still scale y for its later readers: with the
                # gate forced to 1 (0 for an add) it is a no-op, so it goes
                gm.graph.erase_node(mul)
            records.append(record(site.mul.name, site.path, "channel-attention", site.channels,
                                  action="removed"))
            branches.update(site.branch, site.stats)
        # the branches go, opaque calls in them too (a memory-saving swish module)
        drop_dead(gm, branches)
        safe_dce(gm)
    for gm in gms:
        cleanup(gm, tuple(g.graph for g in gms if g is not gm))
    return records
