"""The ``asrfx`` command line: ``demo``, ``stripes``, ``convert``, ``bench``, ``fold``."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ASRError, InputError
from .zoo import build_model, parse_model_spec

__all__ = ["main", "load_model", "read_checkpoint", "fold_checkpoint"]


def read_checkpoint(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A state_dict from ``path``, read with ``torch.load(weights_only=True)`` only (no arbitrary
    unpickling); ``{"state_dict": ...}`` wrappers are unwrapped."""
    save = "save it with torch.save(model.state_dict(), path)"
    if isinstance(path, (str, os.PathLike)):
        if not Path(path).exists():
            raise InputError(f"no checkpoint file at {str(path)!r}; pass --checkpoint with the "
                             f"path of a state_dict ({save})")
        if Path(path).is_dir():
            raise InputError(f"checkpoint {str(path)!r} is a directory, not a file; {save}")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input
        raise InputError(f"cannot read checkpoint {str(path)!r} as a weights-only state_dict: "
                         f"{_load_failure(e)}; asrfx never unpickles arbitrary objects "
                         f"(torch.load(weights_only=True) only): {save}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        if isinstance(state, dict):
            found = ", ".join(f"{k!r}: {type(v).__name__}" for k, v in list(state.items())[:6])
            what = f"a dict with {{{found}{', ...' if len(state) > 6 else ''}}}"
        else:
            what = f"a {type(state).__name__}"
        raise InputError(f"checkpoint {str(path)!r} is not a state_dict (a dict of tensors) but "
                         f"{what}; {save}")
    return state


def _load_failure(e: BaseException) -> str:
    """What torch.load(weights_only=True) refused, without torch's advice to unpickle anyway."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    glob = re.search(r"GLOBAL ([\w.]+)", text)
    if glob:
        return f"it holds a pickled Python object ({glob.group(1)}), not only tensors"
    if isinstance(e, EOFError) or "Ran out of input" in text:
        return "the file is empty or truncated"
    if "Unsupported operand" in text or "invalid load key" in text or \
            "failed finding central directory" in text or "PytorchStreamReader" in text:
        return "it is not a PyTorch checkpoint (or it holds pickled Python objects)"
    if "Weights only load failed" in text:  # torch's advice (unpickle anyway) is not repeated
        return "it holds pickled Python objects, not only tensors"
    return f"{type(e).__name__}: {next((ln for ln in text.splitlines() if ln.strip()), '')[:200]}"


def load_model(spec: str, checkpoint: str | None = None, *, num_classes: int = 10,
               in_channels: int = 3, dims: int = 2, device: str = "cpu") -> nn.Module:
    """Build a model from a model spec, and load a checkpoint into it.

    Args:
        spec: ``package.module:factory`` (``factory()`` returns the model), a zoo name
            ``resnet<depth>[-se][-basic|-bottleneck]`` or a third-party name (built for the
            data's classes/channels/dims); see :func:`asrfx.zoo.parse_model_spec`.
        checkpoint: a ``state_dict`` file, loaded with ``torch.load(weights_only=True)`` only.

    Returns:
        The model on ``device``.

    Raises:
        InputError: unknown spec, factory failure, unreadable or mismatching checkpoint.
    """
    model = build_model(parse_model_spec(spec), num_classes=num_classes,
                        in_channels=in_channels, dims=dims)
    if checkpoint:
        state = read_checkpoint(checkpoint, device)
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise InputError(f"checkpoint {checkpoint!r} does not fit {spec}: missing "
                             f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    return model.to(device)


def _demo(args: argparse.Namespace) -> None:
    from .demo import DemoConfig, run_demo

    if args.threads:
        torch.set_num_threads(args.threads)
    run_demo(DemoConfig(dataset=args.dataset, depth=args.depth, block=args.block,
                        epochs=args.epochs, seeds=args.seeds, batch_size=args.batch_size,
                        lr=args.lr, device=args.device, out=args.out))


def _stripes(args: argparse.Namespace) -> None:
    from tabulate import tabulate

    from .data import batches, load_dataset
    from .stripes import AttentionRecorder, plot_stripes, stripe_report

    split = load_dataset(args.dataset)
    model = load_model(args.model, args.checkpoint, num_classes=split.num_classes,
                       in_channels=split.in_channels, dims=split.dims, device=args.device)
    x = split.x_test[: args.limit].to(args.device)
    y = split.y_test[: args.limit]
    recorder = AttentionRecorder(model, (x[:2],))
    vectors = recorder.record(list(batches(x, y, 256)))
    rows = stripe_report(vectors)
    print(tabulate([[r["path"], r["channels"], r["inputs"], f"{r['statistic']:.4f}",
                     f"{r['mean_gate']:.3f}"] for r in rows],
                   headers=["site", "C", "inputs", "stripe statistic", "mean gate"]))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        png = plot_stripes(vectors, Path(args.out) / "stripes.png")
        print(f"heatmaps: {png}")


def _convert(args: argparse.Namespace) -> None:
    from .data import load_dataset
    from .demo import convert_trained, evaluate

    split = load_dataset(args.data)
    device = torch.device(args.device)
    model = load_model(args.model, args.checkpoint, num_classes=split.num_classes,
                       in_channels=split.in_channels, dims=split.dims, device=args.device)
    before = evaluate(model, split, device)
    deploy = convert_trained(model, split, device)
    after = evaluate(deploy, split, device)
    print(deploy.asrfx_report)
    print(f"test accuracy on {split.name}: original {before:.2f}%, converted and folded "
          f"{after:.2f}% ({after - before:+.2f} points), without retraining")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        torch.save(deploy.state_dict(), Path(args.out) / "deploy_state_dict.pt")
        (Path(args.out) / "convert.txt").write_text(
            f"{deploy.asrfx_report}\noriginal {before:.2f}% -> converted {after:.2f}%\n")


def _bench(args: argparse.Namespace) -> None:
    from .bench import BenchConfig, compiler_cost, format_cost, format_results, run_bench, \
        write_outputs

    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.size[0] if args.size and len(args.size) == 1 else (tuple(args.size) if args.size
                                                                  else None)
    res: dict = {}
    if not args.cost_only:
        cfg = BenchConfig(model=args.model, attention=tuple(args.attention),
                          batches=tuple(args.batch), reps=args.reps, warmup=args.warmup,
                          train_batch=args.train_batch, train_reps=args.train_reps,
                          image_size=size, num_classes=args.num_classes, device=args.device,
                          runtimes=tuple(args.runtimes), progress=not args.quiet)
        res = run_bench(cfg)
        print(format_results(res))
    if args.cost or args.cost_only:
        cost = compiler_cost(tuple(args.cost_depths), reps=args.cost_reps,
                             progress=not args.quiet)
        print(format_cost(cost))
        res["compiler_cost"] = cost
        res.setdefault("machine", __import__("asrfx.bench").bench.machine_description())
        res.setdefault("config", {"model": "compiler cost", "batches": [], "attention": []})
        res.setdefault("rows", [])
    if args.out:
        paths = write_outputs(res, args.out)
        print("wrote " + ", ".join(str(p) for p in paths.values()))


def fold_checkpoint(spec: str, checkpoint: str | Path, out: str | Path, *,
                    size: tuple[int, ...] = (3, 32, 32), num_classes: int = 10,
                    mode: str | None = None, insert: str | None = None,
                    where: str = "block_output", formats: tuple[str, ...] = ("pt2", "onnx"),
                    tol: float = 1e-4, device: str = "cpu") -> dict[str, Any]:
    """Turn a checkpoint of a prepared model into the deploy model, saved without pickle.

    The model is rebuilt from ``spec``, prepared as it was for training (``mode``, ``insert``,
    ``where``), the checkpoint loaded into it (a prepared model's, or the original model's --
    then every psi keeps its initial value and the result says so), folded, and written as
    ``deploy.pt2`` (torch.export) and ``deploy.onnx``; each file is loaded back and checked
    against the prepared model. Returns what was written and measured.
    """
    import asrfx

    from . import runtimes

    bad = [f for f in formats if f not in ("pt2", "onnx")]
    if bad:
        raise InputError(f"--formats: unknown {bad}; choose pt2 and/or onnx")
    try:
        model = load_model(spec, None, num_classes=num_classes, in_channels=size[0],
                           dims=len(size) - 1, device=device)
    except ASRError:
        raise
    except Exception as e:  # noqa: BLE001 - a failing factory is the user's input
        raise InputError(f"--model {spec}: building the model failed ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); the "
                         f"factory must build the model with no arguments") from None
    x = torch.randn(2, *size, device=device)
    prepared = asrfx.prepare(model, example_inputs=(x,), mode=mode, insert=insert, where=where)
    state = read_checkpoint(checkpoint, device)
    expected = prepared.state_dict()
    try:
        res = prepared.load_state_dict(state, strict=False)
        missing, unexpected = list(res.missing_keys), list(res.unexpected_keys)
        shapes: list[str] = []
    except RuntimeError as e:  # shapes differ: say which, as an InputError
        failure = str(e).strip().splitlines()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        shapes = [f"{k}: {tuple(state[k].shape)} in the checkpoint, {tuple(v.shape)} in the "
                  f"model" for k, v in expected.items() if k in state
                  and isinstance(state[k], torch.Tensor) and state[k].shape != v.shape] or \
            [" ".join(ln.strip() for ln in failure[:3])]
    psi_missing = [k for k in missing if k.endswith("psi")]
    other = [k for k in missing if not k.endswith("psi")]
    if other or unexpected:
        raise InputError(f"checkpoint {str(checkpoint)!r} does not fit {spec} prepared with "
                         f"mode={mode!r}, insert={insert!r}: {len(other)} of the model's "
                         f"{len(expected)} keys missing {other[:5]}, {len(unexpected)} unexpected "
                         f"{unexpected[:5]}; check --model (is it this model's checkpoint?), "
                         f"and give the options the model was prepared with")
    if shapes:
        raise InputError(f"checkpoint {str(checkpoint)!r} does not fit {spec}: "
                         f"{'; '.join(shapes[:3])}; build the model as it was trained "
                         f"(--num-classes, --size, the factory's arguments)")
    notes = []
    if psi_missing:
        notes.append(f"the checkpoint has no psi ({len(psi_missing)} missing): it is the "
                     f"original model's; psi keep their initial value")
    deploy = asrfx.fold(prepared, example_inputs=(x,), tol=tol)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"report": str(deploy.asrfx_report), "notes": notes, "files": {}}
    prepared.eval()
    if "pt2" in formats:
        path = runtimes.export_program(deploy, (x,), out / "deploy.pt2")
        err = runtimes.check_program(prepared, (x,), path, tol=tol)
        result["files"]["pt2"] = {"path": str(path), "rel_err": err}
    if "onnx" in formats:
        path = runtimes.export_onnx(deploy, (x,), out / "deploy.onnx")
        err = runtimes.check_onnx(prepared, (x,), path, tol=tol)
        result["files"]["onnx"] = {"path": str(path), "rel_err": err}
    lines = [result["report"], *notes] + [f"{k}: {v['path']} (loaded back: relative error "
                                          f"{v['rel_err']:.1e} against the prepared model)"
                                          for k, v in result["files"].items()]
    (out / "fold.txt").write_text("\n".join(lines) + "\n")
    return result


def _fold(args: argparse.Namespace) -> None:
    res = fold_checkpoint(args.model, args.checkpoint, args.out, size=tuple(args.size),
                          num_classes=args.num_classes, mode=args.mode, insert=args.insert,
                          where=args.where, formats=tuple(args.formats), tol=args.tol,
                          device=args.device)
    print(res["report"])
    for n in res["notes"]:
        print(f"note: {n}")
    for k, v in res["files"].items():
        print(f"{k}: {v['path']} (loaded back, relative error {v['rel_err']:.1e})")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``asrfx`` console script."""
    parser = argparse.ArgumentParser(prog="asrfx", description="ASR on torch.fx: train with "
                                     "channel attention, deploy without it.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    data_help = "digits (default, bundled with scikit-learn), mnist1d, cifar10:DIR, cifar100:DIR"

    demo = sub.add_parser("demo", help="train backbone/+SE/+ASR(SE)/+ASR(SE)+SE on real data, "
                                       "fold, report accuracy, cost and stripes")
    demo.add_argument("--dataset", default="digits", help=data_help)
    demo.add_argument("--depth", type=int, default=20)
    demo.add_argument("--block", default="basic", choices=["basic", "bottleneck"])
    demo.add_argument("--epochs", type=int, default=12)
    demo.add_argument("--seeds", type=int, default=5)
    demo.add_argument("--batch-size", type=int, default=64)
    demo.add_argument("--lr", type=float, default=0.1)
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    demo.add_argument("--out", default=None, help="write results.md/.json and PNGs here")

    st = sub.add_parser("stripes", help="attention vectors of every site over data: the stripe "
                                        "statistic per site and heatmaps")
    st.add_argument("--model", required=True, help="package.module:factory or resnet20-se ...")
    st.add_argument("--checkpoint", default=None)
    st.add_argument("--dataset", default="digits", help=data_help)
    st.add_argument("--limit", type=int, default=500, help="number of test inputs")
    st.add_argument("--device", default="cpu")
    st.add_argument("--out", default=None)

    cv = sub.add_parser("convert", help="training-free conversion of a trained attention model: "
                                        "psi calibrated on data, folded, accuracy before/after")
    cv.add_argument("--model", required=True)
    cv.add_argument("--checkpoint", required=True)
    cv.add_argument("--data", default="digits", help=data_help)
    cv.add_argument("--device", default="cpu")
    cv.add_argument("--out", default=None)

    bn = sub.add_parser("bench", help="latency, FLOPs and training-step cost of the backbone, "
                                      "the attention model and its ASR forms, side by side")
    bn.add_argument("--model", default="resnet164",
                    help="resnet20/56/110/164/1001..., monai-seresnet50, efficientnet-b0, or "
                         "package.module:factory (a model with attention)")
    bn.add_argument("--attention", nargs="+", default=["se"],
                    help="library attention(s) of the zoo ResNets, or 'all'")
    bn.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    bn.add_argument("--reps", type=int, default=30, help="timed rounds per batch size")
    bn.add_argument("--warmup", type=int, default=3)
    bn.add_argument("--train-batch", type=int, default=32)
    bn.add_argument("--train-reps", type=int, default=10, help="0 skips the training step")
    bn.add_argument("--size", type=int, nargs="+", default=None,
                    help="input size: one int (square RGB image) or the full shape without "
                         "batch, e.g. 3 32 32")
    bn.add_argument("--num-classes", type=int, default=100)
    bn.add_argument("--runtimes", nargs="*", default=["onnx"],
                    help="also time the backbone and the folded model in: onnx, compile")
    bn.add_argument("--device", default="cpu")
    bn.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    bn.add_argument("--cost", action="store_true",
                    help="also measure prepare/fold time against graph size")
    bn.add_argument("--cost-only", action="store_true", help="only the compiler cost")
    bn.add_argument("--cost-depths", type=int, nargs="+",
                    default=[20, 56, 110, 164, 326, 650, 1001])
    bn.add_argument("--cost-reps", type=int, default=3)
    bn.add_argument("--quiet", action="store_true", help="no progress bar")
    bn.add_argument("--out", default=None, help="write bench.json, bench.md and PNGs here")

    fd = sub.add_parser("fold", help="checkpoint of a prepared model -> deploy model saved as "
                                     "torch.export (.pt2) and ONNX, each loaded back and checked")
    fd.add_argument("--model", required=True, help="package.module:factory or resnet20-se ...")
    fd.add_argument("--checkpoint", required=True, help="state_dict of the prepared model")
    fd.add_argument("--out", required=True)
    fd.add_argument("--size", type=int, nargs="+", default=[3, 32, 32],
                    help="input shape without batch (default 3 32 32)")
    fd.add_argument("--num-classes", type=int, default=10, help="for zoo models")
    fd.add_argument("--mode", default=None, choices=["replace", "both", "keep"],
                    help="as given to prepare for training")
    fd.add_argument("--insert", default=None, help="as given to prepare for training")
    fd.add_argument("--where", default="block_output", help="as given to prepare for training")
    fd.add_argument("--formats", nargs="+", default=["pt2", "onnx"])
    fd.add_argument("--tol", type=float, default=1e-4)
    fd.add_argument("--device", default="cpu")

    args = parser.parse_args(argv)
    try:
        {"demo": _demo, "stripes": _stripes, "convert": _convert, "bench": _bench,
         "fold": _fold}[args.cmd](args)
    except (ASRError, ValueError) as e:
        print(f"asrfx {args.cmd}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
