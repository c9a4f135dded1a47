"""Training a prepared model the ways people train at scale: DistributedDataParallel (with
BatchNorm and with SyncBatchNorm) and torch.compile, then folding what came out of it.

DDP: two CPU processes (gloo), spawned once per module; each builds the same prepared ResNet-20
itself (a GraphModule of a model written with ``from __future__ import annotations`` does not
pickle in torch 2.13: its placeholder annotations are strings and ``GraphModule.__reduce__``
fails on them, pytorch/pytorch#167117), trains a few SGD steps on its own data, folds, and
writes its state dicts and outputs with ``torch.save`` for the test to read back weights-only.

SyncBatchNorm: torch syncs batch statistics only for CUDA/XPU/HPU/privateuse1 tensors; on CPU
DDP refuses a SyncBatchNorm model (ValueError "SyncBatchNorm layers only work with GPU
modules"). Its DDP run therefore uses CUDA where there is one (both ranks on cuda:0 with gloo
work: run on one H200, torch 2.11) and is skipped, naming torch's error, otherwise; the fold side
(eval mode, no process group) is tested on CPU in this process.

The spawned DDP fixture takes ~8-13 s on a 2-core CPU machine (17 s on the H200 machine's CPUs).
torch.compile: a tiny stem + two SE blocks model; compiling its training step takes ~35 s and
the folded model ~20 s with a cold inductor cache on 2 cores, so those tests are marked slow.
"""

from __future__ import annotations

import copy
import datetime
import operator
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import asrfx
from asrfx import runtimes
from asrfx.passes import revert_sync_batchnorm
from asrfx.zoo import SEModule, cifar_resnet
from helpers import (REL_TOL, bn_call_nodes, psi_names, rand_images, randomize_bn, randomize_psi,
                     rel_err)

WORLD = 2
STEPS = 3
BATCH = 8
SIZE = 16
NUM_CLASSES = 10
SPAWN_TIMEOUT_S = 180
_MUL_OPS = {operator.mul, torch.mul, "mul", "mul_"}


# ------------------------------------------------------------------------------------ helpers

def _prepared(attention: str = "se", dims: int = 2, depth: int = 20,
              fused: bool = False) -> torch.fx.GraphModule:
    """The same prepared ResNet on every call (and in every process): weights from seed 0."""
    torch.manual_seed(0)
    model = cifar_resnet(depth, block="basic", attention=attention, num_classes=NUM_CLASSES,
                         dims=dims, width=8 if dims == 3 else 16)
    x = torch.randn((2, 3) + (SIZE if dims != 3 else 8,) * dims)
    return asrfx.prepare(model, example_inputs=(x,), fused=fused)


def _dead_psis(model: nn.Module) -> set[str]:
    """psi whose SE branch is dead at init: fc1(psi) <= 0 for every hidden unit, so the ReLU
    passes no gradient back and psi (and fc1) never train. With the default init (0.1 in every
    channel) and 2-4 hidden units this is 3 of the 9 sites of the seed-0 ResNet-20."""
    dead = set()
    for name in psi_names(model):
        se = model.get_submodule(name.rsplit(".", 1)[0])
        with torch.no_grad():
            if bool((se.fc1(se.psi.flatten(1)) <= 0).all()):
                dead.add(name)
    return dead


def _mul_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")
            and n.target in _MUL_OPS]


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fold(model: nn.Module) -> torch.fx.GraphModule:
    """``asrfx.fold`` of a copy of ``model``, SyncBatchNorms reverted to BatchNorm first."""
    work = copy.deepcopy(model).cpu()
    revert_sync_batchnorm(work)
    return asrfx.fold(work, example_inputs=(rand_images(2, 0, SIZE),))


# ---------------------------------------------------------------------------- the DDP workers

