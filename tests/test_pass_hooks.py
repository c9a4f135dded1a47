"""The hook passes on small hand-built graphs: ``protect_hooked_calls`` /
``restore_hooked_calls`` (hooked modules stay called, opaque to the fold passes in between) and
``refuse_hooked_sites`` (an attention whose branch calls a hooked module is kept).

Graphs come from :class:`asrfx.tracing.AsrTracer` (which keeps hooked modules as leaves) with
recorded shapes; nothing here goes through ``asrfx.prepare`` or ``asrfx.fold``.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

from asrfx.passes import find_attention_sites
from asrfx.passes.graph_utils import safe_dce
from asrfx.passes.hooks import (call_hooked, protect_hooked_calls, refuse_hooked_sites,
                                restore_hooked_calls)
from helpers import asr_traced, SENet, dtype_tol, randomize_bn, rel_err

TOL = dtype_tol(torch.float32)


def _signature(graph: fx.Graph) -> list[tuple]:
    index = {n: i for i, n in enumerate(graph.nodes)}
    return [(n.op, str(n.target), repr(fx.node.map_arg((n.args, n.kwargs), lambda a: index[a])))
            for n in graph.nodes]


def _calls_of(gm: fx.GraphModule, target: str) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.target == target]


def _hooked_calls(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is call_hooked]


def _senet(seed: int = 0) -> SENet:
    torch.manual_seed(seed)
    return randomize_bn(SENet(8), seed).eval()


# --- protect / restore ---------------------------------------------------------------------------


def test_protect_and_restore_round_trip_keeps_the_hook_firing():
    m = _senet()
    fired: list[tuple] = []
    m.conv2.register_forward_hook(lambda mod, inp, out: fired.append(tuple(out.shape)))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = m(x)
    fired.clear()
    gm = asr_traced(m, x)
    before = _signature(gm.graph)
    fired.clear()

    records = protect_hooked_calls(gm)
    assert [(r["path"], r["kinds"]) for r in records] == [("conv2", ["forward hook"])]
    assert _calls_of(gm, "conv2") == []
    (call,) = _hooked_calls(gm)
    attr = call.args[0]
    assert attr.op == "get_attr" and attr.target == "conv2"
    assert records[0]["nodes"] == [(call, attr)]
    assert "tensor_meta" in call.meta  # the call keeps the module call's metadata
    with torch.no_grad():
        out = gm(x)  # protect recompiles
    assert fired == [(2, 8, 8, 8)] and rel_err(ref, out) <= TOL

    restore_hooked_calls(gm, records)
    assert _hooked_calls(gm) == [] and len(_calls_of(gm, "conv2")) == 1
    assert not any(n.op == "get_attr" and n.target == "conv2" for n in gm.graph.nodes)
    assert _signature(gm.graph) == before
    fired.clear()
    with torch.no_grad():
        out = gm(x)  # restore recompiles
    assert fired == [(2, 8, 8, 8)] and rel_err(ref, out) <= TOL


def test_nothing_hooked_changes_nothing():
    gm = asr_traced(_senet(), torch.randn(2, 3, 8, 8))
    before = gm.code
    assert protect_hooked_calls(gm) == []
    assert gm.code == before
    restore_hooked_calls(gm, [])
    assert gm.code == before


def test_module_called_twice_is_one_record_with_two_calls():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return self.conv(torch.relu(self.conv(x)))

    model = Twice().eval()
    fired = []
    model.conv.register_forward_pre_hook(lambda mod, inp: fired.append(1))
    x = torch.randn(2, 3, 8, 8)
    gm = asr_traced(model, x)
    before = _signature(gm.graph)
    (rec,) = protect_hooked_calls(gm)
    assert rec["path"] == "conv" and rec["kinds"] == ["forward pre-hook"]
    assert len(rec["nodes"]) == 2 and len(_hooked_calls(gm)) == 2
    fired.clear()
    with torch.no_grad():
        gm(x)
    assert len(fired) == 2
    restore_hooked_calls(gm, [rec])
    assert _signature(gm.graph) == before


class Probe(nn.Module):
    """A hooked module whose output nothing reads: only its hook makes the call matter."""

    def __init__(self):
        super().__init__()
        self.probe = nn.Conv2d(3, 4, 1)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        self.probe(x)
        return self.conv(x)


@pytest.mark.parametrize("dce", ["fx", "safe"])
def test_protected_call_survives_dead_code_elimination(dce):
    model = Probe().eval()
    fired = []
    model.probe.register_forward_hook(lambda mod, inp, out: fired.append(1))
    x = torch.randn(2, 3, 8, 8)
    gm = asr_traced(model, x)
    records = protect_hooked_calls(gm)
    if dce == "fx":
        gm.graph.eliminate_dead_code()
    else:
        safe_dce(gm)
    assert len(_hooked_calls(gm)) == 1
    restore_hooked_calls(gm, records)
    assert len(_calls_of(gm, "probe")) == 1
    fired.clear()
    with torch.no_grad():
        gm(x)
    assert fired == [1]


@pytest.mark.parametrize("kind, hook", [
    ("forward hook", lambda m: m.register_forward_hook(lambda *a: None)),
    ("forward pre-hook", lambda m: m.register_forward_pre_hook(lambda *a: None)),
    ("backward hook", lambda m: m.register_full_backward_hook(lambda *a: None)),
    pytest.param("legacy weight_norm", lambda m: torch.nn.utils.weight_norm(m),
                 marks=pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")),
])
def test_every_kind_of_call_hook_is_protected(kind, hook):
    m = _senet(1)
    hook(m.conv2)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = m(x)
    gm = asr_traced(m, x)
    (rec,) = protect_hooked_calls(gm)
    assert rec["path"] == "conv2" and rec["kinds"] == [kind]
    assert isinstance(rec["reason"], str) and rec["reason"]
    with torch.no_grad():
        assert rel_err(ref, gm(x)) <= TOL
    restore_hooked_calls(gm, [rec])
    with torch.no_grad():
        assert rel_err(ref, gm(x)) <= TOL


# --- refuse_hooked_sites -------------------------------------------------------------------------


class PooledSE(nn.Module):
    """SE with a pooling module (a hook on the statistic) and a module excitation."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, 4, 1)
        self.fc2 = nn.Conv2d(4, c, 1)

    def forward(self, x):
        y = self.conv(x)
        return y * torch.sigmoid(self.fc2(torch.relu(self.fc1(self.pool(y)))))


