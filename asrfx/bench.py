"""Latency and cost reports: the backbone, the attention model and its ASR forms, side by side.

``asrfx bench`` (see :func:`run_bench`) times, in one process and interleaved round by round after
warm-up, with the thread count fixed:

* ``backbone`` -- the model without attention (the zoo's plain network, or for any other model
  the traced model with every attention multiply bypassed: :func:`strip_attention`);
* ``backbone fused`` -- the backbone with BN fused by :func:`asrfx.fold` (what a deployment
  toolchain would run);
* ``+<att>`` -- the model with its input-dependent attention (eager);
* ``ASR(<att>) train form`` -- :func:`asrfx.prepare`'s output in eval mode;
* ``ASR(<att>) fused train form`` -- ``prepare(..., fused=True)``: each gate through its
  BatchNorm's affine (one multiply per channel instead of per element);
* ``ASR(<att>) folded`` -- :func:`asrfx.fold` of it: the deploy form;
* ``ASR(<att>) BN-only fold`` -- the reference implementation's deploy: the constant attention
  folded into the BatchNorm, BN kept unfused (``fold(..., fuse_bn=False)``).

Columns: parameters, FLOPs (``torch.utils.flop_counter``, batch 1), latency median and p90 per
batch size, images/s, ratio to the backbone, and the training step (forward + backward + SGD step)
of the trainable forms with its ratio to the backbone's, and that step's peak memory
(:func:`peak_step_memory`) with its ratio to the backbone's. Optional runtimes: the backbone and
the folded model in ONNX Runtime and under ``torch.compile``. :func:`compiler_cost` measures the
compiler itself against graph size.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError
from .zoo import THIRD_PARTY, build_model, parse_model_spec

__all__ = ["keep_freed_memory", "allocator_description", "speed_probe", "format_speed",
           "BenchConfig", "run_bench", "format_results", "write_outputs", "strip_attention",
           "compiler_cost", "machine_description", "time_interleaved", "build_models",
           "peak_step_memory", "ratio_interval", "THIRD_PARTY"]

@dataclass
class BenchConfig:
    """What ``asrfx bench`` runs. ``attention`` names library attentions ("all" for every one);
    ``model`` is a model spec (:func:`asrfx.zoo.parse_model_spec`): a zoo name
    (resnet20/56/110/164/1001..., its ``-se`` suffix aside: the zoo ResNets get each of
    ``attention``), a third-party name (see :data:`THIRD_PARTY`) or ``package.module:factory``
    returning a model with attention."""

    model: str = "resnet164"
    attention: Sequence[str] = ("se",)
    batches: Sequence[int] = (1, 32)
    reps: int = 30
    warmup: int = 3
    train_batch: int = 32
    train_reps: int = 10
    image_size: int | tuple[int, ...] | None = None
    num_classes: int = 100
    threads: int | None = None
    device: str = "cpu"
    runtimes: Sequence[str] = ("onnx",)
    seed: int = 0
    progress: bool = True


def machine_description(device: torch.device | str = "cpu") -> str:
    """CPU model, cores, threads and torch version (and the GPU, on CUDA)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    text = (f"{cpu}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}, {platform.system()} {platform.machine()}")
    if torch.device(device).type == "cuda":
        text += f", GPU {torch.cuda.get_device_name(torch.device(device))}"
    return text + f", allocator: {allocator_description()}"


def speed_probe(reps: int = 5) -> dict[str, float]:
    """How fast this machine runs right now, in milliseconds (the best of ``reps`` timings): a
    fixed pure-Python loop (two million additions: what the compiler's graph work is made of)
    and 20 products of 512x512 float32 matrices on the CPU with the current torch threads
    (what model runs on the CPU are made of; on a GPU bench it still describes the host).

    A shared virtual machine's speed drifts within minutes: on the project's 2-core Intel Xeon
    machine the loop took 72-112 ms and the products 33-43 ms within one hour, and ResNet-164's
    prepare + fold 0.41 s and 0.49 s in two runs of 15 repetitions minutes apart, in step with
    the probe. ``asrfx bench`` records the probe before and after its measurements, so that two
    runs are compared on the machine speed they had."""
    a = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    loop, mm = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        total = 0
        for i in range(2_000_000):
            total += i
        t1 = time.perf_counter()
        for _ in range(20):
            a @ a
        mm.append(time.perf_counter() - t1)
        loop.append(t1 - t0)
    return {"python_loop_ms": 1000 * min(loop), "matmul_ms": 1000 * min(mm)}


def format_speed(speed: dict[str, dict[str, float]]) -> str:
    """One line: the :func:`speed_probe` before and after a run."""
    b, a = speed["before"], speed["after"]
    return (f"speed probe (before / after; lower is faster): Python loop "
            f"{b['python_loop_ms']:.0f} / {a['python_loop_ms']:.0f} ms, 20 matmuls 512x512 "
            f"{b['matmul_ms']:.0f} / {a['matmul_ms']:.0f} ms")


#: what :func:`keep_freed_memory` set with ``mallopt`` in this process (name -> value)
_MALLOPT: dict[str, int] = {}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
_MMAP_MAX_THRESHOLD = 32 * 1024 * 1024  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit


