"""Reference models for asrfx: CIFAR ResNets with optional channel attention.

The models here are the test subjects of the compiler: networks that are
trained *with* a channel-attention module in every residual block and that
asrfx later rewrites into plain networks for deployment.

* :class:`SEModule` -- squeeze-and-excitation channel attention
  (Hu, Shen, Sun, "Squeeze-and-Excitation Networks", CVPR 2018,
  arXiv:1709.01507); defined in :mod:`asrfx.attention` with the other
  attention modules and re-exported here.
* :class:`BasicBlock` and :class:`Bottleneck` -- the original
  (post-activation) residual blocks of He, Zhang, Ren, Sun, "Deep Residual
  Learning for Image Recognition", CVPR 2016, arXiv:1512.03385.
* :func:`cifar_resnet` -- the three-stage CIFAR ResNets of the same paper
  (ResNet-20/56/110 with basic blocks, ResNet-164 with bottlenecks), with an
  optional attention module in every block.

Everything is dimension-agnostic (``dims`` = 1, 2 or 3 picks Conv1d/2d/3d,
BatchNorm1d/2d/3d and the matching pools), and every model is traceable with
:func:`torch.fx.symbolic_trace`: ``forward`` methods only branch on Python
attributes, never on tensor values.

Projection shortcuts (1x1 conv + BN, the paper's option B) are used wherever
a block changes shape; with them ResNet-110 for CIFAR-10 has 1,730,714
parameters.

Models are built from the layers of :mod:`asrfx.attention` (attention modules,
the dims-generic Conv/BatchNorm/pool tables); that module imports nothing from
here. :func:`parse_model_spec` and :func:`build_model` read the model specs of
the command line and the benchmarks (``resnet20-se``, ``resnet164``,
``efficientnet-b0``, ``package.module:factory``).
"""

from __future__ import annotations

import ast
import importlib
import operator
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from .attention import (_BN, _POOL, AttentionFactory, SEModule, TokenSE, _check_dims, _check_spec,
                        _conv, get_attention)
from .errors import InputError

__all__ = [
    "SEModule",
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "cifar_resnet",
    "RepVGGBlock",
    "ACBlock",
    "repvgg_net",
    "acnet",
    "ViTBlock",
    "ViT",
    "vit_tiny",
    "LayerNorm2d",
    "ConvNeXtBlock",
    "ConvNeXt",
    "convnext_tiny",
    "ModelSpec",
    "parse_model_spec",
    "build_model",
    "import_callable",
]

AttentionSpec = Union[None, str, AttentionFactory]

_BLOCKS = ("basic", "bottleneck")


def _make_attention(attention: Union[None, nn.Module, AttentionFactory], channels: int) -> Optional[nn.Module]:
    """Turn a block's ``attention`` argument into a module (or None)."""
    if attention is None:
        return None
    if isinstance(attention, nn.Module):
        return attention
    if callable(attention):
        module = attention(channels)
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"attention factory must return an nn.Module, got {type(module).__name__}"
            )
        return module
    raise TypeError(
        "attention must be None, an nn.Module or a callable channels -> nn.Module, "
        f"got {type(attention).__name__}"
    )


class _ResidualBlock(nn.Module):
    """Shared plumbing of :class:`BasicBlock` and :class:`Bottleneck`."""

    expansion = 1

    def _finish(
        self,
        in_planes: int,
        out_planes: int,
        stride: int,
        attention: Union[None, nn.Module, AttentionFactory],
        dims: int,
    ) -> None:
        self.in_planes = in_planes
        self.out_planes = out_planes
        self.stride = stride
        self.dims = dims
        self.attention = _make_attention(attention, out_planes)
        if stride != 1 or in_planes != out_planes:
            self.downsample: Optional[nn.Sequential] = nn.Sequential(
                _conv(dims, in_planes, out_planes, 1, stride),
                _BN[dims](out_planes),
            )
        else:
            self.downsample = None