def _train(model: nn.Module, rank: int, device: torch.device) -> list[float]:
    """STEPS SGD steps of DDP(model) on this rank's own random data; returns the losses."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1000 + rank)
    ddp.train()
    losses = []
    for _ in range(STEPS):
        x = torch.randn(BATCH, 3, SIZE, SIZE, generator=gen).to(device)
        y = torch.randint(0, NUM_CLASSES, (BATCH,), generator=gen).to(device)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(ddp(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    """One rank: a BatchNorm run on CPU, then a SyncBatchNorm run (CUDA if there is one)."""
    torch.set_num_threads(1)
    torch.backends.cudnn.allow_tf32 = False  # CUDA runs are compared with a CPU reference
    torch.backends.cuda.matmul.allow_tf32 = False
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    cuda = torch.cuda.is_available()
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    result: dict = {"rank": rank}
    try:
        probe = rand_images(4, 7, SIZE)
        # --- BatchNorm: parameters are all-reduced; each rank's last running-stat update is
        # its own (DDP broadcasts rank 0's buffers at the *start* of every forward)
        model = _prepared()
        t0 = time.perf_counter()
        result["bn_losses"] = _train(model, rank, torch.device("cpu"))
        result["bn_train_s"] = time.perf_counter() - t0
        result["bn_raw"] = _cpu_state(model)
        with torch.no_grad():
            for b in model.buffers():  # what DDP's next forward would do
                dist.broadcast(b, 0)
        result["bn_synced"] = _cpu_state(model)
        deploy = _fold(model)
        result["bn_deploy"] = _cpu_state(deploy)
        with torch.no_grad():
            result["bn_deploy_out"] = deploy(probe)
        result["bn_deploy_muls"] = len(_mul_nodes(deploy))
        result["bn_deploy_norms"] = len(bn_call_nodes(deploy))
        # --- the fused training form: the same training, gates in the norms' affine
        fused = _prepared(fused=True)
        result["fused_losses"] = _train(fused, rank, torch.device("cpu"))
        result["fused_raw"] = _cpu_state(fused)

        # --- SyncBatchNorm
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        result["sync_device"] = str(device)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(_prepared()).to(device)
        try:
            result["sync_losses"] = _train(model, rank, device)
        except ValueError as e:  # torch: SyncBatchNorm syncs CUDA/XPU/HPU tensors only
            result["sync_error"] = str(e).splitlines()[0]
        else:
            result["sync_raw"] = _cpu_state(model)
            result["sync_types"] = sorted({type(m).__name__ for m in model.modules()
                                           if isinstance(m, nn.modules.batchnorm._BatchNorm)})
            deploy = _fold(model)
            result["sync_deploy"] = _cpu_state(deploy)
            with torch.no_grad():
                result["sync_deploy_out"] = deploy(probe)
            result["sync_deploy_muls"] = len(_mul_nodes(deploy))
            result["sync_deploy_norms"] = len(bn_call_nodes(deploy))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> list[dict]:
    """Both ranks' results (loaded weights-only); spawned once for the module's DDP tests."""
    out_dir = tmp_path_factory.mktemp("ddp")
    ctx = mp.start_processes(_ddp_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not ctx.join(timeout=1):  # raises ProcessRaisedException with the child's trace
            if time.monotonic() > deadline:
                pytest.fail(f"DDP workers did not finish within {SPAWN_TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


# ----------------------------------------------------------------------- DDP with BatchNorm


def test_ddp_trains_the_fused_form_like_the_multiply_form(ddp_runs):
    """prepare(fused=True) under DDP: the same losses and the same parameters and statistics
    on every rank as the multiply form (before rank 0's buffers are broadcast)."""
    for run in ddp_runs:
        assert len(run["fused_losses"]) == len(run["bn_losses"])
        for a, b in zip(run["bn_losses"], run["fused_losses"]):
            assert abs(a - b) <= 1e-4 * max(1.0, abs(a))
        for k, v in run["bn_raw"].items():
            assert rel_err(v.double(), run["fused_raw"][k].double()) <= 1e-4, k

def test_ddp_psi_and_parameters_identical_across_ranks(ddp_runs):
    r0, r1 = ddp_runs
    for r in ddp_runs:
        assert all(torch.isfinite(torch.tensor(r["bn_losses"])))
    # different data per rank: the losses differ, yet the all-reduced updates agree
    assert r0["bn_losses"] != r1["bn_losses"]
    fresh = _prepared()
    init = dict(fresh.named_parameters())
    psis = psi_names(fresh)
    dead = _dead_psis(fresh)
    assert len(psis) == 9 and len(dead) <= 3
    for name in psis:
        assert torch.equal(r0["bn_raw"][name], r1["bn_raw"][name]), name
        trained = not torch.equal(r0["bn_raw"][name], init[name].detach())
        assert trained == (name not in dead), name
    for name in init:
        assert torch.equal(r0["bn_raw"][name], r1["bn_raw"][name]), name


def test_ddp_batchnorm_statistics_are_rank_local_until_broadcast(ddp_runs):
    """With plain BatchNorm the last step's running statistics are each rank's own (a DDP
    property worth knowing before folding: fold rank 0's checkpoint, or broadcast buffers);
    after broadcasting rank 0's buffers the whole state agrees."""
    r0, r1 = ddp_runs
    stats = [k for k in r0["bn_raw"] if k.endswith(("running_mean", "running_var"))]
    assert stats and any(not torch.equal(r0["bn_raw"][k], r1["bn_raw"][k]) for k in stats)
    assert r0["bn_synced"].keys() == r1["bn_synced"].keys()
    for k in r0["bn_synced"]:
        assert torch.equal(r0["bn_synced"][k], r1["bn_synced"][k]), k


def test_ddp_ranks_fold_to_the_same_deploy_model(ddp_runs):
    r0, r1 = ddp_runs
    # folded inside each rank
    assert r0["bn_deploy"].keys() == r1["bn_deploy"].keys()
    for k in r0["bn_deploy"]:
        assert torch.equal(r0["bn_deploy"][k], r1["bn_deploy"][k]), k
    assert torch.equal(r0["bn_deploy_out"], r1["bn_deploy_out"])
    assert r0["bn_deploy_muls"] == 0 and r0["bn_deploy_norms"] == 0
    # and here, from each rank's checkpoint loaded into a freshly prepared model
    probe = rand_images(4, 7, SIZE)
    deployed = []
    for r in ddp_runs:
        model = _prepared()
        model.load_state_dict(r["bn_synced"])
        deploy = asrfx.fold(model, example_inputs=(rand_images(2, 0, SIZE),))
        assert not _mul_nodes(deploy) and not bn_call_nodes(deploy)
        assert deploy.asrfx_report.count(action="folded") == 9
        model.eval()
        with torch.no_grad():
            out = deploy(probe)
            assert rel_err(model(probe), out) <= REL_TOL
        deployed.append((_cpu_state(deploy), out))
    (s0, o0), (s1, o1) = deployed
    assert s0.keys() == s1.keys() == r0["bn_deploy"].keys()
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
        assert torch.equal(s0[k], r0["bn_deploy"][k]), k
    assert torch.equal(o0, o1)
    assert torch.equal(o0, r0["bn_deploy_out"])


# ------------------------------------------------------------------- DDP with SyncBatchNorm

def test_ddp_syncbatchnorm_trains_and_folds(ddp_runs):
    r0, r1 = ddp_runs
    if "sync_error" in r0:
        assert r0["sync_device"] == "cpu", r0["sync_error"]
        pytest.skip(f"torch {torch.__version__} cannot train SyncBatchNorm on CPU under a "
                    f"process group: {r0['sync_error']}")
    assert r0["sync_types"] == ["SyncBatchNorm"]
    for r in ddp_runs:
        assert all(torch.isfinite(torch.tensor(r["sync_losses"])))
    fresh = _prepared()
    init = dict(fresh.named_parameters())
    # statistics of the global batch: the *whole* state agrees, buffers too, no broadcast
    assert r0["sync_raw"].keys() == r1["sync_raw"].keys()
    for k in r0["sync_raw"]:
        assert torch.equal(r0["sync_raw"][k], r1["sync_raw"][k]), k
    dead = _dead_psis(fresh)
    for name in psi_names(fresh):
        trained = not torch.equal(r0["sync_raw"][name], init[name].detach())
        assert trained == (name not in dead), name
    for k in r0["sync_deploy"]:
        assert torch.equal(r0["sync_deploy"][k], r1["sync_deploy"][k]), k
    assert torch.equal(r0["sync_deploy_out"], r1["sync_deploy_out"])
    assert r0["sync_deploy_muls"] == 0 and r0["sync_deploy_norms"] == 0
    # SyncBatchNorm over 2 x BATCH == BatchNorm over the concatenated batch, in one process
    ref = _prepared()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    gens = [torch.Generator().manual_seed(1000 + r) for r in range(WORLD)]
    ref.train()
    for _ in range(STEPS):
        batches = [(torch.randn(BATCH, 3, SIZE, SIZE, generator=g),
                    torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)) for g in gens]
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        opt.zero_grad()
        nn.functional.cross_entropy(ref(x), y).backward()
        opt.step()
    got = r0["sync_raw"]
    for k, v in ref.state_dict().items():
        if v.dtype.is_floating_point:
            assert rel_err(v, got[k]) <= 1e-3, k
        else:
            assert torch.equal(v, got[k]), k