def keep_freed_memory() -> bool:
    """Make glibc malloc keep the memory torch frees for the next allocation, in this process:
    blocks up to 32 MiB come from the heap (``M_MMAP_THRESHOLD``) and the heap is never trimmed
    (``M_TRIM_THRESHOLD``), as ``MALLOC_MMAP_THRESHOLD_=33554432
    MALLOC_TRIM_THRESHOLD_=4294967296`` in the environment would. Under glibc's defaults every
    large CPU activation is a fresh mapping (or a re-grown heap) whose pages fault in on first
    touch: ResNet-164 at batch 16, one thread, 2-core AMD EPYC: 34,000 page faults and 215 ms
    per inference; with both settings none and 131 ms (the folded model 208 -> 116 ms), and the
    run-to-run spread gone. Setting only the mmap threshold was slower (303 ms, 88,000 faults):
    the heap is then trimmed and re-grown instead. Returns False where there is no glibc."""
    import ctypes
    import ctypes.util

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX_THRESHOLD) == 1 and \
            libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1
    except (OSError, AttributeError):
        return False
    if ok:
        _MALLOPT.update(M_MMAP_THRESHOLD=_MMAP_MAX_THRESHOLD, M_TRIM_THRESHOLD=2 ** 31 - 1)
    return ok


def allocator_description() -> str:
    """The C allocator torch's CPU tensors come from and the settings that change its speed:
    glibc malloc (its version) unless a jemalloc/tcmalloc is preloaded, and any ``MALLOC_*``
    tuning variables. Large CPU activations are fresh ``mmap`` regions under glibc's defaults;
    their page faults can dominate CPU latency (README: CPU deployment)."""
    preload = os.environ.get("LD_PRELOAD", "")
    name = next((n for n in ("jemalloc", "tcmalloc", "mimalloc") if n in preload), None)
    if name is None:
        lib, version = platform.libc_ver()
        name = f"{lib or 'libc'} {version}".strip() + " malloc"
    tuning = sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith("MALLOC_"))
    tuning += [f"mallopt {k}={v}" for k, v in _MALLOPT.items()]
    return name + (f" ({', '.join(tuning)})" if tuning else " (default settings)")


def strip_attention(model: nn.Module, example_inputs: tuple,
                    leaf_modules: Sequence[Any] = ()) -> nn.Module:
    """The model with every channel-attention site bypassed (``x * g -> x``, ``x + g -> x``),
    the attention branches removed: the backbone of a model nobody wrote a plain version of.

    Captures a copy of ``model`` (``leaf_modules`` as for :func:`asrfx.trace`), records its
    shapes on ``example_inputs`` and runs the pass
    :func:`asrfx.passes.strip_attention.strip_attention` on its graphs. The result is a
    GraphModule (a :class:`asrfx.DualModeGraphModule` for models whose modes differ) in the
    model's train/eval mode; ``model`` is untouched.
    """
    from .capture import capture
    from .passes.graph_utils import clone_module
    from .passes.shapes import propagate_shapes
    from .passes.strip_attention import strip_attention as strip_pass

    tr = capture(clone_module(model), example_inputs, leaf_modules)
    graphs = tr.modules()
    for gm in graphs:
        propagate_shapes(gm, example_inputs)
    strip_pass(graphs)
    out = tr.build()
    out.train(model.training)
    return out


def build_models(cfg: BenchConfig, attention: str | None) -> tuple[nn.Module, nn.Module | None,
                                                                      tuple[int, ...]]:
    """(model with attention, its plain backbone or None, input shape without batch).

    ``cfg.model`` is read by :func:`asrfx.zoo.parse_model_spec` and built by
    :func:`asrfx.zoo.build_model`: a zoo ResNet with ``attention`` in every block and its plain
    twin (32x32 RGB inputs unless ``cfg.image_size``), a third-party model (64x64 by default)
    or a factory's model (``cfg.image_size`` required); the last two have no plain twin.

    Raises:
        InputError: an unknown spec, a factory that cannot be loaded, no input size for one.
    """
    spec = parse_model_spec(cfg.model)
    torch.manual_seed(cfg.seed)
    if cfg.image_size is None and spec.kind == "factory":
        raise InputError(f"--model {cfg.model!r}: give the input size with --size "
                         f"(e.g. --size 3 32 32)")
    shape = _input_shape(cfg.image_size, 32 if spec.kind == "zoo" else 64)
    if spec.kind == "zoo":
        make = lambda att: build_model(spec, attention=att, num_classes=cfg.num_classes,  # noqa: E731
                                       in_channels=shape[0], dims=len(shape) - 1)
        return make(attention), make(None), shape
    return build_model(spec, num_classes=cfg.num_classes), None, shape


def _input_shape(size: Any, default: int) -> tuple[int, ...]:
    """``(C, *spatial)`` of one example from ``--size``: a side (``32`` -> RGB 32x32), a list
    ``[C, *spatial]`` (``[3, 32, 32]``), or None (RGB ``default`` x ``default``)."""
    if size is None:
        return (3, default, default)
    if isinstance(size, (list, tuple)):
        if len(size) == 1:
            return (3, int(size[0]), int(size[0]))
        return tuple(int(v) for v in size)
    return (3, int(size), int(size))


