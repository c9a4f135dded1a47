"""The compiler pipeline behind :func:`asrfx.prepare` and :func:`asrfx.fold`.

``prepare``: capture (:mod:`asrfx.capture`) -> insert attention (optional) -> find attention
sites -> refuse the unsafe ones -> the ASR rewrite, on each graph of the model (train and eval
when they differ) -> one module with a report.

``fold``: the eval graph -> evaluate constant branches -> revert SyncBatchNorm -> fold
per-channel scales -> fuse Conv/BatchNorm -> merge branches -> clean up -> check against the
unfolded graph (on a miss, re-run one site at a time to name the culprit). An ``nn.Module``
is first folded from an unchecked trace with its shapes deferred and the result compared with
the eager model directly, one graph run fewer; anything short of a pass takes that full path.

A :class:`Context` carries what the stages share: the caller's model, the inputs, the captured
graphs, which graphs' shape metadata is current for the inputs, and the reference output. Each
pass returns :class:`asrfx.report.Site` records; the report is their concatenation.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY
from torch.utils._pytree import tree_flatten

from asrfx.passes import (apply_asr, cleanup, drop_identities, evaluate_constants,
                          find_attention_sites, fold_scales, fuse_batchnorm,
                          refuse_batch_statistic_sites, gates_before_batch_norm,
                          revert_sync_batchnorm)
from asrfx.passes.asr_rewrite import psi_names
from asrfx.passes.find_attention import gate_form
from asrfx.passes.branch_merge import merge_branches, merge_sequential
from asrfx.passes.graph_utils import (clone_module, deepcopy_module, describe_hooks, module_device,
                                      module_path,
                                      reads_shape_only, safe_dce, stable_toposort,
                                      to_eval, value_dependent)
from asrfx.passes.fuse_gates import fuse_gates, unfuse_gates
from asrfx.passes.batch_excitations import batch_excitations
from asrfx.passes.hooks import (hook_fix, protect_hooked_calls, refuse_hooked_sites,
                                restore_hooked_calls)
from asrfx.passes.insertion import insert_modules, insertion_points
from asrfx.passes.protocol import PassContext
from asrfx.passes.shapes import ShapeRecorder, defer_shapes, drop_deferred, propagate_shapes
from asrfx.passes.stacked import flatten_stacked_gates

from .capture import capture
from .check import first_nonfinite, half_precision, nonfinite, relative_error, tolerance
from .errors import FoldMismatch, InputError, NonFiniteError
from .inputs import describe_inputs, forward_signature, inputs_failure
from .report import Report, Site
from .tracing import (AsrTracer, DualModeGraphModule, TraceResult, eager_eval, preserve_modes,
                      uncompiled_graph_module, warn_own_hooks)

__all__ = ["Context", "PrepareOptions", "prepare_model", "fold_model", "eval_graph_module",
           "count_params", "attach_report", "input_specs", "meta_of"]


@dataclass
class Context:
    """What the stages of one ``prepare`` / ``fold`` call share.

    Attributes:
        model: the caller's model (never modified).
        inputs: the example inputs, a tuple.
        leaf_modules: module names or types kept opaque when capturing.
        trace: the captured graphs (prepare; fold of a model that is not a GraphModule),
            else None.
        fresh: the graph modules whose shape metadata was recorded with ``inputs`` and is still
            current (a pass that changes shapes must call :meth:`stale`).
        reference: the unfolded eval graph's output on ``inputs`` (fold).
    """

    model: nn.Module
    inputs: tuple
    leaf_modules: Sequence[str | type] = ()
    trace: TraceResult | None = None
    fresh: set = field(default_factory=set)
    reference: Any = None

    def captured(self, tr: TraceResult) -> None:
        """Take the capture's graphs (a checked capture's eval graph carries shapes for
        ``inputs``)."""
        self.trace = tr
        if tr.shaped:
            self.fresh.add(tr.eval)

    def shapes(self, gm: fx.GraphModule) -> None:
        """Make ``gm``'s shape metadata current for ``inputs``."""
        if gm not in self.fresh:
            propagate_shapes(gm, self.inputs)
            self.fresh.add(gm)

    def stale(self, gm: fx.GraphModule) -> None:
        self.fresh.discard(gm)


def count_params(m: nn.Module) -> int:
    """``sum(p.numel() for p in m.parameters())`` (each shared module and parameter once),
    walked through ``_modules`` / ``_parameters`` without the generators: 3x faster."""
    modules, params, total, stack = set(), set(), 0, [m]
    while stack:
        mod = stack.pop()
        if id(mod) in modules:
            continue
        modules.add(id(mod))
        for p in mod._parameters.values():
            if p is not None and id(p) not in params:
                params.add(id(p))
                total += p.numel()
        stack.extend(c for c in mod._modules.values() if c is not None)
    return total


