"""Tests for asrfx.zoo: CIFAR ResNets (He et al. 2016) with SE attention."""

import doctest

import pytest
import torch
import torch.fx
from torch import nn

import asrfx.zoo as zoo
from asrfx.zoo import BasicBlock, Bottleneck, CifarResNet, SEModule, cifar_resnet


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def blocks(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]


# every test starts from torch.manual_seed(0): conftest._deterministic_torch


# --------------------------------------------------------------------------
# parameter counts against the published figures


def test_resnet110_basic_cifar10_param_count():
    # 1,730,714: ResNet-110 with projection (1x1 conv + BN) shortcuts; the
    # option-A (zero-padding) variant has 2,752 fewer (1,727,962).
    model = cifar_resnet(110, num_classes=10, block="basic")
    count = n_params(model)
    assert abs(count - 1_730_714) <= 0.01 * 1_730_714
    assert count == 1_730_714


def test_resnet164_bottleneck_cifar100_param_count():
    model = cifar_resnet(164, num_classes=100, block="bottleneck")
    count = n_params(model)
    assert abs(count - 1.73e6) <= 0.03 * 1.73e6
    assert count == 1_727_284


def test_small_basic_param_counts():
    # ResNet-20 / 56 (CIFAR-10, projection shortcuts): 0.27M / 0.86M in the paper.
    assert n_params(cifar_resnet(20, num_classes=10, block="basic")) == 272_474
    assert n_params(cifar_resnet(56, num_classes=10, block="basic")) == 855_770


def test_bottleneck_stage_widths_and_shortcuts():
    model = cifar_resnet(29, num_classes=100)
    assert [m.out_planes for m in blocks(model)] == [64] * 3 + [128] * 3 + [256] * 3
    assert model.fc.in_features == 256
    # Projection only where shape changes: first block of each stage.
    assert [b.downsample is not None for b in blocks(model)] == [True, False, False] * 3
    assert [b.stride for b in blocks(model)] == [1, 1, 1, 2, 1, 1, 2, 1, 1]
    # 3n blocks with 3 weighted layers each, plus stem and classifier.
    assert len(blocks(model)) == 9


def test_basic_stage_widths_and_shortcuts():
    model = cifar_resnet(20, num_classes=10, block="basic")
    assert [m.out_planes for m in blocks(model)] == [16] * 3 + [32] * 3 + [64] * 3
    assert [b.downsample is not None for b in blocks(model)] == [False] * 3 + [True, False, False] * 2
    assert model.fc.in_features == 64


def test_all_convs_bias_free_and_init():
    model = cifar_resnet(20, attention="se", block="basic")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.bias is None for c in convs)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    # kaiming_normal_(fan_out, relu): std = sqrt(2 / (out_channels * k * k)).
    conv = model.layer3[1].conv1  # 64 -> 64, 3x3: 36,864 weights
    expected = (2.0 / (64 * 9)) ** 0.5
    assert abs(conv.weight.std().item() - expected) < 0.05 * expected


# --------------------------------------------------------------------------
# attention placement