def time_interleaved(calls: dict[str, Callable[[], Any]], reps: int, warmup: int = 3,
                     sync: Callable[[], None] = lambda: None, progress: Any = None
                     ) -> dict[str, list[float]]:
    """Seconds per call of each function, timed round by round (each round calls every function
    once, in an order rotated by one each round, so no variant always runs first)."""
    names = list(calls)
    for name in names:
        for _ in range(warmup):
            calls[name]()
    sync()
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            sync()
            t = time.perf_counter()
            calls[name]()
            sync()
            times[name].append(time.perf_counter() - t)
            if progress is not None:
                progress.update(1)
    return times


def ratios_settled(times: dict[str, list[float]], tol: float = 0.03) -> bool:
    """Each variant's median over the first variant's agrees within ``tol`` between the first
    and the second half of the samples (the ratios a report quotes have settled)."""
    names = list(times)
    if len(names) < 2 or min(len(v) for v in times.values()) < 4:
        return True

    def ratios(half: slice) -> list[float]:
        base = statistics.median(times[names[0]][half])
        return [statistics.median(times[n][half]) / base for n in names[1:]]

    n = min(len(v) for v in times.values())
    first, second = slice(0, n // 2), slice(n // 2, n)
    return all(abs(a - b) <= tol * a for a, b in zip(ratios(first), ratios(second)))


def timed_until_stable(calls: dict[str, Callable[[], Any]], reps: int, warmup: int = 3,
                       sync: Callable[[], None] = lambda: None, progress: Any = None,
                       max_rounds: int = 3) -> tuple[dict[str, list[float]], int]:
    """:func:`time_interleaved` rounds of ``reps`` until the ratios to the first variant agree
    between the two halves of the samples (:func:`ratios_settled`), ``max_rounds`` at most;
    (samples, rounds). A machine whose latencies drift (another process, the allocator's page
    faults) gets more samples instead of a ratio one half of the run contradicts."""
    times = time_interleaved(calls, reps, warmup, sync, progress)
    rounds = 1
    while rounds < max_rounds and not ratios_settled(times):
        more = time_interleaved(calls, reps, 0, sync, None)
        times = {k: times[k] + more[k] for k in times}
        rounds += 1
    return times, rounds


def ratio_interval(base: Sequence[float], samples: Sequence[float], level: float = 0.95
                   ) -> tuple[float, float]:
    """A ``level`` confidence interval of ``median(samples) / median(base)``: a paired
    percentile bootstrap over the rounds of :func:`time_interleaved` (sample ``i`` of both
    lists ran in round ``i``, side by side, so a slow round slows both), 2,000 resamples with a
    fixed seed (``scipy.stats.bootstrap``). On a machine whose step times swing by 10-20% from
    step to step (a shared virtual machine) a ratio of 20 steps per variant can be several
    percent off; the interval says how far.

    Raises:
        ValueError: the lists differ in length or hold fewer than 3 samples.
    """
    from scipy.stats import bootstrap

    if len(base) != len(samples) or len(base) < 3:
        raise ValueError(f"need two paired lists of at least 3 samples, got {len(base)} and "
                         f"{len(samples)}")
    if all(a == b for a, b in zip(base, samples)):  # (one variant timed against itself)
        return 1.0, 1.0
    res = bootstrap((list(base), list(samples)),
                    lambda b, s: statistics.median(s) / statistics.median(b), paired=True,
                    vectorized=False, n_resamples=2000, confidence_level=level,
                    method="percentile", random_state=0)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _p(samples: list[float], q: float) -> float:
    s = sorted(samples)
    i = min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))
    return s[i]


def _count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _flops(m: nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    # with autograd on: the module tracker hooks a parameter passed straight into a submodule
    # (psi into the excitation) and fails on it under no_grad; only the forward is counted
    counter = FlopCounterMode(display=False)
    with counter:
        m(x)
    return int(counter.get_total_flops())


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One SGD step (forward, cross-entropy, backward, update) on a private copy of ``model``."""
    m = copy.deepcopy(model).train()
    opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(m(x), y).backward()
        opt.step()
    return step


#: name of the profiler range around the measured step in :func:`peak_step_memory`
_MEASURED_STEP = "asrfx::peak_step_memory"


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """File descriptor 2 goes to /dev/null inside (some torch builds' profilers print a line
    on every start and stop from C++, which Python's ``sys.stderr`` cannot catch); Python
    exceptions still propagate as usual."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real stderr (an embedding host)
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_step_memory(step: Callable[[], Any], device: torch.device | str = "cpu",
                     warmup: int = 1) -> int:
    """Peak memory of one call of ``step`` above what was allocated when it began, in bytes:
    the largest value (0 at least) that the bytes torch allocated during the call less the bytes
    it freed during the call reaches. Counted: the tensors the call allocates (for a training
    step the activations saved for backward, the new gradients, temporaries) less those alive
    at its start that it frees (the last step's gradients, under
    ``zero_grad(set_to_none=True)``). Not counted: what stays allocated throughout (parameters,
    optimizer state, inputs).

    ``step`` is called ``warmup`` times first and then once more, measured: for a training step
    (:func:`_train_step`) after the warm-up the optimizer's momentum buffers exist and the
    gradients of the last call are what ``zero_grad(set_to_none=True)`` frees, as in every step
    of a training run after the first.

    On CUDA: ``torch.cuda.max_memory_allocated`` over the measured call less
    ``torch.cuda.memory_allocated`` before it (the caching allocator's blocks, rounded up to
    512 bytes). On CPU: torch's profiler with ``profile_memory=True`` around the warm-up and the
    measured call; its allocation and free events of the CPU allocator (signed sizes) inside the
    measured call, in time order, summed up, and the largest running sum taken. The warm-up
    runs under the profiler too: the profiler knows the size of a block freed only if it saw
    the block allocated, so the gradients a step frees must come from a profiled call. Memory
    that is not a torch CPU tensor (a library's own scratch buffers, the Python objects) is not
    seen. Both are deterministic for a deterministic step, unlike the process's RSS.

    Raises:
        ValueError: a device other than CPU and CUDA.
    """
    device = torch.device(device)
    if device.type == "cuda":
        for _ in range(warmup):
            step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    if device.type != "cpu":
        raise ValueError(f"peak_step_memory: device {device} (CPU and CUDA only)")
    from torch.profiler import ProfilerActivity, profile, record_function

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU],
                                     profile_memory=True) as prof:
        for _ in range(warmup):
            step()
        with record_function(_MEASURED_STEP):
            step()
    # the raw events (no per-operator tables built); memory events are named "[memory]" and
    # carry the signed size of one allocation (+) or free (-)
    events = prof.profiler.kineto_results.events()
    mark = next(e for e in events if e.name() == _MEASURED_STEP)
    t0, t1 = mark.start_ns(), mark.end_ns()
    cpu = torch.autograd.DeviceType.CPU
    deltas = sorted((e.start_ns(), i, e.nbytes()) for i, e in enumerate(events)
                    if e.name() == "[memory]" and e.device_type() == cpu
                    and t0 <= e.start_ns() <= t1)
    level = peak = 0
    for _, _, nbytes in deltas:
        level += nbytes
        peak = max(peak, level)
    return peak


