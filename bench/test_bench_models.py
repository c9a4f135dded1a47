"""Forward latency of every variant (backbone, backbone fused, +attention, ASR train form,
ASR folded, BN-only fold) of the benchmark models, at batch 1 and 32.

Models: ResNet-164 at 32x32 with every attention of the library (the paper's setting), ResNet-56
with SE, MONAI SEResNet50 and efficientnet_pytorch EfficientNet-B0 at 64x64 in replace mode.
"""

from __future__ import annotations

import pytest
import torch

from asrfx.attention import ATTENTIONS

CASES = [("resnet164", a) for a in sorted(ATTENTIONS)] + [("resnet56", "se")]
THIRD_PARTY = [("monai-seresnet50", "se"), ("efficientnet-b0", "se")]
KINDS = ["backbone", "backbone fused", "attention", "train form", "folded", "BN-only fold"]


def _pick(evals: dict, kind: str):
    if kind in ("backbone", "backbone fused"):
        return evals[kind]
    if kind == "attention":
        return next(m for n, m in evals.items() if n.startswith("+"))
    return next(m for n, m in evals.items() if n.endswith(kind))


def _run(benchmark, built, model, attention, kind, batch):
    if model in ("monai-seresnet50",):
        pytest.importorskip("monai")
    if model == "efficientnet-b0":
        pytest.importorskip("efficientnet_pytorch")
    evals, shape = built(model, attention)
    m = _pick(evals, kind)
    x = torch.randn(batch, *shape)
    with torch.no_grad():
        benchmark(m, x)


@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model, attention", CASES)
def test_latency(benchmark, built, model, attention, kind, batch):
    benchmark.group = f"{model}/{attention}/batch {batch}"
    _run(benchmark, built, model, attention, kind, batch)


@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model, attention", THIRD_PARTY)
def test_latency_third_party(benchmark, built, model, attention, kind, batch):
    benchmark.group = f"{model}/batch {batch}"
    _run(benchmark, built, model, attention, kind, batch)
