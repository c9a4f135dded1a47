"""Insertion of new attention into a backbone, pass by pass: ``insertion_points`` (where) and
``insert_modules`` (inlining a module's traced graph after each point).

Graphs come from :class:`asrfx.tracing.AsrTracer` with recorded shapes; nothing here goes
through ``asrfx.prepare``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
from torch import nn

from asrfx.passes import find_attention_sites, insert_modules, insertion_points
from asrfx.passes.graph_utils import module_path, stable_toposort
from asrfx.passes.shapes import propagate_shapes
from asrfx.tracing import AsrTracer
from helpers import asr_traced, SE, dtype_tol, randomize_bn, rel_err


def _targets(points: list[fx.Node]) -> list[str]:
    return [str(p.target) for p in points]


class Block(nn.Module):
    """A basic residual block; ``proj``: the shortcut is a 1x1 conv and its BatchNorm."""

    def __init__(self, c: int, proj: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.short = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)) \
            if proj else nn.Identity()

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + self.short(x))


class Net(nn.Module):
    """Two residual blocks and a head whose vectors are summed and normalised: adds and norms
    without spatial extent, which are not insertion points."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.b0 = Block(c)
        self.b1 = Block(c, proj=True)
        self.head = nn.Linear(c, 5)
        self.hbn = nn.BatchNorm1d(5)

    def forward(self, x):
        v = self.hbn(self.head(self.b1(self.b0(self.stem(x))).mean((2, 3))))
        return v + v.mean(1, keepdim=True)


X = (2, 3, 8, 8)


# --- insertion_points ----------------------------------------------------------------------------


def test_block_output_is_the_main_branch_before_the_residual_add():
    gm = asr_traced(Net(), torch.randn(*X))
    assert _targets(insertion_points(gm, "block_output")) == ["b0.bn2", "b1.bn2"]
    assert insertion_points(gm) == insertion_points(gm, "block_output")


def test_every_bn_is_every_batch_norm_with_spatial_extent():
    gm = asr_traced(Net(), torch.randn(*X))
    assert _targets(insertion_points(gm, "every_bn")) == [
        "b0.bn1", "b0.bn2", "b1.bn1", "b1.bn2", "b1.short.1"]   # not hbn: (N, 5)


def test_predicate_sees_paths_and_nodes_of_feature_maps():
    gm = asr_traced(Net(), torch.randn(*X))
    seen = []

    def where(path: str, node: fx.Node) -> bool:
        seen.append((path, node))
        return path.endswith("conv1")

    assert _targets(insertion_points(gm, where)) == ["b0.conv1", "b1.conv1"]
    # only value-dependent calls producing (N, C, *S): no placeholder, no head vectors
    assert seen and all(len(n.meta["tensor_meta"].shape) == 4 for _, n in seen)
    assert all(n.op in ("call_module", "call_function", "call_method") for _, n in seen)
    assert ("head", next(n for n in gm.graph.nodes if n.target == "head")) not in seen


@pytest.mark.parametrize("where", ["block_output", "every_bn"])
def test_every_k_keeps_every_kth_point_from_the_first(where):
    gm = asr_traced(Net(), torch.randn(*X))
    points = insertion_points(gm, where)
    assert insertion_points(gm, where, every=2) == points[::2]
    assert insertion_points(gm, where, every=len(points)) == points[:1]


@pytest.mark.parametrize("where, every", [("everywhere", 1), ("block_output", 0)])
def test_bad_where_or_every_raises(where, every):
    gm = asr_traced(Net(), torch.randn(*X))
    with pytest.raises(ValueError):
        insertion_points(gm, where, every)