def _variants(cfg: BenchConfig, x1: torch.Tensor, device: torch.device
              ) -> tuple[dict[str, nn.Module], dict[str, nn.Module], dict[str, Any]]:
    """(eval forms by name, trainable forms by name, notes)."""
    import asrfx
    from .check import full_fp32_precision, relative_error

    evals: dict[str, nn.Module] = {}
    trains: dict[str, nn.Module] = {}
    notes: dict[str, Any] = {}
    atts = list(cfg.attention)
    if atts == ["all"]:
        from .attention import ATTENTIONS

        atts = sorted(ATTENTIONS)
    zoo = parse_model_spec(cfg.model).kind == "zoo"
    if not zoo:
        atts = atts[:1]  # the model brings its own attention; --attention is for the zoo
    for i, att in enumerate(atts):
        model, backbone, _ = build_models(cfg, att)
        model = model.to(device)
        label = att if zoo else "attention"
        if i == 0:
            if backbone is None:
                backbone = strip_attention(model, (x1,))
                notes["backbone"] = "attention bypassed in the traced model (strip_attention)"
            backbone = backbone.to(device).eval()
            evals["backbone"] = backbone
            trains["backbone"] = backbone
            evals["backbone fused"] = asrfx.fold(backbone, example_inputs=(x1,))
        model.eval()
        prepared = asrfx.prepare(model, example_inputs=(x1,))
        prepared.eval()
        evals[f"+{label}"] = model
        trains[f"+{label}"] = model
        evals[f"ASR({label}) train form"] = prepared
        trains[f"ASR({label}) train form"] = prepared
        # the same form with each gate through its BatchNorm's affine (prepare(fused=True))
        fused = asrfx.prepare(model, example_inputs=(x1,), fused=True).eval()
        evals[f"ASR({label}) fused train form"] = fused
        trains[f"ASR({label}) fused train form"] = fused
        deploy = asrfx.fold(prepared, example_inputs=(x1,))
        evals[f"ASR({label}) folded"] = deploy
        evals[f"ASR({label}) BN-only fold"] = asrfx.fold(prepared, example_inputs=(x1,),
                                                         fuse_bn=False)
        rep = deploy.asrfx_report
        with torch.no_grad(), full_fp32_precision():
            err = relative_error(prepared(x1), deploy(x1))
        converted = prepared.asrfx_report.count(action="converted")
        notes[label] = {"converted": converted, "folded": rep.count(action="folded"),
                        "kept": rep.count(action="kept"), "fold_rel_err": err}
        if not converted:
            notes["no attention"] = (f"{cfg.model} has no channel attention asrfx converts: "
                                     f"its ASR rows are the model itself (prepare's report: "
                                     f"{str(prepared.asrfx_report).splitlines()[0]})")
    return evals, trains, notes


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Build every variant, time them, and return the results as plain data (see module doc)."""
    from tqdm.auto import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device on this machine; use --device cpu")
    if any(b < 1 for b in cfg.batches) or cfg.reps < 1:
        raise InputError(f"batch sizes and --reps must be positive, got {list(cfg.batches)} and "
                         f"{cfg.reps}")
    _, _, shape = build_models(cfg, None if parse_model_spec(cfg.model).kind == "zoo" else "se")
    before = speed_probe()
    gen = torch.Generator().manual_seed(cfg.seed)
    x1 = torch.randn(1, *shape, generator=gen).to(device)
    evals, trains, notes = _variants(cfg, x1, device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    runtimes = _runtime_calls(cfg, evals, x1)
    n_calls = (len(evals) + sum(len(r["calls"]) for r in runtimes.values())) * \
        len(cfg.batches) * cfg.reps + (len(trains) * cfg.train_reps if cfg.train_reps else 0)
    rows: list[dict[str, Any]] = []
    with tqdm(total=n_calls, desc=f"bench {cfg.model}", unit="call",
              disable=not cfg.progress) as bar:
        for name, m in evals.items():
            rows.append({"variant": name, "params": _count_params(m), "flops": _flops(m, x1),
                         "latency": {}, "train": None})
        by_name = {r["variant"]: r for r in rows}
        for b in cfg.batches:
            x = torch.randn(b, *shape, generator=gen).to(device)
            calls = {}
            for name, m in evals.items():
                calls[name] = (lambda m=m: m(x))
            for rt, info in runtimes.items():
                for name, fn in info["calls"].items():
                    calls[f"{name} [{rt}]"] = (lambda fn=fn: fn(x))
            with torch.no_grad():
                times, rounds = timed_until_stable(calls, cfg.reps, cfg.warmup, sync, bar)
            notes.setdefault("rounds", {})[str(b)] = rounds
            for name, samples in times.items():
                if name not in by_name:
                    base, _, rt = name.rpartition(" [")
                    by_name[name] = {"variant": name, "params": by_name[base]["params"],
                                     "flops": by_name[base]["flops"], "latency": {},
                                     "train": None, "runtime": rt.rstrip("]")}
                    rows.append(by_name[name])
                med = statistics.median(samples)
                by_name[name]["latency"][str(b)] = {
                    "median_ms": 1000 * med, "p90_ms": 1000 * _p(samples, 0.9),
                    "images_per_s": b / med, "samples": len(samples)}
        if cfg.train_reps:
            xt = torch.randn(cfg.train_batch, *shape, generator=gen).to(device)
            # targets for the classes the model outputs (a factory's model has its own count)
            with torch.no_grad():
                classes = next(iter(trains.values()))(xt[:2]).shape[-1] if trains else \
                    cfg.num_classes
            yt = torch.randint(0, classes, (cfg.train_batch,), generator=gen).to(device)
            steps = {name: _train_step(m, xt, yt) for name, m in trains.items()}
            # peak memory first, on fresh steps: its warm-up (which creates the gradients and
            # the momentum buffers) runs under the profiler too (see peak_step_memory)
            peaks = {name: peak_step_memory(step, device) for name, step in steps.items()}
            train_times = time_interleaved(steps, cfg.train_reps, 1, sync, bar)
            for name, samples in train_times.items():
                by_name[name]["train"] = {"median_ms": 1000 * statistics.median(samples),
                                          "p90_ms": 1000 * _p(samples, 0.9),
                                          "batch": cfg.train_batch,
                                          "peak_bytes": peaks[name],
                                          "peak_mib": peaks[name] / 2 ** 20}
    base = by_name["backbone"]
    for r in rows:
        for b, lat in r["latency"].items():
            lat["ratio"] = lat["median_ms"] / base["latency"][b]["median_ms"]
        if r["train"] is not None:
            r["train"]["ratio"] = r["train"]["median_ms"] / base["train"]["median_ms"]
            if cfg.train_reps >= 3:
                r["train"]["ratio_ci95"] = list(ratio_interval(train_times["backbone"],
                                                                train_times[r["variant"]]))
            r["train"]["peak_ratio"] = (r["train"]["peak_bytes"] /
                                        max(1, base["train"]["peak_bytes"]))
    return {"config": {k: (list(v) if isinstance(v, tuple) else v)
                       for k, v in asdict(cfg).items()},
            "machine": machine_description(device), "rows": rows, "notes": notes,
            "speed": {"before": before, "after": speed_probe()},
            "runtimes": {k: v["status"] for k, v in runtimes.items()},
            # the project's own targets are about its benchmark models, not a user's
            "targets": _targets(rows, cfg) if parse_model_spec(cfg.model).kind == "zoo" else []}


def _runtime_calls(cfg: BenchConfig, evals: dict[str, nn.Module], x1: torch.Tensor
                   ) -> dict[str, dict[str, Any]]:
    """ONNX Runtime / torch.compile versions of the backbone and of the folded model."""
    import tempfile

    wanted = [n for n in evals if n == "backbone" or n.endswith(") folded")]
    out: dict[str, dict[str, Any]] = {}
    for rt in cfg.runtimes:
        calls: dict[str, Callable] = {}
        status = "ok"
        try:
            from . import runtimes as R
        except ImportError as e:  # pragma: no cover - the module ships with the package
            out[rt] = {"calls": {}, "status": f"unavailable: {e}"}
            continue
        if rt == "onnx":
            if x1.device.type != "cpu":
                out[rt] = {"calls": {}, "status": "skipped: ONNX Runtime is timed on CPU only"}
                continue
            tmp = Path(tempfile.mkdtemp(prefix="asrfx_bench_"))
            try:
                for i, name in enumerate(wanted):
                    path = R.export_onnx(evals[name], (x1,), tmp / f"v{i}.onnx")
                    sess = R.onnx_session(path, threads=torch.get_num_threads())
                    calls[name] = (lambda x, s=sess: R.run_onnx(s, x))
            except Exception as e:  # noqa: BLE001 - reported in the table header instead
                status = f"unavailable: {str(e).splitlines()[0]}"
                calls = {}
        elif rt == "compile":
            for name in wanted:
                compiled, why = R.compiled(evals[name], (x1,))
                if compiled is None:
                    status = f"unavailable: {why}"
                    calls = {}
                    break
                calls[name] = compiled
        else:
            raise InputError(f"--runtimes: unknown runtime {rt!r}; choose onnx and/or compile")
        out[rt] = {"calls": calls, "status": status}
    return out


def _targets(rows: list[dict[str, Any]], cfg: BenchConfig) -> list[dict[str, Any]]:
    """The README's targets, evaluated on this run."""
    by = {r["variant"]: r for r in rows}
    out = []
    folded = [r for r in rows if r["variant"].endswith(") folded")]
    for r in folded:
        for b, lat in r["latency"].items():
            out.append({"target": f"{r['variant']} <= 1.00x backbone at batch {b}",
                        "value": round(lat["ratio"], 3), "met": lat["ratio"] <= 1.0})
        if "1" in r["latency"]:
            out.append({"target": f"{r['variant']} <= 0.90x backbone at batch 1 (aim)",
                        "value": round(r["latency"]["1"]["ratio"], 3),
                        "met": r["latency"]["1"]["ratio"] <= 0.9})
    for r in rows:
        if r["variant"].endswith("train form") and r["train"] is not None:
            limit = 1.03 if r["variant"].endswith("fused train form") else 1.10
            ci = r["train"].get("ratio_ci95")
            out.append({"target": f"{r['variant']} training step <= {limit:.2f}x backbone",
                        "value": round(r["train"]["ratio"], 3),
                        "met": r["train"]["ratio"] <= limit,
                        **({"ci95": [round(v, 3) for v in ci]} if ci else {})})
            if r["variant"].endswith("fused train form"):
                out.append({"target": f"{r['variant']} training peak memory <= 1.02x backbone",
                            "value": round(r["train"]["peak_ratio"], 3),
                            "met": r["train"]["peak_ratio"] <= 1.02})
    for r in folded:
        onnx = by.get(f"{r['variant']} [onnx]")
        base = by.get("backbone [onnx]")
        if onnx and base:
            for b in onnx["latency"]:
                v = onnx["latency"][b]["median_ms"] / base["latency"][b]["median_ms"]
                out.append({"target": f"{r['variant']} in ONNX Runtime <= backbone in ONNX "
                                      f"Runtime at batch {b}", "value": round(v, 3),
                            "met": v <= 1.0})
    return out