def input_specs(inputs: tuple) -> list:
    return [(tuple(t.shape), t.dtype) for t in inputs if isinstance(t, torch.Tensor)]


def attach_report(gm: fx.GraphModule, report: Report, **info: Any) -> None:
    """Attach ``report`` (``gm.asrfx_report``) and ``info`` (``gm.meta["asrfx"]``, and the
    attribute ``gm.asrfx_info`` that pickling keeps: it drops ``meta``), kept by
    ``copy.deepcopy`` and pickling."""
    gm.meta["asrfx"] = dict(info, stage=report.stage)
    kept = gm.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})
    kept["asrfx_report"], kept["asrfx_info"] = report, gm.meta["asrfx"]
    gm.asrfx_report, gm.asrfx_info = report, gm.meta["asrfx"]


# ----------------------------------------------------------------------------- prepare

@dataclass
class PrepareOptions:
    """``prepare``'s checked arguments (see :func:`asrfx.prepare`)."""

    mode: str
    init: Any
    calibration_data: Any = None
    factory: Callable | None = None
    where: Any = "block_output"
    every: int = 1
    select: Callable[[str, str], bool] | None = None  # (module path, gate form) -> convert?
    fused: bool = False  # gates folded into their norms' affine in the training form


def prepare_model(model: nn.Module, work: nn.Module, inputs: tuple, opts: PrepareOptions,
                  leaf_modules: Sequence[str | type]) -> fx.GraphModule:
    """The training form of ``work`` (a copy of ``model``), with its report attached."""
    ctx = Context(model, inputs, leaf_modules)
    ctx.captured(capture(work, inputs, leaf_modules))
    tr = ctx.trace
    report = Report("prepare", params_before=count_params(model))
    report.extend(_hooked_leaf_records(tr.hooked) +
                  opaque_leaf_records(tr.leaves.why, tr.root, "converted"))
    for gm in tr.modules():  # SK / split attention: a gate over stacked branches, flattened
        ctx.shapes(gm)
        if flatten_stacked_gates(gm):
            ctx.stale(gm)
    created: dict[str, Any] = {}
    inserted = _insert(ctx, opts, created, report) if opts.factory is not None else {}
    init = opts.init
    if init == "calibrate":
        init = calibrated_init(ctx, tr.eval, opts.calibration_data)
    counts = []
    found = []
    for i, gm in enumerate(tr.modules()):
        ctx.shapes(gm)
        found.append(_analyse(gm, opts.mode, inserted.get(i, set()),
                              found[0].moved if i else None))
    for i, gm in enumerate(tr.modules()):
        # a site refused in one mode's graph is refused in the other's too, with its record
        elsewhere = {(s.path, s.channels): rec for j, a in enumerate(found) if j != i
                     for s, rec in a.refused}
        records, notes, n = _convert(gm, work, opts, init, created, inserted.get(i, set()),
                                     found[i], elsewhere)
        counts.append(n)
        if i == 0:
            report.extend(records)
            report.notes += notes
    if tr.dual:
        report.notes.append("forward differs between train and eval mode (e.g. drop-path); "
                            "both graphs were converted")
        if counts[0] != counts[1]:
            report.notes.append(f"train graph has {counts[0]} sites, eval graph {counts[1]}")
    out = tr.build()
    # the caller's per-module train/eval flags carry over (the layers are copies of theirs);
    # only the containers the GraphModule made for itself take the top-level flag
    out.training = model.training
    for m in out.modules():
        if type(m) is nn.Module:
            m.training = model.training
    report.params_after = count_params(out)
    if not report.sites:
        report.notes.append("no channel attention found; the model is returned unchanged "
                            "(use fold() for BN fusion)")
    attach_report(out, report, mode=opts.mode, input_specs=input_specs(inputs),
                  psi=[n for n in created if n.endswith("psi")], opaque=dict(tr.leaves.why))
    return out


