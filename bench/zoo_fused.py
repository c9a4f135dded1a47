"""Zoo sweep of the fused training form (``make zoo-fused``): ``prepare(..., fused=True)``
against the multiply form on every model of the zoo sweep that has BatchNorm layers.

Run in the zoo environment (as ``bench/zoo_sweep.py``, whose model selection, cached model list,
builders and randomisers it reuses)::

    ../.zoo-venv/bin/python bench/zoo_fused.py --out bench/results
    ../.zoo-venv/bin/python bench/zoo_fused.py --families 5               # a quick check
    ../.zoo-venv/bin/python bench/zoo_fused.py --only seresnet18 --merge   # replace a row
    ../.zoo-venv/bin/python bench/zoo_fused.py --report-only   # rewrite .md from .json

Each model runs in its own process (a fork of the driver, which imports torch, timm and asrfx
once; one torch thread; a timeout: a crash or a hang is a row, not the end of the sweep), with
fixed seeds:

1. build with random weights and 10 classes; norms and all-zero weights randomised; the sweep's
   example input (2 images at :data:`zoo_sweep.EXAMPLE_SIZE`, or the pretrained size where that
   fails). A model without BatchNorm is skipped (its gates could still go into convolution
   kernels; not swept here).
2. ``plain = asrfx.prepare(model, example_inputs=(x,))`` and ``fused = asrfx.prepare(model,
   example_inputs=(x,), fused=True)``; norms and psi of ``plain`` randomised;
   ``fused.load_state_dict(plain.state_dict())`` (strict).
3. one training-mode forward and backward of both on one batch of 8 (cross-entropy on the first
   10 logits; the same torch seed before each): relative output error; per-parameter gradient
   error ``max |g_plain - g_fused|`` over the largest gradient of the model (as
   ``tests/test_fused_training.py`` measures it); the state after the step (running statistics,
   counters) compared key by key.
4. eval-mode outputs of both compared (on the example and on the sweep's second input, another
   batch and size); ``asrfx.fold`` of each; their deploy outputs compared.

A row *fails* when the fused form raises where the multiply form does not, or when an error is
above :data:`TOL`. A training-step error above TOL is judged again in float64 (both forms
converted with ``.double()``, from the same starting state; deep models at 64x64 with batch 8
amplify float32 rounding through their training-mode norms): it is float32 rounding, not a
failure, when the fused form agrees with the multiply form in float64 (within :data:`TOL64`)
and its float32 error against the float64 reference is within twice the multiply form's own (or
TOL). Eval and deploy errors are judged in float32 only.

Writes ``zoo-fused.md`` (a row per model and a summary) and ``zoo-fused.json`` (everything
measured; rewritten after every model).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import zoo_sweep as zs  # noqa: E402  (the bench folder, also when run as a script)
from zoo_sweep import (EXAMPLE_SIZE, _build, _error_text, _first_tensor, _load_json,  # noqa: E402
                       _write_json, enumerate_models, pick_inputs, randomize_norms,
                       randomize_psi, randomize_zero_weights, rel_err, select_models)

TOL = 1e-4
TOL64 = 1e-9
DEFAULT_TIMEOUT = 180.0
TRAIN_BATCH = 8
RESULTS_MD = "zoo-fused.md"
RESULTS_JSON = "zoo-fused.json"

_GATES_NOTE = re.compile(r"fused training form: (\d+) gate\(s\)[^,]*"
                         r"(?:, (\d+) through the input columns)?")
_BATCHED_NOTE = re.compile(r"the excitations of (\d+) site\(s\) run as (\d+) batched call\(s\)")
_STAYS_NOTE = re.compile(r"stays a multiply in the training form \((.*)\)$")


# ---------------------------------------------------------------------------------------------
# one model (runs in a forked process)


def has_batch_norm(model) -> bool:
    from torch import nn

    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_step(model, xb, yb) -> tuple[Any, dict, Any]:
    """One training-mode forward and backward (the same torch seed every time: dropout and
    drop-path draw alike in both forms).

    Returns:
        (the output, ``{name: gradient}`` of the parameters that got one, the loss)."""
    import torch
    from torch import nn

    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    out = _first_tensor(model(xb))
    loss = nn.functional.cross_entropy(out.reshape(len(xb), -1)[:, :10].float(), yb)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return out.detach(), grads, loss.detach()


def grad_error(ga: dict, gb: dict) -> tuple[float, str, float]:
    """The largest per-parameter gradient difference over the largest gradient of the model.

    Returns:
        (that error, the parameter where it is largest, the largest relative error of a
        parameter against its own largest gradient -- noisy where a gradient is rounding only).
        inf when the two forms give gradients to different parameters."""
    if ga.keys() != gb.keys():
        return math.inf, f"gradients of different parameters: {sorted(ga.keys() ^ gb.keys())[:3]}", \
            math.inf
    if not ga:
        return 0.0, "", 0.0
    scale = max(float(g.double().abs().max()) for g in ga.values()) or 1e-30
    worst, where, own = 0.0, "", 0.0
    for name in ga:
        a, b = ga[name].double(), gb[name].double()
        if a.shape != b.shape:
            return math.inf, f"{name}: shapes {tuple(a.shape)} / {tuple(b.shape)}", math.inf
        err = float((a - b).abs().max())
        if not math.isfinite(err):
            return math.nan, name, math.nan
        if err / scale > worst:
            worst, where = err / scale, name
        own = max(own, err / max(float(a.abs().max()), 1e-30))
    return worst, where, own


def state_error(sa: dict, sb: dict) -> tuple[float, str]:
    """The largest relative error between two state_dicts, key by key (inf for other keys)."""
    if sa.keys() != sb.keys():
        return math.inf, "other keys"
    worst, where = 0.0, ""
    for k in sa:
        e = rel_err(sa[k].double(), sb[k].double()) if sa[k].numel() else 0.0
        if not e <= worst:  # NaN too
            worst, where = e, k
    return worst, where


def judge_training_float64(plain, fused, state0: dict, xb, yb, out32: tuple, grads32: tuple
                           ) -> dict[str, Any]:
    """The training step again in float64, both forms from ``state0``: is the float32 miss
    rounding? ``out32`` / ``grads32``: the float32 step's (plain, fused) outputs / gradients.

    Returns:
        ``{"out64", "grad64"}`` (fused vs plain, both float64: the mechanism's own error),
        ``{"out_fused_vs64", "out_plain_vs64", "grad_fused_vs64", "grad_plain_vs64"}`` (each
        float32 form against the float64 multiply form) and ``"rounding"`` (the verdict)."""
    p64, f64 = copy.deepcopy(plain), copy.deepcopy(fused)
    for m in (p64, f64):
        m.load_state_dict(state0)
        m.double()
    pa, pg, _ = train_step(p64, xb.double(), yb)
    fa, fg, _ = train_step(f64, xb.double(), yb)
    out64 = rel_err(pa, fa)
    grad64 = grad_error(pg, fg)[0]
    out_f, out_p = rel_err(pa, out32[1]), rel_err(pa, out32[0])
    grad_f, grad_p = grad_error(pg, grads32[1])[0], grad_error(pg, grads32[0])[0]
    rounding = out64 <= TOL64 and grad64 <= TOL64 and out_f <= max(2 * out_p, TOL) and \
        grad_f <= max(2 * grad_p, TOL)
    return {"out64": out64, "grad64": grad64, "out_fused_vs64": out_f, "out_plain_vs64": out_p,
            "grad_fused_vs64": grad_f, "grad_plain_vs64": grad_p, "rounding": rounding}


def fused_counts(report) -> dict[str, Any]:
    """What the fused prepare's report says: gates fused, sites batched, groups, and why the
    other gates stay multiplies (``{reason: count}``)."""
    gates = batched = groups = into_convs = 0
    stays: collections.Counter = collections.Counter()
    for note in report.notes:
        if m := _GATES_NOTE.search(note):
            into_convs = int(m.group(2) or 0)
            gates = int(m.group(1)) + into_convs
        if m := _BATCHED_NOTE.search(note):
            batched, groups = int(m.group(1)), int(m.group(2))
        if m := _STAYS_NOTE.search(note.strip()):
            stays[m.group(1)] += 1
    return {"gates_fused": gates, "gates_into_convs": into_convs, "sites_batched": batched,
            "batched_groups": groups, "stays_multiply": dict(stays.most_common())}


class _Failed(Exception):
    """Raised in the worker to end a row: ``side`` is ``plain`` or ``fused``."""

    def __init__(self, side: str, exc: BaseException):
        super().__init__(side)
        self.side, self.exc = side, exc


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """The fused training form against the multiply form on one model (see the module
    docstring).

    Returns:
        the result row: the entry's fields plus what was measured; ``stage`` says how far it
        got, ``plain_error`` / ``fused_error`` what raised in which form (type and first line)."""
    import torch
    from torch import nn

    import asrfx

    torch.set_num_threads(1)
    torch.manual_seed(0)
    res: dict[str, Any] = dict(spec)
    res.update(stage="build", plain_error="", fused_error="", setup_error="")

    def side(which: str, key: str | None, fn):
        """``fn()`` for one form; its wall time in ``res[key]``; raises :class:`_Failed`."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                out = fn()
                if key:
                    res[key] = round(time.perf_counter() - t0, 3)
            return out
        except Exception as e:  # noqa: BLE001
            raise _Failed(which, e) from e

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _build(spec["source"], spec["model"])
            res["params"] = int(sum(p.numel() for p in model.parameters()))
            res["batch_norms"] = sum(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                     for m in model.modules())
            if not res["batch_norms"]:
                res["stage"] = "skipped"
                return res
            res["stage"] = "input"
            randomize_norms(model, 0)
            randomize_zero_weights(model, 0)
            x, other, note = pick_inputs(model, spec.get("input_size"))
        res["input"], res["other_input"], res["input_note"] = list(x.shape), \
            list(other.shape), note
    except Exception as e:  # noqa: BLE001
        res["setup_error"] = _error_text(e)
        res["traceback"] = traceback.format_exc().strip().splitlines()[-6:]
        return res

    try:
        res["stage"] = "prepare"
        plain = side("plain", "prepare_plain_s",
                     lambda: asrfx.prepare(model, example_inputs=(x,)))
        fused = side("fused", "prepare_fused_s",
                     lambda: asrfx.prepare(model, example_inputs=(x,), fused=True))
        res["converted"] = plain.asrfx_report.count(action="converted")
        res.update(fused_counts(fused.asrfx_report))

        res["stage"] = "load"
        randomize_norms(plain, 1)
        randomize_psi(plain, 2)
        side("fused", None, lambda: fused.load_state_dict(plain.state_dict()))
        state0 = _snapshot(plain)

        res["stage"] = "train"
        gen = torch.Generator().manual_seed(3)
        xb = torch.randn(TRAIN_BATCH, *x.shape[1:], generator=gen)
        yb = torch.randint(0, 10, (TRAIN_BATCH,), generator=gen)
        pa, pg, ploss = side("plain", "train_plain_s", lambda: train_step(plain, xb, yb))
        fa, fg, _ = side("fused", "train_fused_s", lambda: train_step(fused, xb, yb))
        res["loss"] = float(ploss)
        res["train_out_err"] = rel_err(pa, fa)
        res["grad_err"], res["grad_err_at"], res["grad_err_own"] = grad_error(pg, fg)
        res["grads"] = len(pg)
        res["state_err"], res["state_err_at"] = state_error(plain.state_dict(),
                                                            fused.state_dict())
        res["train_ok"] = res["train_out_err"] <= TOL and res["grad_err"] <= TOL and \
            res["state_err"] <= TOL
        if not res["train_ok"] and all(math.isfinite(res[k]) for k in (
                "train_out_err", "grad_err", "state_err")) and \
                math.isfinite(float(ploss)):
            try:  # a model that does not run in float64 keeps its float32 verdict
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res["float64"] = judge_training_float64(plain, fused, state0, xb, yb,
                                                            (pa, fa), (pg, fg))
                res["train_ok"] = res["float64"]["rounding"] and res["state_err"] <= TOL
            except Exception as e:  # noqa: BLE001
                res["float64_error"] = _error_text(e)
        del pa, pg, fa, fg

        res["stage"] = "eval"
        outs = {}
        for which, m in (("plain", plain), ("fused", fused)):
            m.eval()

            def run(m=m):
                with torch.no_grad():
                    return [_first_tensor(m(xi)) for xi in (x, other)]
            outs[which] = side(which, None, run)
        res["eval_err"] = max(rel_err(a, b) for a, b in zip(outs["plain"], outs["fused"]))

        res["stage"] = "fold"
        deploy_plain = side("plain", "fold_plain_s",
                            lambda: asrfx.fold(plain, example_inputs=(x,)))
        deploy_fused = side("fused", "fold_fused_s",
                            lambda: asrfx.fold(fused, example_inputs=(x,)))
        res["stage"] = "deploy"
        douts = {}
        for which, m in (("plain", deploy_plain), ("fused", deploy_fused)):
            def run(m=m):
                with torch.no_grad():
                    return [_first_tensor(m(xi)) for xi in (x, other)]
            douts[which] = side(which, None, run)
        res["deploy_err"] = max(rel_err(a, b) for a, b in zip(douts["plain"], douts["fused"]))
        res["deploy_nodes"] = [sum(1 for _ in d.graph.nodes) for d in (deploy_plain,
                                                                        deploy_fused)]
        res["stage"] = "done"
    except _Failed as f:
        res[f"{f.side}_error"] = _error_text(f.exc)
        res["traceback"] = traceback.format_exception(f.exc)[-6:]
        res["traceback"] = [line.rstrip() for chunk in res["traceback"]
                            for line in chunk.splitlines()][-8:]
    return res


# ---------------------------------------------------------------------------------------------
# verdicts


def outcome(r: dict) -> str:
    """One word for a row, the first that applies: ``timeout``, ``crash``, ``no-batchnorm``
    (skipped), ``setup-error`` (build or inputs), ``plain-error`` (the multiply form raised:
    not the fused form's failure), ``FAIL:<stage>`` (the fused form raised, or an error above
    TOL: ``FAIL:train``, ``FAIL:eval``, ``FAIL:deploy``), ``ok``."""
    if r.get("timeout"):
        return "timeout"
    if r.get("crash"):
        return "crash"
    if r.get("stage") == "skipped":
        return "no-batchnorm"
    if r.get("setup_error"):
        return "setup-error"
    if r.get("plain_error"):
        return "plain-error"
    if r.get("fused_error"):
        return f"FAIL:{r.get('stage')}"
    if r.get("stage") != "done":
        return f"FAIL:{r.get('stage')}"
    if not r.get("train_ok"):
        return "FAIL:train"
    if not r.get("eval_err", math.inf) <= TOL:
        return "FAIL:eval"
    if not r.get("deploy_err", math.inf) <= TOL:
        return "FAIL:deploy"
    return "ok"


def failed(r: dict) -> bool:
    return outcome(r).startswith(("FAIL", "timeout", "crash"))


def summarise(results: list[dict]) -> dict[str, Any]:
    """The summary numbers: models swept (with BatchNorm), with gates fused, gates fused, sites
    batched and groups, max errors, failures, outcomes."""
    swept = [r for r in results if outcome(r) not in ("no-batchnorm",)]
    done = [r for r in swept if r.get("stage") == "done"]

    def mx(key: str, rows: list[dict] | None = None) -> float:
        vals = [r[key] for r in (swept if rows is None else rows) if key in r]
        return max(vals) if vals else 0.0

    stays: collections.Counter = collections.Counter()
    for r in swept:
        stays.update(r.get("stays_multiply", {}))
    rounding = [r["model"] for r in swept if (r.get("float64") or {}).get("rounding")]
    return {
        "models": len(swept), "skipped_no_batchnorm": len(results) - len(swept),
        "models_done": len(done), "models_ok": sum(outcome(r) == "ok" for r in swept),
        "models_with_gates_fused": sum(1 for r in swept if r.get("gates_fused")),
        "gates_fused": sum(r.get("gates_fused", 0) for r in swept),
        "gates_into_convs": sum(r.get("gates_into_convs", 0) for r in swept),
        "models_with_gates_into_convs": sum(1 for r in swept if r.get("gates_into_convs")),
        "sites_converted": sum(r.get("converted", 0) for r in swept),
        "models_batched": sum(1 for r in swept if r.get("sites_batched")),
        "sites_batched": sum(r.get("sites_batched", 0) for r in swept),
        "batched_groups": sum(r.get("batched_groups", 0) for r in swept),
        "max_train_out_err": mx("train_out_err"), "max_grad_err": mx("grad_err"),
        "max_state_err": mx("state_err"), "max_eval_err": mx("eval_err"),
        "max_deploy_err": mx("deploy_err"),
        # the rows not judged in float64 (within TOL in float32)
        "max_train_out_err_f32": mx("train_out_err", [r for r in swept if not r.get("float64")]),
        "max_grad_err_f32": mx("grad_err", [r for r in swept if not r.get("float64")]),
        "rounding_judged_float64": rounding,
        "failures": [r["model"] for r in swept if failed(r)],
        "outcomes": dict(collections.Counter(outcome(r) for r in results).most_common()),
        "stays_multiply": dict(stays.most_common()),
        "train_s_plain": round(sum(r.get("train_plain_s", 0) for r in done), 1),
        "train_s_fused": round(sum(r.get("train_fused_s", 0) for r in done), 1),
    }


def summary_lines(s: dict) -> list[str]:
    lines = [
        f"models with BatchNorm swept: {s['models']} ({s['models_ok']} ok, "
        f"{len(s['failures'])} failed; {s['skipped_no_batchnorm']} without BatchNorm skipped)",
        f"models with gates fused: {s['models_with_gates_fused']}; gates fused: "
        f"{s['gates_fused']} of {s['sites_converted']} converted sites "
        f"({s.get('gates_into_convs', 0)} of them into the kernels of the convolutions reading "
        f"their map, in {s.get('models_with_gates_into_convs', 0)} models)",
        f"sites batched: {s['sites_batched']} in {s['batched_groups']} batched calls "
        f"({s['models_batched']} models)",
        f"max errors: training output {s['max_train_out_err']:.1e}, gradients (of the largest "
        f"gradient) {s['max_grad_err']:.1e}, state after the step {s['max_state_err']:.1e}, "
        f"eval {s['max_eval_err']:.1e}, deploy {s['max_deploy_err']:.1e}"
        + (f" (without the models judged in float64: training output "
           f"{s['max_train_out_err_f32']:.1e}, gradients {s['max_grad_err_f32']:.1e})"
           if s.get("rounding_judged_float64") and "max_grad_err_f32" in s else ""),
        "failures: " + (", ".join(f"`{m}`" for m in s["failures"]) or "none"),
        "outcomes: " + ", ".join(f"{k} {v}" for k, v in s["outcomes"].items()),
        f"first training step time (with the one-time traces), sum over models: multiply form {s['train_s_plain']:.1f} s, "
        f"fused form {s['train_s_fused']:.1f} s",
    ]
    if s["rounding_judged_float64"]:
        lines.append("over TOL in float32, judged float32 rounding in float64: "
                     + ", ".join(f"`{m}`" for m in s["rounding_judged_float64"]))
    if s["stays_multiply"]:
        lines.append("gates left as multiplies, by reason: " + "; ".join(
            f"{k} x{v}" for k, v in s["stays_multiply"].items()))
    return lines


def _e(r: dict, key: str) -> str:
    if key not in r:
        return "-"
    v = r[key]
    s = f"{v:.1e}"
    return s if v <= TOL else f"**{s}**"


def markdown(results: list[dict], s: dict, meta: dict) -> str:
    out = ["# asrfx zoo sweep: the fused training form against the multiply form", ""]
    out += [f"{meta['when']}; torch {meta['torch']}, timm {meta['timm']}, torchvision "
            f"{meta['torchvision']}; asrfx at {meta.get('commit') or '?'}; CPU, one torch "
            f"thread per model, timeout "
            f"{meta['timeout']:.0f} s; {meta['wall_s'] / 60:.1f} min in all. The models of "
            "`bench/zoo_sweep.py` (one small model per timm family with channel attention, "
            "torchvision's SE models) that have BatchNorm. Each model: random weights, 10 "
            "classes, norms and zero weights randomised, example 2x3x64x64 (the pretrained "
            "size where 64 fails); `prepare` and `prepare(fused=True)`; norms and psi "
            "randomised, the fused form loads the multiply form's state_dict (strict); one "
            f"training step (forward and backward, batch {TRAIN_BATCH}) of each; eval outputs "
            "compared on the example and a batch of 3 at another size; `fold` of each, deploy "
            "outputs compared. Generated by `bench/zoo_fused.py`.", ""]
    for rr in meta.get("reruns", []):
        out += [f"Re-run on {rr['when']} (`--merge`, {rr['wall_s'] / 60:.1f} min), replacing "
                "their rows: " + ", ".join(f"`{m}`" for m in rr["models"]) + ".", ""]
    out += ["## Summary", ""] + [f"- {line}" for line in summary_lines(s)] + [""]
    out += [f"Errors are relative (max |a - b| / max |a|; TOL {TOL:g}): *train out*: the "
            "training-mode outputs; *grad*: the largest per-parameter gradient difference over "
            "the largest gradient of the model; *state*: running statistics and counters after "
            "the step; *eval*, *deploy*: eval outputs of the prepared and of the folded forms. "
            "*fused*: gates applied through a BatchNorm's affine or a reading conv's kernel "
            "/ sites converted; *batched*: "
            "sites whose excitations run batched (in calls); *train s*: the first training step "
            "of each form (wall clock, one sample on a shared machine: noisy), with its one-time "
            "work: in the fused form each batched call traces its aten graph then (about "
            "0.02-0.1 s per call). An error over TOL marked (f64) "
            "was judged float32 rounding in float64 (see the module docstring).", ""]
    out += ["## Models", ""]
    out += ["| family | model | BN | fused | batched | train out | grad | state | eval | deploy "
            "| train s plain / fused | prepare s fused | outcome |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        oc = outcome(r)
        if oc == "no-batchnorm":
            continue
        f64 = " (f64)" if (r.get("float64") or {}).get("rounding") else ""
        out.append("| " + " | ".join([
            f"{r['source']}:{r['family']}", ("+ " if r.get("extra") else "") + f"`{r['model']}`",
            str(r.get("batch_norms", "-")),
            f"{r['gates_fused']}/{r['converted']}" if "gates_fused" in r else "-",
            f"{r['sites_batched']} ({r['batched_groups']})" if "sites_batched" in r else "-",
            _e(r, "train_out_err") + f64, _e(r, "grad_err") + f64, _e(r, "state_err"),
            _e(r, "eval_err"), _e(r, "deploy_err"),
            f"{r['train_plain_s']:.2f} / {r['train_fused_s']:.2f}"
            if "train_fused_s" in r else "-",
            f"{r['prepare_fused_s']:.1f}" if "prepare_fused_s" in r else "-",
            oc if oc == "ok" else f"**{oc}**"]) + " |")
    skipped = [r for r in results if outcome(r) == "no-batchnorm"]
    if skipped:
        out += ["", "Without BatchNorm (skipped): " + ", ".join(f"`{r['model']}`"
                                                                for r in skipped) + "."]
    bad = [r for r in results if outcome(r) not in ("ok", "no-batchnorm")]
    if bad:
        out += ["", "## Not OK", ""]
        for r in bad:
            why = [outcome(r)]
            for k in ("setup_error", "plain_error", "fused_error", "float64_error"):
                if r.get(k):
                    why.append(f"{k.replace('_', ' ')} at {r.get('stage')}: {r[k]}")
            if r.get("error"):
                why.append(r["error"])
            if r.get("grad_err", 0) > TOL:
                why.append(f"worst gradient: {r.get('grad_err_at')}")
            if r.get("state_err", 0) > TOL:
                why.append(f"worst state: {r.get('state_err_at')}")
            if r.get("float64"):
                f = r["float64"]
                why.append("float64: fused vs multiply out {out64:.1e} grad {grad64:.1e}; "
                           "float32 vs float64 out fused {out_fused_vs64:.1e} / multiply "
                           "{out_plain_vs64:.1e}, grad fused {grad_fused_vs64:.1e} / multiply "
                           "{grad_plain_vs64:.1e}".format(**f))
            out.append(f"- `{r['model']}` ({r['family']}): " + "; ".join(why))
    judged = [r for r in results if (r.get("float64") or {}).get("rounding")]
    if judged:
        out += ["", "## Over TOL in float32, rounding in float64", ""]
        for r in judged:
            f = r["float64"]
            out.append(f"- `{r['model']}`: float32 out {r['train_out_err']:.1e}, grad "
                       f"{r['grad_err']:.1e} (at `{r.get('grad_err_at')}`); float64 fused vs "
                       f"multiply out {f['out64']:.1e}, grad {f['grad64']:.1e}; against the "
                       f"float64 multiply form, float32 fused / multiply: out "
                       f"{f['out_fused_vs64']:.1e} / {f['out_plain_vs64']:.1e}, grad "
                       f"{f['grad_fused_vs64']:.1e} / {f['grad_plain_vs64']:.1e}")
    notes = [r for r in results if r.get("input_note")]
    if notes:
        out += ["", "## Inputs changed", ""]
        out += [f"- `{r['model']}`: {r['input_note']}" for r in notes]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# driver


def run_forked(spec: dict, timeout: float) -> dict[str, Any]:
    """:func:`run_one` for ``spec`` in a forked child of this process (torch, timm and asrfx
    already imported: a fresh interpreter per model would spend more time importing than most
    models take), in its own session, killed after ``timeout`` seconds; its output goes to a
    log, whose last lines a crash or a timeout keeps.

    Returns:
        the result row; on a timeout or a crash the entry's fields with ``timeout`` / ``crash``
        set."""
    with tempfile.TemporaryDirectory(prefix="zoo-fused-") as tmp:
        out, log_path = Path(tmp) / "result.json", Path(tmp) / "log.txt"
        sys.stdout.flush()
        sys.stderr.flush()
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the driver
            code = 1
            try:
                os.setsid()
                fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                res = run_one(spec)
                out.write_text(json.dumps(res))
                code = 0
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        status, timed_out = None, False
        while status is None:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
            elif time.perf_counter() - t0 > timeout:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                timed_out = True
            else:
                time.sleep(0.05)
        wall = round(time.perf_counter() - t0, 1)
        if out.exists() and not timed_out:
            res = json.loads(out.read_text())
        else:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-8:] \
                if log_path.exists() else []
            res = dict(spec, stage="timeout" if timed_out else "crash",
                       error=(f"timed out after {timeout:.0f} s" if timed_out else
                              f"exit status {os.waitstatus_to_exitcode(status)}"),
                       log_tail=tail)
            res["timeout" if timed_out else "crash"] = True
        res["wall_s"] = wall
        return res


def _commit() -> str:
    """The repository's HEAD commit (short), with ``+dirty`` when asrfx's sources differ from
    it; empty when git cannot say."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "asrfx", "passes"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return head + ("+dirty" if dirty.strip() else "")


def _select(cache: dict, only: list[str] | None, families: int | None) -> list[dict]:
    entries = select_models(cache)
    if only:
        wanted = set(only)
        entries = [e for e in entries
                   if {e["model"], e["family"], f"{e['source']}:{e['model']}"} & wanted]
    if families:
        fams: list[tuple[str, str]] = []
        for e in entries:
            if (e["source"], e["family"]) not in fams:
                fams.append((e["source"], e["family"]))
        keep = set(fams[:families])
        entries = [e for e in entries if (e["source"], e["family"]) in keep]
    return entries


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results", help="results folder (bench/results)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="only these models or families")
    p.add_argument("--families", type=int, metavar="N", help="only the first N families")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds per model (default {DEFAULT_TIMEOUT:.0f})")
    p.add_argument("--models", default=str(Path(__file__).resolve().parent / "results"
                                           / zs.MODELS_JSON),
                   help="the zoo sweep's cached model list (made when missing)")
    p.add_argument("--merge", action="store_true",
                   help="replace the rows of the selected models in the existing results")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the Markdown report from the existing results")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        res = run_one(json.loads(args.worker))
        Path(args.worker_out).write_text(json.dumps(res))
        return 0

    out_dir = Path(args.out)
    if args.report_only:
        old = _load_json(out_dir / RESULTS_JSON)
        if not old.get("results"):
            print(f"--report-only: no results in {out_dir / RESULTS_JSON}")
            return 2
        s = summarise(old["results"])
        _write_json(out_dir / RESULTS_JSON, old | {"summary": s})
        (out_dir / RESULTS_MD).write_text(markdown(old["results"], s, old["meta"]))
        print("\n".join(summary_lines(s)))
        return 0

    import timm
    import torch
    import torchvision
    import tqdm as tqdm_module
    from tqdm import tqdm

    tqdm_module.tqdm.monitor_interval = 0  # no monitor thread in a process that forks

    import asrfx  # noqa: F401  (imported once: every model runs in a fork of this process)

    torch.set_num_threads(1)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    cache = _load_json(Path(args.models))  # read only: the zoo sweep owns the file
    versions = {"timm": timm.__version__, "torchvision": torchvision.__version__,
                "torch": torch.__version__}
    if not cache.get("complete") or cache.get("versions") != versions:
        print("enumerating timm and torchvision models (meta device) ...", flush=True)
        cache = enumerate_models(Path(args.models), log=lambda s: print(s, flush=True))
    entries = _select(cache, args.only, args.families)
    meta = {"when": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
            "timm": timm.__version__, "torchvision": torchvision.__version__,
            "timeout": args.timeout, "example_size": EXAMPLE_SIZE, "train_batch": TRAIN_BATCH,
            "wall_s": 0.0, "args": argv if argv is not None else sys.argv[1:],
            "commit": _commit()}
    previous: list[dict] = []
    if args.merge:
        old = _load_json(out_dir / RESULTS_JSON)
        if not old.get("results"):
            print(f"--merge: no results in {out_dir / RESULTS_JSON} to merge into")
            return 2
        previous = old["results"]
        meta = old["meta"]
        meta.setdefault("reruns", []).append({"when": time.strftime("%Y-%m-%d %H:%M"),
                                              "models": [e["model"] for e in entries],
                                              "wall_s": 0.0})

    def merged(new: list[dict]) -> list[dict]:
        by_key = {(r["source"], r["model"]): r for r in new}
        rows = [by_key.pop((r["source"], r["model"]), r) for r in previous]
        return rows + [r for r in new if (r["source"], r["model"]) in by_key]

    def set_wall() -> None:
        (meta["reruns"][-1] if args.merge else meta)["wall_s"] = time.perf_counter() - t_start

    results: list[dict] = []
    bar = tqdm(entries, unit="model", dynamic_ncols=True)
    for i, spec in enumerate(bar, 1):
        bar.set_postfix_str(spec["model"])
        res = run_forked(spec, args.timeout)
        results.append(res)
        oc = outcome(res)
        if oc != "no-batchnorm":
            err = res.get("fused_error") or res.get("plain_error") or res.get("setup_error") \
                or res.get("error") or ""
            tqdm.write(f"{spec['model']:30s} {oc:14s} fused {res.get('gates_fused', '-')}/"
                       f"{res.get('converted', '-')} batched {res.get('sites_batched', '-')}"
                       f"({res.get('batched_groups', '-')}) out {res.get('train_out_err', math.nan):.1e}"
                       f" grad {res.get('grad_err', math.nan):.1e} eval "
                       f"{res.get('eval_err', math.nan):.1e} deploy "
                       f"{res.get('deploy_err', math.nan):.1e} {res['wall_s']:.0f} s {err}")
        set_wall()
        _write_json(out_dir / RESULTS_JSON, {"meta": meta, "partial": i < len(entries),
                                             "results": merged(results)})
    bar.close()
    set_wall()
    results = merged(results)
    s = summarise(results)
    _write_json(out_dir / RESULTS_JSON, {"meta": meta, "partial": False, "summary": s,
                                         "results": results})
    (out_dir / RESULTS_MD).write_text(markdown(results, s, meta))
    print("\n".join(["", "summary"] + [f"  {line}" for line in summary_lines(s)]))
    print(f"wrote {out_dir / RESULTS_MD}, {out_dir / RESULTS_JSON} in "
          f"{(time.perf_counter() - t_start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
