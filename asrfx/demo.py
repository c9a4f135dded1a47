"""The main job: ASR end to end on real data, with the Stripe Observation and deploy costs.

``asrfx demo`` trains a zoo CIFAR-style ResNet in four variants — backbone, +SE, +ASR(SE)
(:func:`asrfx.prepare`, ``mode="replace"``) and +ASR(SE)+SE (``mode="both"``) — over several seeds,
folds the ASR models (checked exact), converts the trained +SE model without retraining
(``init="calibrate"``), and reports test accuracy (last epoch, mean ± std over seeds) beside
parameters, FLOPs and measured latency of each deployed model. While the +SE model trains, the
paper's stripe statistic (mean over channels of the std of attention values across inputs) is
tracked per epoch.

Default data: scikit-learn's bundled handwritten digits (1,797 real 8x8 images, fixed split).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

import asrfx
from asrfx.data import Split, batches, load_dataset
from asrfx.tracing import preserve_modes
from asrfx.zoo import cifar_resnet

__all__ = ["DemoConfig", "run_demo", "evaluate", "train", "count_flops", "latency_ms",
           "convert_trained"]

VARIANTS = ("backbone", "+SE", "+ASR(SE)", "+ASR(SE)+SE")
CONVERTED = "+SE -> ASR (calibrated, no retraining)"


@dataclass
class DemoConfig:
    """Settings of one demo run (the CLI's flags)."""

    dataset: str = "digits"
    depth: int = 20
    block: str = "basic"
    epochs: int = 12
    seeds: int = 5
    batch_size: int = 64
    lr: float = 0.1
    weight_decay: float = 5e-4
    device: str = "cpu"
    out: str | None = None
    latency_reps: int = 30


@dataclass
class VariantResult:
    name: str
    accuracies: list[float] = field(default_factory=list)
    params: int = 0
    flops: int = 0
    latency_ms: float = 0.0
    fold_error: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies) if self.accuracies else float("nan")

    @property
    def std(self) -> float:
        return statistics.pstdev(self.accuracies) if len(self.accuracies) > 1 else 0.0


def evaluate(model: nn.Module, split: Split, device: torch.device, batch_size: int = 256) -> float:
    """Top-1 accuracy (%) on the test split, in eval mode (the model's mode is restored)."""
    correct = 0
    with preserve_modes(model), torch.no_grad():
        model.eval()
        for xb, yb in batches(split.x_test, split.y_test, batch_size):
            correct += (model(xb.to(device)).argmax(1).cpu() == yb).sum().item()
    return 100.0 * correct / len(split.y_test)