def opaque_leaf_records(why: dict[str, str], root: nn.Module, done: str) -> list[Site]:
    """A "kept" record (code ``untraceable-module``) for every submodule the trace kept as an
    opaque call because it could not be captured faithfully (``why``: path -> reason, a
    trace's ``leaves.why`` or what a prepared model carries; ``root`` holds the submodules):
    nothing inside it is ``done`` (converted, folded), and the record counts the BatchNorm
    layers it hides."""
    out = []
    for path, reason in sorted(why.items()):
        try:
            inner = root.get_submodule(path)
        except AttributeError:
            inner = None
        norms = 0 if inner is None else sum(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                            for m in inner.modules())
        hidden = f"; it hides {norms} BatchNorm layer(s)" if norms else ""
        out.append(Site(path, "opaque module", 0, "kept", "",
                        f"{reason}: kept as an opaque call, run as the model runs it; nothing "
                        f"inside it is {done}{hidden} (make it traceable, e.g. move the Python "
                        f"logic on tensor values out of its forward, to include it)",
                        code="untraceable-module"))
    return out


def _hooked_leaf_records(hooked: dict[str, list[str]]) -> list[Site]:
    return [Site(path, "hooked module", 0, "kept", "",
                 f"has {describe_hooks(kinds)}: kept as an opaque call so that it runs; nothing "
                 f"inside it is converted (to convert it, {hook_fix(kinds)})",
                 code="hooked-module") for path, kinds in hooked.items()]


def _insert(ctx: Context, opts: PrepareOptions, created: dict, report: Report
            ) -> dict[int, set[fx.Node]]:
    """Insert new attention modules at ``opts.where`` in every graph; the inserted nodes per
    graph (their sites are always converted)."""
    inserted: dict[int, set] = {}
    paths: list[str] = []
    for i, gm in enumerate(ctx.trace.modules()):
        ctx.shapes(gm)
        points = insertion_points(gm, opts.where, opts.every)
        done = insert_modules(gm, points, opts.factory, created, AsrTracer)
        inserted[i] = set().union(*(nodes for _, nodes in done)) if done else set()
        if i == 0:
            paths = [p for p, _ in done]
        stable_toposort(gm.graph)
        ctx.stale(gm)
        ctx.shapes(gm)
    if not paths:
        report.notes.append(f"no insertion point found for where={opts.where!r}")
    return inserted


@dataclass
class _Analysis:
    """One graph's attention sites before the rewrite: those to convert, the refusals, and the
    sites whose gate moves behind the BatchNorms reading its map (key -> norm names)."""

    sites: list
    found_refused: list
    refused: list  # (AttentionSite, Site record)
    moved: dict = field(default_factory=dict)


def _analyse(gm: fx.GraphModule, mode: str, new: set[fx.Node],
             expected: dict | None = None) -> _Analysis:
    """Find the sites of one graph and refuse the unsafe ones (nothing is changed but the
    sites' marks). ``expected``: the train graph's moved gates, for the eval graph."""
    sites, found_refused = find_attention_sites(gm)
    sites, hooked = refuse_hooked_sites(gm, sites, new) if mode != "keep" else (sites, [])
    _, batch_stats = refuse_batch_statistic_sites(
        gm, [s for s in sites if mode != "keep" or s.mul in new])
    moved, before_bn = gates_before_batch_norm(
        gm, [s for s in sites if mode == "replace" and s.mul not in new and
             all(s is not r for r, _ in batch_stats)], expected)
    refused = hooked + batch_stats + before_bn
    return _Analysis([s for s in sites if all(s is not r for r, _ in refused)], found_refused,
                     refused, moved)


