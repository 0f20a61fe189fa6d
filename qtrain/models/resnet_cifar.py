"""CIFAR ResNets with parameter-free identity shortcuts (He et al. 2016, option A).

A basic block computes relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)) with 3×3 convolutions
(no bias; BatchNorm follows). When a block changes resolution or width, the shortcut is
parameter-free: x[:, :, ::s, ::s] with zero channels appended, so every weight is a conv.

    stem: conv3×3 (C_in → 16), BN, ReLU                           32×32
    stage 1: n blocks, 16·k filters, stride 1                      32×32
    stage 2: n blocks, 32·k filters, first stride 2                16×16
    stage 3: n blocks, 64·k filters, first stride 2                 8×8
    global average pool → linear (64·k → classes)

ResNet-56 is n = 9, k = 1 (1 + 6n = 55 convs + 1 linear); WRN-56-2 doubles every residual
block's filters (k = 2) and keeps the 16-filter stem, as in Zagoruyko & Komodakis.

Binary activations (``activations="binary"``): each block computes
bn2(conv2(sign(bn1(conv1(sign(x)))))) + shortcut(x), so every convolution but the stem's reads
±1 values that come from a BatchNorm (or from a residual sum of BatchNorm outputs), the
XNOR-Net placement (Rastegari et al. 2016: BN → sign → conv). Every ReLU is dropped, as in
Bi-Real Net (Liu et al. 2018): a ReLU before a sign would make every activation +1, and the
residual stream stays real-valued. The shortcut still spans two convolutions, as in the
paper's ResNet; Bi-Real Net's one-shortcut-per-convolution is not used, so the float and the
binary network have the same topology and parameters.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .activations import BinaryActivation, check_activations
from .registry import register_model, scaled
from .resnet_trunk import ResNetTrunk

STAGE_CHANNELS = (16, 32, 64)
STEM_CHANNELS = 16


class IdentityShortcut(nn.Module):
    """Parameter-free shortcut: subsample by ``stride``, then zero-pad to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.extra = out_channels - in_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] → [B, C_out, H/stride, W/stride]."""
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra > 0:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra))
        return x


class BasicBlock(nn.Module):
    """Two 3×3 conv/BN layers with a ReLU between and after the residual sum; with
    ``binary=True`` a sign before each convolution instead and no ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, binary: bool) -> None:
        super().__init__()
        self.binary = binary
        if binary:
            self.sign = BinaryActivation()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = IdentityShortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] → [B, C_out, H/stride, W/stride]."""
        if self.binary:
            out = self.bn1(self.conv1(self.sign(x)))
            return self.bn2(self.conv2(self.sign(out))) + self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(ResNetTrunk):
    """3×3 stem, three stages of ``blocks_per_stage`` basic blocks, average pool, linear."""

    def __init__(
        self,
        blocks_per_stage: int,
        widen: int,
        num_classes: int,
        width: float,
        in_channels: int,
        activations: str = "float",
    ) -> None:
        binary = check_activations(activations) == "binary"
        channels = scaled(STEM_CHANNELS, width)
        stem = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            *([] if binary else [nn.ReLU(inplace=True)]),
        )
        stages = [scaled(base * widen, width) for base in STAGE_CHANNELS]
        block = partial(BasicBlock, binary=binary)
        super().__init__(stem, channels, block, stages, blocks_per_stage, num_classes)


@register_model("resnet56", binary_activations=True)
def resnet56(
    num_classes: int, width: float, in_channels: int, activations: str = "float"
) -> nn.Module:
    """ResNet-56 for CIFAR: 55 conv (16/32/64 filters, 3×9 blocks), 1 linear, identity shortcuts."""
    return CifarResNet(9, 1, num_classes, width, in_channels, activations)


@register_model("wrn56_2", binary_activations=True)
def wrn56_2(
    num_classes: int, width: float, in_channels: int, activations: str = "float"
) -> nn.Module:
    """WRN-56-2: ResNet-56 with every residual block's filters doubled (32/64/128)."""
    return CifarResNet(9, 2, num_classes, width, in_channels, activations)