def _interval(train: dict[str, Any]) -> str:
    """``"; 95% 1.01-1.06x"``: a training ratio's bootstrap interval (:func:`ratio_interval`),
    or nothing for a run without one (an older results file, the backbone itself)."""
    ci = train.get("ratio_ci95")
    return "" if not ci or ci[0] == ci[1] else f"; 95% {ci[0]:.2f}-{ci[1]:.2f}x"


def _target_ci(target: dict[str, Any]) -> str:
    ci = target.get("ci95")
    return f", 95% interval {ci[0]:.3f}-{ci[1]:.3f} over the paired steps" if ci else ""


_PEAK_NOTE = ("train peak MiB: the most memory in torch tensors one training step (forward, "
              "cross-entropy, backward, SGD step) holds above what was allocated at its start "
              "(parameters, optimizer state, inputs, the last step's gradients; "
              "peak_step_memory)")


def format_results(res: dict[str, Any]) -> str:
    """A tabulate table (one row per variant) with the machine in the header."""
    from tabulate import tabulate

    batches = [str(b) for b in res["config"]["batches"]]
    headers = ["variant", "params", "MFLOPs"]
    for b in batches:
        headers += [f"b{b} ms (p50)", f"b{b} p90", f"b{b} img/s", f"b{b} ratio"]
    headers += ["train ms", "train ratio", "train peak MiB", "peak ratio"]
    table = []
    for r in res["rows"]:
        row = [r["variant"], f"{r['params']:,}", f"{r['flops'] / 1e6:,.1f}"]
        for b in batches:
            lat = r["latency"].get(b)
            row += ([f"{lat['median_ms']:.2f}", f"{lat['p90_ms']:.2f}",
                     f"{lat['images_per_s']:,.0f}", f"{lat['ratio']:.2f}x"] if lat else
                    ["", "", "", ""])
        tr = r["train"]
        row += [f"{tr['median_ms']:.1f}", f"{tr['ratio']:.2f}x{_interval(tr)}",
                f"{tr['peak_mib']:,.1f}", f"{tr['peak_ratio']:.3f}x"] if tr else ["", "", "", ""]
        table.append(row)
    cfg = res["config"]
    own = parse_model_spec(cfg["model"]).kind != "zoo"
    lines = [f"asrfx bench: {cfg['model']} ("
             f"{'its own attention' if own else 'attention ' + ', '.join(cfg['attention'])}), "
             f"{cfg['reps']} interleaved reps per batch, train step at batch "
             f"{cfg['train_batch']} x {cfg['train_reps']}",
             f"machine: {res['machine']}"]
    if res.get("speed"):
        lines.append(format_speed(res["speed"]))
    lines += [""]
    lines.append(tabulate(table, headers=headers, disable_numparse=True))
    for rt, status in res.get("runtimes", {}).items():
        if status != "ok":
            lines.append(f"{rt}: {status}")
    if any(r["train"] for r in res["rows"]):
        lines.append(f"note: {_PEAK_NOTE}")
    for key in ("backbone", "no attention"):
        if isinstance(res.get("notes", {}).get(key), str):
            lines.append(f"note: {res['notes'][key]}")
    rounds = res.get("notes", {}).get("rounds", {})
    if any(v > 1 for v in rounds.values()):
        lines.append("note: rounds of --reps until the ratios settled (within 3% between the "
                     "halves of the samples; 3 at most): " +
                     ", ".join(f"batch {b}: {v}" for b, v in rounds.items()))
    spread = max((lat["p90_ms"] / lat["median_ms"] for r in res["rows"]
                  for lat in r["latency"].values()), default=1.0)
    if spread > 1.15 and "mallopt" not in res.get("machine", ""):
        lines.append(f"note: latencies spread up to {100 * (spread - 1):.0f}% (p90 over median); "
                     f"on glibc a large CPU activation's pages fault in on every run: "
                     f"`--malloc keep` (or README: CPU deployment) measures without that")
    if res.get("targets"):
        lines += ["", "targets:"]
        lines += [f"  [{'met' if t['met'] else 'NOT met'}] {t['target']}: {t['value']}"
                  f"{_target_ci(t)}" for t in res["targets"]]
    return "\n".join(lines)