def _convert(gm: fx.GraphModule, root: nn.Module, opts: PrepareOptions, init: Any,
             created: dict, new: set[fx.Node], found: _Analysis,
             elsewhere: dict[tuple[str, int], Site]) -> tuple[list[Site], list[str], int]:
    """Rewrite the analysed sites of one graph, except those refused in the model's other
    graph (``elsewhere``: the two modes must agree on what is converted); (records, notes,
    sites)."""
    mode = opts.mode
    sites = [s for s in found.sites if (s.path, s.channels) not in elsewhere]
    also = [elsewhere[(s.path, s.channels)] for s in found.sites
            if all(s is not k for k in sites)]
    forms = {id(s): gate_form(gm, s) for s in sites}
    if opts.select is not None:
        chosen = [s for s in sites if s.mul in new or opts.select(s.path, forms[id(s)])]
        also += [Site(s.path, "channel-attention", s.channels, "kept", "",
                      "not chosen by prepare(sites=...): the attention stays as it is",
                      "not-selected", form=forms[id(s)]) for s in sites
                 if all(s is not c for c in chosen)]
        sites = chosen
    site_modes = ["replace" if s.mul in new else mode for s in sites]
    try:
        names = apply_asr(gm, sites, init=init, created=created, root=root,
                          site_modes=site_modes)
    except (ValueError, KeyError) as e:
        raise InputError(f"bad psi init for {type(root).__name__}: "
                         f"{e.args[0] if e.args else e}") from None
    safe_dce(gm)
    replaced = [s for s, m in zip(sites, site_modes) if m == "replace"]
    inserted_sites = {id(s) for s in sites if s.mul in new}  # before fusion moves s.mul
    fused_notes, into_convs = fuse_gates(gm, replaced) if opts.fused else ([], 0)
    batched = batch_excitations(gm, replaced) if opts.fused else (0, 0)
    actions = {"replace": "converted", "both": "added", "keep": "kept"}
    records = []
    for site, psis, m in zip(sites, names, site_modes):
        inserted = id(site) in inserted_sites
        reason, code = ("existing attention kept (mode='keep')", "mode-keep") if m == "keep" \
            else ("", "")
        if site.after_norms and m == "replace" and not inserted:
            norms = sorted({name for name, _ in site.after_norms})
            reason, code = (f"the constant gate {'shifts' if site.fusion == 'add' else 'scales'} "
                            f"the output of {', '.join(norms)} instead of its input, where the "
                            f"norm's batch statistics would cancel it in training",
                            "gate-after-batch-norm")
        records.append(Site(site.path, "channel-attention (inserted)" if inserted else
                            "channel-attention", site.channels,
                            "inserted" if inserted else actions[m],
                            "" if m == "keep" else ", ".join(psis), reason, code,
                            form=forms[id(site)]))
    records += [Site(path, _NOT_CHANNEL.get(code, "channel-attention?"), 0, "refused", "",
                     reason, code)
                for path, reason, code in found.found_refused]
    records += [rec for _, rec in found.refused] + also
    if opts.fused:
        done = sum(1 for m in site_modes if m == "replace") - len(fused_notes) - into_convs
        fused_notes.insert(0, f"fused training form: {done} gate(s) applied through their "
                              f"BatchNorm's affine (one multiply per channel)" +
                           (f", {into_convs} through the input columns of the convolutions "
                            f"reading their map (one multiply per weight)" if into_convs
                            else ""))
        if batched[0]:
            fused_notes.insert(1, f"fused training form: the excitations of {batched[0]} "
                                  f"site(s) run as {batched[1]} batched call(s) "
                                  f"(identical excitations, stacked parameters, torch.func.vmap traced once)")
    return records, _site_notes(sites) + fused_notes, len(sites)


def _site_notes(sites: list) -> list[str]:
    notes = []
    for site in sites:
        if site.rows:
            notes.append(f"{site.path}: the ASR branch runs on psi expanded to the batch "
                         f"({site.rows}); it folds the same")
        for norm in site.frozen_norms:
            notes.append(f"{norm}: a norm inside the ASR branch of {site.path} now always "
                         f"normalises with its running statistics (psi is one value for the "
                         f"whole batch)")
    return list(dict.fromkeys(notes))  # sites sharing a branch (radix gates) say it once


def calibrated_init(ctx: Context, gm: fx.GraphModule, calibration_data: Any
                    ) -> dict[str, torch.Tensor]:
    """psi name -> the mean, over every calibration input, of the statistic psi replaces.

    The original (input-dependent) graph runs in eval mode on each batch; each pooled statistic's
    per-sample values are summed and averaged, so the converted attention starts at the average
    output its branch saw (the Stripe Observation says that is nearly every output).

    Raises:
        InputError: a batch is not a tensor (or a tuple starting with one), the model fails on
            it, or there is no batch.
    """
    ctx.shapes(gm)
    sites, _ = find_attention_sites(gm)
    keep = {stat: name for site, ns in zip(sites, psi_names(sites))
            for stat, name in zip(site.stats, ns)}
    sums: dict[str, torch.Tensor] = {}
    count = 0
    device = module_device(gm)
    modes = preserve_modes(gm)
    gm.eval()
    try:
        with torch.no_grad():
            for batch in calibration_data:
                xb = batch[0] if isinstance(batch, (tuple, list)) else batch
                if not isinstance(xb, torch.Tensor):
                    raise InputError(f"calibration_data yields {type(xb).__name__}, expected "
                                     f"tensors or (input, ...) tuples")
                rec = ShapeRecorder(gm, keep=keep)
                try:
                    rec.run(xb.to(device))
                except Exception as e:  # noqa: BLE001
                    raise InputError(f"the model fails on a calibration batch of shape "
                                     f"{tuple(xb.shape)}: {str(e).splitlines()[0]}") from None
                for stat, name in keep.items():
                    v = rec.values[stat].double().sum(0, keepdim=True)
                    sums[name] = v if name not in sums else sums[name] + v
                count += xb.shape[0]
    finally:
        modes.__exit__()
    if count == 0:
        raise InputError("calibration_data is empty")
    ctx.stale(gm)  # calibration batches overwrote the recorded shapes
    ctx.shapes(gm)
    return {name: (total / count).float() for name, total in sums.items()}