def train(model: nn.Module, split: Split, cfg: DemoConfig, seed: int, device: torch.device,
          on_epoch: Callable[[int], None] | None = None, desc: str = "",
          bar: Any = None) -> nn.Module:
    """SGD with momentum and a cosine schedule, cross-entropy, on the training split.
    ``bar``: an overall progress bar advanced once per epoch (else one of its own)."""
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True,
                          weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(split.y_train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15)
    model.train()
    epochs = range(cfg.epochs) if bar is not None else \
        tqdm(range(cfg.epochs), desc=desc, unit="epoch", leave=False)
    for epoch in epochs:
        if bar is not None:
            bar.set_description(f"{desc}, epoch {epoch + 1}/{cfg.epochs}")
        for xb, yb in batches(split.x_train, split.y_train, cfg.batch_size, shuffle=True,
                              generator=gen):
            loss = F.cross_entropy(model(xb.to(device)), yb.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if on_epoch is not None:
            on_epoch(epoch)
        if bar is not None:
            bar.update(1)
    model.eval()
    return model


def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass on ``x`` (``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return int(counter.get_total_flops())


def latency_ms(models: dict[str, nn.Module], x: torch.Tensor, reps: int = 30
               ) -> dict[str, float]:
    """Median forward latency (ms) of each model, timed interleaved round by round."""
    times: dict[str, list[float]] = {k: [] for k in models}
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with torch.no_grad():
        for m in models.values():
            for _ in range(3):
                m(x)
        for _ in range(reps):
            for name, m in models.items():
                sync()
                t = time.perf_counter()
                m(x)
                sync()
                times[name].append(time.perf_counter() - t)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def calibrated_form(model: nn.Module, split: Split, x_ex: torch.Tensor, batch_size: int = 256,
                    **options: Any) -> nn.Module:
    """``model``'s ASR form with each psi at the mean of its statistic over the training split
    (``prepare(init="calibrate")``, batches on ``x_ex``'s device); ``options`` go to prepare."""
    calib = [xb.to(x_ex.device) for xb, _ in batches(split.x_train, split.y_train, batch_size)]
    return asrfx.prepare(model, example_inputs=(x_ex,), init="calibrate",
                         calibration_data=calib, **options)


def convert_trained(model: nn.Module, split: Split, device: torch.device,
                    batch_size: int = 256) -> nn.Module:
    """Training-free conversion: psi calibrated on the training split, then folded."""
    x_ex = split.x_test[:2].to(device)
    return asrfx.fold(calibrated_form(model, split, x_ex, batch_size), example_inputs=(x_ex,))


def _machine() -> str:
    threads = torch.get_num_threads()
    return (f"{platform.machine()} {platform.processor() or ''}".strip()
            + f", {os.cpu_count()} CPUs, torch {torch.__version__}, {threads} threads")


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the whole demo; returns the results (also written to ``cfg.out`` when given)."""
    from asrfx.stripes import AttentionRecorder, stripe_statistic

    device = torch.device(cfg.device)
    split = load_dataset(cfg.dataset)
    shape = split.input_shape
    x_ex = split.x_test[:2].to(device)

    def build(attention: str | None, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return cifar_resnet(cfg.depth, attention=attention, num_classes=split.num_classes,
                            block=cfg.block, in_channels=split.in_channels,
                            dims=split.dims).to(device)

    results = {name: VariantResult(name) for name in VARIANTS + (CONVERTED,)}
    stripe_history: list[float] = []
    deployed: dict[str, nn.Module] = {}
    last_vectors = None
    t0 = time.time()
    from tqdm import tqdm

    bar = tqdm(total=len(VARIANTS) * cfg.seeds * cfg.epochs, unit="epoch")
    for seed in range(cfg.seeds):
        models = {
            "backbone": build(None, seed),
            "+SE": build("se", seed),
            "+ASR(SE)": asrfx.prepare(build("se", seed), example_inputs=(x_ex,)),
            "+ASR(SE)+SE": asrfx.prepare(build("se", seed), example_inputs=(x_ex,),
                                         mode="both"),
        }
        for name, model in models.items():
            hook: Callable[[int], None] | None = None
            if name == "+SE" and seed == 0:
                recorder = AttentionRecorder(model, (x_ex,))
                probe = list(batches(split.x_test, split.y_test, 256))

                def record_stripes(epoch: int, recorder=recorder, probe=probe) -> None:
                    vectors = recorder.record(probe)
                    stripe_history.append(statistics.fmean(
                        stripe_statistic(v) for v in vectors.values()))

                hook = record_stripes

            v = list(models).index(name) + 1
            train(model, split, cfg, seed, device, on_epoch=hook, bar=bar,
                  desc=f"variant {v}/{len(models)} ({name}), seed {seed + 1}/{cfg.seeds}")
            if name == "+SE" and seed == 0:
                last_vectors = recorder.record(probe)
            deploy = asrfx.fold(model, example_inputs=(x_ex,))
            acc = evaluate(deploy, split, device)
            acc_train_form = evaluate(model, split, device)
            if abs(acc - acc_train_form) > 1e-9:
                results[name].notes.append(
                    f"seed {seed}: deployed {acc:.2f}% vs training form {acc_train_form:.2f}%")
            results[name].accuracies.append(acc)
            if name.startswith("+ASR"):
                err = deploy.asrfx_report.notes[-1]
                results[name].notes.append(f"seed {seed}: {err}")
            if seed == 0:
                deployed[name] = deploy
            if name == "+SE":
                converted = convert_trained(model, split, device)
                results[CONVERTED].accuracies.append(evaluate(converted, split, device))
                if seed == 0:
                    deployed[CONVERTED] = converted
    bar.close()
    train_seconds = time.time() - t0
    x1 = torch.zeros(1, *shape, device=device)
    lat = latency_ms(deployed, x1, cfg.latency_reps)
    for name, model in deployed.items():
        r = results[name]
        r.params = sum(p.numel() for p in model.parameters())
        r.flops = count_flops(model, x1)
        r.latency_ms = lat[name]
    out = {
        "config": asdict(cfg),
        "machine": _machine(),
        "dataset": {"name": split.name, "train": len(split.y_train), "test": len(split.y_test),
                    "input_shape": list(shape), "classes": split.num_classes},
        "train_seconds": round(train_seconds, 1),
        "variants": [dict(asdict(r), mean=r.mean, std=r.std) for r in results.values()],
        "stripe_history": stripe_history,
    }
    text = format_results(out)
    print(text)
    if cfg.out:
        _write_outputs(Path(cfg.out), out, text, stripe_history, last_vectors)
    return out


def format_results(out: dict[str, Any]) -> str:
    """The Markdown report: a header naming data, model, seeds, epochs, machine, and the table."""
    cfg = out["config"]
    base = next(v for v in out["variants"] if v["name"] == "backbone")
    rows = []
    for v in out["variants"]:
        acc = f"{v['mean']:.2f} ± {v['std']:.2f}"
        lat = f"{v['latency_ms']:.3f}" if v["latency_ms"] else "-"
        ratio = f"{v['latency_ms'] / base['latency_ms']:.2f}x" if v["latency_ms"] and \
            base["latency_ms"] else "-"
        rows.append([v["name"], acc, f"{v['params']:,}", f"{v['flops'] / 1e6:.3f}", lat, ratio])
    ds = out["dataset"]
    head = (f"asrfx demo: {ds['name']} ({ds['train']} train / {ds['test']} test, input "
            f"{tuple(ds['input_shape'])}), ResNet-{cfg['depth']} ({cfg['block']}), "
            f"{cfg['seeds']} seeds x {cfg['epochs']} epochs, test accuracy at the last epoch\n"
            f"machine: {out['machine']}; training took {out['train_seconds']} s\n")
    table = tabulate(rows, headers=["variant (deployed form)", "test acc % (mean ± std)",
                                    "params", "MFLOPs", "latency ms (b=1)", "vs backbone"],
                     tablefmt="github")
    hist = out["stripe_history"]
    stripes = ""
    if hist:
        stripes = ("\nstripe statistic of the +SE model (mean over sites of the mean over "
                   "channels of the std across test inputs), per epoch: "
                   + ", ".join(f"{h:.3f}" for h in hist) + "\n")
    return head + "\n" + table + "\n" + stripes


def _write_outputs(out_dir: Path, out: dict[str, Any], text: str, history: list[float],
                   vectors: dict[str, torch.Tensor] | None) -> None:
    from asrfx.stripes import plot_stripe_history, plot_stripes

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(out, indent=2, default=str))
    (out_dir / "results.md").write_text(text)
    _plot_accuracy(out, out_dir / "accuracy_latency.png")
    if history:
        plot_stripe_history(history, out_dir / "stripe_history.png")
    if vectors:
        plot_stripes(vectors, out_dir / "stripes.png")
    print(f"written to {out_dir}/: results.md, results.json, accuracy_latency.png, "
          f"stripe_history.png, stripes.png")


def _plot_accuracy(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vs = out["variants"]
    names = [v["name"].replace(" (calibrated, no retraining)", "\n(calibrated)") for v in vs]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.bar(range(len(vs)), [v["mean"] for v in vs], yerr=[v["std"] for v in vs], capsize=4,
           color="#4C72B0")
    a1.set_xticks(range(len(vs)), names, rotation=20, ha="right", fontsize=8)
    lo = min(v["mean"] - v["std"] for v in vs)
    a1.set_ylim(max(0, lo - 5), 100)
    a1.set_ylabel("test accuracy % (mean ± std)")
    a2.bar(range(len(vs)), [v["latency_ms"] for v in vs], color="#DD8452")
    a2.set_xticks(range(len(vs)), names, rotation=20, ha="right", fontsize=8)
    a2.set_ylabel("deployed latency, ms (batch 1)")
    fig.suptitle(f"{out['dataset']['name']}: ResNet-{out['config']['depth']}, "
                 f"{out['config']['seeds']} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
