"""`asrfx bench` and `asrfx.bench`: the variants, their static cost (params, FLOPs), the result
structure and files, the generic backbone of third-party models, the compiler-cost scaling and
the CLI's errors. Timings are measured here only to check the plumbing (a couple of reps): the
numbers worth quoting come from `asrfx bench` runs, never from unit tests."""

from __future__ import annotations

import json
import os

import pytest
import torch

import asrfx
from asrfx.bench import (BenchConfig, compiler_cost, format_cost, format_results,
                         peak_step_memory, ratio_interval, run_bench, strip_attention,
                         time_interleaved, write_outputs)
from asrfx.cli import main
from asrfx.zoo import cifar_resnet


@pytest.fixture(scope="module")
def small_run():
    cfg = BenchConfig(model="resnet20", attention=("se", "eca"), batches=(1, 2), reps=2,
                      warmup=1, train_batch=4, train_reps=3, num_classes=10, runtimes=(),
                      progress=False)
    return run_bench(cfg)


def test_every_variant_is_measured(small_run):
    names = [r["variant"] for r in small_run["rows"]]
    assert names == ["backbone", "backbone fused",
                     "+se", "ASR(se) train form", "ASR(se) fused train form", "ASR(se) folded",
                     "ASR(se) BN-only fold",
                     "+eca", "ASR(eca) train form", "ASR(eca) fused train form",
                     "ASR(eca) folded", "ASR(eca) BN-only fold"]
    for r in small_run["rows"]:
        assert set(r["latency"]) == {"1", "2"}
        for lat in r["latency"].values():
            assert lat["samples"] == 2 and 0 < lat["median_ms"] <= lat["p90_ms"]
            assert lat["images_per_s"] > 0 and lat["ratio"] > 0
    trained = {r["variant"] for r in small_run["rows"] if r["train"] is not None}
    assert trained == {"backbone", "+se", "ASR(se) train form", "ASR(se) fused train form",
                       "+eca", "ASR(eca) train form", "ASR(eca) fused train form"}
    assert small_run["rows"][0]["latency"]["1"]["ratio"] == 1.0


def test_static_costs_say_the_fold_removes_the_attention(small_run):
    by = {r["variant"]: r for r in small_run["rows"]}
    plain = cifar_resnet(20, block="basic", num_classes=10)
    assert by["backbone"]["params"] == sum(p.numel() for p in plain.parameters())
    for att in ("se", "eca"):
        # the deploy form is the fused backbone: same parameters, same FLOPs
        assert by[f"ASR({att}) folded"]["params"] == by["backbone fused"]["params"]
        assert by[f"ASR({att}) folded"]["flops"] == by["backbone fused"]["flops"]
        # the attention model costs more than the backbone
        assert by[f"+{att}"]["params"] > by["backbone"]["params"]
        assert by[f"+{att}"]["flops"] > by["backbone"]["flops"]
        # BN-only: the attention is gone, BN is still there (the backbone's parameters)
        assert by[f"ASR({att}) BN-only fold"]["params"] == by["backbone"]["params"]
        note = small_run["notes"][att]
        assert note["converted"] == 9 and note["kept"] == 0 and note["fold_rel_err"] < 1e-4


def test_targets_and_table(small_run):
    targets = {t["target"]: t for t in small_run["targets"]}
    assert "ASR(se) folded <= 1.00x backbone at batch 1" in targets
    assert "ASR(se) train form training step <= 1.10x backbone" in targets
    for t in targets.values():
        assert isinstance(t["met"], bool) and t["value"] > 0
    text = format_results(small_run)
    assert "machine:" in text and "ASR(eca) BN-only fold" in text and "train ratio" in text
    assert "speed probe (before / after" in text and set(small_run["speed"]) == {"before", "after"}


