"""``prepare`` and ``fold``: the two calls a user makes. They orchestrate the passes."""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY
from torch.utils._pytree import tree_flatten

from asrfx.passes import (apply_asr, cleanup, drop_identities, revert_sync_batchnorm, evaluate_constants, find_attention_sites,
                          fold_scales, fuse_batchnorm, refuse_batch_statistic_sites,
                          refuse_gates_before_batch_norm)
from asrfx.passes.graph_utils import (clone_module, deepcopy_module, describe_hooks,
                                      get_attr_path, module_path, safe_dce, stable_toposort)
from asrfx.passes.hooks import (hook_fix, protect_hooked_calls, refuse_hooked_sites,
                                restore_hooked_calls)
from asrfx.passes.insertion import insert_modules, insertion_points
from asrfx.passes.branch_merge import merge_branches, merge_sequential

from .errors import FoldMismatch, InputError, NonFiniteError
from .report import Report
from .tracing import (AsrTracer, DualModeGraphModule, _inputs_failure, check_example_inputs,
                      infer_example_inputs, normalize_inputs, preserve_modes, propagate_shapes,
                      trace_modes, warn_own_hooks)

__all__ = ["prepare", "fold", "relative_error"]

_MODES = ("replace", "both", "keep")


def _count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _meta(model: nn.Module) -> dict:
    meta = getattr(model, "meta", None)
    return meta.get("asrfx", {}) if isinstance(meta, dict) else {}


def _attach(gm: fx.GraphModule, report: Report, **info: Any) -> None:
    gm.meta["asrfx"] = dict(info, stage=report.stage)
    gm.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})["asrfx_report"] = report
    gm.asrfx_report = report


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_model(model: nn.Module, entry: str) -> None:
    """Refuse models whose weights asrfx cannot compute with: on the meta device (no values),
    complex or exotic floating dtypes (the fold computes in float64 and casts back, which would
    drop an imaginary part), integer weights of the layers a fold rewrites."""
    name = type(model).__name__
    tensors = list(model.named_parameters(remove_duplicate=True)) + \
        list(model.named_buffers(remove_duplicate=True))
    for key, t in tensors:
        if t.device.type == "meta":
            raise InputError(f"asrfx.{entry}: {name}.{key} is on the meta device (shapes without "
                             f"values): constants cannot be evaluated nor the result checked; "
                             f"materialize the weights first (model.to_empty(device='cpu') and "
                             f"load_state_dict)")
        if t.is_complex() or (t.is_floating_point() and t.dtype not in _DTYPES):
            fix = ("hold the real and imaginary parts as two real tensors (torch.view_as_real)"
                   if t.is_complex() else "convert the model with model.float() first")
            raise InputError(f"asrfx.{entry}: {name}.{key} is {str(t.dtype).replace('torch.', '')}"
                             f"; asrfx folds real-valued float16, bfloat16, float32 and float64 "
                             f"models: {fix}")
    folded_types = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase,
                    nn.GroupNorm, nn.LayerNorm)
    for path, mod in model.named_modules():
        if not isinstance(mod, folded_types):
            continue
        for key, t in list(mod.named_parameters(recurse=False)) + \
                list(mod.named_buffers(recurse=False)):
            if key != "num_batches_tracked" and not t.is_floating_point():
                raise InputError(f"asrfx.{entry}: {name}.{path}.{key} ({type(mod).__name__}) is "
                                 f"{str(t.dtype).replace('torch.', '')}: asrfx folds "
                                 f"floating-point layers; dequantize the model (float weights) "
                                 f"first")


def _inputs_for(model: nn.Module, example_inputs: Any) -> tuple:
    inputs = normalize_inputs(example_inputs, model)
    if inputs is not None:
        check_example_inputs(inputs, model)
        return inputs
    specs = _meta(model).get("input_specs")
    if specs:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
        gen = torch.Generator().manual_seed(0)

        def make(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
            if dtype.is_floating_point and first is not None and first.dtype.is_floating_point:
                dtype = first.dtype  # the model was cast (e.g. .half()) after prepare
            return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)

        return tuple(make(shape, dtype) for shape, dtype in specs)
    return infer_example_inputs(model)