def _markdown(res: dict[str, Any]) -> str:
    from tabulate import tabulate

    if not res.get("rows"):  # compiler cost only
        return "\n".join(["# asrfx bench: compiler cost", "", f"Machine: {res['machine']}", "",
                          "```", format_cost(res["compiler_cost"]), "```", ""])
    md_rows = []
    batches = [str(b) for b in res["config"]["batches"]]
    for r in res["rows"]:
        row = [r["variant"], f"{r['params']:,}", f"{r['flops'] / 1e6:,.1f}"]
        for b in batches:
            lat = r["latency"].get(b)
            row += [f"{lat['median_ms']:.2f} / {lat['p90_ms']:.2f}",
                    f"{lat['ratio']:.2f}x"] if lat else ["", ""]
        tr = r["train"]
        row += [f"{tr['median_ms']:.1f} ({tr['ratio']:.2f}x{_interval(tr)})" if tr else "",
                f"{tr['peak_mib']:,.1f} ({tr['peak_ratio']:.3f}x)" if tr else ""]
        md_rows.append(row)
    headers = ["variant", "params", "MFLOPs"]
    for b in batches:
        headers += [f"batch {b} ms p50 / p90", "vs backbone"]
    headers += [f"train step ms (batch {res['config']['train_batch']})",
                f"train peak MiB (batch {res['config']['train_batch']})"]
    lines = [f"# asrfx bench: {res['config']['model']}", "", f"Machine: {res['machine']}", ""]
    if res.get("speed"):
        lines += ["S" + format_speed(res["speed"])[1:], ""]
    lines += [tabulate(md_rows, headers=headers, tablefmt="github", disable_numparse=True), ""]
    for rt, status in res.get("runtimes", {}).items():
        if status != "ok":
            lines.append(f"- {rt}: {status}")
    if any(r["train"] for r in res["rows"]):
        lines.append(f"- {_PEAK_NOTE}")
    if res.get("targets"):
        lines += ["", "## Targets", ""] + [f"- {'met' if t['met'] else '**not met**'}: "
                                           f"{t['target']} ({t['value']}{_target_ci(t)})"
                                           for t in res["targets"]]
    if res.get("compiler_cost"):
        lines += ["", "## Compiler cost", "", "```", format_cost(res["compiler_cost"]), "```"]
    return "\n".join(lines) + "\n"


