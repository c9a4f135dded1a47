"""The ``asrfx`` command line: ``demo``, ``stripes``, ``convert``, ``bench``, ``fold``."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .errors import ASRError, InputError

if TYPE_CHECKING:  # torch loads when a command runs, not for --help
    import torch
    from torch import nn

__all__ = ["main", "load_model", "read_checkpoint", "fold_checkpoint", "check_fits",
           "write_deploy"]


def read_checkpoint(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A state_dict from ``path``, read with ``torch.load(weights_only=True)`` only (no arbitrary
    unpickling); ``{"state_dict": ...}`` wrappers are unwrapped."""
    import torch

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
    from .zoo import build_model, parse_model_spec

    model = build_model(parse_model_spec(spec), num_classes=num_classes,
                        in_channels=in_channels, dims=dims)
    if checkpoint:
        state = read_checkpoint(checkpoint, device)
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shapes differ: say which, and how to build the model
            raise InputError(f"checkpoint {checkpoint!r} does not fit {spec}: "
                             f"{'; '.join(_shape_mismatches(model.state_dict(), state, e)[:3])}; "
                             f"build the model as it was trained (zoo: --num-classes and the "
                             f"data; a factory: its arguments, e.g. module:factory(cin=1, "
                             f"classes=10))") from None
        if result.missing_keys or result.unexpected_keys:
            raise InputError(f"checkpoint {checkpoint!r} does not fit {spec}: missing "
                             f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    return model.to(device)


def check_fits(model: nn.Module, split: Any, spec: str, data: str) -> int:
    """The model's class count, after checking that it takes the data's inputs and has an
    output for every label the data holds.

    Raises:
        InputError: the model fails on two of the data's inputs, or its output has fewer
            classes than the data's labels need; the message says how to build it instead.
    """
    import torch

    x = split.x_test[:2].to(next(model.parameters(), torch.empty(0)).device)
    out = check_takes(model, x, spec, f"build it for {split.in_channels} input channel(s), "
                                      f"e.g. module:factory(cin={split.in_channels})",
                      f"--data {data}'s inputs")
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise InputError(f"--model {spec} returns {getattr(out, 'shape', type(out).__name__)} "
                         f"for a batch of 2; a classifier returning (N, classes) is expected")
    if out.shape[1] < split.num_classes:
        raise InputError(f"--model {spec} outputs {out.shape[1]} classes but --data {data} has "
                         f"labels 0..{split.num_classes - 1}: build it for "
                         f"{split.num_classes} classes (e.g. module:factory(classes="
                         f"{split.num_classes}))")
    return int(out.shape[1])


def check_takes(model: nn.Module, x: Any, spec: str, advice: str,
                what: str = "inputs") -> Any:
    """``model``'s output on ``x`` (one run, eval mode, no grad); an InputError naming the
    model, ``what`` the inputs are, their shape and ``advice`` (what to type) when it fails."""
    import torch

    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(x)
    except Exception as e:  # noqa: BLE001 - the user's model and the shape they gave
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise InputError(f"--model {spec} does not take {what} of shape {tuple(x.shape[1:])} "
                         f"({type(e).__name__}: {first}); {advice}") from None
    finally:
        model.train(was)


def _shape_mismatches(expected: dict, state: dict, error: BaseException) -> list[str]:
    """The entries whose shapes differ between a model's state_dict and a checkpoint's (the
    first lines of load_state_dict's ``error`` when none is found)."""
    import torch

    return [f"{k}: {tuple(state[k].shape)} in the checkpoint, {tuple(v.shape)} in the model"
            for k, v in expected.items() if k in state and isinstance(state[k], torch.Tensor)
            and state[k].shape != v.shape] or \
        [" ".join(ln.strip() for ln in str(error).strip().splitlines()[:3])]


def _demo(args: argparse.Namespace) -> None:
    from .demo import DemoConfig, run_demo
    from .threads import use_threads

    print(use_threads(args.threads))
    run_demo(DemoConfig(dataset=args.data, depth=args.depth, block=args.block,
                        epochs=args.epochs, seeds=args.seeds, batch_size=args.batch_size,
                        lr=args.lr, device=args.device, out=args.out))


def _stripes(args: argparse.Namespace) -> None:
    from tabulate import tabulate

    from .data import batches, load_dataset
    from .stripes import AttentionRecorder, plot_stripes, stripe_report

    split = load_dataset(args.data)
    model = load_model(args.model, args.checkpoint, num_classes=split.num_classes,
                       in_channels=split.in_channels, dims=split.dims, device=args.device)
    check_fits(model, split, args.model, args.data)
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
    import torch

    import asrfx

    from .data import load_dataset
    from .demo import calibrated_form, evaluate
    from .stripes import AttentionRecorder, stripe_report
    from .threads import use_threads

    print(use_threads(args.threads))
    split = load_dataset(args.data)
    device = torch.device(args.device)
    model = load_model(args.model, args.checkpoint, num_classes=split.num_classes,
                       in_channels=split.in_channels, dims=split.dims, device=args.device)
    check_fits(model, split, args.model, args.data)
    before = evaluate(model, split, device)
    x = split.x_test[:2].to(device)
    sample = split.x_test[:256].to(device)
    rows = stripe_report(AttentionRecorder(model, (x,)).record([sample]))
    stripe = sum(r["statistic"] for r in rows) / len(rows) if rows else float("nan")
    prepared = calibrated_form(model, split, x)
    deploy = asrfx.fold(prepared, example_inputs=(x,))
    after = evaluate(deploy, split, device)
    lines = [str(deploy.asrfx_report),
             f"stripe statistic (mean over {len(rows)} sites, {len(sample)} test inputs; "
             f"0 = every input gets the same attention): {stripe:.4f}",
             f"test accuracy on {split.name}: original {before:.2f}%, converted and folded "
             f"{after:.2f}% ({after - before:+.2f} points), without retraining"]
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(prepared.state_dict(), out / "prepared.pt")
        files = write_deploy(deploy, prepared, x, out, args.formats, args.tol,
                             lines + [f"prepared.pt: the calibrated ASR form (asrfx fold "
                                      f"--model {args.model} --checkpoint prepared.pt "
                                      f"folds it again)"], "convert.txt")
        print(f"prepared.pt: {out / 'prepared.pt'} (the calibrated ASR form: fine-tune it, "
              f"then `asrfx fold --model {args.model} --checkpoint prepared.pt`)")
        for k, v in files.items():
            print(f"{k}: {v['path']} (loaded back, relative error {v['rel_err']:.1e})")


def _bench(args: argparse.Namespace) -> None:
    from .threads import use_threads

    from .bench import BenchConfig, compiler_cost, format_cost, format_results, run_bench, \
        write_outputs

    print(use_threads(args.threads))
    if args.malloc == "keep":
        from .bench import allocator_description, keep_freed_memory

        if not keep_freed_memory():
            raise InputError("--malloc keep needs glibc's malloc (mallopt); this process has "
                             "another allocator: drop --malloc")
        print(f"allocator: {allocator_description()}")
    size = args.size[0] if args.size and len(args.size) == 1 else (tuple(args.size) if args.size
                                                                  else None)
    from .zoo import parse_model_spec

    if args.attention and parse_model_spec(args.model).kind != "zoo":
        raise InputError(f"--attention {' '.join(args.attention)}: it chooses the attention of "
                         f"the zoo ResNets (e.g. --model resnet56 --attention eca); "
                         f"{args.model} brings its own attention, which is what is measured: "
                         f"drop --attention")
    if args.data is not None:  # the data's input shape and classes, unless --size says
        from .data import load_dataset

        split = load_dataset(args.data)
        size = size or tuple(split.input_shape)
        args.num_classes = split.num_classes
    if parse_model_spec(args.model).kind == "factory" and not args.cost_only and size:
        import torch

        from .bench import _input_shape

        check_takes(load_model(args.model), torch.randn(2, *_input_shape(size, 64)),
                    args.model, "give --size (the input shape without batch) or --data")
    res: dict = {}
    if not args.cost_only:
        cfg = BenchConfig(model=args.model, attention=tuple(args.attention or ["se"]),
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
                    size: tuple[int, ...] | None = None, num_classes: int = 10,
                    mode: str | None = None, insert: str | None = None,
                    where: str = "block_output", formats: tuple[str, ...] = ("pt2", "onnx"),
                    tol: float = 1e-4, device: str = "cpu", data: str | None = None
                    ) -> dict[str, Any]:
    """Turn a checkpoint of a prepared model into the deploy model, saved without pickle.

    The model is rebuilt from ``spec``, prepared as it was for training (``mode``, ``insert``,
    ``where``), the checkpoint loaded into it, folded, and written as ``deploy.pt2``
    (torch.export) and ``deploy.onnx``; each file is loaded back and checked against the
    prepared model. A checkpoint of the original attention model (no psi) needs psi calibrated
    on data first: with ``data`` that is done here (``init="calibrate"`` on its training
    inputs), without it an error says how. ``size`` (the input shape without batch) defaults
    to the data's, else ``(3, 32, 32)``. Returns what was written and measured.

    Raises:
        InputError: unknown format, a model that cannot be built, a checkpoint that does not
            fit it, an original model's checkpoint without ``data``.
    """
    import torch

    import asrfx

    bad = [f for f in formats if f not in ("pt2", "onnx")]
    if bad:
        raise InputError(f"--formats: unknown {bad}; choose pt2 and/or onnx")
    split = None
    if data is not None:
        from .data import load_dataset

        split = load_dataset(data)
        size = size or tuple(split.input_shape)
        num_classes = split.num_classes
    size = tuple(size or (3, 32, 32))
    model = load_model(spec, None, num_classes=num_classes, in_channels=size[0],
                       dims=len(size) - 1, device=device)
    x = torch.randn(2, *size, device=device)
    check_takes(model, x, spec, "give --size (the input shape without batch) or --data")
    prepared = asrfx.prepare(model, example_inputs=(x,), mode=mode, insert=insert, where=where)
    state = read_checkpoint(checkpoint, device)
    missing = _load_into(prepared, state, checkpoint, spec, f"prepared with mode={mode!r}, "
                                                             f"insert={insert!r}")
    notes = []
    if missing:  # every key but psi: the original attention model's checkpoint
        if split is None:
            raise InputError(
                f"checkpoint {str(checkpoint)!r} has no psi ({len(missing)} missing): it is the "
                f"original attention model's, whose attention depends on the input. Calibrate "
                f"psi on your data first: `asrfx convert --model {spec} --checkpoint "
                f"{checkpoint} --data DATA --out DIR` (it reports the accuracy before and after "
                f"and writes these files too), or give --data DATA here")
        from .demo import calibrated_form

        _load_into(model, state, checkpoint, spec, "(the original model)")
        prepared = calibrated_form(model, split, x, mode=mode, insert=insert, where=where)
        notes.append(f"the checkpoint is the original model's: psi calibrated on {data} "
                     f"({len(split.y_train)} training inputs; init='calibrate')")
    deploy = asrfx.fold(prepared, example_inputs=(x,), tol=tol)
    files = write_deploy(deploy, prepared, x, out, formats, tol,
                         [str(deploy.asrfx_report), *notes], "fold.txt")
    return {"report": str(deploy.asrfx_report), "notes": notes, "files": files}


def _load_into(model: nn.Module, state: dict, checkpoint: str | Path, spec: str,
               how: str) -> list[str]:
    """Load ``state`` into ``model``; the psi it lacks (a prepared model given the original's
    checkpoint). Anything else missing, unexpected or of another shape is an InputError."""
    expected = model.state_dict()
    try:
        res = model.load_state_dict(state, strict=False)
        missing, unexpected = list(res.missing_keys), list(res.unexpected_keys)
    except RuntimeError as e:  # shapes differ: say which, as an InputError
        raise InputError(f"checkpoint {str(checkpoint)!r} does not fit {spec}: "
                         f"{'; '.join(_shape_mismatches(expected, state, e)[:3])}; build the "
                         f"model as it was trained (--num-classes, --size or --data, the "
                         f"factory's arguments)") from None
    other = [k for k in missing if not k.endswith("psi")]
    if other or unexpected:
        raise InputError(f"checkpoint {str(checkpoint)!r} does not fit {spec} {how}: "
                         f"{len(other)} of the model's {len(expected)} keys missing "
                         f"{other[:5]}, {len(unexpected)} unexpected {unexpected[:5]}; check "
                         f"--model (is it this model's checkpoint?), and give the options the "
                         f"model was prepared with")
    return [k for k in missing if k.endswith("psi")]


def write_deploy(deploy: nn.Module, prepared: nn.Module, x: Any, out: str | Path,
                 formats: Sequence[str], tol: float, lines: list[str], note: str
                 ) -> dict[str, dict[str, Any]]:
    """Write ``deploy`` as ``deploy.pt2`` / ``deploy.onnx`` in ``out``, load each back and
    check it against ``prepared`` in eval mode; ``lines`` and one line per file go to the text
    file ``note``. Returns format -> {"path", "rel_err"}."""
    from . import runtimes

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prepared.eval()
    files: dict[str, dict[str, Any]] = {}
    if "pt2" in formats:
        path = runtimes.export_program(deploy, (x,), out / "deploy.pt2")
        files["pt2"] = {"path": str(path),
                        "rel_err": runtimes.check_program(prepared, (x,), path, tol=tol)}
    if "onnx" in formats:
        path = runtimes.export_onnx(deploy, (x,), out / "deploy.onnx")
        files["onnx"] = {"path": str(path),
                         "rel_err": runtimes.check_onnx(prepared, (x,), path, tol=tol)}
    lines = lines + [f"{k}: {v['path']} (loaded back: relative error {v['rel_err']:.1e} "
                     f"against the prepared model)" for k, v in files.items()]
    (out / note).write_text("\n".join(lines) + "\n")
    return files


def _fold(args: argparse.Namespace) -> None:
    res = fold_checkpoint(args.model, args.checkpoint, args.out,
                          size=tuple(args.size) if args.size else None,
                          num_classes=args.num_classes, mode=args.mode, insert=args.insert,
                          where=args.where, formats=tuple(args.formats), tol=args.tol,
                          device=args.device, data=args.data)
    print(res["report"])
    for n in res["notes"]:
        print(f"note: {n}")
    for k, v in res["files"].items():
        print(f"{k}: {v['path']} (loaded back, relative error {v['rel_err']:.1e})")


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="asrfx", description="ASR on torch.fx: train with "
                                     "channel attention, deploy without it.", formatter_class=fmt)
    sub = parser.add_subparsers(dest="cmd", required=True)
    data_help = ("digits (bundled with scikit-learn), mnist1d, cifar10:DIR, cifar100:DIR, or "
                 "your own: FILE.npz (arrays x: inputs N x C x ..., y: labels), a DIR of class "
                 "folders of images, or module:function returning (inputs, labels) batches")
    model_help = ("resnet20-se, resnet164 ... (CIFAR ResNets), monai-seresnet50, "
                  "efficientnet-b0, or module:factory / module:factory(cin=1) from the working "
                  "directory")
    device_help = "torch device (cpu, cuda, cuda:1, ...)"

    demo = sub.add_parser("demo", formatter_class=fmt,
                          help="train backbone/+SE/+ASR(SE)/+ASR(SE)+SE on real data, fold, "
                               "report accuracy, cost and stripes")
    demo.add_argument("--data", "--dataset", dest="data", default="digits", help=data_help)
    demo.add_argument("--depth", type=int, default=20, help="CIFAR ResNet depth")
    demo.add_argument("--block", default="basic", choices=["basic", "bottleneck"],
                      help="ResNet block")
    demo.add_argument("--epochs", type=int, default=12, help="training epochs per run")
    demo.add_argument("--seeds", type=int, default=5, help="runs per variant")
    demo.add_argument("--batch-size", type=int, default=64, help="training batch size")
    demo.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    demo.add_argument("--device", default="cpu", help=device_help)
    demo.add_argument("--threads", type=int, default=0,
                      help="torch threads (0: the cores other processes leave free)")
    demo.add_argument("--out", default=None, help="write results.md/.json and PNGs here")

    st = sub.add_parser("stripes", formatter_class=fmt,
                        help="attention vectors of every site over data: the stripe statistic "
                             "per site and heatmaps")
    st.add_argument("--model", required=True, help=model_help)
    st.add_argument("--checkpoint", default=None, help="state_dict of the model (weights only)")
    st.add_argument("--data", "--dataset", dest="data", default="digits", help=data_help)
    st.add_argument("--limit", type=int, default=500, help="number of test inputs")
    st.add_argument("--device", default="cpu", help=device_help)
    st.add_argument("--out", default=None, help="write stripes.png here")

    cv = sub.add_parser("convert", formatter_class=fmt,
                        help="training-free conversion of a trained attention model: psi "
                             "calibrated on data, folded, accuracy before/after")
    cv.add_argument("--model", required=True, help=model_help)
    cv.add_argument("--checkpoint", required=True, help="state_dict of the trained model")
    cv.add_argument("--data", "--dataset", dest="data", default="digits", help=data_help)
    cv.add_argument("--device", default="cpu", help=device_help)
    cv.add_argument("--out", default=None,
                    help="write deploy.pt2 / deploy.onnx (loaded back and checked), the "
                         "calibrated prepared.pt and convert.txt here")
    cv.add_argument("--formats", nargs="+", default=["pt2", "onnx"], choices=["pt2", "onnx"],
                    help="deploy files to write with --out")
    cv.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: the cores other processes leave free)")
    cv.add_argument("--tol", type=float, default=1e-4,
                    help="largest relative error accepted for the fold and each file")

    bn = sub.add_parser("bench", formatter_class=fmt,
                        help="latency, FLOPs, training-step time and peak training memory "
                             "of the backbone, the attention model and its ASR forms, side by "
                             "side")
    bn.add_argument("--model", default="resnet164", help=model_help)
    bn.add_argument("--attention", nargs="+", default=None,
                    help="library attention(s) in every block of a zoo ResNet, or 'all' "
                         "(default: se); other models bring their own")
    bn.add_argument("--data", "--dataset", dest="data", default=None,
                    help="take the input shape and class count from this data: " + data_help)
    bn.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="batch sizes timed")
    bn.add_argument("--reps", type=int, default=30, help="timed rounds per batch size")
    bn.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    bn.add_argument("--train-batch", type=int, default=32, help="batch of the training step")
    bn.add_argument("--train-reps", type=int, default=10,
                    help="timed training steps per trainable form (its peak memory is measured "
                         "on a step before them); 0 skips the training step and its memory")
    bn.add_argument("--size", type=int, nargs="+", default=None,
                    help="input size: one int (square RGB image) or the full shape without "
                         "batch, e.g. 3 32 32 (default: the data's, else 32 for the zoo, 64 "
                         "otherwise)")
    bn.add_argument("--num-classes", type=int, default=100,
                    help="classes of zoo and third-party models (the data's with --data)")
    bn.add_argument("--runtimes", nargs="*", default=["onnx"],
                    help="also time the backbone and the folded model in these runtimes: "
                         "onnx, compile (none: no value)")
    bn.add_argument("--device", default="cpu", help=device_help)
    bn.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: the cores other processes leave free)")
    bn.add_argument("--malloc", default="default", choices=["default", "keep"],
                    help="keep: glibc malloc keeps freed memory for reuse (mallopt; no page "
                         "faults on every large activation; README: CPU deployment)")
    bn.add_argument("--cost", action="store_true",
                    help="also measure prepare/fold time against graph size")
    bn.add_argument("--cost-only", action="store_true", help="only the compiler cost")
    bn.add_argument("--cost-depths", type=int, nargs="+",
                    default=[20, 56, 110, 164, 326, 650, 1001], help="ResNet depths of --cost")
    bn.add_argument("--cost-reps", type=int, default=3, help="runs per depth of --cost")
    bn.add_argument("--quiet", action="store_true", help="no progress bar")
    bn.add_argument("--out", default=None, help="write bench.json, bench.md and PNGs here")

    fd = sub.add_parser("fold", formatter_class=fmt,
                        help="checkpoint of a prepared model -> deploy model saved as "
                             "torch.export (.pt2) and ONNX, each loaded back and checked")
    fd.add_argument("--model", required=True, help=model_help)
    fd.add_argument("--checkpoint", required=True, help="state_dict of the prepared model")
    fd.add_argument("--out", required=True, help="folder for deploy.pt2, deploy.onnx, fold.txt")
    fd.add_argument("--size", type=int, nargs="+", default=None,
                    help="input shape without batch (default: the data's, else 3 32 32)")
    fd.add_argument("--data", "--dataset", dest="data", default=None,
                    help="calibrate psi on this data when the checkpoint is the original "
                         "attention model's: " + data_help)
    fd.add_argument("--num-classes", type=int, default=10, help="classes of zoo models")
    fd.add_argument("--mode", default=None, choices=["replace", "both", "keep"],
                    help="as given to prepare for training (None: prepare's default)")
    fd.add_argument("--insert", default=None, help="as given to prepare for training")
    fd.add_argument("--where", default="block_output", help="as given to prepare for training")
    fd.add_argument("--formats", nargs="+", default=["pt2", "onnx"], choices=["pt2", "onnx"],
                    help="files to write")
    fd.add_argument("--tol", type=float, default=1e-4,
                    help="largest relative error accepted for the fold and each file")
    fd.add_argument("--device", default="cpu", help=device_help)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``asrfx`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        {"demo": _demo, "stripes": _stripes, "convert": _convert, "bench": _bench,
         "fold": _fold}[args.cmd](args)
    except (ASRError, ValueError) as e:
        print(f"asrfx {args.cmd}: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the user gave: a folder that cannot be made, a full disk...
        where = f" {e.filename!r}" if e.filename else ""
        print(f"asrfx {args.cmd}: cannot use{where}: {e.strerror or e}; give a path you can "
              f"write to (--out) or read from (--checkpoint, --data)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