def _input_specs(inputs: tuple) -> list:
    return [(tuple(t.shape), t.dtype) for t in inputs if isinstance(t, torch.Tensor)]


def _check_init(init: Any, calibration_data: Any) -> None:
    if init == "calibrate":
        if calibration_data is None:
            raise InputError("init='calibrate' needs calibration_data=: an iterable of input "
                             "batches (tensors, or tuples whose first element is the input)")
        return
    if isinstance(init, (int, float, torch.Tensor, dict)) and not isinstance(init, bool):
        return
    if init == "normal":
        return
    raise InputError(f"init must be a float, a tensor, 'normal', 'calibrate' or a dict of those, "
                     f"got {init!r}")


def _calibrated_init(gm: fx.GraphModule, calibration_data: Any, inputs: tuple
                     ) -> dict[str, torch.Tensor]:
    """psi name -> the mean, over every calibration input, of the statistic psi replaces.

    The original (input-dependent) graph runs in eval mode on each batch; each pooled statistic's
    per-sample values are summed and averaged, so the converted attention starts at the average
    output its branch saw (the Stripe Observation says that is nearly every output).
    """
    from asrfx.passes.asr_rewrite import psi_names
    from .tracing import ShapeRecorder

    sites, _ = find_attention_sites(gm)
    names = psi_names(sites)
    keep = {stat: name for site, ns in zip(sites, names) for stat, name in zip(site.stats, ns)}
    sums: dict[str, torch.Tensor] = {}
    count = 0
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
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
    propagate_shapes(gm, inputs)  # calibration batches overwrote the recorded shapes
    return {name: (total / count).float() for name, total in sums.items()}


def _attention_factory(insert: Any) -> Callable[[int, int, bool], nn.Module]:
    if isinstance(insert, str):
        from .attention import ATTENTIONS, make_attention

        if insert not in ATTENTIONS:
            raise InputError(f"insert={insert!r} is not a known attention; choose one of "
                             f"{sorted(ATTENTIONS)} or pass a callable channels -> nn.Module")
        def named(c: int, dims: int, tokens: bool) -> nn.Module:
            if tokens:
                if insert != "se":
                    raise InputError(f"insert={insert!r} is written for (N, C, *spatial) maps; "
                                     f"after a token LayerNorm use insert='se' (TokenSE) or a "
                                     f"callable channels -> nn.Module")
                from .attention import TokenSE
                return TokenSE(c, dims=dims)
            return make_attention(insert, c, dims=dims)
        return named
    if callable(insert):
        def build(c: int, dims: int, tokens: bool = False) -> nn.Module:
            mod = insert(c)
            if not isinstance(mod, nn.Module):
                raise InputError(f"insert callable returned {type(mod).__name__} for {c} "
                                 f"channels, expected an nn.Module")
            return mod
        return build
    raise InputError(f"insert must be an attention name or a callable channels -> nn.Module, "
                     f"got {insert!r}")