class BasicBlock(_ResidualBlock):
    """Original (post-activation) basic residual block of He et al. 2016.

    ``conv3x3(stride)-BN-ReLU-conv3x3-BN[-attention] + shortcut, ReLU``
    (arXiv:1512.03385). The shortcut is the identity when shapes match and a
    1x1 convolution (with ``stride``) plus BN otherwise.

    Args:
        in_planes: input channels.
        planes: output channels (``expansion`` is 1).
        stride: stride of the first convolution and of the shortcut.
        attention: None, an ``nn.Module`` instance, or a callable
            ``channels -> nn.Module``; applied after the last BN, before the
            residual addition.
        dims: 1, 2 or 3 (Conv1d/2d/3d, BatchNorm1d/2d/3d).
    """

    expansion = 1

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        attention: Union[None, nn.Module, AttentionFactory] = None,
        dims: int = 2,
    ) -> None:
        super().__init__()
        _check_dims(dims)
        out_planes = planes * self.expansion
        self.conv1 = _conv(dims, in_planes, planes, 3, stride)
        self.bn1 = _BN[dims](planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv(dims, planes, out_planes, 3)
        self.bn2 = _BN[dims](out_planes)
        self._finish(in_planes, out_planes, stride, attention, dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.attention is not None:
            out = self.attention(out)
        return self.relu(out + identity)


class Bottleneck(_ResidualBlock):
    """Original (post-activation) bottleneck residual block of He et al. 2016.

    ``conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1-BN[-attention]
    + shortcut, ReLU`` with ``expansion = 4`` (arXiv:1512.03385). The
    shortcut is the identity when shapes match and a 1x1 convolution (with
    ``stride``) plus BN otherwise.

    Args:
        in_planes: input channels.
        planes: bottleneck width; the block outputs ``4 * planes`` channels.
        stride: stride of the 3x3 convolution and of the shortcut.
        attention: None, an ``nn.Module`` instance, or a callable
            ``channels -> nn.Module`` (called with ``4 * planes``); applied
            after the last BN, before the residual addition.
        dims: 1, 2 or 3 (Conv1d/2d/3d, BatchNorm1d/2d/3d).
    """

    expansion = 4

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        attention: Union[None, nn.Module, AttentionFactory] = None,
        dims: int = 2,
    ) -> None:
        super().__init__()
        _check_dims(dims)
        out_planes = planes * self.expansion
        self.conv1 = _conv(dims, in_planes, planes, 1)
        self.bn1 = _BN[dims](planes)
        self.conv2 = _conv(dims, planes, planes, 3, stride)
        self.bn2 = _BN[dims](planes)
        self.conv3 = _conv(dims, planes, out_planes, 1)
        self.bn3 = _BN[dims](out_planes)
        self.relu = nn.ReLU(inplace=True)
        self._finish(in_planes, out_planes, stride, attention, dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.attention is not None:
            out = self.attention(out)
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """Three-stage CIFAR ResNet (He et al. 2016, section 4.2).

    Stem ``conv3x3(in_channels, width)-BN-ReLU``, three stages of ``n``
    blocks each with widths ``width, 2*width, 4*width`` (times the block's
    expansion) and strides 1, 2, 2, then global average pooling, flatten and
    a linear classifier. Usually built through :func:`cifar_resnet`.
    """

    def __init__(
        self,
        block: type,
        n: int,
        attention: Optional[AttentionFactory] = None,
        num_classes: int = 100,
        width: int = 16,
        in_channels: int = 3,
        dims: int = 2,
    ) -> None:
        super().__init__()
        _check_dims(dims)
        self.dims = dims
        self.conv1 = _conv(dims, in_channels, width, 3)
        self.bn1 = _BN[dims](width)
        self.relu = nn.ReLU(inplace=True)
        planes_in = width
        stages = []
        for i, stride in enumerate((1, 2, 2)):
            planes = width * 2**i
            blocks = []
            for j in range(n):
                blk = block(planes_in, planes, stride if j == 0 else 1, attention, dims)
                blocks.append(blk)
                planes_in = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = _POOL[dims](1)
        self.fc = nn.Linear(planes_in, num_classes)
        self.num_features = planes_in

        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.avgpool(x).flatten(1)
        return self.fc(x)


def _blocks_per_stage(depth: int, block: str) -> int:
    """Apply the paper's depth rule: 6n+2 (basic) or 9n+2 (bottleneck)."""
    per = 6 if block == "basic" else 9
    rule = f"{per}n+2"
    try:
        d = operator.index(depth)
    except TypeError:
        raise TypeError(f"depth must be an int, got {type(depth).__name__}") from None
    if isinstance(depth, bool):
        raise TypeError("depth must be an int, got bool")
    if d >= per + 2 and (d - 2) % per == 0:
        return (d - 2) // per
    lower = (d - 2) // per
    candidates = [per * k + 2 for k in (lower, lower + 1) if k >= 1] or [per + 2]
    nearest = " or ".join(str(c) for c in candidates)
    raise ValueError(
        f"depth {d} does not fit the {block} rule depth = {rule} with n >= 1; "
        f"nearest valid depths: {nearest}"
    )


def cifar_resnet(
    depth: int,
    attention: AttentionSpec = None,
    num_classes: int = 10,
    block: Optional[str] = None,
    width: int = 16,
    in_channels: int = 3,
    dims: int = 2,
) -> nn.Module:
    """Build a CIFAR ResNet of He et al. 2016 (arXiv:1512.03385).

    Three stages of ``n`` residual blocks with widths ``width``,
    ``2*width``, ``4*width`` and strides 1, 2, 2 after a
    ``conv3x3-BN-ReLU`` stem; global average pooling, flatten and a linear
    classifier. Bottleneck blocks output four times their width (64/128/256
    channels for ``width=16``). Shortcuts are identities, or 1x1 conv + BN
    projections where a block changes shape. Convolutions use Kaiming-normal
    initialisation (fan_out, ReLU); BatchNorm starts at weight 1, bias 0.

    Args:
        depth: total number of weighted layers. Basic blocks need
            ``depth = 6n + 2`` (20, 32, 44, 56, 110, ...); bottlenecks need
            ``depth = 9n + 2`` (29, 56, 110, 164, ...), with ``n >= 1``
            blocks per stage.
        attention: channel attention placed after the last BN of every
            block, before the residual addition: ``None`` (plain ResNet),
            ``"se"`` (:class:`SEModule` with reduction 16), any other name of
            :data:`asrfx.attention.ATTENTIONS` (``"ese"``, ``"eca"``,
            ``"eca_transpose"``, ``"srm"``, ``"gct"``, ``"cbam"``,
            ``"cbam_channel"``, ``"spa"``, ``"gc"``; built by
            :func:`asrfx.attention.get_attention` with its defaults), or a
            callable ``channels -> nn.Module`` called once per block.
        num_classes: output size of the classifier (10: CIFAR-10).
        block: ``"basic"`` or ``"bottleneck"``; by default the CIFAR naming the command line
            and benchmarks use too: ResNet-20/32/44/56/110 are basic-block nets (ResNet-20:
            0.27M parameters), ResNet-164/1001 bottleneck ones (ResNet-164: 1.7M); a depth
            only one rule fits (29, 47, ...) takes that rule.
        width: channels of the stem and of the first stage.
        in_channels: channels of the input.
        dims: 1, 2 or 3 -- selects Conv1d/2d/3d, BatchNorm1d/2d/3d and the
            matching adaptive average pools, so the same network runs on
            signals ``(N, C, L)``, images ``(N, C, H, W)`` or volumes
            ``(N, C, D, H, W)``.

    Returns:
        A :class:`CifarResNet` (an ``nn.Module``) mapping
        ``(N, in_channels, *spatial)`` to logits ``(N, num_classes)``.

    Raises:
        ValueError: ``depth`` does not fit the depth rule of ``block``;
            unknown ``block``; ``dims`` not 1, 2 or
            3, or not 2 for a 2-D-only attention (``"eca_transpose"``,
            ``"spa"``, ``"gc"``); non-positive ``width``, ``num_classes`` or ``in_channels``.
        InputError (a ``ValueError``): unknown ``attention`` string (the
            message lists the names).
        TypeError: ``depth`` is not an int, or ``attention`` is neither
            None, a string nor a callable (an ``nn.Module`` instance is
            rejected: it would be shared by every block).

    Example:
        >>> import torch
        >>> from asrfx.zoo import cifar_resnet
        >>> model = cifar_resnet(20, attention="se")  # basic blocks, 10 classes
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> gm = torch.fx.symbolic_trace(model.eval())
    """
    if isinstance(depth, int) and not isinstance(depth, bool) and block is None:
        block = _cifar_block(depth)
    if block not in _BLOCKS:
        raise ValueError(f"block must be one of {_BLOCKS}, got {block!r}")
    _check_dims(dims)
    for name, value in (("num_classes", num_classes), ("width", width), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    n = _blocks_per_stage(depth, block)

    factory: Optional[AttentionFactory]
    if attention is None:
        factory = None
    elif isinstance(attention, str):
        _check_spec(attention, "attention")  # an unknown name fails before any block is built
        factory = lambda channels: get_attention(attention, channels, dims=dims)  # noqa: E731
    elif isinstance(attention, nn.Module):
        raise TypeError(
            "attention must be a factory (callable channels -> nn.Module), not an "
            "nn.Module instance, which every block would share"
        )
    elif callable(attention):
        factory = attention
    else:
        raise TypeError(
            "attention must be None, a name such as 'se' or a callable channels -> nn.Module, "
            f"got {type(attention).__name__}"
        )

    block_cls = BasicBlock if block == "basic" else Bottleneck
    return CifarResNet(
        block_cls,
        n,
        attention=factory,
        num_classes=num_classes,
        width=width,
        in_channels=in_channels,
        dims=dims,
    )


# --- multi-branch re-parameterizable nets --------------------------------------------------------


def _conv_bn(ci: int, co: int, k: int | tuple[int, int], stride: int = 1, groups: int = 1
             ) -> nn.Sequential:
    k = k if isinstance(k, tuple) else (k, k)
    return nn.Sequential(nn.Conv2d(ci, co, k, stride, tuple(d // 2 for d in k), groups=groups,
                                   bias=False), nn.BatchNorm2d(co))


class RepVGGBlock(nn.Module):
    """Training-time RepVGG block (Ding et al., "RepVGG: Making VGG-style ConvNets Great Again",
    CVPR 2021, arXiv 2101.03697): ``relu(BN(conv3x3(x)) + BN(conv1x1(x)) [+ BN(x)])``; the
    identity branch exists when the block keeps its width and resolution. ``asrfx.fold``
    merges the branches into one 3x3 conv from the graph."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.dense = _conv_bn(in_channels, out_channels, 3, stride, groups)
        self.pointwise = _conv_bn(in_channels, out_channels, 1, stride, groups)
        self.identity = nn.BatchNorm2d(in_channels) \
            if in_channels == out_channels and stride == 1 else None
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dense(x) + self.pointwise(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.relu(y)


class ACBlock(nn.Module):
    """Asymmetric convolution block (Ding et al., "ACNet: Strengthening the Kernel Skeletons for
    Powerful CNN via Asymmetric Convolution Blocks", ICCV 2019, arXiv 1908.03930):
    ``relu(BN(conv3x3(x)) + BN(conv1x3(x)) + BN(conv3x1(x)))``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.square = _conv_bn(in_channels, out_channels, 3, stride)
        self.hor = _conv_bn(in_channels, out_channels, (1, 3), stride)
        self.ver = _conv_bn(in_channels, out_channels, (3, 1), stride)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.square(x) + self.hor(x) + self.ver(x))


def _multi_branch_net(block: Callable[..., nn.Module], widths: tuple[int, ...], blocks: int,
                      num_classes: int, in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = in_channels
    for i, w in enumerate(widths):
        for j in range(blocks):
            layers.append(block(c, w, stride=2 if j == 0 and i > 0 else 1))
            c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))


def repvgg_net(widths: tuple[int, ...] = (16, 32, 64), blocks: int = 2, num_classes: int = 10,
               in_channels: int = 3) -> nn.Sequential:
    """A small RepVGG-style net: stages of :class:`RepVGGBlock` (first block of a stage strides
    2). Deploy form after ``asrfx.fold``: one 3x3 conv and a ReLU per block.

    Example::

        deploy = asrfx.fold(repvgg_net(), example_inputs=(torch.randn(1, 3, 32, 32),))
    """
    return _multi_branch_net(RepVGGBlock, widths, blocks, num_classes, in_channels)


def acnet(widths: tuple[int, ...] = (16, 32, 64), blocks: int = 2, num_classes: int = 10,
          in_channels: int = 3) -> nn.Sequential:
    """A small ACNet-style net: stages of :class:`ACBlock`. Deploy form after ``asrfx.fold``:
    one 3x3 conv and a ReLU per block."""
    return _multi_branch_net(ACBlock, widths, blocks, num_classes, in_channels)


# --- a small vision transformer ----------------------------------------------------------------


class ViTBlock(nn.Module):
    """Pre-norm transformer block (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021,
    arXiv 2010.11929): ``t + MHA(LN(t))``, then ``t + MLP(LN(t))``, with an optional channel
    attention over the tokens after the second norm (``asrfx.attention.TokenSE``)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2, attention: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        if attention:
            self.se = TokenSE(dim)
        else:
            self.se = None
        self.fc1 = nn.Linear(dim, dim * mlp_ratio)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim * mlp_ratio, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        h = self.norm1(t)
        t = t + self.attn(h, h, h, need_weights=False)[0]
        h = self.norm2(t)
        if self.se is not None:
            h = self.se(h)
        return t + self.fc2(self.act(self.fc1(h)))


class ViT(nn.Module):
    """Patch embedding (a strided conv), learned position embedding, ``depth`` :class:`ViTBlock`,
    final LayerNorm, mean over tokens, linear head."""

    def __init__(self, image_size: int = 32, patch: int = 4, dim: int = 32, depth: int = 2,
                 heads: int = 2, num_classes: int = 10, in_channels: int = 3,
                 attention: bool = False):
        super().__init__()
        self.embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.pos = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2, dim))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads, attention=attention)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        t = self.norm(self.blocks(t))
        return self.head(t.mean(dim=1))


def vit_tiny(**kwargs: Any) -> ViT:
    """A small :class:`ViT` (32x32 images, 4x4 patches, width 32, 2 blocks, 2 heads);
    ``attention=True`` puts a TokenSE after the second norm of every block."""
    return ViT(**kwargs)


# --- a small ConvNeXt ----------------------------------------------------------------------------


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an ``(N, C, H, W)`` map, as ConvNeXt's stem and downsampling
    layers use it: permute to channels last, normalise the last dim, permute back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block (Liu et al., "A ConvNet for the 2020s", CVPR 2022, arXiv 2201.03545):
    7x7 depthwise conv, then channels last: LayerNorm, Linear 4x, GELU, Linear, layer scale
    ``gamma``; back to channels first and add the input. ``attention=True`` puts a channel
    attention over the channels-last map after the norm (``asrfx.attention.TokenSE(dims=2)``)."""

    def __init__(self, dim: int, mlp_ratio: int = 4, layer_scale: float = 1e-6,
                 attention: bool = False):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        if attention:
            self.se = TokenSE(dim, dims=2)
        else:
            self.se = None
        self.pwconv1 = nn.Linear(dim, mlp_ratio * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(mlp_ratio * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        if self.se is not None:
            y = self.se(y)
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(y)))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """Stem (2x2 patchify conv + :class:`LayerNorm2d`), stages of :class:`ConvNeXtBlock` with
    LayerNorm2d + 2x2 strided conv downsampling between them, global average pool, LayerNorm,
    linear head. A CIFAR-sized member of the family (32x32 inputs)."""

    def __init__(self, widths: tuple[int, ...] = (16, 32), depths: tuple[int, ...] = (1, 1),
                 num_classes: int = 10, in_channels: int = 3, layer_scale: float = 1e-6,
                 attention: bool = False):
        super().__init__()
        if len(widths) != len(depths) or not widths:
            raise ValueError(f"widths {widths} and depths {depths} must be non-empty and of one "
                             f"length")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 2, 2), LayerNorm2d(widths[0]))
        stages = []
        for i, (w, d) in enumerate(zip(widths, depths)):
            layers: list[nn.Module] = []
            if i > 0:
                layers += [LayerNorm2d(widths[i - 1]), nn.Conv2d(widths[i - 1], w, 2, 2)]
            layers += [ConvNeXtBlock(w, layer_scale=layer_scale, attention=attention)
                       for _ in range(d)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(widths[-1])
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(self.norm(x.mean(dim=(2, 3))))


def convnext_tiny(**kwargs: Any) -> ConvNeXt:
    """A small :class:`ConvNeXt` (widths 16, 32; one block per stage); ``attention=True`` puts a
    channels-last TokenSE after the norm of every block."""
    return ConvNeXt(**kwargs)


# --- model specs: the --model argument of the command line and the benchmarks -------------------

#: Third-party models known by name (their packages are optional): ``monai-seresnet50`` (MONAI's
#: ``SEResNet50``) and ``efficientnet-b0`` (efficientnet_pytorch), both with SE attention.
THIRD_PARTY = ("monai-seresnet50", "efficientnet-b0")

_ZOO_NAME = re.compile(r"^resnet-?(\d+)(-se)?(-basic|-bottleneck)?$", re.IGNORECASE)
_FROM_SPEC: Any = object()  # build_model's default attention: the one the spec names


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec (see :func:`parse_model_spec`).

    Attributes:
        text: the spec as given.
        kind: ``"zoo"`` (a CIFAR ResNet of :func:`cifar_resnet`), ``"third-party"`` (a name
            of :data:`THIRD_PARTY`) or ``"factory"`` (``package.module:factory``).
        depth: the ResNet depth (zoo only).
        block: ``"basic"`` or ``"bottleneck"`` (zoo only): the one the name gives, else the
            CIFAR convention for the depth.
        attention: ``"se"`` for a ``-se`` zoo name, else None.
        module, factory: the two halves of ``package.module:factory`` (factory only).
        args, kwargs: the literal arguments of ``package.module:factory(1, cin=1)`` (a tuple,
            and a tuple of (name, value) pairs; empty without parentheses).
    """

    text: str
    kind: str
    depth: Optional[int] = None
    block: Optional[str] = None
    attention: Optional[str] = None
    module: Optional[str] = None
    factory: Optional[str] = None
    args: tuple = ()
    kwargs: tuple = ()


def _cifar_block(depth: int) -> str:
    """The CIFAR naming: ResNet-20/32/44/56/110 are basic-block nets, ResNet-164/1001
    bottleneck; a depth only one rule fits (29, 47, ...) picks that rule."""
    fits_basic, fits_bottleneck = (depth - 2) % 6 == 0, (depth - 2) % 9 == 0
    return "bottleneck" if fits_bottleneck and (depth >= 164 or not fits_basic) else "basic"


def parse_model_spec(spec: str | ModelSpec) -> ModelSpec:
    """Read a model spec, as ``asrfx stripes/convert/fold/bench --model`` take it.

    Accepted forms:

    * a zoo name ``resnet<depth>[-se][-basic|-bottleneck]`` (case-insensitive, ``resnet-164``
      too): a CIFAR ResNet (:func:`cifar_resnet`), with SE in every block for ``-se``; without a
      block suffix the block follows the CIFAR convention (basic for 20/32/44/56/110, bottleneck
      for 164/1001, and the only rule a depth fits, e.g. bottleneck for 29);
    * a name of :data:`THIRD_PARTY`;
    * ``package.module:factory``, where ``factory()`` returns the model, or
      ``package.module:factory(cin=1, widths=(16, 32))`` with literal arguments (numbers,
      strings, tuples, lists, dicts, True/False/None) for it. The module is imported as
      ``python -m`` would: the working directory comes first on the path.

    The depth is not checked here (:func:`build_model` does, through :func:`cifar_resnet`).
    A :class:`ModelSpec` is returned as it is.

    Raises:
        InputError: ``spec`` fits none of these forms (the message shows the forms).

    Example:
        >>> s = parse_model_spec("resnet164-se")
        >>> s.kind, s.depth, s.block, s.attention
        ('zoo', 164, 'bottleneck', 'se')
        >>> parse_model_spec("ResNet-20").block
        'basic'
        >>> parse_model_spec("mypkg.models:build").factory
        'build'
    """
    if isinstance(spec, ModelSpec):
        return spec
    if not isinstance(spec, str):
        raise InputError(f"--model must be a string, got {type(spec).__name__}")
    zoo = _ZOO_NAME.match(spec)
    if zoo:
        depth = int(zoo.group(1))
        block = (zoo.group(3) or "").lstrip("-").lower() or _cifar_block(depth)
        return ModelSpec(spec, "zoo", depth=depth, block=block,
                         attention="se" if zoo.group(2) else None)
    if spec in THIRD_PARTY:
        return ModelSpec(spec, "third-party")
    factory = _FACTORY.match(spec.strip())
    if factory:
        args, kwargs = _factory_arguments(spec, factory.group(3))
        return ModelSpec(spec, "factory", module=factory.group(1), factory=factory.group(2),
                         args=args, kwargs=kwargs)
    raise InputError(f"--model {spec!r}: expected a zoo name like resnet20-se or resnet164, one "
                     f"of {', '.join(THIRD_PARTY)}, or package.module:factory (with literal "
                     f"arguments: package.module:factory(cin=1))")


_FACTORY = re.compile(r"^([A-Za-z_][\w.]*):([A-Za-z_]\w*)(?:\((.*)\))?$", re.DOTALL)


def _factory_arguments(spec: str, text: str | None, option: str = "--model"
                       ) -> tuple[tuple, tuple]:
    """The literal positional and keyword arguments written in ``factory(...)``."""
    if not text or not text.strip():
        return (), ()
    bad = InputError(f"{option} {spec!r}: the arguments after the name must be Python literals, "
                     f"e.g. module:name(cin=1, widths=(16, 32), kind='small')")
    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except SyntaxError:
        raise bad from None
    if not isinstance(call, ast.Call) or any(isinstance(a, ast.Starred) for a in call.args) or \
            any(k.arg is None for k in call.keywords):
        raise bad
    try:
        return (tuple(ast.literal_eval(a) for a in call.args),
                tuple((k.arg, ast.literal_eval(k.value)) for k in call.keywords))
    except ValueError:
        raise bad from None


def import_callable(text: str, option: str = "--model") -> tuple[Callable[..., Any], tuple,
                                                                 dict[str, Any]]:
    """``(callable, args, kwargs)`` of a ``package.module:name`` or ``package.module:name(...)``
    spec (literal arguments), the module imported with the working directory first on the path
    (``python -m`` and ``uvicorn module:app`` do the same; a console script does not).

    Raises:
        InputError: not such a spec, arguments that are not literals, or nothing to import;
            the message names ``option``.
    """
    m = _FACTORY.match(text.strip())
    if not m:
        raise InputError(f"{option} {text!r}: expected package.module:function")
    module, name = m.group(1), m.group(2)
    args, kwargs = _factory_arguments(text, m.group(3), option)
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise InputError(f"{option} {text!r}: cannot import {module}.{name} ({e}); give "
                         f"package.module:{'factory' if option == '--model' else 'function'} "
                         f"for a module in the working directory ({cwd}) or on the Python "
                         f"path") from None
    return fn, args, dict(kwargs)


def build_model(spec: str | ModelSpec, *, attention: AttentionSpec = _FROM_SPEC,
                num_classes: int = 10, in_channels: int = 3, dims: int = 2) -> nn.Module:
    """Build the model a spec names (see :func:`parse_model_spec`), with fresh weights.

    Args:
        spec: a model spec string or a parsed :class:`ModelSpec`.
        attention: for zoo models, the attention of every block (as :func:`cifar_resnet`
            takes it; None for the plain network); by default the spec's own (``-se``: SE).
            Third-party and factory models come with their own attention; it is ignored there.
        num_classes, in_channels, dims: the classifier's outputs, input channels and spatial
            dims of zoo and third-party models (``efficientnet-b0`` is 2-D only). A factory is
            called with the arguments its spec writes (none by default) and builds the model
            as it likes.

    Returns:
        The model (an ``nn.Module``), on the CPU; for zoo models an input
        ``(N, in_channels, *spatial)`` with ``len(spatial) == dims`` gives ``(N, num_classes)``.

    Raises:
        InputError: an unparseable spec; a factory whose module or attribute cannot be
            imported, that raises (the original exception is its ``__cause__``) or that
            returns something other than an ``nn.Module``; a third-party model whose package
            is not installed or that cannot have ``dims``.
        ValueError: a zoo depth that fits no block rule (the message gives the nearest ones).
    """
    ms = parse_model_spec(spec)
    if ms.kind == "zoo":
        return cifar_resnet(int(ms.depth), attention=ms.attention if attention is _FROM_SPEC
                            else attention, num_classes=num_classes, block=str(ms.block),
                            in_channels=in_channels, dims=dims)
    if ms.kind == "third-party":
        return _third_party(ms.text, num_classes, in_channels, dims)
    factory, _, _ = import_callable(ms.text)
    try:
        model = factory(*ms.args, **dict(ms.kwargs))
    except Exception as e:  # noqa: BLE001 - the user's code: say whose and with what
        written = [*map(repr, ms.args)] + [f"{k}={v!r}" for k, v in ms.kwargs]
        call = f"{ms.factory}({', '.join(written)})"
        raise InputError(f"--model {ms.text!r}: {ms.module}.{call} raised "
                         f"{type(e).__name__}: {e}; fix the factory or the arguments written "
                         f"after its name, e.g. {ms.module}:{ms.factory}(cin=1)") from e
    if not isinstance(model, nn.Module):
        raise InputError(f"--model {ms.text!r}: the factory returned {type(model).__name__}, "
                         f"not an nn.Module")
    return model


def _third_party(name: str, num_classes: int, in_channels: int, dims: int) -> nn.Module:
    package = {"monai-seresnet50": "monai", "efficientnet-b0": "efficientnet_pytorch"}[name]
    try:
        if name == "monai-seresnet50":
            from monai.networks.nets import SEResNet50

            return SEResNet50(spatial_dims=dims, in_channels=in_channels, num_classes=num_classes)
        from efficientnet_pytorch import EfficientNet
    except ImportError as e:
        raise InputError(f"--model {name}: needs the {package} package ({e}); install it "
                         f"(pip install {package.replace('_', '-')})") from None
    if dims != 2:
        raise InputError(f"--model {name} takes images (dims=2), got dims={dims}")
    return EfficientNet.from_name(name, in_channels=in_channels, num_classes=num_classes)
