"""A library of channel-attention modules, written for torch.fx and for asrfx.

Every module maps ``(N, C, *spatial)`` to the same shape and is built as
``Module(channels, ..., dims=2)``; ``dims`` (1, 2 or 3) picks the pooling and convolution
dimensionality wherever the module has spatial pooling or convolutions. Modules whose design is
tied to images (:class:`ECATranspose`, :class:`SPA`, :class:`GC`) accept ``dims=2`` only and raise
``ValueError`` otherwise.

All ``forward`` methods are traceable with :func:`torch.fx.symbolic_trace`: they never branch on
tensor values, and tensor ranks come from Python ints stored in ``__init__`` (``self.dims``), never
from ``x.dim()`` / ``len(x.shape)``. Shapes that do depend on the input are read as
``x.shape[0]`` / ``x.shape[1]`` and spatial extents are collapsed with ``flatten`` so that no
arithmetic is done on traced sizes.

The exact forms (which op pools, where the gate is applied) matter: asrfx finds attention by graph
structure, so each docstring states the equation the module implements.

* :class:`SEModule` (also :data:`SE`) -- squeeze-and-excitation.
* :class:`EffectiveSE` -- eSE of CenterMask/VoVNetV2.
* :class:`ECA` and :class:`ECATranspose` -- efficient channel attention.
* :class:`SRM` -- style-based recalibration.
* :class:`GCT` -- gated channel transformation.
* :class:`CBAM` and :class:`CBAMChannel` -- convolutional block attention module.
* :class:`SPA` -- spatial pyramid attention.
* :class:`GC` -- global context block (additive fusion).
* :class:`TokenSE` -- SE over the last dim of tokens ``(N, L, C)`` or channels-last maps.

:data:`ATTENTIONS` maps short names to classes. :func:`get_attention` is the one resolver of an
attention spec -- a name of :data:`ATTENTIONS` or a callable ``channels -> nn.Module`` -- to a
module: :func:`asrfx.zoo.cifar_resnet` (``attention=``) and :func:`asrfx.prepare` (``insert=``,
through :func:`attention_factory`) both resolve names with it. :func:`make_attention` builds one
by name with the default hyper-parameters.

This module is the layer below the models: it also holds the dims-generic layer tables and
helpers (Conv/BatchNorm/pool classes by ``dims``, :func:`_check_dims`, :func:`_conv`) that
:mod:`asrfx.zoo` builds its networks from, and it imports nothing of :mod:`asrfx.zoo`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError

__all__ = [
    "TokenSE",
    "SE",
    "EffectiveSE",
    "ECA",
    "ECATranspose",
    "SRM",
    "GCT",
    "CBAM",
    "CBAMChannel",
    "SPA",
    "GC",
    "ATTENTIONS",
    "make_attention",
]
# Also public, outside ``__all__`` (its contents are pinned by the test suite): ``SEModule``,
# ``get_attention``, ``attention_factory``, ``eca_kernel_size``, ``AttentionFactory``.

#: A callable ``channels -> nn.Module``: builds one attention module for a map of C channels.
AttentionFactory = Callable[[int], nn.Module]

# --- dims-generic layers: the building blocks of this library and of asrfx.zoo ------------------

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_POOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
_MAXPOOL = {1: nn.AdaptiveMaxPool1d, 2: nn.AdaptiveMaxPool2d, 3: nn.AdaptiveMaxPool3d}


def _check_dims(dims: int) -> int:
    """``dims`` itself when it is 1, 2 or 3 (a Python int, not a bool).

    Raises:
        ValueError: anything else.
    """
    if isinstance(dims, bool) or not isinstance(dims, int) or dims not in _CONV:
        raise ValueError(f"dims must be 1, 2 or 3, got {dims!r}")
    return dims


def _conv(dims: int, cin: int, cout: int, kernel_size: int, stride: int = 1) -> nn.Module:
    """Bias-free ``Conv{dims}d`` ``cin -> cout`` with 'same' padding for odd kernels: maps
    ``(N, cin, *S)`` to ``(N, cout, *ceil(S / stride))``."""
    return _CONV[dims](
        cin, cout, kernel_size=kernel_size, stride=stride, padding=kernel_size // 2, bias=False
    )


def _check_channels(channels: int) -> int:
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    return channels


def _check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _only_2d(cls_name: str, dims: int) -> int:
    _check_dims(dims)
    if dims != 2:
        raise ValueError(f"{cls_name} supports dims=2 only (images), got dims={dims}")
    return dims


class SEModule(nn.Module):
    """Squeeze-and-excitation channel attention.

    Hu, Shen, Sun, "Squeeze-and-Excitation Networks", CVPR 2018,
    arXiv:1709.01507. Global average pooling squeezes each channel to a
    scalar, a two-layer bottleneck MLP (``channels -> channels // reduction
    -> channels``, ReLU between) followed by a sigmoid gives one gate per
    channel, and the input is rescaled channel-wise by the gate::

        Y = X * sigmoid(W2 relu(W1 avgpool(X)))

    Args:
        channels: number of input (and output) channels.
        reduction: reduction ratio of the hidden layer;
            ``hidden = max(channels // reduction, 1)``.
        dims: spatial dimensionality of the input (1, 2 or 3), which picks
            ``AdaptiveAvgPool1d/2d/3d``.

    Shape:
        Input ``(N, C, *spatial)`` with ``len(spatial) == dims``; output has
        the same shape.

    Raises:
        ValueError: ``channels`` or ``reduction`` below 1, ``dims`` not 1, 2 or 3.
    """

    def __init__(self, channels: int, reduction: int = 16, dims: int = 2) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be positive, got {channels}")
        if reduction < 1:
            raise ValueError(f"reduction must be positive, got {reduction}")
        self.dims = _check_dims(dims)
        self.channels = channels
        self.reduction = reduction
        hidden = max(channels // reduction, 1)
        self.pool = _POOL[dims](1)
        self.fc1 = nn.Linear(channels, hidden)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, channels)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        y = self.pool(x).flatten(1)
        y = self.fc2(self.relu(self.fc1(y)))
        # self.dims (a Python int) rather than x.dim(): keeps fx tracing
        # free of Proxy arithmetic in the view's shape.
        y = self.gate(y).view(b, c, *([1] * self.dims))
        return x * y

    def extra_repr(self) -> str:
        return f"channels={self.channels}, reduction={self.reduction}, dims={self.dims}"


#: Squeeze-and-excitation, Hu, Shen, Sun, "Squeeze-and-Excitation Networks", CVPR 2018,
#: arXiv:1709.01507: ``x * sigmoid(W2 relu(W1 avgpool(x)))``. The same class as
#: :class:`SEModule` (which :mod:`asrfx.zoo` re-exports under that name).
SE = SEModule


class EffectiveSE(nn.Module):
    """Effective squeeze-and-excitation (eSE).

    Youngwan Lee, Jongyoul Park, "CenterMask: Real-Time Anchor-Free Instance Segmentation",
    CVPR 2020, arXiv:1911.06667 (the eSE block of VoVNetV2). SE with the two bottleneck FC
    layers replaced by a single full-width FC (a ``C -> C`` 1x1 convolution with bias), so no
    channel information is lost to the reduction, and a hard sigmoid gate::

        F_avg = GAP(X)                          # (N, C, 1, ..., 1)
        A     = hsigmoid(W_C(F_avg))            # hsigmoid(z) = relu6(z + 3) / 6
        Y     = X * A

    Args:
        channels: C.
        dims: 1, 2 or 3 (``AdaptiveAvgPool{d}d`` and ``Conv{d}d``).
    """

    def __init__(self, channels: int, dims: int = 2) -> None:
        super().__init__()
        self.channels = _check_channels(channels)
        self.dims = _check_dims(dims)
        self.pool = _POOL[dims](1)
        self.fc = _CONV[dims](channels, channels, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = F.hardsigmoid(self.fc(self.pool(x)))
        return x * g

    def extra_repr(self) -> str:
        return f"channels={self.channels}, dims={self.dims}"


def eca_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """ECA's adaptive kernel size ``k = |log2(C) / gamma + b / gamma|_odd``.

    ``int(...)`` truncates, and an even result is bumped to the next odd number.
    """
    k = int(abs(math.log2(channels) / gamma + b / gamma))
    return k if k % 2 else k + 1


class ECA(nn.Module):
    """Efficient channel attention (ECA).

    Qilong Wang, Banggu Wu, Pengfei Zhu, Peihua Li, Wangmeng Zuo, Qinghua Hu, "ECA-Net: Efficient
    Channel Attention for Deep Convolutional Neural Networks", CVPR 2020, arXiv:1910.03151.
    SE without dimensionality reduction: the pooled channel descriptor is mixed only between
    ``k`` neighbouring channels by a 1-D convolution along the channel axis, whose kernel size
    adapts to C::

        y = GAP(X)                                     # (N, C)
        k = |log2(C) / gamma + b / gamma|_odd
        w = sigmoid(conv1d_k(y))                       # one shared 1-D kernel, zero padding k//2
        Y = X * w

    Implemented as ``pool -> view (N, C) -> unsqueeze(1) (N, 1, C) -> Conv1d(1, 1, k,
    padding=k//2, bias=False) -> view (N, C, 1, ..., 1) -> sigmoid -> x * g``. See
    :class:`ECATranspose` for the paper's squeeze/transpose spelling.

    Args:
        channels: C.
        gamma, b: parameters of the kernel-size mapping (paper: 2 and 1).
        dims: 1, 2 or 3 (``AdaptiveAvgPool{d}d``; the channel convolution is always 1-D).
    """

    def __init__(self, channels: int, gamma: int = 2, b: int = 1, dims: int = 2) -> None:
        super().__init__()
        self.channels = _check_channels(channels)
        self.dims = _check_dims(dims)
        if gamma <= 0:
            raise ValueError(f"gamma must be positive, got {gamma!r}")
        self.gamma = gamma
        self.b = b
        self.kernel_size = eca_kernel_size(channels, gamma, b)
        self.pool = _POOL[dims](1)
        self.conv = nn.Conv1d(1, 1, kernel_size=self.kernel_size, padding=self.kernel_size // 2,
                              bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[0], x.shape[1]
        y = self.pool(x).view(n, c).unsqueeze(1)          # (N, 1, C)
        y = self.conv(y).view(n, c, *([1] * self.dims))  # (N, C, 1, ..., 1)
        return x * torch.sigmoid(y)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}, dims={self.dims}"


class ECATranspose(nn.Module):
    """Efficient channel attention, in the squeeze/transpose spelling of the ECA-Net paper.

    Qilong Wang, Banggu Wu, Pengfei Zhu, Peihua Li, Wangmeng Zuo, Qinghua Hu, "ECA-Net: Efficient
    Channel Attention for Deep Convolutional Neural Networks", CVPR 2020, arXiv:1910.03151.
    The same function as :class:`ECA` (``Y = X * sigmoid(conv1d_k(GAP(X)))``) written as::

        y = pool(x)                                                    # (N, C, 1, 1)
        y = conv(y.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
        return x * y.sigmoid()

    Images only (``dims=2``): the spelling drops exactly one trailing spatial axis.

    Args:
        channels: C.
        gamma, b: parameters of the kernel-size mapping (paper: 2 and 1).
        dims: must be 2.
    """

    def __init__(self, channels: int, gamma: int = 2, b: int = 1, dims: int = 2) -> None:
        super().__init__()
        self.channels = _check_channels(channels)
        self.dims = _only_2d(type(self).__name__, dims)
        if gamma <= 0:
            raise ValueError(f"gamma must be positive, got {gamma!r}")
        self.gamma = gamma
        self.b = b
        self.kernel_size = eca_kernel_size(channels, gamma, b)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv1d(1, 1, kernel_size=self.kernel_size, padding=self.kernel_size // 2,
                              bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(x)
        y = self.conv(y.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
        return x * y.sigmoid()

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}"


class SRM(nn.Module):
    """Style-based recalibration module (SRM).

    HyunJae Lee, Hyo-Eun Kim, Hyeonseob Nam, "SRM: A Style-based Recalibration Module for
    Convolutional Neural Networks", ICCV 2019, arXiv:1903.10829. Style pooling takes the
    per-channel mean and standard deviation over all spatial positions; style integration is a
    channel-wise fully connected layer (one weight per channel and statistic), BatchNorm and a
    sigmoid::

        mu_c    = mean_s x_cs
        sigma_c = sqrt(mean_s (x_cs - mu_c)^2 + eps)          # biased variance, eps = 1e-5
        t_c     = [mu_c, sigma_c]                             # (N, C, 2)
        z_c     = w_c . t_c                                   # Conv1d(C, C, 2, groups=C, bias=False)
        g_c     = sigmoid(BN(z_c))                            # BatchNorm1d(C)
        Y       = X * g

    Args:
        channels: C.
        dims: 1, 2 or 3 (the spatial axes the statistics are taken over).
    """

    def __init__(self, channels: int, dims: int = 2) -> None:
        super().__init__()
        self.channels = _check_channels(channels)
        self.dims = _check_dims(dims)
        self.spatial = tuple(range(2, 2 + dims))
        self.cfc = nn.Conv1d(channels, channels, kernel_size=2, groups=channels, bias=False)
        self.bn = nn.BatchNorm1d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[0], x.shape[1]
        mean = x.mean(self.spatial)                                             # (N, C)
        std = x.var(self.spatial, unbiased=False, keepdim=False).add(1e-5).sqrt()  # (N, C)
        t = torch.stack([mean, std], dim=-1)                                    # (N, C, 2)
        z = self.bn(self.cfc(t))                                                # (N, C, 1)
        g = torch.sigmoid(z).view(n, c, *([1] * self.dims))
        return x * g

    def extra_repr(self) -> str:
        return f"channels={self.channels}, dims={self.dims}"


class GCT(nn.Module):
    """Gated channel transformation (GCT).

    Zongxin Yang, Linchao Zhu, Yu Wu, Yi Yang, "Gated Channel Transformation for Visual
    Recognition", CVPR 2020, arXiv:1909.11519. A global context embedding (the l2 norm of each
    channel, scaled by alpha), a channel normalization across channels, and a tanh gate around
    one::

        s_c = alpha_c * sqrt(sum_s x_cs^2 + eps)
        n_c = gamma_c / sqrt(mean_c' s_c'^2 + eps)            # = gamma_c * sqrt(C) / ||s||_2
        Y   = X * (1 + tanh(s_c * n_c + beta_c))

    ``alpha`` starts at 1 and ``gamma``, ``beta`` at 0, so a fresh GCT is the identity.

    Args:
        channels: C.
        epsilon: the eps of both square roots.
        dims: 1, 2 or 3 (the spatial axes of the sum; parameters have shape ``(1, C, 1, ...)``).
    """

    def __init__(self, channels: int, epsilon: float = 1e-5, dims: int = 2) -> None:
        super().__init__()
        self.channels = _check_channels(channels)
        self.dims = _check_dims(dims)
        if not epsilon >= 0:
            raise ValueError(f"epsilon must be non-negative, got {epsilon!r}")
        self.epsilon = float(epsilon)
        self.spatial = tuple(range(2, 2 + dims))
        shape = (1, channels) + (1,) * dims
        self.alpha = nn.Parameter(torch.ones(shape))
        self.gamma = nn.Parameter(torch.zeros(shape))
        self.beta = nn.Parameter(torch.zeros(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embedding = self.alpha * (x.pow(2).sum(self.spatial, keepdim=True) + self.epsilon).sqrt()
        norm = self.gamma / (embedding.pow(2).mean(dim=1, keepdim=True) + self.epsilon).sqrt()
        gate = 1.0 + torch.tanh(embedding * norm + self.beta)
        return x * gate

    def extra_repr(self) -> str:
        return f"channels={self.channels}, epsilon={self.epsilon}, dims={self.dims}"


class CBAMChannel(nn.Module):
    """The channel-attention half of CBAM.

    Sanghyun Woo, Jongchan Park, Joon-Young Lee, In So Kweon, "CBAM: Convolutional Block Attention
    Module", ECCV 2018, arXiv:1807.06521, eq. (2). One bottleneck MLP (1x1 convolutions
    ``C -> C/r -> C``, ReLU between, no bias) shared by the average- and the max-pooled
    descriptor::

        M_c(F) = sigmoid(MLP(AvgPool(F)) + MLP(MaxPool(F)))
        F'     = F * M_c(F)

    Args:
        channels: C.
        reduction: r; ``hidden = max(C // r, 1)``.
        dims: 1, 2 or 3 (adaptive pools and 1x1 convolutions).
    """

    def __init__(self, channels: int, reduction: int = 16, dims: int = 2) -> None:
        super().__init__()
        self.channels = _check_channels(channels)
        self.reduction = _check_positive("reduction", reduction)
        self.dims = _check_dims(dims)
        hidden = max(channels // reduction, 1)
        conv = _CONV[dims]
        self.avg_pool = _POOL[dims](1)
        self.max_pool = _MAXPOOL[dims](1)
        self.mlp = nn.Sequential(
            conv(channels, hidden, kernel_size=1, bias=False),
            nn.ReLU(inplace=True),
            conv(hidden, channels, kernel_size=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.mlp(self.avg_pool(x)) + self.mlp(self.max_pool(x)))
        return x * g

    def extra_repr(self) -> str:
        return f"channels={self.channels}, reduction={self.reduction}, dims={self.dims}"


class CBAM(nn.Module):
    """Convolutional block attention module: channel attention, then spatial attention.

    Sanghyun Woo, Jongchan Park, Joon-Young Lee, In So Kweon, "CBAM: Convolutional Block Attention
    Module", ECCV 2018, arXiv:1807.06521, eqs. (1)-(3)::

        F'     = F * M_c(F)                                     # CBAMChannel
        M_s(F') = sigmoid(conv_kxk([mean_c(F'); max_c(F')]))   # 2 -> 1 channels, padding k//2
        F''    = F' * M_s(F')

    The spatial map is a plain ``k x k`` convolution (with bias) followed by the sigmoid, as in
    eq. (3) of the paper. The spatial convolution follows ``dims`` (a length-``k`` 1-D or a
    ``k^3`` 3-D kernel for ``dims`` 1 and 3; the paper only uses ``dims=2``).

    Args:
        channels: C.
        reduction: r of the channel MLP.
        kernel_size: k of the spatial convolution (odd; paper: 7).
        dims: 1, 2 or 3.
    """

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7, dims: int = 2) -> None:
        super().__init__()
        self.channels = _check_channels(channels)
        self.dims = _check_dims(dims)
        self.kernel_size = _check_positive("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same-size padding), got {kernel_size}")
        self.channel = CBAMChannel(channels, reduction=reduction, dims=dims)
        self.spatial = _CONV[dims](2, 1, kernel_size=kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.channel(x)
        s = torch.cat([x1.mean(1, keepdim=True), x1.amax(1, keepdim=True)], 1)
        return x1 * torch.sigmoid(self.spatial(s))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}, dims={self.dims}"


class SPA(nn.Module):
    """Spatial pyramid attention (SPA).

    Jingda Guo, Xu Ma, Andrew Sansom, Mara McGuire, Andrew Kalaani, Qi Chen, Sihai Tang,
    Qing Yang, Song Fu, "SPANet: Spatial Pyramid Attention Network for Enhanced Image
    Recognition", ICME 2020 (no arXiv version; journal version: Ma et al., "Spatial Pyramid
    Attention for Deep Convolutional Neural Networks", IEEE TMM 2021). SE whose squeeze keeps
    coarse structure: average pools to 1x1, 2x2 and 4x4 are flattened and concatenated
    (``21 C`` features) before a two-layer excitation::

        p = [vec(AvgPool_1(X)); vec(AvgPool_2(X)); vec(AvgPool_4(X))]     # (N, 21 C)
        g = sigmoid(W2 relu(W1 p))                                         # W1: 21C -> C/r
        Y = X * g

    Images only (``dims=2``). Note that the 2x2 and 4x4 pools are not global statistics.

    Args:
        channels: C.
        reduction: r; ``hidden = max(C // r, 1)``.
        dims: must be 2.
    """

    levels = (1, 2, 4)

    def __init__(self, channels: int, reduction: int = 16, dims: int = 2) -> None:
        super().__init__()
        self.channels = _check_channels(channels)
        self.reduction = _check_positive("reduction", reduction)
        self.dims = _only_2d(type(self).__name__, dims)
        hidden = max(channels // reduction, 1)
        features = channels * sum(s * s for s in self.levels)
        self.pool1 = nn.AdaptiveAvgPool2d(1)
        self.pool2 = nn.AdaptiveAvgPool2d(2)
        self.pool4 = nn.AdaptiveAvgPool2d(4)
        self.fc1 = nn.Linear(features, hidden)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[0], x.shape[1]
        p = torch.cat([self.pool1(x).flatten(1), self.pool2(x).flatten(1),
                       self.pool4(x).flatten(1)], 1)
        g = torch.sigmoid(self.fc2(self.relu(self.fc1(p)))).view(n, c, 1, 1)
        return x * g

    def extra_repr(self) -> str:
        return f"channels={self.channels}, reduction={self.reduction}"


class GC(nn.Module):
    """Global context block (GC), with additive fusion.

    Yue Cao, Jiarui Xu, Stephen Lin, Fangyun Wei, Han Hu, "GCNet: Non-local Networks Meet
    Squeeze-Excitation Networks and Beyond", ICCV Workshops 2019, arXiv:1904.11492, eq. (3).
    Context modelling pools the feature map with a softmax attention over positions (a query-
    independent non-local block), a bottleneck transform with LayerNorm follows, and the result
    is *added* to every position::

        a_j = exp(W_k x_j) / sum_m exp(W_k x_m)                 # W_k: 1x1 conv C -> 1
        ctx = sum_j a_j x_j                                     # (N, C, 1, 1)
        Y   = X + W_v2 relu(LN(W_v1 ctx))                       # C -> C/r -> C

    Because the fusion is additive, this is not a multiplicative gate ``x * g``; the attention
    weights ``a`` have spatial extent.

    With ``C // r == 1`` (e.g. C=16, r=16) the LayerNorm normalizes a single number and always
    outputs its bias, so the block adds an input-independent constant; use a smaller ``reduction``
    for narrow layers.

    Args:
        channels: C.
        reduction: r; ``hidden = max(C // r, 1)``.
        dims: must be 2.
        zero_init_last: zero the last 1x1 convolution so that a fresh block is the identity
            (as the authors do); off by default.
    """

    def __init__(self, channels: int, reduction: int = 16, dims: int = 2,
                 zero_init_last: bool = False) -> None:
        super().__init__()
        self.channels = _check_channels(channels)
        self.reduction = _check_positive("reduction", reduction)
        self.dims = _only_2d(type(self).__name__, dims)
        hidden = max(channels // reduction, 1)
        self.hidden = hidden
        self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )
        if zero_init_last:
            nn.init.zeros_(self.transform[-1].weight)
            nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[0], x.shape[1]
        w = torch.softmax(self.conv_mask(x).flatten(2), dim=-1)          # (N, 1, HW)
        context = torch.matmul(x.flatten(2), w.transpose(1, 2))          # (N, C, 1)
        context = context.view(n, c, 1, 1)
        return x + self.transform(context)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, reduction={self.reduction}"


#: Short name -> class. Every class is built as ``cls(channels, dims=dims)`` with its defaults.
ATTENTIONS: Dict[str, type] = {
    "se": SE,
    "ese": EffectiveSE,
    "eca": ECA,
    "eca_transpose": ECATranspose,
    "srm": SRM,
    "gct": GCT,
    "cbam": CBAM,
    "cbam_channel": CBAMChannel,
    "spa": SPA,
    "gc": GC,
}


def _known_names() -> str:
    return ", ".join(repr(k) for k in ATTENTIONS)


def _check_spec(spec: Any, arg: str) -> None:
    """Raise the :class:`InputError` :func:`get_attention` would raise for ``spec`` before it
    builds anything; return quietly for a known name or a callable."""
    if isinstance(spec, str):
        if spec not in ATTENTIONS:
            raise InputError(f"{arg}={spec!r} is not a known attention; choose one of "
                             f"{_known_names()}, or pass a callable channels -> nn.Module")
    elif isinstance(spec, nn.Module):
        raise InputError(f"{arg} must be an attention name or a callable channels -> nn.Module, "
                         f"not an nn.Module instance ({type(spec).__name__}), which every "
                         f"place it is put would share; pass its class or a factory")
    elif not callable(spec):
        raise InputError(f"{arg} must be an attention name ({_known_names()}) or a callable "
                         f"channels -> nn.Module, got {spec!r}")


def get_attention(spec: str | AttentionFactory, channels: int, dims: int = 2, *,
                  arg: str = "attention", **kwargs: Any) -> nn.Module:
    """Resolve an attention spec to a new module for a map of ``channels`` channels.

    The one place asrfx turns ``attention=`` / ``insert=`` arguments into modules, as timm's
    ``create_attn`` does:

    * a name of :data:`ATTENTIONS` builds its class as ``cls(channels, dims=dims, **kwargs)``
      (the paper's defaults unless ``kwargs`` override them, e.g. ``reduction=4``);
    * a callable ``channels -> nn.Module`` (a factory function or a module class) is called as
      ``spec(channels, **kwargs)``; it picks its own dimensionality (``dims`` is not passed).

    Args:
        spec: an attention name or a callable ``channels -> nn.Module``.
        channels: C of the ``(N, C, *spatial)`` map the module will gate.
        dims: 1, 2 or 3, for names only; the 2-D-only modules (``eca_transpose``, ``spa``,
            ``gc``) reject other values.
        arg: the argument name error messages quote (``"attention"``, ``"insert"``).
        **kwargs: hyper-parameters passed on to the class or the callable.

    Returns:
        An ``nn.Module`` mapping ``(N, C, *spatial)`` to the same shape (for the library
        modules; a callable's module is taken as it comes).

    Raises:
        InputError: ``spec`` is an unknown name (the message quotes it and lists the names of
            :data:`ATTENTIONS`), an ``nn.Module`` instance (it would be shared wherever it is
            placed), neither a name nor a callable, or a callable that returns something other
            than an ``nn.Module``.
        ValueError: the module's own checks: ``channels`` not positive, ``dims`` not 1, 2 or 3,
            or not 2 for a 2-D-only module.

    Example:
        >>> get_attention("eca", 64, dims=1).kernel_size
        3
        >>> type(get_attention(lambda c: SEModule(c, reduction=4), 32)).__name__
        'SEModule'
    """
    _check_spec(spec, arg)
    if isinstance(spec, str):
        return ATTENTIONS[spec](channels, dims=dims, **kwargs)
    module = spec(channels, **kwargs)
    if not isinstance(module, nn.Module):
        raise InputError(f"{arg} callable returned {type(module).__name__} for {channels} "
                         f"channels, expected an nn.Module")
    return module


def make_attention(name: str, channels: int, dims: int = 2) -> nn.Module:
    """Build the attention module registered as ``name`` with its default hyper-parameters.

    Names only; :func:`get_attention` also takes callables and hyper-parameters.

    Args:
        name: a key of :data:`ATTENTIONS`.
        channels: C.
        dims: 1, 2 or 3; the 2-D-only modules (``eca_transpose``, ``spa``, ``gc``) raise
            ``ValueError`` for other values.

    Returns:
        A fresh module mapping ``(N, C, *spatial)`` to the same shape.

    Raises:
        InputError (a ``ValueError``): ``name`` is not a key of :data:`ATTENTIONS` (the message
            lists the known ones).
        ValueError: unsupported ``dims`` or ``channels``.
    """
    if not isinstance(name, str) or name not in ATTENTIONS:
        raise InputError(f"unknown attention {name!r}; known names: {_known_names()}")
    return get_attention(name, channels, dims=dims)


def attention_factory(insert: str | AttentionFactory
                      ) -> Callable[[int, int, bool], nn.Module]:
    """The module builder behind ``asrfx.prepare(insert=...)``.

    ``insert`` is checked at once (before anything is traced). The returned
    ``build(channels, dims, tokens=False)`` resolves it with :func:`get_attention` for a map
    ``(N, C, *spatial)`` with ``len(spatial) == dims``; with ``tokens=True`` (a place after a
    token LayerNorm: tokens ``(N, L, C)`` or a channels-last map ``(N, *S, C)``, ``dims`` token
    dims) the name ``"se"`` builds :class:`TokenSE` and a callable is called as it is.

    Raises:
        InputError: at once, for an unknown name, an ``nn.Module`` instance or a non-callable
            (see :func:`get_attention`); from ``build``, for a name other than ``"se"`` at a
            token place, or a callable that returns something other than an ``nn.Module``.
    """
    _check_spec(insert, "insert")

    def build(channels: int, dims: int, tokens: bool = False) -> nn.Module:
        if tokens and isinstance(insert, str):
            if insert != "se":
                raise InputError(f"insert={insert!r} is written for (N, C, *spatial) maps; "
                                 f"after a token LayerNorm use insert='se' (TokenSE) or a "
                                 f"callable channels -> nn.Module")
            return TokenSE(channels, dims=dims)
        return get_attention(insert, channels, dims=dims, arg="insert")

    return build


class TokenSE(nn.Module):
    """Squeeze-and-excitation over the last (channel) dim of tokens ``(N, L, C)`` or of a
    channels-last map ``(N, *S, C)`` (``dims`` = number of token/spatial dims): ``t *
    sigmoid(W2 relu(W1 mean(t)))`` with the mean over the tokens and the gate broadcast over them.
    The SE of Hu et al. (CVPR 2018, arXiv 1709.01507) applied to tokens, as the ASR paper
    inserts it after the norms of transformer blocks; ``dims=2`` fits ConvNeXt's channels-last
    blocks (Liu et al., CVPR 2022, arXiv 2201.03545)."""

    def __init__(self, channels: int, reduction: int = 4, dims: int = 1):
        super().__init__()
        if dims < 1:
            raise ValueError(f"TokenSE needs at least one token dim, got dims={dims}")
        hidden = max(channels // reduction, 1)
        self.dims = dims
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        pooled = t.mean(dim=1) if self.dims == 1 else t.mean(dim=tuple(range(1, self.dims + 1)))
        g = torch.sigmoid(self.fc2(torch.relu(self.fc1(pooled))))
        for _ in range(self.dims):
            g = g.unsqueeze(1)
        return t * g

    def extra_repr(self) -> str:
        return f"dims={self.dims}"
