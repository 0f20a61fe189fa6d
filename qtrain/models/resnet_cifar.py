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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
    """Two 3×3 conv/BN layers with a ReLU between and after the residual sum."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = IdentityShortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] → [B, C_out, H/stride, W/stride]."""
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
    ) -> None:
        channels = scaled(STEM_CHANNELS, width)
        stem = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        stages = [scaled(base * widen, width) for base in STAGE_CHANNELS]
        super().__init__(stem, channels, BasicBlock, stages, blocks_per_stage, num_classes)


@register_model("resnet56")
def resnet56(num_classes: int, width: float, in_channels: int) -> nn.Module:
    """ResNet-56 for CIFAR: 55 conv (16/32/64 filters, 3×9 blocks), 1 linear, identity shortcuts."""
    return CifarResNet(9, 1, num_classes, width, in_channels)


@register_model("wrn56_2")
def wrn56_2(num_classes: int, width: float, in_channels: int) -> nn.Module:
    """WRN-56-2: ResNet-56 with every residual block's filters doubled (32/64/128)."""
    return CifarResNet(9, 2, num_classes, width, in_channels)