@pytest.mark.parametrize("depth,block", [(20, "basic"), (29, "bottleneck")])
def test_one_se_per_block(depth, block):
    model = cifar_resnet(depth, attention="se", block=block)
    ses = [m for m in model.modules() if isinstance(m, SEModule)]
    bs = blocks(model)
    assert len(bs) == 9  # 3n with n = 3
    assert len(ses) == len(bs)
    for b in bs:
        assert isinstance(b.attention, SEModule)
        assert b.attention.channels == b.out_planes
        assert b.attention.fc1.out_features == max(b.out_planes // 16, 1)


def test_plain_model_has_no_attention_modules():
    model = cifar_resnet(20, block="basic")
    assert all(b.attention is None for b in blocks(model))
    assert not any(isinstance(m, (SEModule, nn.Identity)) for m in model.modules())


def test_callable_attention_receives_block_channels():
    seen = []

    def factory(channels):
        seen.append(channels)
        return SEModule(channels, reduction=4)

    model = cifar_resnet(11, attention=factory, num_classes=10)
    assert seen == [64, 128, 256]
    assert [b.attention.fc1.out_features for b in blocks(model)] == [16, 32, 64]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_attention_sits_between_last_bn_and_residual_add(block):
    depth = 8 if block == "basic" else 11
    model = cifar_resnet(depth, attention="se", block=block).eval()
    last_bn = "bn2" if block == "basic" else "bn3"
    gm = torch.fx.symbolic_trace(model)
    nodes = list(gm.graph.nodes)
    for stage in ("layer1", "layer2", "layer3"):
        prefix = f"{stage}.0."
        bn = next(n for n in nodes if n.op == "call_module" and n.target == prefix + last_bn)
        pool = next(n for n in nodes if n.op == "call_module" and n.target == prefix + "attention.pool")
        assert bn in pool.all_input_nodes  # SE squeezes the last BN's output
        # The SE gate multiplies the BN output; the product feeds the residual add.
        mul = next(u for u in bn.users if u.op == "call_function" and u.target.__name__ == "mul")
        add = next(iter(mul.users))
        assert add.op == "call_function" and add.target.__name__ == "add"
        relu = next(iter(add.users))
        assert relu.op == "call_module" and relu.target == prefix + "relu"


def test_attention_changes_output():
    plain = cifar_resnet(8, block="basic", num_classes=10).eval()
    se = cifar_resnet(8, attention="se", block="basic", num_classes=10).eval()
    # Give both models the same backbone weights; only the SE layers differ.
    missing, unexpected = se.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(".attention." in k for k in missing)
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(plain(x), se(x))


# --------------------------------------------------------------------------
# shapes, dims, tracing


@pytest.mark.parametrize(
    "depth,block,attention",
    [(20, "basic", None), (20, "basic", "se"), (29, "bottleneck", None), (29, "bottleneck", "se")],
)
def test_output_shapes_cifar(depth, block, attention):
    model = cifar_resnet(depth, attention=attention, block=block, num_classes=100)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
@pytest.mark.parametrize("attention", [None, "se"])
def test_dims1_signal(block, attention):
    depth = 8 if block == "basic" else 11
    model = cifar_resnet(depth, attention=attention, block=block, in_channels=1, num_classes=7, dims=1)
    assert not any(isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) for m in model.modules())
    assert any(isinstance(m, nn.Conv1d) for m in model.modules())
    out = model(torch.randn(2, 1, 40))
    assert out.shape == (2, 7)
    gm = torch.fx.symbolic_trace(model.eval())
    x = torch.randn(2, 1, 40)
    torch.testing.assert_close(gm(x), model(x))


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_dims3_volume(block):
    depth = 8 if block == "basic" else 11
    model = cifar_resnet(depth, attention="se", block=block, in_channels=1, num_classes=5, dims=3, width=4)
    assert any(isinstance(m, nn.Conv3d) for m in model.modules())
    assert all(isinstance(b.attention.pool, nn.AdaptiveAvgPool3d) for b in blocks(model))
    assert model(torch.randn(2, 1, 8, 8, 8)).shape == (2, 5)


def test_fx_trace_depth20_se_matches_eager():
    model = cifar_resnet(20, attention="se", block="basic", num_classes=10)
    # Non-trivial BN statistics so eval mode is not a near-identity.
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, 32, 32))
    model.eval()
    gm = torch.fx.symbolic_trace(model)
    assert isinstance(gm, torch.fx.GraphModule)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        got = gm(x)
    torch.testing.assert_close(got, expected)
    # Tracing sees through SE: 9 sigmoid gates, no opaque SEModule leaf.
    gates = [n for n in gm.graph.nodes if n.op == "call_module" and n.target.endswith("attention.gate")]
    assert len(gates) == 9


def test_fx_trace_bottleneck_se_matches_eager():
    model = cifar_resnet(29, attention="se", num_classes=100).eval()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


# --------------------------------------------------------------------------
# SEModule on its own


