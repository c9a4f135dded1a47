"""pytest-benchmark suite: ``pytest bench --benchmark-only``.

Latency of the ResNet-164 deploy forms at batch 1 and 16, and the compiler's own cost.
Compare within one run (``--benchmark-group-by=param``); timings on shared machines are noisy.
"""

import pytest
import torch

import asrfx
from asrfx.zoo import cifar_resnet

DEPTH = 164


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    plain = cifar_resnet(DEPTH).eval()
    se = cifar_resnet(DEPTH, attention="se").eval()
    asr = asrfx.prepare(se, example_inputs=(x,)).eval()
    return {"backbone": plain, "backbone_folded": asrfx.fold(plain, example_inputs=(x,)),
            "se": se, "asr_folded": asrfx.fold(asr, example_inputs=(x,))}


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("variant", ["backbone", "backbone_folded", "se", "asr_folded"])
def test_latency(benchmark, models, variant, batch):
    x = torch.randn(batch, 3, 32, 32)
    m = models[variant]
    with torch.no_grad():
        out = benchmark(m, x)
    assert out.shape == (batch, 100)


def test_prepare_fold_resnet164(benchmark):
    se = cifar_resnet(DEPTH, attention="se")
    x = torch.randn(1, 3, 32, 32)

    def run():
        return asrfx.fold(asrfx.prepare(se, example_inputs=(x,)), example_inputs=(x,))

    deploy = benchmark.pedantic(run, rounds=3, iterations=1)
    assert deploy.asrfx_report.count(action="folded") == 54