# ----------------------------------------------------------------------------- fold

def fold_model(model: nn.Module, inputs: tuple, check: bool, fuse_bn: bool, tol: float,
               leaf_modules: Sequence[str | type]) -> fx.GraphModule:
    """The deploy form of ``model`` (see :func:`asrfx.fold`), checked when ``check``."""
    if check and not isinstance(model, fx.GraphModule):
        gm = _fold_checked_end_to_end(model, inputs, fuse_bn, tol, leaf_modules)
        if gm is not None:
            return gm
    ctx = Context(model, inputs, leaf_modules)
    gm = eval_graph_module(ctx, compiled=False)  # the passes end with cleanup's recompile
    check_arity(gm, inputs)
    recs = run_fold_passes(gm, ctx, fuse_bn)
    report = _fold_report(model, gm, _folded_opaque(model, ctx.trace) + recs)
    if check:
        _check(ctx, gm, report, recs, tol, fuse_bn)
    _attach_fold(model, inputs, gm, report)
    return gm


def _fold_checked_end_to_end(model: nn.Module, inputs: tuple, fuse_bn: bool, tol: float,
                             leaf_modules: Sequence[str | type]) -> fx.GraphModule | None:
    """The checked fold of an ``nn.Module`` with one model run fewer, or None.

    The full path runs three graphs on the inputs: the eager model (the reference), the traced
    graph (checking the trace against it and recording the shapes the passes read) and the
    folded graph (checking the fold). Here the traced graph does not run by itself: the folded
    graph is compared with the eager model directly, which checks trace and fold at once, and
    shapes are recorded only when a pass first reads one (:func:`defer_shapes`; on a plain conv
    net none does, and the folded graph's run records them for the report).

    Anything short of a passing check (an exception, an error above the tolerance, a
    non-finite reference) returns None, and :func:`fold_model` takes the full path, which
    makes unfaithfully traced submodules leaves, names the site that breaks a fold or raises,
    exactly as without this attempt; the attempt's warnings are then dropped (the full path
    gives its own), else they are re-issued.
    """
    clone = clone_module(model)
    reference = eager_eval(clone, inputs)  # (the full path's first step too: its errors stand)
    if any(nonfinite(t) for t in tree_flatten(reference)[0]):
        return None
    gm = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            tr = capture(clone, inputs, leaf_modules, checked=False)
            gm = tr.eval
            to_eval(gm)
            defer_shapes(gm, inputs)
            ctx = Context(model, inputs, leaf_modules, reference=reference)
            ctx.fresh.add(gm)  # (its shapes: deferred) the reference: the eager model's output
            check_arity(gm, inputs)
            recs = run_fold_passes(gm, ctx, fuse_bn)
            with torch.no_grad():
                out = ShapeRecorder(gm).propagate(*inputs)
            err, limit = relative_error(reference, out), tolerance(tol, out)
            if not err <= limit:
                return None
            report = _fold_report(model, gm, _folded_opaque(model, tr) + recs)
        except Exception:  # noqa: BLE001 - the full path reports it properly
            return None
        finally:
            if gm is not None:
                drop_deferred(gm.graph)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    report.notes.append(_checked_note(err, limit))
    _attach_fold(model, inputs, gm, report)
    return gm


def _folded_opaque(model: nn.Module, tr: TraceResult | None) -> list[Site]:
    """Fold's records of opaque submodules: those of its own trace, else (a GraphModule)
    those the prepared model carries."""
    if tr is not None:
        return opaque_leaf_records(tr.leaves.why, tr.root, "folded")
    return opaque_leaf_records(meta_of(model).get("opaque") or {}, model, "folded")


def _fold_report(model: nn.Module, gm: fx.GraphModule, recs: list[Site]) -> Report:
    """Fold's report before its check: the passes' records, attention left, constants left."""
    report = Report("fold", params_before=count_params(model), params_after=count_params(gm))
    report.extend(recs + _attention_left(gm))
    audit_constants(gm, report)
    return report


def _attach_fold(model: nn.Module, inputs: tuple, gm: fx.GraphModule, report: Report) -> None:
    if not any(s.action in ("folded", "fused", "merged") for s in report.sites):
        report.notes.append("nothing was folded, fused or merged: the result computes what the "
                            "model computes in eval mode")
    info = {k: v for k, v in meta_of(model).items() if k != "stage"}
    info["input_specs"] = input_specs(inputs)
    attach_report(gm, report, **info)