def prepare(model: nn.Module, *, example_inputs: Any = None, mode: str | None = None,
            init: Any = 0.1, calibration_data: Any = None, insert: Any = None,
            where: Any = "block_output", every: int = 1,
            leaf_modules: Sequence[str | type] = ()) -> fx.GraphModule:
    """Turn every channel attention of ``model`` into its ASR training form.

    Args:
        model: any ``nn.Module``; it is not modified.
        example_inputs: a tensor or tuple of tensors the model accepts (shapes are read from
            them). When omitted, a batch is guessed from the first conv/linear layer.
        mode: what happens to the attention already in the model. ``"replace"`` (the default
            without ``insert``) — each pooled statistic an attention branch reads becomes a
            learnable psi (ASR(SE)); ``"both"`` — the original attention stays and an ASR copy
            with fresh weights is added in front of it (ASR(SE)+SE); ``"keep"`` (the default
            with ``insert``) — left as it is.
        insert: add new ASR attention to the model: a library name (``"se"``, ``"eca"``, ...,
            see :mod:`asrfx.attention`) or a callable ``channels -> nn.Module``. Inserted
            attention is always converted to its ASR form.
        where: insertion points: ``"block_output"`` (after the last norm of each residual
            block, before the add: the paper's placement), ``"every_bn"``, or a predicate
            ``(module path, node) -> bool``.
        every: keep every k-th insertion point (the paper's insertion-frequency ablation).
        init: psi's initial value: a float (0.1, as in the reference), a tensor broadcastable to
            the statistic's shape, ``"normal"``, ``"calibrate"``, or a dict psi name -> one of
            those. ``"calibrate"`` starts each psi at the mean of the statistic it replaces over
            ``calibration_data`` — training-free conversion of a trained attention model.
        calibration_data: for ``init="calibrate"``: an iterable of input batches (tensors, or
            tuples whose first element is the input, e.g. a DataLoader).
        leaf_modules: module names or types to keep opaque while tracing.

    Returns:
        A GraphModule in the training form (same mode as ``model``), with original parameter
        names, new ``...psi`` parameters and a report in ``.asrfx_report``.

    Example:
        >>> train_model = asrfx.prepare(model, example_inputs=(torch.randn(2, 3, 32, 32),))
        >>> print(train_model.asrfx_report)
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"asrfx.prepare expects an nn.Module, got {type(model).__name__}")
    if mode is None:
        mode = "replace" if insert is None else "keep"
    if mode not in _MODES:
        raise InputError(f"mode must be one of {_MODES}, got {mode!r}")
    factory = _attention_factory(insert) if insert is not None else None
    if not (isinstance(every, int) and every >= 1):
        raise InputError(f"every must be a positive integer, got {every!r}")
    if not (callable(where) or where in ("block_output", "every_bn", "after_norm")):
        raise InputError(f"where must be 'block_output', 'every_bn', 'after_norm' or a predicate "
                         f"(module path, node) -> bool, got {where!r}")
    _check_init(init, calibration_data)
    _check_model(model, "prepare")
    stage = _meta(model).get("stage")
    if stage in ("prepare", "fold"):
        out = deepcopy_module(model)
        done = {"prepare": "prepared", "fold": "folded"}[stage]
        report = Report("prepare", params_before=_count_params(model),
                        params_after=_count_params(out),
                        notes=[f"model is already {done} (asrfx.{stage}); returned unchanged "
                               f"(a copy)"])
        _attach(out, report, **{k: v for k, v in _meta(model).items() if k != "stage"})
        out.meta["asrfx"]["stage"] = stage
        return out
    work = clone_module(model)
    inputs = _inputs_for(work, example_inputs)
    tr = trace_modes(work, leaf_modules, inputs)
    report = Report("prepare", params_before=_count_params(model))
    for path, kinds in tr.hooked.items():  # leaves so that their hooks run
        report.add(path, "hooked module", 0, "kept", "", f"has {describe_hooks(kinds)}: kept "
                   f"as an opaque call so that it runs; nothing inside it is converted (to "
                   f"convert it, {hook_fix(kinds)})", code="hooked-module")
    created: dict[str, Any] = {}
    inserted: dict[int, set] = {}
    inserted_paths: list[str] = []
    if factory is not None:
        for i, gm in enumerate(tr.modules()):
            if gm.meta.get("asrfx_shapes_from") != id(inputs):
                propagate_shapes(gm, inputs)
            points = insertion_points(gm, where, every)
            done = insert_modules(gm, points, factory, created, AsrTracer)
            inserted[i] = set().union(*(nodes for _, nodes in done)) if done else set()
            if i == 0:
                inserted_paths = [p for p, _ in done]
            stable_toposort(gm.graph)
            propagate_shapes(gm, inputs)
            gm.meta["asrfx_shapes_from"] = id(inputs)
        if not inserted_paths:
            report.notes.append(f"no insertion point found for where={where!r}")
    if init == "calibrate":
        if tr.eval.meta.get("asrfx_shapes_from") != id(inputs):
            propagate_shapes(tr.eval, inputs)
        init = _calibrated_init(tr.eval, calibration_data, inputs)
        tr.eval.meta["asrfx_shapes_from"] = id(inputs)
    per_mode_counts = []
    for i, gm in enumerate(tr.modules()):
        if gm.meta.get("asrfx_shapes_from") != id(inputs):
            propagate_shapes(gm, inputs)
        gm.meta.pop("asrfx_shapes_from", None)
        sites, refusals = find_attention_sites(gm)
        new_nodes = inserted.get(i, set())
        sites, hooked = refuse_hooked_sites(gm, sites, new_nodes) if mode != "keep" else \
            (sites, [])
        _, batch_stats = refuse_batch_statistic_sites(
            gm, [s for s in sites if mode != "keep" or s.mul in new_nodes])
        _, before_bn = refuse_gates_before_batch_norm(
            gm, [s for s in sites if mode == "replace" and s.mul not in new_nodes and
                 all(s is not r for r, _ in batch_stats)])
        sites = [s for s in sites if all(s is not r for r, _ in batch_stats + before_bn)]
        site_modes = ["replace" if s.mul in new_nodes else mode for s in sites]
        try:
            names = apply_asr(gm, sites, init=init, created=created, root=work,
                              site_modes=site_modes)
        except (ValueError, KeyError) as e:
            raise InputError(f"bad psi init for {type(model).__name__}: "
                             f"{e.args[0] if e.args else e}") from None
        safe_dce(gm)
        per_mode_counts.append(len(sites))
        if i == 0:
            actions = {"replace": "converted", "both": "added", "keep": "kept"}
            for site, psis, m in zip(sites, names, site_modes):
                new = site.mul in new_nodes
                report.add(site.path, "channel-attention (inserted)" if new else
                           "channel-attention", site.channels,
                           "inserted" if new else actions[m], "" if m == "keep" else
                           ", ".join(psis), "existing attention kept (mode='keep')"
                           if m == "keep" else "")
            for path, reason in refusals:
                kind = "spatial attention" if reason.startswith("spatial") else \
                    "channel-attention?"
                report.add(path, kind, 0, "refused", "", reason)
            for site, reason in hooked:
                report.add(site.path, "channel-attention", site.channels, "refused", "", reason,
                           code="hooked-module-in-branch")
            for site, reason in batch_stats:
                report.add(site.path, "channel-attention", site.channels, "refused", "", reason,
                           code="batch-stats-norm-in-branch")
            for site, reason in before_bn:
                report.add(site.path, "channel-attention", site.channels, "refused", "", reason,
                           code="gate-before-batch-norm")
            for site in sites:
                if site.extra.get("rows"):
                    report.notes.append(f"{site.path}: the ASR branch runs on psi expanded to "
                                        f"the batch ({site.extra['rows']}); it folds the same")
                for norm in site.extra.get("frozen_norms", []):
                    report.notes.append(f"{norm}: a norm inside the ASR branch of {site.path} "
                                        f"now always normalises with its running statistics "
                                        f"(psi is one value for the whole batch)")
    if tr.dual:
        report.notes.append("forward differs between train and eval mode (e.g. drop-path); "
                            "both graphs were converted")
        if per_mode_counts[0] != per_mode_counts[1]:
            report.notes.append(f"train graph has {per_mode_counts[0]} sites, eval graph "
                                f"{per_mode_counts[1]}")
    out = tr.build()
    # the caller's per-module train/eval flags carry over (the layers are copies of theirs);
    # only the containers the GraphModule made for itself take the top-level flag
    out.training = model.training
    for m in out.modules():
        if type(m) is nn.Module:
            m.training = model.training
    report.params_after = _count_params(out)
    if not report.sites:
        report.notes.append("no channel attention found; the model is returned unchanged "
                            "(use fold() for BN fusion)")
    _attach(out, report, mode=mode, input_specs=_input_specs(inputs),
            psi=[n for n in created if n.endswith("psi")])
    return out


def relative_error(ref: Any, out: Any) -> float:
    """max |ref - out| / max |ref| over all tensors of two (nested) outputs, in float64.

    NaN when either side holds a NaN (or infinities that do not cancel), inf when ``ref`` is
    finite and ``out`` is not: a non-finite output never reads as a small error.
    """
    a, _ = tree_flatten(ref)
    b, _ = tree_flatten(out)
    num, den = 0.0, 0.0
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.numel():
            x64, y64 = x.detach().double(), y.detach().double()
            diff = torch.where(x64 == y64, 0.0, (x64 - y64).abs())  # inf == inf: no error
            d, r = diff.max().item(), x64.abs().max().item()
            if math.isnan(d) or math.isnan(r) or bool(diff.isnan().any()):
                return math.nan
            num, den = max(num, d), max(den, r)
    if math.isinf(den):
        return math.nan if num else 0.0
    return num / max(den, 1e-12)


def _nonfinite(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and \
        not bool(torch.isfinite(t).all())


def _count_nonfinite(t: torch.Tensor) -> str:
    nan, inf = int(t.isnan().sum()), int(t.isinf().sum())
    return ", ".join(p for p in (f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else "") if p)


def _where_nonfinite(model: nn.Module, leaf_modules: Sequence[str | type], inputs: tuple) -> str:
    """Where the model's eval-mode output first becomes NaN/Inf: the input, a parameter or
    buffer (e.g. a BatchNorm's running variance), or the first layer computing one."""
    for i, t in enumerate(inputs):
        if _nonfinite(t):
            return f"example input {i} holds {_count_nonfinite(t)} values"
    gm = _eval_graph_module(model, leaf_modules, inputs)
    found: list[str] = []

    class Finder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if not found and n.op != "get_attr" and \
                    any(_nonfinite(t) for t in tree_flatten(out)[0]):
                found.append(_describe_nonfinite(gm, n))
            return out

    with torch.no_grad():
        Finder(gm).run(*inputs)
    return found[0] if found else "an unknown place"


def _describe_nonfinite(gm: fx.GraphModule, n: fx.Node) -> str:
    path = module_path(n) or "(top)"
    if n.op == "call_module":
        mod = gm.get_submodule(str(n.target))
        what = f"{n.target} ({type(mod).__name__})"
        tensors = list(mod.named_parameters()) + list(mod.named_buffers())
    else:
        what = f"{getattr(n.target, '__name__', n.target)} in {path}"
        tensors = [(str(a.target), get_attr_path(gm, str(a.target)))
                   for a in n.all_input_nodes if a.op == "get_attr"]
    bad = [f"{k} holds {_count_nonfinite(t)} values" for k, t in tensors if _nonfinite(t)]
    if bad:
        return f"{what}: {'; '.join(bad)}"
    return f"{what}: its output is the first non-finite value (its inputs are finite)"


def _eval_graph_module(model: nn.Module, leaf_modules: Sequence[str | type],
                       inputs: tuple | None = None) -> fx.GraphModule:
    """An eval-mode GraphModule over a copy of ``model`` (the eval graph of a dual-mode one)."""
    if isinstance(model, fx.GraphModule):
        graph = model.eval_graph if isinstance(model, DualModeGraphModule) else model.graph
        gm = _clone_graph_module(model, graph)
        warn_own_hooks(model)
    else:
        gm = trace_modes(clone_module(model), leaf_modules, inputs).eval
    gm.eval()
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
    new = fx.GraphModule(root, g, type(gm).__name__)  # errors name the caller's model
    new.meta = {k: v for k, v in getattr(gm, "meta", {}).items()
                if k != _USER_PRESERVED_ATTRIBUTES_KEY}
    return new


def _run_passes(gm: fx.GraphModule, inputs: tuple, fuse_bn: bool,
                select: Callable[[str], bool] = lambda k: True,
                outputs: list | None = None) -> dict[str, list]:
    hooked = protect_hooked_calls(gm)  # no pass folds into, through or away a hooked module
    try:
        consts = evaluate_constants(gm, inputs, outputs)
    except Exception as e:  # noqa: BLE001 - a bad input must name itself, not fail deep in fx
        raise InputError(_inputs_failure(gm, inputs, e)) from None
    syncbn = revert_sync_batchnorm(gm)  # trained with SyncBatchNorm: the same map in eval mode
    drop_identities(gm)
    scales = fold_scales(gm, select)
    bns = fuse_batchnorm(gm, select) if fuse_bn else []
    merges = merge_sequential(gm, select) + merge_branches(gm, select) if fuse_bn else []
    restore_hooked_calls(gm, hooked)
    cleanup(gm)
    return {"consts": consts, "syncbn": syncbn, "scales": scales, "bns": bns, "merges": merges,
            "hooks": hooked}


def fold(model: nn.Module, *, example_inputs: Any = None, check: bool = True,
         fuse_bn: bool = True, tol: float = 1e-4,
         leaf_modules: Sequence[str | type] = ()) -> fx.GraphModule:
    """Fold a model's ASR branches (and BatchNorms) away: the deploy form.

    Every input-independent branch is evaluated to its constant (eval mode); per-channel
    constants fold into the producing BatchNorm / Conv / Linear, or into the consuming Conv /
    Linear; each Conv -> BatchNorm pair becomes one Conv.

    Args:
        model: a model from :func:`prepare`, or any ``nn.Module`` (then only BN fusion and any
            constant scales apply). It is not modified and keeps its mode.
        example_inputs: inputs for evaluating constants and checking the result. Defaults to the
            shapes recorded by ``prepare``, else a batch guessed from the first layer.
        check: compare outputs with the unfolded model in eval mode.
        fuse_bn: fuse Conv -> BatchNorm pairs.
        tol: the largest relative error (max |a-b| / max |a|) the check accepts.

    Returns:
        A GraphModule in eval mode with ``.asrfx_report``.

    Raises:
        FoldMismatch: the check failed; names the site whose fold alone errs most.

    Example:
        >>> deploy = asrfx.fold(train_model, example_inputs=(x,))
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"asrfx.fold expects an nn.Module, got {type(model).__name__}")
    _check_model(model, "fold")
    if _meta(model).get("stage") == "fold":
        out = deepcopy_module(model).eval()
        report = Report("fold", params_before=_count_params(model),
                        params_after=_count_params(out), notes=["model is already folded "
                                                                "(asrfx.fold); returned "
                                                                "unchanged (a copy)"])
        _attach(out, report, **{k: v for k, v in _meta(model).items() if k != "stage"})
        return out
    inputs = _inputs_for(model, example_inputs)
    with _full_fp32_precision():
        return _fold(model, inputs, check, fuse_bn, tol, leaf_modules)


@contextlib.contextmanager
def _full_fp32_precision():
    """No TF32 while folding: on Ampere and later GPUs cuDNN convolutions default to TF32
    (10-bit mantissa), whose rounding differs between the original and the folded weights by
    ~1e-3 -- the check would compare rounding noise, not the fold."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


def _fold(model: nn.Module, inputs: tuple, check: bool, fuse_bn: bool, tol: float,
          leaf_modules: Sequence[str | type]) -> fx.GraphModule:
    gm = _eval_graph_module(model, leaf_modules, inputs)
    _check_arity(gm, inputs)
    outputs: list = []
    recs = _run_passes(gm, inputs, fuse_bn, outputs=outputs)
    ref = outputs[0]
    report = _fold_report(model, gm, recs)
    _audit_constants(gm, report)
    if check:
        if any(_nonfinite(t) for t in tree_flatten(ref)[0]):
            raise NonFiniteError(
                f"asrfx.fold: {type(model).__name__} itself outputs NaN/Inf in eval mode on the "
                f"example inputs, so no fold can be checked; the first non-finite value: "
                f"{_where_nonfinite(model, leaf_modules, inputs)}. Fix the model (e.g. "
                f"re-estimate BatchNorm statistics, or lower the learning rate that diverged) "
                f"and fold again")
        with torch.no_grad():
            try:
                out = gm(*inputs)
            except Exception as e:  # noqa: BLE001 - the unfolded graph ran on these inputs
                raise FoldMismatch(float("nan"), tol, None,
                                   f"The folded graph fails to run ({type(e).__name__}: "
                                   f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})"
                                   f". ") from None
            err = relative_error(ref, out)
        tol = _tolerance(tol, out)
        report.notes.append(f"checked against the unfolded model in eval mode: relative error "
                            f"{err:.2e} (tolerance {tol:.0e})")
        half = _half_precision(out)
        if not err <= tol and half is not None and not math.isnan(err):
            # rounding of a half-precision eager run can exceed tol on its own: judge both
            # against the truth (the unfolded model in float64)
            eager64, fold64 = _against_float64(model, leaf_modules, inputs, ref, out)
            detail = (f"against the unfolded model run in float64 the fold errs {fold64:.2e} and "
                      f"the {half} eager model {eager64:.2e}")
            if fold64 <= eager64:
                report.notes.append(f"{half}: the fold differs from the eager model by more than "
                                    f"the tolerance, but {detail}: the fold is no worse")
                err = tol  # accepted
            else:
                raise FoldMismatch(err, tol, None, f"({detail}.) ")
        if not err <= tol:
            worst, worst_err = _isolate(model, leaf_modules, inputs, fuse_bn, ref, recs)
            raise FoldMismatch(err, tol, worst,
                               f"(that site alone gives {worst_err:.2e}) " if worst else "")
    if not any(s.action in ("folded", "fused", "merged") for s in report.sites):
        report.notes.append("nothing was folded, fused or merged: the result computes what the "
                            "model computes in eval mode")
    info = {k: v for k, v in _meta(model).items() if k != "stage"}
    info["input_specs"] = _input_specs(inputs)
    _attach(gm, report, **info)
    return gm