@pytest.mark.parametrize("dims,shape", [(1, (2, 32, 10)), (2, (2, 32, 5, 6)), (3, (2, 32, 3, 4, 5))])
def test_se_module_shapes_and_gate(dims, shape):
    se = SEModule(32, dims=dims)
    assert se.fc1.out_features == 2
    x = torch.randn(*shape)
    y = se(x)
    assert y.shape == x.shape
    # y = x * g with a per-(sample, channel) gate in (0, 1).
    gate = y / x
    flat = gate.flatten(2)
    torch.testing.assert_close(flat, flat[..., :1].expand_as(flat))
    assert torch.all((flat > 0) & (flat < 1))


def test_se_hidden_at_least_one():
    assert SEModule(8, reduction=16).fc1.out_features == 1


def test_se_module_traces():
    se = SEModule(16, reduction=4, dims=1)
    gm = torch.fx.symbolic_trace(se)
    x = torch.randn(3, 16, 11)
    torch.testing.assert_close(gm(x), se(x))


def test_blocks_standalone():
    b = BasicBlock(16, 32, stride=2, attention=SEModule(32))
    assert b(torch.randn(2, 16, 8, 8)).shape == (2, 32, 4, 4)
    bt = Bottleneck(64, 16, attention=lambda c: SEModule(c, dims=1), dims=1)
    assert bt.downsample is None and bt.attention.channels == 64
    assert bt(torch.randn(2, 64, 9)).shape == (2, 64, 9)


# --------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("depth,block,nearest", [
    (21, "basic", "20 or 26"),
    (19, "basic", "14 or 20"),
    (5, "basic", "8"),
    (0, "basic", "8"),
    (30, "bottleneck", "29 or 38"),
    (21, "bottleneck", "20 or 29"),
    (2, "bottleneck", "11"),
])
def test_bad_depth_raises(depth, block, nearest):
    rule = "6n+2" if block == "basic" else "9n+2"
    with pytest.raises(ValueError) as info:
        cifar_resnet(depth, block=block)
    msg = str(info.value)
    assert rule in msg
    assert nearest in msg


def test_bottleneck_depth_rule_accepts_paper_depths():
    # 164 -> n=18, 29 -> n=3, 11 -> n=1; basic 110 -> 18, 56 -> 9, 8 -> 1.
    assert len(blocks(cifar_resnet(11))) == 3
    assert len(blocks(cifar_resnet(8, block="basic"))) == 3
    with pytest.raises(ValueError):
        cifar_resnet(110 + 6, block="bottleneck")


@pytest.mark.parametrize("attention", ["nope", "SE", ""])
def test_bad_attention_string_raises(attention):
    with pytest.raises(ValueError, match="'se'"):
        cifar_resnet(20, attention=attention, block="basic")


def test_bad_attention_type_raises():
    with pytest.raises(TypeError):
        cifar_resnet(20, attention=3, block="basic")
    with pytest.raises(TypeError):
        cifar_resnet(20, attention=SEModule(16), block="basic")
    with pytest.raises(TypeError):
        cifar_resnet(20, attention=lambda c: "not a module", block="basic")


def test_bad_block_and_dims_raise():
    with pytest.raises(ValueError, match="basic"):
        cifar_resnet(20, block="wide")
    with pytest.raises(ValueError, match="dims"):
        cifar_resnet(20, block="basic", dims=4)
    with pytest.raises(TypeError):
        cifar_resnet(20.0, block="basic")


def test_public_api_and_docstring_example():
    assert set(zoo.__all__) == {"SEModule", "BasicBlock", "Bottleneck", "CifarResNet", "cifar_resnet",
                                "RepVGGBlock", "ACBlock", "repvgg_net", "acnet", "ViTBlock",
                                "ViT", "vit_tiny", "LayerNorm2d", "ConvNeXtBlock", "ConvNeXt",
                                "convnext_tiny", "ModelSpec", "parse_model_spec", "build_model",
                                "import_callable"}
    assert isinstance(cifar_resnet(8, block="basic"), CifarResNet)
    result = doctest.testmod(zoo, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