def _checked_note(err: float, tol: float) -> str:
    return (f"checked against the unfolded model in eval mode: relative error {err:.2e} "
            f"(tolerance {tol:.0e})")


def meta_of(model: nn.Module) -> dict:
    """What asrfx recorded on a model it made (``model.meta["asrfx"]``; after pickling, which
    drops ``meta``, ``model.asrfx_info``), else {}."""
    meta = getattr(model, "meta", None)
    found = meta.get("asrfx") if isinstance(meta, dict) else None
    if found is None:
        found = model.__dict__.get("asrfx_info")
    return found if isinstance(found, dict) else {}


def eval_graph_module(ctx: Context, compiled: bool = True) -> fx.GraphModule:
    """An eval-mode GraphModule over a copy of ``ctx.model`` (the eval graph of a dual-mode
    one); the model itself is not touched. ``compiled=False``: without generated code (no
    ``forward`` until ``recompile()``), for a caller that rewrites it and compiles it once.

    A model that is not a GraphModule is captured, which runs the graph on ``ctx.inputs``
    (checking it against the eager model): that run's shapes make the result fresh in ``ctx``
    and its output is ``ctx.reference``."""
    model = ctx.model
    if isinstance(model, fx.GraphModule):
        graph = model.eval_graph if isinstance(model, DualModeGraphModule) else model.graph
        gm = _clone_graph_module(model, graph)
        warn_own_hooks(model)
    else:
        tr = capture(clone_module(model), ctx.inputs, ctx.leaf_modules)
        ctx.trace = tr
        gm = tr.eval
        if tr.shaped:
            ctx.fresh.add(gm)
            ctx.reference = tr.output
    if compiled:
        gm.recompile()
    to_eval(gm)
    return gm