def test_ratio_interval_brackets_the_ratio_and_narrows_with_samples():
    gen = torch.Generator().manual_seed(0)

    def rounds(n):  # each round's machine speed swings by up to 40%; the variant costs 1.05x
        speed = 1 + 0.4 * torch.rand(n, generator=gen)
        base = (speed * (1 + 0.02 * torch.randn(n, generator=gen))).tolist()
        other = (1.05 * speed * (1 + 0.02 * torch.randn(n, generator=gen))).tolist()
        return base, other

    lo, hi = ratio_interval(*rounds(20))
    assert lo < 1.05 < hi and hi - lo < 0.1
    wide = hi - lo
    lo, hi = ratio_interval(*rounds(400))
    assert lo < 1.05 < hi and hi - lo < wide / 2
    # paired: the rounds' common swing cancels; unpaired (shuffled) the interval is wider
    base, other = rounds(40)
    paired = ratio_interval(base, other)
    shuffled = ratio_interval(base, other[7:] + other[:7])
    assert paired[1] - paired[0] < shuffled[1] - shuffled[0]
    assert ratio_interval([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == (1.0, 1.0)
    with pytest.raises(ValueError, match="paired lists"):
        ratio_interval([1.0, 2.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="paired lists"):
        ratio_interval([1.0, 2.0, 3.0], [1.0, 2.0])


def test_training_ratios_carry_their_interval(small_run, tmp_path):
    by = {r["variant"]: r for r in small_run["rows"]}
    for r in small_run["rows"]:
        if r["train"] is None:
            continue
        lo, hi = r["train"]["ratio_ci95"]
        assert lo <= r["train"]["ratio"] <= hi
    assert by["backbone"]["train"]["ratio_ci95"] == [1.0, 1.0]
    t = next(t for t in small_run["targets"] if t["target"].startswith("ASR(se) fused train "
                                                                        "form training step"))
    assert t["ci95"] == [round(v, 3) for v in by["ASR(se) fused train form"]["train"]
                         ["ratio_ci95"]]
    lo, hi = by["ASR(se) fused train form"]["train"]["ratio_ci95"]
    md = write_outputs(small_run, tmp_path)["md"].read_text()
    assert lo < hi and f"; 95% {lo:.2f}-{hi:.2f}x" in md
    assert "over the paired steps" in md


def test_peak_step_memory_of_a_known_step():
    """A step shaped like a training step: it frees the "gradient" the previous call left, holds
    two "activations", allocates the new gradient while they are alive, then drops them. Above
    the memory alive at its start the peak is the two activations (the new gradient replaces
    the freed one); a temporary inside an operation counts too."""
    n_act, n_grad = 3000, 5000
    f32 = torch.tensor(0.0).element_size()
    state: dict = {}

    def step():
        state["grad"] = None
        a1 = torch.ones(n_act)
        a2 = torch.ones(n_act)
        state["grad"] = torch.ones(n_grad)
        del a1, a2

    expected = 2 * n_act * f32
    assert peak_step_memory(step) == expected
    # the gradient's free is seen (a warmed-up step): without it the peak would be
    # expected + n_grad * f32
    assert peak_step_memory(step, warmup=3) == expected

    def with_temporary():  # (x + 1) lives until the sum returns: two buffers at once
        state["out"] = (torch.ones(n_grad) + 1).sum()

    got = peak_step_memory(with_temporary)
    assert 2 * n_grad * f32 <= got <= 2 * n_grad * f32 + 64  # (+ a scalar or two)
    with pytest.raises(ValueError, match="CPU and CUDA"):
        peak_step_memory(step, "meta")


def test_train_peak_memory_columns(small_run, tmp_path):
    by = {r["variant"]: r for r in small_run["rows"]}
    trained = [r for r in small_run["rows"] if r["train"] is not None]
    for r in trained:
        tr = r["train"]
        assert tr["peak_bytes"] > 0 and tr["peak_mib"] == tr["peak_bytes"] / 2 ** 20
        assert tr["peak_ratio"] > 0
    assert by["backbone"]["train"]["peak_ratio"] == 1.0
    # the attention's activations cost memory: the SE model holds more than the backbone
    assert by["+se"]["train"]["peak_bytes"] > by["backbone"]["train"]["peak_bytes"]
    targets = {t["target"]: t for t in small_run["targets"]}
    for att in ("se", "eca"):
        t = targets[f"ASR({att}) fused train form training peak memory <= 1.02x backbone"]
        assert t["value"] == round(by[f"ASR({att}) fused train form"]["train"]["peak_ratio"], 3)
    assert not any("peak" in t for t in targets if "fused" not in t)
    text = format_results(small_run)
    assert "train peak MiB" in text and "peak ratio" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("ASR(se) fused train form"))
    assert f"{by['ASR(se) fused train form']['train']['peak_ratio']:.3f}x" in line
    md = write_outputs(small_run, tmp_path)["md"].read_text()
    assert "train peak MiB (batch 4)" in md and "peak_step_memory" in md


def test_outputs_are_written(small_run, tmp_path):
    paths = write_outputs(small_run, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert [r["variant"] for r in data["rows"]] == [r["variant"] for r in small_run["rows"]]
    md = paths["md"].read_text()
    assert md.startswith("# asrfx bench: resnet20") and "| ASR(se) folded" in md
    assert "Speed probe (before / after; lower is faster): Python loop" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_time_interleaved_rotates_the_order():
    order = []
    calls = {k: (lambda k=k: order.append(k)) for k in "abc"}
    times = time_interleaved(calls, reps=3, warmup=0)
    assert order == list("abc" "bca" "cab")
    assert all(len(v) == 3 and all(t >= 0 for t in v) for v in times.values())


def test_strip_attention_gives_the_backbone():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    se = cifar_resnet(20, block="basic", attention="se", num_classes=10).eval()
    plain = cifar_resnet(20, block="basic", num_classes=10)
    stripped = strip_attention(se, (x,))
    assert sum(p.numel() for p in stripped.parameters()) == \
        sum(p.numel() for p in plain.parameters())
    assert not [n for n in stripped.graph.nodes if "sigmoid" in str(n.target)]
    # the same function as the SE model with every gate forced to 1
    for m in se.modules():
        if type(m).__name__ == "SEModule":
            m.forward = lambda t: t
    with torch.no_grad():
        torch.testing.assert_close(stripped(x), se(x))
    assert not stripped.training


def test_strip_attention_of_third_party_models():
    monai = pytest.importorskip("monai.networks.nets")
    effnet = pytest.importorskip("efficientnet_pytorch")
    x = torch.randn(2, 3, 64, 64)
    for model in (monai.SEResNet50(spatial_dims=2, in_channels=3, num_classes=10),
                  effnet.EfficientNet.from_name("efficientnet-b0", num_classes=10)):
        model.eval()
        stripped = strip_attention(model, (x,))
        # exactly the attention's parameters go (EfficientNet's excitations call its swish, an
        # opaque module applying an autograd Function: the branch goes with it)
        attention = ("_se_", ".se_layer.") if hasattr(model, "_blocks") else (".se_layer.",)
        assert sum(p.numel() for p in stripped.parameters()) == \
            sum(p.numel() for n, p in model.named_parameters()
                if not any(a in n for a in attention))
        prepared = asrfx.prepare(model, example_inputs=(x,))
        # nothing of the attention is left to find
        deploy = asrfx.fold(stripped, example_inputs=(x,))
        assert deploy.asrfx_report.count(kind="channel scale") == 0
        assert prepared.asrfx_report.count(action="converted") == 16
        stripped.train()
        stripped(x).sum().backward()  # the backbone trains (dual-mode graphs included)


def test_compiler_cost_grows_with_the_graph():
    cost = compiler_cost((20, 32), reps=1, progress=False)
    rows = cost["rows"]
    assert [r["depth"] for r in rows] == [20, 32]
    assert rows[0]["nodes"] < rows[1]["nodes"] and rows[0]["sites"] == 9 and rows[1]["sites"] == 15
    assert all(r["prepare_s"] > 0 and r["fold_s"] > 0 for r in rows)
    assert set(cost["fits"]) == {"prepare", "fold"}
    assert "us / node" in format_cost(cost)


def test_cli_bench_runs_and_writes(tmp_path, capsys):
    rc = main(["bench", "--model", "resnet20", "--batch", "1", "--reps", "1", "--train-reps",
               "0", "--runtimes", "--num-classes", "10", "--quiet", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "ASR(se) folded" in out and (tmp_path / "bench.json").exists()


@pytest.mark.parametrize("argv, msg", [
    (["--model", "nosuchmodel"], "expected a zoo name"),
    (["--model", "nosuch.module:factory", "--size", "32"], "cannot import"),
    (["--model", "resnet20", "--batch", "0"], "must be positive"),
    (["--model", "resnet20", "--runtimes", "tensorrt", "--reps", "1", "--train-reps", "0"],
     "unknown runtime"),
])
def test_cli_bench_errors_are_one_line(argv, msg, capsys):
    assert main(["bench", "--quiet", "--num-classes", "10"] + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("asrfx bench:") and msg in err and "Traceback" not in err


def test_cli_cost_only_writes_the_cost_report(tmp_path, capsys):
    rc = main(["bench", "--cost-only", "--cost-depths", "20", "32", "--cost-reps", "1",
               "--quiet", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "graph nodes" in out and "fx fuse ms" in out and "plain fold ms" in out
    md = (tmp_path / "bench.md").read_text()
    assert md.startswith("# asrfx bench: compiler cost") and "prepare:" in md
    assert "allocator: " in md  # the machine line names the allocator and its settings
    assert (tmp_path / "compiler_cost.png").read_bytes()[:4] == b"\x89PNG"
    cost = json.loads((tmp_path / "bench.json").read_text())["compiler_cost"]
    rows = cost["rows"]
    assert rows and all(r["fx_fuse_s"] > 0 and r["plain_fold_s"] > 0 for r in rows)
    # the machine's speed before and after, in the JSON and in both reports
    assert all(cost["speed"][k]["python_loop_ms"] > 0 and cost["speed"][k]["matmul_ms"] > 0
               for k in ("before", "after"))
    assert "speed probe (before / after" in out and "speed probe (before / after" in md


def test_speed_probe_times_the_python_loop_and_the_products(monkeypatch):
    """The probe reports the best of its repetitions, in milliseconds, of each workload: here
    with a clock that advances 0.1 s per Python loop and 0.03 s per 20 products (0.2 s / 0.06 s
    in the first repetition)."""
    from asrfx import bench
    ticks = iter([0.0, 0.2, 0.26] + [x for i in range(1, 5) for x in
                                     (i, i + 0.1, i + 0.13)])
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(ticks))
    got = bench.speed_probe(reps=5)
    assert got == pytest.approx({"python_loop_ms": 100.0, "matmul_ms": 30.0})
    line = bench.format_speed({"before": got, "after": {"python_loop_ms": 140.0,
                                                        "matmul_ms": 45.0}})
    assert "Python loop 100 / 140 ms" in line and "512x512 30 / 45 ms" in line


@pytest.mark.parametrize("size,shape", [(None, (3, 32, 32)), (16, (3, 16, 16)),
                                        ((1, 24, 24), (1, 24, 24)), ((3, 20), (3, 20))])
def test_bench_input_size_reaches_the_zoo_model(size, shape):
    """``--size C H W`` builds a zoo model for that input (channels and dims), not a 3-channel
    one fed a nested shape; one number is the side of an RGB image."""
    from asrfx.bench import BenchConfig, build_models

    model, plain, got = build_models(BenchConfig(model="resnet20", image_size=size), "se")
    assert got == shape
    with torch.no_grad():
        assert model.eval()(torch.randn(2, *shape)).shape == (2, 100)
        assert plain.eval()(torch.randn(2, *shape)).shape == (2, 100)


@pytest.mark.parametrize("keep", [False, True], ids=["default", "keep"])
def test_keep_freed_memory_stops_page_faults_on_every_inference(keep):
    """Six conv-BN-ReLU layers on a 16x16x32x32 batch: under glibc's defaults every inference
    faults its activations' pages in again (12,000 faults in 5 runs here); told to keep freed
    memory, none. A fresh process each: the setting is process-wide."""
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    code = (
        "import resource, sys, torch\n"
        "from torch import nn\n"
        "from asrfx.bench import keep_freed_memory, allocator_description\n"
        "torch.set_num_threads(1)\n"
        f"assert keep_freed_memory() if {keep} else True\n"
        "m = nn.Sequential(*[nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16),\n"
        "                                  nn.ReLU()) for _ in range(6)]).eval()\n"
        "x = torch.randn(16, 16, 32, 32)\n"
        "with torch.no_grad():\n"
        "    m(x); m(x)\n"
        "    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    for _ in range(5):\n"
        "        m(x)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)\n"
        "print(allocator_description())\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env).stdout.splitlines()
    activation_pages = 5 * 16 * 16 * 32 * 32 * 4 // 4096  # one activation per run
    faults = int(out[-2])
    if keep:
        assert faults < activation_pages // 2, out  # (a few hundred unrelated faults)
        assert "mallopt M_MMAP_THRESHOLD=33554432" in out[-1]
    else:  # the premise: the default allocator faults pages in on every run
        assert faults > activation_pages, out
        assert "default settings" in out[-1]


def test_ratios_settle_when_both_halves_agree():
    from asrfx.bench import ratios_settled

    steady = {"backbone": [1.0] * 10, "folded": [0.9] * 10}
    assert ratios_settled(steady)
    # the folded model's latency jumps half way (the allocator started faulting, say): 0.9x in
    # the first half, 1.2x in the second
    drift = {"backbone": [1.0] * 10, "folded": [0.9] * 5 + [1.2] * 5}
    assert not ratios_settled(drift)
    assert ratios_settled({"backbone": [1.0, 2.0]})  # one variant, or too few samples


def test_timing_repeats_rounds_until_the_ratios_settle(monkeypatch):
    import asrfx.bench as B

    rounds = iter([
        {"a": [1.0] * 4, "b": [0.9, 0.9, 1.3, 1.3]},   # drifting
        {"a": [1.0] * 4, "b": [1.3] * 4},               # settled at 1.3x once pooled
        {"a": [1.0] * 4, "b": [1.3] * 4},
    ])
    calls_made = []

    def fake(calls, reps, warmup=3, sync=None, progress=None):
        calls_made.append(reps)
        return next(rounds)

    monkeypatch.setattr(B, "time_interleaved", fake)
    times, n = B.timed_until_stable({"a": None, "b": None}, reps=4)
    assert n == 3 and len(times["b"]) == 12 and calls_made == [4, 4, 4]
    # a stable first round is not repeated
    rounds = iter([{"a": [1.0] * 4, "b": [0.9] * 4}])
    times, n = B.timed_until_stable({"a": None, "b": None}, reps=4)
    assert n == 1
