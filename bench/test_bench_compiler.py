"""The compiler's own cost: prepare and fold (with its check) of SE ResNets of growing depth.
``asrfx bench --cost-only`` gives the same figures with node counts and linear fits."""

from __future__ import annotations

import pytest
import torch

import asrfx
from asrfx.zoo import cifar_resnet


@pytest.mark.parametrize("depth", [20, 56, 110, 164, 326, 650, 1001])
def test_prepare_and_fold(benchmark, depth):
    block = "basic" if depth < 164 else "bottleneck"
    model = cifar_resnet(depth, block=block, attention="se")
    x = torch.randn(1, 3, 32, 32)
    benchmark.group = "compiler cost"

    def run():
        return asrfx.fold(asrfx.prepare(model, example_inputs=(x,)), example_inputs=(x,))

    deploy = benchmark.pedantic(run, rounds=3, iterations=1)
    assert deploy.asrfx_report.count(action="folded") > 0