def _clone_graph_module(gm: fx.GraphModule, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule over deep copies of ``gm``'s attributes and a copy of ``graph``.

    Cheaper than ``copy.deepcopy(gm)``, which deep-copies every node's metadata and recompiles
    twice; here node metadata is copied shallowly (it is only read).
    """
    memo: dict = {}
    root = nn.Module()
    for name, child in gm.named_children():
        root.add_module(name, clone_module(child, memo))
    for name, p in gm._parameters.items():
        root.register_parameter(name, copy.deepcopy(p, memo))
    for name, b in gm._buffers.items():
        root.register_buffer(name, copy.deepcopy(b, memo))
    g = fx.Graph()
    g._codegen = copy.deepcopy(graph._codegen)
    out = g.graph_copy(graph, {})
    g.output(out)
    # errors name the caller's model; fold's cleanup generates the code once, at the end
    new = uncompiled_graph_module(root, g, type(gm).__name__)
    new.meta = {k: v for k, v in getattr(gm, "meta", {}).items()
                if k != _USER_PRESERVED_ATTRIBUTES_KEY}
    return new


def run_fold_passes(gm: fx.GraphModule, ctx: Context, fuse_bn: bool,
                    select: Callable[[str], bool] | None = None) -> list[Site]:
    """The fold passes on ``gm`` in order; sets ``ctx.reference``; their records."""
    # a graph that just ran on the inputs (a checked capture) need not run again for them
    reference = ctx.reference if gm in ctx.fresh else None
    pctx = PassContext(ctx.inputs, reference=reference) if select is None else \
        PassContext(ctx.inputs, select, reference)
    ctx.stale(gm)  # the passes below change it
    unfuse_gates(gm)  # a fused training form: BN(x) * g again, which the passes below fold
    hooked = protect_hooked_calls(gm)  # no pass folds into, through or away a hooked module
    try:
        records = evaluate_constants(gm, pctx)
    except Exception as e:  # noqa: BLE001 - a bad input must name itself, not fail deep in fx
        raise InputError(inputs_failure(gm, ctx.inputs, e)) from None
    ctx.reference = pctx.reference
    records += revert_sync_batchnorm(gm)  # trained with SyncBatchNorm: the same map in eval
    drop_identities(gm)
    records += fold_scales(gm, pctx)
    if fuse_bn:
        records += _fuse_and_merge(gm, pctx)
    restore_hooked_calls(gm, hooked)
    cleanup(gm)
    return [Site(h["path"], "hooked module", 0, "kept", "", h["reason"], "hooked-module")
            for h in hooked] + records


def _fuse_and_merge(gm: fx.GraphModule, pctx: PassContext, rounds: int = 8) -> list[Site]:
    """BatchNorm fusion and branch merging to a fixed point: a merge can give a BatchNorm after
    a summed block the conv it fuses into (and a fusion a merge its conv). What was done in
    every round, then what the last round kept."""
    done: list[Site] = []
    kept: list[Site] = []
    for _ in range(rounds):
        recs = fuse_batchnorm(gm, pctx) + merge_sequential(gm, pctx) + merge_branches(gm, pctx)
        done += [r for r in recs if r.action != "kept"]
        kept = [r for r in recs if r.action == "kept"]
        # only a merge makes new work (a conv a BatchNorm after the block fuses into): the
        # merges of this round already saw every fusion before them
        if not any(r.action == "merged" for r in recs):
            break
    return done + kept


def _attention_left(gm: fx.GraphModule) -> list[Site]:
    """Input-dependent attention the deploy graph still computes (fold does not convert)."""
    try:  # nodes kept from the unfolded graph still carry their shape metadata
        left, refused = find_attention_sites(gm)
    except Exception:  # noqa: BLE001 - the report must not fail the fold
        left, refused = [], []
    return [Site(s.path, "channel-attention", s.channels, "kept", "",
                 "input-dependent attention (prepare() converts it)", "not-prepared")
            for s in left] + \
        [Site(path, _NOT_CHANNEL[code], 0, "kept", "", reason, code)
         for path, reason, code in refused if code in _NOT_CHANNEL]


#: the kinds of input-dependent attention that are not channel attention (refusal code -> kind)
_NOT_CHANNEL = {"spatial-attention": "spatial attention",
                "element-attention": "element-wise attention"}


def _check(ctx: Context, gm: fx.GraphModule, report: Report, recs: list[Site], tol: float,
           fuse_bn: bool) -> None:
    """Compare the folded graph with the unfolded one on the inputs; raise on a miss."""
    ref, name = ctx.reference, type(ctx.model).__name__
    if any(nonfinite(t) for t in tree_flatten(ref)[0]):
        raise NonFiniteError(
            f"asrfx.fold: {name} itself outputs NaN/Inf in eval mode on the example inputs, so "
            f"no fold can be checked; the first non-finite value: "
            f"{first_nonfinite(eval_graph_module(ctx), ctx.inputs)}. Fix the model (e.g. "
            f"re-estimate BatchNorm statistics, or lower the learning rate that diverged) and "
            f"fold again")
    with torch.no_grad():
        try:
            out = gm(*ctx.inputs)
        except Exception as e:  # noqa: BLE001 - the unfolded graph ran on these inputs
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise FoldMismatch(float("nan"), tol, None, f"The folded graph fails to run "
                               f"({type(e).__name__}: {msg}). ") from None
        err = relative_error(ref, out)
    tol = tolerance(tol, out)
    report.notes.append(_checked_note(err, tol))
    if err <= tol:
        return
    dtype = half_precision(out) or _float32(out)
    detail = ""
    if dtype is not None and not math.isnan(err):
        # the eager run's own rounding can exceed tol (half precision; an ill-conditioned
        # float32 model, e.g. large norm gains): judge both against the truth, the unfolded
        # model run in float64, and accept a fold within tol of it or whose error is of the
        # eager run's own order (a wrong fold errs by the size of what it got wrong)
        eager64, fold64 = _against_float64(ctx, ref, out)
        detail = (f"against the unfolded model run in float64 the fold errs {fold64:.2e} and "
                  f"the {dtype} eager model {eager64:.2e}")
        same64 = _fold_in_float64(ctx, fuse_bn) if dtype == "float32" else math.inf
        if same64 <= 1e-9:
            report.notes.append(f"float32: the fold differs from the eager model by more than "
                                f"the tolerance, but {detail}, and the same fold computed in "
                                f"float64 errs {same64:.1e}: the difference is float32 "
                                f"rounding in an ill-conditioned model, not the fold")
            return
        if fold64 <= max(2 * eager64 if dtype == "float32" else eager64, tol):
            verdict = "the fold is no worse" if fold64 <= max(eager64, tol) else \
                "the fold errs within twice the eager run's own rounding"
            report.notes.append(f"{dtype}: the fold differs from the eager model by more than "
                                f"the tolerance, but {detail}: {verdict}")
            return
        if half_precision(out):
            raise FoldMismatch(err, tol, None, f"({detail}.) ")
    worst, worst_err = _isolate(ctx, fuse_bn, recs)
    raise FoldMismatch(err, tol, worst,
                       (f"(that site alone gives {worst_err:.2e}) " if worst else "") +
                       (f"({detail}.) " if detail else ""))


def _double(inputs: tuple) -> tuple:
    """The inputs with floating-point tensors in float64 (exactly: float16/bfloat16/float32
    values are float64 values)."""
    return tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                 for t in inputs)


def _fold_in_float64(ctx: Context, fuse_bn: bool) -> float:
    """The relative error of the same fold done on a float64 copy of the model, against that
    copy unfolded: about 1e-15 when every fold identity holds (then a float32 miss is rounding),
    the size of the mistake otherwise."""
    model64 = deepcopy_module(ctx.model).double()
    inputs64 = _double(ctx.inputs)
    ctx64 = Context(model64, inputs64, ctx.leaf_modules)
    gm = eval_graph_module(ctx64)
    run_fold_passes(gm, ctx64, fuse_bn)
    with torch.no_grad():
        return relative_error(ctx64.reference, gm(*inputs64))


def _float32(out: Any) -> str | None:
    """"float32" when an output tensor is float32 (its rounding can be judged in float64)."""
    return "float32" if any(isinstance(t, torch.Tensor) and t.dtype == torch.float32
                            for t in tree_flatten(out)[0]) else None


def _against_float64(ctx: Context, eager: Any, folded: Any) -> tuple[float, float]:
    """(relative error of the eager output, of the folded output) against the unfolded model
    run in float64 on the same inputs (converted exactly: float16/bfloat16 values are float64
    values)."""
    gm = eval_graph_module(ctx).double()
    inputs64 = _double(ctx.inputs)
    with torch.no_grad():
        truth = gm(*inputs64)
    return relative_error(truth, eager), relative_error(truth, folded)


def _isolate(ctx: Context, fuse_bn: bool, recs: list[Site]) -> tuple[str | None, float]:
    """Fold one site at a time to find the one that breaks equivalence."""
    worst, worst_err = None, -1.0
    done: set[str] = set()
    for rec in recs:
        if rec.action not in ("folded", "fused", "merged") or not rec.key or rec.key in done:
            continue
        done.add(rec.key)
        gm = eval_graph_module(ctx)
        run_fold_passes(gm, ctx, fuse_bn, select=lambda k, key=rec.key: k == key)
        with torch.no_grad():
            e = relative_error(ctx.reference, gm(*ctx.inputs))
        if e > worst_err:
            worst, worst_err = f"{rec.path or '(top)'} -> {rec.target}", e
    return worst, worst_err


def audit_constants(gm: fx.GraphModule, report: Report) -> None:
    """Part of fold's check: the deploy graph holds no psi and no computation from parameters
    and buffers alone, unless the report already says why (a constant branch kept). Anything
    else left (an in-place update of a buffer, an opaque call on constants) is reported here,
    never left unmentioned."""
    kept = {s.path for s in report.sites if s.action == "kept" and s.kind == "constant branch"}
    dep = value_dependent(gm.graph)
    left: dict[str, list[str]] = {}
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method", "call_module") or n in dep or \
                reads_shape_only(n):
            continue
        if n.op != "call_module" and not hasattr(n.meta.get("tensor_meta"), "shape"):
            continue  # a shape computed from shapes (``b, c = x.shape[:2]``)
        path = module_path(n)
        if path not in kept:
            left.setdefault(path, []).append(str(getattr(n.target, "__name__", n.target)))
    for path, ops in left.items():
        report.add(path, "constant branch", 0, "kept", "",
                   f"computed from parameters and buffers alone at every call "
                   f"({', '.join(ops[:4])}{', ...' if len(ops) > 4 else ''}): an in-place update "
                   f"or a call asrfx cannot evaluate keeps it", code="constant-computation-left")
        kept.add(path)
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        path, _, field_name = name.rpartition(".")
        if field_name.endswith("psi") and path not in kept:
            report.add(path, "constant branch", 0, "kept", "",
                       f"{name} is still read by the deploy graph", code="psi-left")


def check_arity(gm: fx.GraphModule, inputs: tuple) -> None:
    """As many inputs as the graph takes: fx's Interpreter would silently drop extra ones.

    Raises:
        InputError: naming how many inputs the model takes and what was given.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if any(str(n.target).startswith("*") for n in placeholders):
        return
    required = [n for n in placeholders if not n.args]  # a default is the placeholder's arg
    if not len(required) <= len(inputs) <= len(placeholders):
        takes = f"{len(required)}" if len(required) == len(placeholders) else \
            f"{len(required)} to {len(placeholders)}"
        raise InputError(f"{type(gm).__name__} takes {takes} input(s), got {len(inputs)}; pass "
                         f"example_inputs=(x,) with tensors {forward_signature(gm)} accepts "
                         f"(given: {describe_inputs(inputs)})")
