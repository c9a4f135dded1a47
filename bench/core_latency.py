"""Side-by-side latency of the deploy forms and the compiler's own cost (ResNet-164, CIFAR size).

Run: ``python -m bench.core_latency [--depth 164] [--batches 1 16] [--reps 30]``.
All variants are timed in one process, interleaved round by round after warm-up, with the
thread count fixed; medians and ratios to the eager backbone are printed as a table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from tabulate import tabulate

import asrfx
from asrfx.demo import latency_ms
from asrfx.zoo import cifar_resnet


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def build(depth: int, x: torch.Tensor) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    plain = cifar_resnet(depth).eval()
    se = cifar_resnet(depth, attention="se").eval()
    asr = asrfx.prepare(se, example_inputs=(x,)).eval()
    return {
        "backbone (eager)": plain,
        "backbone folded": asrfx.fold(plain, example_inputs=(x,)),
        "SE (eager)": se,
        "ASR(SE) training form": asr,
        "ASR(SE) folded": asrfx.fold(asr, example_inputs=(x,)),
    }


def compiler_cost(depth: int, reps: int = 5) -> tuple[float, float]:
    x = torch.randn(1, 3, 32, 32)
    se = cifar_resnet(depth, attention="se")
    prep, fold = [], []
    for _ in range(reps):
        t = time.perf_counter()
        p = asrfx.prepare(se, example_inputs=(x,))
        t1 = time.perf_counter()
        asrfx.fold(p, example_inputs=(x,))
        t2 = time.perf_counter()
        prep.append(t1 - t)
        fold.append(t2 - t1)
    return statistics.median(prep), statistics.median(fold)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=164)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    rows = []
    for b in args.batches:
        x = torch.randn(b, 3, 32, 32)
        models = build(args.depth, x[:1])
        medians = latency_ms(models, x, args.reps)  # interleaved round by round
        base = medians["backbone (eager)"]
        for name, med in medians.items():
            rows.append([b, name, f"{med:.2f}", f"{med / base:.2f}x",
                         f"{sum(p.numel() for p in models[name].parameters()):,}"])
    print(tabulate(rows, headers=["batch", f"ResNet-{args.depth}", "median ms", "vs backbone",
                                  "params"]))
    p, f = compiler_cost(args.depth)
    print(f"prepare {1000 * p:.0f} ms, fold (with check) {1000 * f:.0f} ms, "
          f"total {1000 * (p + f):.0f} ms (median of 5)")


if __name__ == "__main__":
    main()
