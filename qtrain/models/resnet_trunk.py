"""The part every ResNet here shares: stem → residual stages → average pool → linear."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


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
