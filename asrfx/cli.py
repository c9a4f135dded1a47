"""The ``asrfx`` command line."""

from __future__ import annotations

import argparse
import sys
import time

import torch

__all__ = ["main", "quick_demo"]


def quick_demo(depth: int = 20, block: str = "basic", steps: int = 20, batch: int = 16,
               device: str = "cpu", seed: int = 0) -> dict:
    """End to end on random data: SE ResNet -> prepare -> train a few steps -> fold -> report.

    Returns:
        A dict with the two reports, the relative error of the fold and latencies (ms, batch 1).
    """
    from tqdm import tqdm

    import asrfx
    from asrfx.zoo import cifar_resnet

    torch.manual_seed(seed)
    dev = torch.device(device)
    model = cifar_resnet(depth, attention="se", block=block, num_classes=10).to(dev)
    x_ex = torch.randn(2, 3, 32, 32, device=dev)
    train_model = asrfx.prepare(model, example_inputs=(x_ex,))
    print(train_model.asrfx_report)
    opt = torch.optim.SGD(train_model.parameters(), lr=0.05, momentum=0.9)
    train_model.train()
    for _ in tqdm(range(steps), desc="training (random data)", unit="step"):
        x = torch.randn(batch, 3, 32, 32, device=dev)
        y = torch.randint(0, 10, (batch,), device=dev)
        loss = torch.nn.functional.cross_entropy(train_model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    deploy = asrfx.fold(train_model, example_inputs=(x_ex,))
    print(deploy.asrfx_report)
    train_model.eval()
    x1 = torch.randn(1, 3, 32, 32, device=dev)
    timings = {}
    for name, m in (("SE (input-dependent)", model.eval()), ("ASR training form", train_model),
                    ("ASR folded", deploy)):
        timings[name] = _median_ms(m, x1)
    with torch.no_grad():
        err = asrfx.relative_error(train_model(x1), deploy(x1))
    print(f"fold relative error at batch 1: {err:.2e}")
    for name, ms in timings.items():
        print(f"  {name:22s} {ms:8.2f} ms/batch-1 (median)")
    return {"prepare": train_model.asrfx_report, "fold": deploy.asrfx_report, "error": err,
            "latency_ms": timings}


def _median_ms(model: torch.nn.Module, x: torch.Tensor, reps: int = 20) -> float:
    with torch.no_grad():
        for _ in range(3):
            model(x)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    times.sort()
    return 1000 * times[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="asrfx", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser("demo", help="prepare, train a few steps, fold and report "
                                       "(an SE ResNet on random data)")
    demo.add_argument("--depth", type=int, default=20)
    demo.add_argument("--block", default="basic", choices=["basic", "bottleneck"])
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        from asrfx.errors import ASRError
        try:
            quick_demo(args.depth, args.block, args.steps, device=args.device)
        except (ASRError, ValueError) as e:
            print(f"asrfx: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