# ------------------------------------------------ SyncBatchNorm -> BatchNorm (one process)

def _sync(model: nn.Module) -> nn.Module:
    return nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_revert_sync_batchnorm_restores_exact_batchnorms(dims):
    prepared = randomize_bn(_prepared(dims=dims, depth=8), dims)
    plain_types = {k: type(m) for k, m in prepared.named_modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    sync = _sync(prepared)
    for m in sync.modules():
        if type(m) is nn.SyncBatchNorm:
            m.momentum, m.eps = 0.25, 1e-3
    tensors = {k: v.data_ptr() for k, v in sync.state_dict().items()}
    x = torch.randn((3, 3) + (SIZE if dims != 3 else 8,) * dims)
    sync.eval()
    with torch.no_grad():
        ref = sync(x)
    records = revert_sync_batchnorm(sync)
    assert records and all(r.action == "reverted" for r in records)
    assert {r.path for r in records} == set(plain_types)
    for k, m in sync.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert type(m) is plain_types[k], k
            assert (m.momentum, m.eps, m.training) == (0.25, 1e-3, False)
    # same names, the very same tensors
    assert {k: v.data_ptr() for k, v in sync.state_dict().items()} == tensors
    with torch.no_grad():
        assert torch.equal(sync(x), ref)


def test_syncbatchnorm_model_trains_and_folds_single_process():
    """No process group: SyncBatchNorm trains as BatchNorm; revert -> fold leaves no attention
    multiply and no norm, and the deploy model matches the SyncBatchNorm model."""
    sync = _sync(_prepared())
    opt = torch.optim.SGD(sync.parameters(), lr=0.1, momentum=0.9)
    sync.train()
    for step in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(sync(rand_images(BATCH, step, SIZE)),
                                    torch.arange(BATCH) % 10).backward()
        opt.step()
    randomize_psi(sync, 3)
    records = revert_sync_batchnorm(sync)
    assert sum(r.action == "reverted" for r in records) == 21
    # the reverted model is still the training form: it trains on, and in the same optimizer
    assert sync.training
    opt.zero_grad()
    nn.functional.cross_entropy(sync(rand_images(BATCH, 9, SIZE)),
                                torch.arange(BATCH) % 10).backward()
    opt.step()
    deploy = asrfx.fold(sync, example_inputs=(rand_images(2, 0, SIZE),))
    assert not _mul_nodes(deploy) and not bn_call_nodes(deploy)
    assert deploy.asrfx_report.count(action="folded") == 9
    x = rand_images(5, 11, SIZE)
    sync.eval()
    with torch.no_grad():
        assert rel_err(sync(x), deploy(x)) <= REL_TOL


def test_syncbatchnorm_inside_the_asr_branch():
    """SRM has a BatchNorm inside its attention branch (frozen to running statistics by
    prepare): converted to SyncBatchNorm it is only a holder of tensors; the fold is exact."""
    prepared = randomize_psi(randomize_bn(_prepared(attention="srm", depth=8), 4), 5)
    sync = _sync(prepared)
    revert_sync_batchnorm(sync)
    deploy = asrfx.fold(sync, example_inputs=(rand_images(2, 0, SIZE),))
    assert not _mul_nodes(deploy)
    x = rand_images(3, 12, SIZE)
    prepared.eval()
    with torch.no_grad():
        assert rel_err(prepared(x), deploy(x)) <= REL_TOL


def test_fold_takes_a_syncbatchnorm_model_directly():
    prepared = randomize_psi(randomize_bn(_prepared(), 6), 7)
    deploy = asrfx.fold(_sync(prepared), example_inputs=(rand_images(2, 0, SIZE),))
    reverted = [s for s in deploy.asrfx_report.sites if s.kind == "SyncBatchNorm"]
    assert reverted and all(s.action == "reverted" and s.target.startswith("BatchNorm")
                            for s in reverted)
    x = rand_images(3, 13, SIZE)
    prepared.eval()
    with torch.no_grad():
        assert rel_err(prepared(x), deploy(x)) <= REL_TOL
    assert not _mul_nodes(deploy) and not bn_call_nodes(deploy)


class _TwoRanks(nn.Module):
    """One norm called on a 4-d map and on its flattened 3-d view."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.other = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.other(x).flatten(2) + self.bn(x.flatten(2))


class _TwoRanksBoth(_TwoRanks):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x).flatten(2) + self.bn(x.flatten(2))


class _MySync(nn.SyncBatchNorm):
    pass


def test_revert_sync_batchnorm_keeps_what_it_cannot_place():
    x = torch.randn(2, 4, 3, 3)
    # ranks 4 and 3 at one module's call sites: BatchNorm2d takes one, BatchNorm1d the other
    gm = asrfx.trace(nn.SyncBatchNorm.convert_sync_batchnorm(_TwoRanksBoth()), (x,))
    (rec,) = revert_sync_batchnorm(gm)
    assert (rec.action, rec.code) == ("kept", "ranks-differ") and "ranks [3, 4]" in rec.reason
    assert type(gm.bn) is nn.SyncBatchNorm
    # no shape metadata: kept, with the fix named; example_inputs supply it
    gm = asrfx.trace(nn.SyncBatchNorm.convert_sync_batchnorm(_TwoRanks()), (x,))
    for n in gm.graph.nodes:
        n.meta.pop("tensor_meta", None)
    records = revert_sync_batchnorm(gm)
    assert [(r.action, r.code) for r in records] == [("kept", "rank-unknown")] * 2
    assert all("example_inputs" in r.reason for r in records)
    records = revert_sync_batchnorm(gm, example_inputs=(x,))
    assert {r.path: r.target for r in records} == {"bn": "BatchNorm1d",
                                                         "other": "BatchNorm2d"}
    assert type(gm.bn) is nn.BatchNorm1d and type(gm.other) is nn.BatchNorm2d
    # subclasses are not SyncBatchNorm: their forward may differ
    model = _TwoRanks()
    model.bn = _MySync(4)
    gm = asrfx.trace(model, (x,))
    assert revert_sync_batchnorm(gm) == []
    assert type(gm.bn) is _MySync


# ----------------------------------------------------------------------------- torch.compile

class _TinySE(nn.Module):
    """Stem conv + BN + ReLU, two conv-BN-SE blocks with identity shortcuts, pool, linear."""

    def __init__(self, c: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                                  nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                          SEModule(c, reduction=4)) for _ in range(2))
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = torch.relu(x + block(x))
        return self.head(x.mean((2, 3)))


class _TinyMBConv(_TinySE):
    """The same with each block's SE after a SiLU and before a 1x1 projection (the fused form
    puts its gate into the projection's kernel)."""

    def __init__(self, c: int = 16, num_classes: int = 10) -> None:
        super().__init__(c, num_classes)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                          nn.SiLU(), SEModule(c, reduction=4), nn.Conv2d(c, c, 1))
            for _ in range(2))