def _audit_constants(gm: fx.GraphModule, report: Report) -> None:
    """Part of fold's check: the deploy graph holds no psi and no computation from parameters
    and buffers alone, unless the report already says why (a constant branch kept). Anything
    else left (an in-place update of a buffer, an opaque call on constants) is reported here,
    never left unmentioned."""
    from asrfx.passes.graph_utils import reads_shape_only, value_dependent

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
        path, _, field = name.rpartition(".")
        if field.endswith("psi") and path not in kept:
            report.add(path, "constant branch", 0, "kept", "",
                       f"{name} is still read by the deploy graph", code="psi-left")


def _check_arity(gm: fx.GraphModule, inputs: tuple) -> None:
    """As many inputs as the graph takes: fx's Interpreter would silently drop extra ones."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if any(str(n.target).startswith("*") for n in placeholders):
        return
    required = [n for n in placeholders if not n.args]  # a default is the placeholder's arg
    if not len(required) <= len(inputs) <= len(placeholders):
        from .tracing import _signature, describe_inputs

        takes = f"{len(required)}" if len(required) == len(placeholders) else \
            f"{len(required)} to {len(placeholders)}"
        raise InputError(f"{type(gm).__name__} takes {takes} input(s), got {len(inputs)}; pass "
                         f"example_inputs=(x,) with tensors {_signature(gm)} accepts (given: "
                         f"{describe_inputs(inputs)})")


def _half_precision(out: Any) -> str | None:
    """"float16" / "bfloat16" when an output tensor is of that dtype."""
    for t in tree_flatten(out)[0]:
        if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16):
            return str(t.dtype).replace("torch.", "")
    return None


def _against_float64(model: nn.Module, leaf_modules: Sequence[str | type], inputs: tuple,
                     eager: Any, folded: Any) -> tuple[float, float]:
    """(relative error of the eager output, of the folded output) against the unfolded model
    run in float64 on the same inputs (converted exactly: float16/bfloat16 values are float64
    values)."""
    gm = _eval_graph_module(model, leaf_modules, inputs).double()
    inputs64 = tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                     for t in inputs)
    with torch.no_grad():
        truth = gm(*inputs64)
    return relative_error(truth, eager), relative_error(truth, folded)


def _tolerance(tol: float, out: Any) -> float:
    """The check's tolerance: ``tol``, widened for half-precision outputs (whose rounding alone
    exceeds 1e-4); the fold itself is computed in float64 either way."""
    leaves, _ = tree_flatten(out)
    for t in leaves:
        if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16):
            tol = max(tol, 8 * torch.finfo(t.dtype).eps)
    return tol


def _isolate(model: nn.Module, leaf_modules: Sequence[str | type], inputs: tuple,
             fuse_bn: bool, ref: Any, recs: dict[str, list]) -> tuple[str | None, float]:
    """Fold one site at a time to find the one that breaks equivalence."""
    worst, worst_err = None, -1.0
    for rec in recs["scales"] + recs["bns"] + recs["merges"]:
        if rec.get("action") not in ("folded", "fused", "merged"):
            continue
        gm = _eval_graph_module(model, leaf_modules, inputs)
        _run_passes(gm, inputs, fuse_bn, select=lambda k, key=rec["key"]: k == key)
        with torch.no_grad():
            e = relative_error(ref, gm(*inputs))
        if e > worst_err:
            worst, worst_err = f"{rec['path'] or '(top)'} -> {rec.get('target')}", e
    return worst, worst_err


def _fold_report(model: nn.Module, gm: fx.GraphModule, recs: dict[str, list]) -> Report:
    report = Report("fold", params_before=_count_params(model), params_after=_count_params(gm))
    for h in recs.get("hooks", []):
        report.add(h["path"], "hooked module", 0, "kept", "", h["reason"], code="hooked-module")
    for c in recs["consts"]:
        if "refused" in c:
            report.add(c["path"], "constant branch", 0, "kept", "", c["refused"],
                       code=c.get("code", ""))
    for r in recs.get("syncbn", []):
        report.add(r["path"], "SyncBatchNorm", r["channels"], r["action"], r["target"],
                   r.get("reason", ""))
    for r in recs["scales"]:
        report.add(r["path"], "channel scale", r["channels"], r["action"], r["target"],
                   r.get("reason", ""))
    absorbed = {bn: m["target"] for m in recs["merges"] for bn in m.get("absorbed", [])}
    for r in recs["bns"]:
        if r["action"] == "kept" and r["path"] in absorbed:  # an identity-BN branch
            r.update(action="merged", target=absorbed[r["path"]], reason="")
        report.add(r["path"], "conv+bn", r["channels"], r["action"], r["target"], r["reason"])
    for r in recs["merges"]:
        report.add(r["path"], "sequential merge" if r["key"].startswith("seq:") else
                   "branch merge", r["channels"], r["action"], r["target"],
                   r["reason"])
    try:  # nodes kept from the unfolded graph still carry their shape metadata
        left, refused = find_attention_sites(gm)
    except Exception:  # noqa: BLE001 - the report must not fail the fold
        left, refused = [], []
    for site in left:
        report.add(site.path, "channel-attention", site.channels, "kept", "",
                   "input-dependent attention (prepare() converts it)")
    for path, reason in refused:
        if reason.startswith("spatial attention"):
            report.add(path, "spatial attention", 0, "kept", "", reason)
    return report