class Tokens(nn.Module):
    """A token LayerNorm ``(N, L, C)`` and a LayerNorm of a pooled vector ``(N, C)``."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.embed = nn.Linear(5, c)
        self.norm = nn.LayerNorm(c)
        self.fc = nn.Linear(c, c)
        self.head_norm = nn.LayerNorm(c)

    def forward(self, t):
        t = self.embed(t)
        t = t + self.fc(self.norm(t))
        return self.head_norm(t.mean(1))


def test_after_norm_is_every_token_layer_norm():
    gm = asr_traced(Tokens(), torch.randn(2, 6, 5))
    assert _targets(insertion_points(gm, "after_norm")) == ["norm"]


def test_backbone_without_points_gives_none():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    gm = asr_traced(model, torch.randn(*X))
    assert insertion_points(gm, "block_output") == []
    assert insertion_points(gm, "every_bn") == []


# --- insert_modules ------------------------------------------------------------------------------


def _insert(gm, points, x, factory=None, created=None):
    calls = []

    def make(channels: int, dims: int, tokens: bool) -> nn.Module:
        calls.append((channels, dims, tokens))
        return SE(channels) if factory is None else factory(channels, dims, tokens)

    created = {} if created is None else created
    done = insert_modules(gm, points, make, created, AsrTracer)
    stable_toposort(gm.graph)
    gm.recompile()
    propagate_shapes(gm, (x,))
    return done, calls, created


def test_inserted_modules_are_registered_and_inlined_after_each_point():
    torch.manual_seed(0)
    x = torch.randn(*X)
    gm = asr_traced(Net(), x)
    points = insertion_points(gm)
    done, calls, created = _insert(gm, points, x)
    assert [p for p, _ in done] == ["b0.bn2_asr", "b1.bn2_asr"]
    assert calls == [(8, 2, False)] * 2
    assert list(created) == ["b0.bn2_asr", "b1.bn2_asr"]
    for path, nodes in done:
        assert gm.get_submodule(path) is created[path]
        assert {n.target for n in nodes if n.op == "call_module"} == {f"{path}.fc1",
                                                                     f"{path}.fc2"}
        assert all(module_path(n).startswith(path) for n in nodes)
    # each point's readers now read the inserted module's output, which reads the point
    for p, (_, nodes) in zip(points, done):
        assert all(u in nodes for u in p.users)
    sites, refusals = find_attention_sites(gm)
    assert refusals == []
    assert [s.path for s in sites] == ["b0.bn2_asr", "b1.bn2_asr"]
    assert [s.x for s in sites] == points
    assert all(s.mul in nodes for s, (_, nodes) in zip(sites, done))


def test_inserted_graph_computes_the_module_after_the_point():
    torch.manual_seed(1)
    x = torch.randn(*X)
    model = randomize_bn(Net(), 1).eval()
    ref_model = copy.deepcopy(model)
    gm = asr_traced(model, x)
    _, _, created = _insert(gm, insertion_points(gm), x)
    for block in ("b0", "b1"):
        blk = getattr(ref_model, block)
        blk.bn2 = nn.Sequential(blk.bn2, created[f"{block}.bn2_asr"])
    with torch.no_grad():
        for xi in (x, torch.randn(3, 3, 8, 8)):
            assert rel_err(ref_model(xi), gm(xi)) <= dtype_tol(torch.float32)


def test_every_point_gets_a_module_and_count_matches():
    x = torch.randn(*X)
    gm = asr_traced(Net(), x)
    points = insertion_points(gm, "every_bn", every=2)
    done, calls, created = _insert(gm, points, x)
    assert len(done) == len(calls) == len(created) == len(points) == 3
    assert len(find_attention_sites(gm)[0]) == 3


def test_created_modules_are_reused_for_the_other_graph():
    x = torch.randn(*X)
    created: dict = {}
    gm1 = asr_traced(Net(), x)
    _, calls1, _ = _insert(gm1, insertion_points(gm1), x, created=created)
    gm2 = asr_traced(Net(), x)
    _, calls2, _ = _insert(gm2, insertion_points(gm2), x, created=created)
    assert len(calls1) == 2 and calls2 == []
    assert gm2.get_submodule("b0.bn2_asr") is gm1.get_submodule("b0.bn2_asr")


def test_inserted_module_takes_the_map_dtype():
    x = torch.randn(*X, dtype=torch.float64)
    gm = asr_traced(Net().double(), x)
    _, _, created = _insert(gm, insertion_points(gm), x)
    assert all(p.dtype == torch.float64 for m in created.values() for p in m.parameters())
    with torch.no_grad():
        assert gm(x).dtype == torch.float64


def test_token_norm_point_passes_the_last_dim_as_channels():
    from asrfx.attention import TokenSE

    x = torch.randn(2, 6, 5)
    gm = asr_traced(Tokens(), x)
    done, calls, _ = _insert(gm, insertion_points(gm, "after_norm"), x,
                             factory=lambda c, d, t: TokenSE(c))
    assert calls == [(8, 1, True)]
    assert [p for p, _ in done] == ["norm_asr"]
    (site,) = find_attention_sites(gm)[0]
    assert site.path == "norm_asr" and site.channels == 8


def test_function_point_is_named_after_its_node():
    """A point that is not a module call (``torch.relu``) names its module after the node."""
    x = torch.randn(*X)
    gm = asr_traced(Net(), x)
    points = insertion_points(gm, lambda path, n: n.op == "call_function" and
                              n.target is torch.relu and path == "b0")
    assert len(points) == 2
    done, _, _ = _insert(gm, points, x)
    assert [p for p, _ in done] == [f"b0.{p.name}_asr" for p in points]