@pytest.mark.parametrize("hooked", ["fc1", "fc2", "pool"])
def test_site_whose_branch_or_statistic_calls_a_hooked_module_is_refused(hooked):
    model = PooledSE()
    getattr(model, hooked).register_forward_hook(lambda *a: None)
    gm = asr_traced(model, torch.randn(2, 3, 8, 8))
    sites, _ = find_attention_sites(gm)
    assert len(sites) == 1
    keep, refused = refuse_hooked_sites(gm, sites)
    assert keep == [] and [s for s, _ in refused] == sites
    (site, rec), = refused
    assert (rec.path, rec.action, rec.code) == (site.path, "refused", "hooked-module-in-branch")
    assert rec.reason.startswith(f"{hooked} has a forward hook")  # names the hooked module


def test_hook_outside_the_branch_does_not_refuse():
    model = PooledSE()
    model.conv.register_forward_hook(lambda *a: None)  # produces the gated map
    gm = asr_traced(model, torch.randn(2, 3, 8, 8))
    sites, _ = find_attention_sites(gm)
    assert refuse_hooked_sites(gm, sites) == (sites, [])


def test_skipped_site_is_never_refused():
    """Attention asrfx inserted itself (``skip``) is converted even with a hooked module."""
    model = PooledSE()
    model.fc1.register_forward_hook(lambda *a: None)
    gm = asr_traced(model, torch.randn(2, 3, 8, 8))
    sites, _ = find_attention_sites(gm)
    assert refuse_hooked_sites(gm, sites, skip={sites[0].mul}) == (sites, [])


def test_refusing_leaves_the_graph_as_it_is():
    model = PooledSE()
    model.fc1.register_forward_hook(lambda *a: None)
    gm = asr_traced(model, torch.randn(2, 3, 8, 8))
    before = _signature(gm.graph)
    sites, _ = find_attention_sites(gm)
    refuse_hooked_sites(gm, sites)
    assert _signature(gm.graph) == before
