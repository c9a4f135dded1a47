"""The pass protocol (passes/protocol.py): ``run_steps`` is the one place that applies
``ctx.select``, a step with ``key=None`` always runs, and steps are planned lazily -- a step
produced after another ran is planned against the graph as that one left it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from asrfx.passes.branch_merge import branch_merge_steps, merge_branches
from asrfx.passes.protocol import PassContext, Step, record, run_steps
from asrfx.report import Site
from helpers import randomize_bn, rel_err, run_graph, traced


def _step(key, log):
    """A step that logs its key when run and returns one record for it."""
    return Step(key, lambda: log.append(key) or [record(key or "", "p", "k", 1, "folded")])


def test_record_is_a_site_with_its_key_and_integer_channels():
    rec = record("scale:mul", "block.se", "channel scale", 8.0,
                 code="no-fold-target")
    assert isinstance(rec, Site)
    assert (rec.key, rec.path, rec.kind, rec.channels, rec.action, rec.code) == \
        ("scale:mul", "block.se", "channel scale", 8, "kept", "no-fold-target")
    assert type(rec.channels) is int


@pytest.mark.parametrize("ctx", [None, PassContext()], ids=["no-context", "default-select"])
def test_every_step_runs_by_default_in_order(ctx):
    log: list = []
    records = run_steps([_step("a", log), _step("b", log), _step("c", log)], ctx)
    assert log == ["a", "b", "c"]
    assert [r.key for r in records] == ["a", "b", "c"]


def test_select_runs_only_the_accepted_keys_and_is_asked_about_each():
    log, asked = [], []

    def select(key):
        asked.append(key)
        return key == "b"

    records = run_steps([_step("a", log), _step("b", log), _step("c", log)],
                        PassContext(select=select))
    assert log == ["b"]
    assert [r.key for r in records] == ["b"]
    assert asked == ["a", "b", "c"]


def test_a_step_without_key_runs_whatever_select_says():
    log: list = []
    asked: list = []
    ctx = PassContext(select=lambda k: asked.append(k) or False)
    records = run_steps([_step("a", log), _step(None, log), _step("b", log)], ctx)
    assert log == [None]
    assert len(records) == 1
    assert None not in asked  # select is never consulted about a key-less step


def test_steps_are_planned_after_the_steps_before_them_ran():
    state = {"value": 0}
    planned: list = []

    def steps():
        yield Step("set", lambda: state.update(value=1) or [])
        planned.append(state["value"])  # planning of the next step happens here
        yield Step("read", lambda: [record("read", "", "k", state["value"], "folded")])

    records = run_steps(steps(), PassContext())
    assert planned == [1]
    assert records[0].channels == 1


def test_a_step_not_selected_leaves_the_state_later_steps_are_planned_with():
    state = {"value": 0}
    planned: list = []

    def steps():
        yield Step("set", lambda: state.update(value=1) or [])
        planned.append(state["value"])
        yield Step("read", lambda: [])

    run_steps(steps(), PassContext(select=lambda k: k == "read"))
    assert planned == [0]


class RepVGGLike(nn.Module):
    """Three summed branches of one input, BNs already fused: 3x3 conv, 1x1 conv, identity BN."""

    def __init__(self, c=4):
        super().__init__()
        self.k3 = nn.Conv2d(c, c, 3, padding=1)
        self.k1 = nn.Conv2d(c, c, 1)
        self.id = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.k3(x) + self.k1(x) + self.id(x))


def test_a_real_pass_plans_each_sum_against_the_graph_the_previous_merge_left():
    # the outer sum absorbs the inner one; planned lazily, the inner sum (erased by then)
    # yields no step of its own
    x = torch.randn(2, 4, 6, 6)
    model = randomize_bn(RepVGGLike(), seed=1)
    gm = traced(model, x)
    ref = run_graph(gm, x)
    records = merge_branches(gm)
    assert [(r.kind, r.action) for r in records] == [("branch merge", "merged"),
                                                     ("conv+bn", "merged")]
    assert rel_err(ref, run_graph(gm, x)) <= 1e-5


def test_planning_every_step_up_front_would_see_both_sums():
    # the same graph, steps listed before any runs: the inner sum is a candidate too -- what
    # lazy planning avoids
    x = torch.randn(2, 4, 6, 6)
    gm = traced(randomize_bn(RepVGGLike(), seed=1), x)
    assert len(list(branch_merge_steps(gm))) == 2


def test_report_extend_replaces_a_kept_site_only_by_another_pass():
    """An identity-BatchNorm branch kept by fusion (``bn:``) and absorbed by merging
    (``merge:``) is one row; two records of one pass at one path (two scales of one module,
    one kept, one folded) stay two rows."""
    from asrfx.report import Report, Site

    report = Report("fold")
    report.extend([Site("blk.bn", "conv+bn", 4, "kept", "", "no conv", "no-conv-producer",
                        key="bn:n1"),
                   Site("blk", "channel scale", 4, "kept", "", "why", "no-fold-target",
                        key="scale:a"),
                   Site("blk", "channel scale", 4, "folded", "conv", key="scale:b")])
    report.extend([Site("blk.bn", "conv+bn", 4, "merged", "blk.merged_conv", key="merge:add")])
    rows = [(s.path, s.kind, s.action) for s in report.sites]
    assert rows == [("blk.bn", "conv+bn", "merged"), ("blk", "channel scale", "kept"),
                    ("blk", "channel scale", "folded")]
