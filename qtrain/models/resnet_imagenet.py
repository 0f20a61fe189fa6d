"""ResNet-18 for ImageNet, as in He et al. 2016 (and torchvision's ``resnet18``).

    stem: conv7×7/2 (C_in → 64), BN, ReLU, maxpool3×3/2         224 → 56
    stages: 2 basic blocks each, 64 / 128 / 256 / 512 filters,
            first block of stages 2–4 with stride 2               56 → 28 → 14 → 7
    global average pool → linear (512 → classes)

Convolutions have no bias (BatchNorm follows). A block that changes resolution or width uses
the projection shortcut (1×1 conv/2 + BN, option B), as the ImageNet ResNets do.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model, scaled
from .resnet_trunk import ResNetTrunk

STAGE_CHANNELS = (64, 128, 256, 512)
BLOCKS_PER_STAGE = 2


class BasicBlock(nn.Module):
    """relu(bn(conv3×3(relu(bn(conv3×3(x))))) + shortcut(x)), projection if needed."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] → [B, C_out, H/stride, W/stride]."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class ResNet18(ResNetTrunk):
    """The 18-layer ImageNet ResNet: 17 3×3/7×7 convs (+3 projections) and one linear layer."""

    def __init__(self, num_classes: int, width: float, in_channels: int) -> None:
        channels = scaled(STAGE_CHANNELS[0], width)
        stem = nn.Sequential(
            nn.Conv2d(in_channels, channels, 7, 2, padding=3, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, padding=1),
        )
        stages = [scaled(base, width) for base in STAGE_CHANNELS]
        super().__init__(stem, channels, BasicBlock, stages, BLOCKS_PER_STAGE, num_classes)


@register_model("resnet18", input_size=224, dataset="imagenet")
def resnet18(num_classes: int, width: float, in_channels: int) -> nn.Module:
    """ResNet-18 for ImageNet (He et al. 2016): 7×7 stem, 4 stages × 2 basic blocks, 1 linear."""
    return ResNet18(num_classes, width, in_channels)
