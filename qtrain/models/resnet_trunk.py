"""The part every ResNet here shares: stem → residual stages → average pool → linear."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


class BasicBlock(nn.Module):
    """relu(bn(conv3×3(relu(bn(conv3×3/stride(x))))) + shortcut(x)), convolutions without bias.

    The shortcut is the caller's: parameter-free for the CIFAR ResNets (option A), a 1×1
    projection for the ImageNet ones (option B).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: nn.Module):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut  # torchvision's name, so ResNet-18 state dicts keep their keys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] → [B, C_out, H/stride, W/stride]."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class ResNetTrunk(nn.Module):
    """`stem`, then one stage of `blocks_per_stage` blocks per entry of `stage_channels`.

    The first block of every stage but the first halves the resolution (stride 2);
    `block(in_channels, out_channels, stride)` builds one residual block.
    """

    def __init__(
        self,
        stem: nn.Module,
        stem_channels: int,
        block: Callable[[int, int, int], nn.Module],
        stage_channels: Sequence[int],
        blocks_per_stage: int,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.stem = stem
        blocks: list[nn.Module] = []
        channels = stem_channels
        for stage, out in enumerate(stage_channels):
            for index in range(blocks_per_stage):
                blocks.append(block(channels, out, 2 if stage > 0 and index == 0 else 1))
                channels = out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] → logits [B, num_classes]."""
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))