def _tiny_prepared(fused: bool | str = False) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    model = _TinyMBConv() if fused == "conv" else _TinySE()
    return asrfx.prepare(model, example_inputs=(rand_images(2, 0, size=8),),
                         fused=bool(fused))


def _need_inductor() -> None:
    if not runtimes.available()["torch.compile"]:
        pytest.skip("no C++ compiler for inductor")


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True, "conv"],
                         ids=["multiply", "fused", "fused-into-conv"])
def test_prepared_model_trains_under_torch_compile(fused):
    _need_inductor()
    eager, model = _tiny_prepared(fused), _tiny_prepared(fused)
    if fused == "conv":
        from asrfx.passes.fuse_gates import GatedConv2d
        assert sum(isinstance(m, GatedConv2d) for m in model.modules()) == 2
    psis = psi_names(model)
    assert len(psis) == 2 and not _dead_psis(model)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    cmodel = torch.compile(model)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (eager, model)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.randn(BATCH, 3, 8, 8, generator=gen)
        y = torch.randint(0, 10, (BATCH,), generator=gen)
        losses = []
        for m, opt in zip((eager, cmodel), opts):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(m(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert all(torch.isfinite(torch.tensor(losses)))
        assert abs(losses[0] - losses[1]) <= 1e-4 * max(1.0, abs(losses[0]))
        params = dict(model.named_parameters())
        for n in psis:
            g = params[n].grad
            assert g is not None and torch.count_nonzero(g) > 0, n
    params, ref = dict(model.named_parameters()), dict(eager.named_parameters())
    for n in psis:
        assert not torch.equal(params[n].detach(), init[n]), n
    for n in params:
        assert rel_err(ref[n], params[n]) <= 1e-4, n
    # what torch.compile trained folds like anything else
    deploy = asrfx.fold(model, example_inputs=(rand_images(2, 0, size=8),))
    assert not _mul_nodes(deploy)


@pytest.mark.slow
def test_folded_model_runs_under_torch_compile():
    _need_inductor()
    model = randomize_psi(randomize_bn(_tiny_prepared(), 8), 9)
    deploy = asrfx.fold(model, example_inputs=(rand_images(2, 0, size=8),))
    assert not _mul_nodes(deploy) and not bn_call_nodes(deploy)
    deploy.eval()
    cmodel, reason = runtimes.compiled(deploy, (rand_images(2, 0, size=8),))
    assert reason == "" and cmodel is not None
    model.eval()
    for seed in (1, 2):
        x = rand_images(2, seed, size=8)
        with torch.no_grad():
            out = cmodel(x)
            assert rel_err(deploy(x), out) <= 1e-5
            assert rel_err(model(x), out) <= REL_TOL