def write_outputs(res: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """``bench.json``, ``bench.md`` and ``bench.png`` (latency ratio per variant and batch)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "md": out / "bench.md", "png": out / "bench.png"}
    paths["json"].write_text(json.dumps(res, indent=2))
    paths["md"].write_text(_markdown(res))
    if res.get("rows"):
        _plot_latency(res, paths["png"])
    else:
        del paths["png"]
    if res.get("compiler_cost"):
        paths["cost_png"] = out / "compiler_cost.png"
        _plot_cost(res["compiler_cost"], paths["cost_png"])
    return paths


def _plot_latency(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    batches = [str(b) for b in res["config"]["batches"]]
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(rows) * len(batches)), 4))
    width = 0.8 / len(batches)
    for j, b in enumerate(batches):
        vals = [r["latency"].get(b, {}).get("ratio", float("nan")) for r in rows]
        ax.bar([i + j * width for i in range(len(rows))], vals, width, label=f"batch {b}")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([r["variant"] for r in rows], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("median latency / backbone")
    ax.set_title(f"{res['config']['model']}: latency relative to the eager backbone", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- the compiler's own cost ---------------------------------------------------------------------


@dataclass
class CostRow:
    depth: int
    nodes: int
    prepare_s: float
    fold_s: float
    sites: int = 0
    extra: dict = field(default_factory=dict)
    plain_fold_s: float = float("nan")  # fold of the plain network (no attention)
    fx_fuse_s: float = float("nan")  # torch.fx.experimental.optimization.fuse of it


def compiler_cost(depths: Sequence[int] = (20, 56, 110, 164, 326, 650, 1001), reps: int = 3,
                  attention: str = "se", progress: bool = True) -> dict[str, Any]:
    """Wall time of ``prepare`` and ``fold`` (with its check) against the traced graph's size,
    CIFAR ResNets of growing depth with ``attention`` in every block; medians of ``reps`` runs
    and a least-squares line ``time = a * nodes + b`` per phase with its R^2. Beside them, the
    plain network's ``fold`` and ``torch.fx.experimental.optimization.fuse`` (trace, BN fusion,
    no check), timed alternately."""
    import asrfx
    from torch.fx.experimental.optimization import fuse
    from tqdm.auto import tqdm

    x = torch.randn(1, 3, 32, 32)
    before = speed_probe()
    rows: list[CostRow] = []
    for depth in tqdm(depths, desc="compiler cost", disable=not progress):
        # the CIFAR convention of the model specs (resnet<depth>): 20..110 basic, 164.. bottleneck
        model = build_model(f"resnet{depth}", attention=attention, num_classes=100)
        prep, fold = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            p = asrfx.prepare(model, example_inputs=(x,))
            t1 = time.perf_counter()
            asrfx.fold(p, example_inputs=(x,))
            fold.append(time.perf_counter() - t1)
            prep.append(t1 - t0)
        nodes = len(asrfx.trace(model, example_inputs=(x,)).graph.nodes)
        plain = _zero_init_residual(build_model(f"resnet{depth}", attention=None,
                                                num_classes=100)).eval()
        ours, theirs = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            asrfx.fold(plain, example_inputs=(x,))
            t1 = time.perf_counter()
            fuse(plain)
            theirs.append(time.perf_counter() - t1)
            ours.append(t1 - t0)
        rows.append(CostRow(depth, nodes, statistics.median(prep), statistics.median(fold),
                            p.asrfx_report.count(action="converted"),
                            plain_fold_s=statistics.median(ours),
                            fx_fuse_s=statistics.median(theirs)))
    fits = {ph: _linear_fit([r.nodes for r in rows], [getattr(r, f"{ph}_s") for r in rows])
            for ph in ("prepare", "fold")}
    return {"rows": [asdict(r) for r in rows], "fits": fits, "reps": reps,
            "speed": {"before": before, "after": speed_probe()}}


def _zero_init_residual(model: nn.Module) -> nn.Module:
    """Each residual block's last BatchNorm weight set to 0 (Goyal et al., 2017): every block
    starts as its shortcut. Without attention gates to damp them, the blocks of a freshly
    initialised ResNet-650/1001 add up to infinities in eval mode, which fold rightly refuses."""
    from .zoo import BasicBlock, Bottleneck

    with torch.no_grad():
        for block in model.modules():
            last = getattr(block, "bn3", None) if isinstance(block, Bottleneck) else \
                getattr(block, "bn2", None) if isinstance(block, BasicBlock) else None
            if last is not None:
                last.weight.zero_()
    return model


def _linear_fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    n = len(xs)
    if n < 2:
        return {"per_node_ms": float("nan"), "intercept_s": float("nan"), "r2": float("nan")}
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    a = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    b = my - a * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (a * x + b)) ** 2 for x, y in zip(xs, ys))
    return {"per_node_ms": 1000 * a, "intercept_s": b,
            "r2": 1 - ss_res / ss_tot if ss_tot else 1.0}


def format_cost(cost: dict[str, Any]) -> str:
    from tabulate import tabulate

    rows = [[r["depth"], r["nodes"], r["sites"], f"{1000 * r['prepare_s']:.0f}",
             f"{1000 * r['fold_s']:.0f}", f"{1000 * (r['prepare_s'] + r['fold_s']):.0f}",
             f"{1e6 * (r['prepare_s'] + r['fold_s']) / r['nodes']:.0f}",
             f"{1000 * r.get('plain_fold_s', float('nan')):.0f}",
             f"{1000 * r.get('fx_fuse_s', float('nan')):.0f}"] for r in cost["rows"]]
    lines = [tabulate(rows, headers=["ResNet depth", "graph nodes", "sites", "prepare ms",
                                     "fold ms", "total ms", "us / node", "plain fold ms",
                                     "fx fuse ms"])]
    for ph, f in cost["fits"].items():
        lines.append(f"{ph}: {f['per_node_ms']:.3f} ms per node + {f['intercept_s']:.3f} s "
                     f"(linear fit R^2 = {f['r2']:.3f})")
    if cost.get("speed"):
        lines.append(format_speed(cost["speed"]))
    return "\n".join(lines)


def _plot_cost(cost: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = cost["rows"]
    nodes = [r["nodes"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for ph, style in (("prepare", "o-"), ("fold", "s-")):
        ax.plot(nodes, [r[f"{ph}_s"] for r in rows], style, label=ph)
        f = cost["fits"][ph]
        ax.plot(nodes, [f["per_node_ms"] / 1000 * n + f["intercept_s"] for n in nodes], "k:",
                lw=0.8)
    for r in rows:
        ax.annotate(f"R{r['depth']}", (r["nodes"], r["prepare_s"] + r["fold_s"]), fontsize=7)
    ax.set_xlabel("traced graph nodes")
    ax.set_ylabel("wall time (s), median")
    ax.set_title("compiler cost vs graph size (dotted: linear fits)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
