"""Zoo sweep, other collections: asrfx on attention models written outside timm and
torchvision (``make zoo-collections``).

Each collection implements its networks independently, with its own spellings of the same
attention, so each finds what the others do not:

* pytorchcv ("imgclsmob"): SE as 1x1 convolutions, DIA's LSTM shared across a stage, split
  attention, selective kernels, and the attention that is not channel attention (BAM, the
  spatial half of CBAM, self-calibrated convolutions, AirNet, residual attention networks),
  which asrfx must report, not skip; one small model per attention family;
* resnest: the ResNeSt authors' own split attention (``torch.split`` into the radix parts, a
  BatchNorm inside the excitation shared by every part's gate);
* pretrainedmodels: the SENet port (SE-ResNet, SE-ResNeXt);
* geffnet: the EfficientNet / MobileNetV3 / MixNet family before timm (SE on mixed
  convolutions, memory-efficient activations as autograd Functions, CondConv);
* segmentation_models_pytorch: encoders with SE, split and selective-kernel attention under
  U-Net / FPN / MA-Net decoders, and the decoders' own concurrent spatial and channel SE;
* vit_pytorch: MaxViT, whose SE is written with einops layers (and, with registers, einops
  ``pack`` / ``unpack`` at the top level).

Every model runs through the steps and verdicts of ``bench/zoo_sweep.py``
(:func:`zoo_sweep.run_one`, in a subprocess each): random weights, norms randomised, prepare, one
SGD step, fold, deploy outputs against the prepared model on two inputs.

Run in the zoo environment with the collections installed (``make zoo-collections`` installs
them)::

    ../.zoo-venv/bin/python bench/zoo_collections.py --out bench/results

Writes ``zoo-collections.md`` (a row per model) and ``zoo-collections.json``.

With ``--fused`` (``make zoo-collections-fused``) every model runs through the steps of
``bench/zoo_fused.py`` instead (:func:`zoo_fused.run_one`: ``prepare`` and
``prepare(fused=True)``, one training step of each with the same state, gradients, statistics,
eval and deploy outputs compared, a float32 miss judged against float64) and the results go to
``zoo-collections-fused.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo_fused  # noqa: E402 - the fused form's steps and verdicts
import zoo_sweep  # noqa: E402 - the sweep's steps and verdicts, from beside this file

_SEG = [3, 128, 128]  # segmentation models: any size the encoder divides
#: (collection, model, input size or None for the sweep's choice). pytorchcv: the smallest model
#: of each family with attention (the CIFAR models take 32x32 only); segmentation_models_pytorch:
#: "<architecture>:<encoder>[:<decoder attention>]"
MODELS: list[tuple[str, str, list[int] | None]] = [
    ("pytorchcv", "seresnet20_cifar10", [3, 32, 32]),
    ("pytorchcv", "sepreresnet20_cifar10", [3, 32, 32]),
    ("pytorchcv", "diaresnet20_cifar10", [3, 32, 32]),
    ("pytorchcv", "diapreresnet20_cifar10", [3, 32, 32]),
    *[("pytorchcv", m, None) for m in (
        "senet16", "seresnext50_32x4d", "cbam_resnet18", "bam_resnet18", "sknet50",
        "resnesta18", "scnet50", "airnet50_1x64d_r2", "airnext50_32x4d_r2", "resattnet56",
        "efficientnet_b0", "mixnet_s", "mnasnet_a1", "mobilenetv3_small_w7d20", "ghostnet",
        "regnety002", "dicenet_wd5", "fishnet99")],
    ("pytorchcv", "sinet_cityscapes", [3, 128, 256]),
    ("pytorchcv", "bisenet_resnet18_celebamaskhq", [3, 640, 480]),
    *[("resnest", m, None) for m in ("resnest50", "resnest50_fast_1s1x64d",
                                      "resnest50_fast_2s2x40d")],
    *[("pretrainedmodels", m, None) for m in ("se_resnet50", "se_resnext50_32x4d")],
    *[("geffnet", m, None) for m in ("efficientnet_b0", "tf_efficientnet_b0", "mixnet_s",
                                     "tf_mixnet_s", "mobilenetv3_large_100", "mnasnet_a1",
                                     "efficientnet_cc_b0_4e")],
    *[("smp", m, _SEG) for m in ("Unet:resnet18:scse", "UnetPlusPlus:resnet18:scse",
                                 "MAnet:resnet18", "PAN:resnet18", "Unet:se_resnet50",
                                 "Unet:timm-resnest14d", "Unet:timm-skresnet18",
                                 "Unet:timm-efficientnet-b0", "FPN:timm-regnety_004")],
    *[("vit_pytorch", m, None) for m in ("max_vit.MaxViT", "max_vit_with_registers.MaxViT")],
]
#: the import name and the distribution name of each collection (its version goes into the
#: report)
PACKAGES = {"pytorchcv": ("pytorchcv", "pytorchcv"), "resnest": ("resnest", "resnest"),
            "pretrainedmodels": ("pretrainedmodels", "pretrainedmodels"),
            "geffnet": ("geffnet", "geffnet"),
            "smp": ("segmentation_models_pytorch", "segmentation-models-pytorch"),
            "vit_pytorch": ("vit_pytorch", "vit-pytorch")}
RESULTS_MD, RESULTS_JSON = "zoo-collections.md", "zoo-collections.json"
FUSED_MD, FUSED_JSON = "zoo-collections-fused.md", "zoo-collections-fused.json"


def _codes(r: dict) -> str:
    return zoo_sweep._codes(r) or "-"


def _head(title: str, meta: dict, steps: str, outcomes: collections.Counter, legend: str,
          columns: list[str]) -> list[str]:
    """A report's lines up to its table's rows: title, run line (``steps``: what each model
    went through), outcome counts with the ``legend`` of the columns, the table's header."""
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    return [f"# asrfx zoo sweep: {title}", "",
            f"{meta['date']}; torch {meta['torch']}, {versions}; asrfx at {meta['commit']}; "
            f"CPU, one torch thread per model; {meta['minutes']:.1f} min. {steps}", "",
            "Outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())) + ". "
            + legend, "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]


def markdown(results: list[dict], meta: dict) -> str:
    out = _head("attention models of other collections", meta,
                "The steps and verdicts of `bench/zoo_sweep.py` (prepare, one SGD step, fold, "
                "deploy outputs against the prepared model on the example and on a second "
                "input). Generated by `bench/zoo_collections.py`.",
                collections.Counter(zoo_sweep.outcome(r) for r in results),
                "*refused*: prepare reported attention it cannot convert, with a code (here "
                "the attention that is not per channel); *attention*: instances of the model's "
                "attention classes; *error*: the largest relative error of the deploy model.",
                ["collection", "model", "params", "input", "attention", "converted", "refused",
                 "error", "left", "report rows (kept / refused)", "outcome"])
    for r in results:
        att = ", ".join(f"{k} x{v}" for k, v in (r.get("attention") or {}).items()) or "-"
        err = r.get("max_error")
        out.append(
            f"| {r['source']} | `{r['model']}` | {r.get('params', 0) / 1e6:.1f}M | "
            f"{'x'.join(str(v) for v in r.get('input', [])[2:]) or '-'} | {att} | "
            f"{r.get('converted', '-')} | {r.get('refused', '-')} | "
            f"{'-' if err is None else f'{err:.1e}'} | {zoo_sweep.left_count(r)} | "
            f"{_codes(r)} | {zoo_sweep.outcome(r)}"
            + (f": {r['error'][:120]}" if r.get("error") else "") + " |")
    return "\n".join(out) + "\n"


def _err(r: dict, key: str) -> str:
    v = r.get(key)
    return "-" if v is None else f"{v:.1e}"


def fused_markdown(results: list[dict], meta: dict) -> str:
    """The ``--fused`` report: a row per model, the fused form against the multiply form."""
    out = _head("the fused training form on other collections", meta,
                "The steps and verdicts of `bench/zoo_fused.py` (`prepare` and "
                "`prepare(fused=True)` with the same state, one training step each; outputs, "
                "gradients, statistics, eval and deploy outputs compared; a float32 miss judged "
                "against float64). Generated by `bench/zoo_collections.py --fused`.",
                collections.Counter(zoo_fused.outcome(r) for r in results),
                "*fused*: gates applied through a norm's affine or a reading conv's kernel "
                "(into kernels); *batched*: sites (calls); errors relative, gradients to the "
                "model's largest; *float64*: the two forms' gradients computed in float64, and "
                "each float32 form's against them.",
                ["collection", "model", "converted", "fused (into kernels)", "batched",
                 "train out", "grad", "eval", "deploy", "float64: forms / fused / multiply",
                 "outcome"])
    for r in results:
        f64 = r.get("float64") or {}
        judged = (f"{_err(f64, 'grad64')} / {_err(f64, 'grad_fused_vs64')} / "
                  f"{_err(f64, 'grad_plain_vs64')}" if f64 else "-")
        error = r.get("plain_error") or r.get("fused_error") or r.get("setup_error") or ""
        out.append(
            f"| {r['source']} | `{r['model']}` | {r.get('converted', '-')} | "
            f"{r.get('gates_fused', '-')} ({r.get('gates_into_convs', '-')}) | "
            f"{r.get('sites_batched', '-')} ({r.get('batched_groups', '-')}) | "
            f"{_err(r, 'train_out_err')} | {_err(r, 'grad_err')} | {_err(r, 'eval_err')} | "
            f"{_err(r, 'deploy_err')} | {judged} | {zoo_fused.outcome(r)}"
            + (f": {error[:120]}" if error else "") + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results", help="results folder (bench/results)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="sweep only these models")
    p.add_argument("--timeout", type=float, default=240, help="seconds per model (240)")
    p.add_argument("--merge", action="store_true",
                   help="with --only: replace those rows of the last results, keep the rest")
    p.add_argument("--fused", action="store_true",
                   help="the fused training form against the multiply form (bench/zoo_fused.py's "
                        "steps) instead; writes zoo-collections-fused.{md,json}")
    args = p.parse_args(argv)
    run = zoo_fused.run_forked if args.fused else zoo_sweep.run_isolated
    results_md, results_json = (FUSED_MD, FUSED_JSON) if args.fused else \
        (RESULTS_MD, RESULTS_JSON)
    import importlib
    import subprocess

    import torch
    from tqdm.auto import tqdm

    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for source, (package, dist) in PACKAGES.items():
        try:
            importlib.import_module(package)
            versions[source] = version(dist)
        except (ImportError, PackageNotFoundError):
            versions[source] = None
    missing = sorted(k for k, v in versions.items() if v is None)
    if missing:
        print(f"not installed, skipped: {', '.join(missing)} (make zoo-collections installs "
              f"them)", file=sys.stderr)
    models = [(c, m, s) for c, m, s in MODELS
              if versions[c] is not None and (not args.only or m in args.only)]
    t0 = time.perf_counter()
    results = []
    for source, name, size in tqdm(models, desc="zoo-collections", unit="model"):
        spec = {"source": source, "model": name, "family": name, "input_size": size}
        results.append(run(spec, args.timeout))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
            "versions": {k: v for k, v in versions.items() if v is not None}, "commit": commit,
            "minutes": (time.perf_counter() - t0) / 60}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge and (out / results_json).exists():
        fresh = {(r["source"], r["model"]): r for r in results}
        last = json.loads((out / results_json).read_text())
        results = [fresh.pop((r["source"], r["model"]), r) for r in last["results"]] + \
            list(fresh.values())
        meta["minutes"] = last["meta"].get("minutes", meta["minutes"])  # the whole run's
        meta["merged"] = list(args.only or [])
    (out / results_json).write_text(json.dumps({"meta": meta, "results": results}, indent=1,
                                               default=str))
    (out / results_md).write_text(fused_markdown(results, meta) if args.fused
                                  else markdown(results, meta))
    for r in results:
        if args.fused:
            print(f"{r['source']:16s} {r['model']:32s} {zoo_fused.outcome(r):14s} "
                  f"batched {r.get('sites_batched')} grad {_err(r, 'grad_err')}")
        else:
            print(f"{r['source']:16s} {r['model']:32s} {zoo_sweep.outcome(r):12s} {_codes(r)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
