"""speednet: a CIFAR network shaped for fast training (after cifar10-airbench's airbench94).

Layers, for a 32×32 input (widths at width 1; every channel count but the whitening layer's
is scaled by ``width``):

    whiten   2×2 patch whitening, C → 2·C·4 = 24 channels, no padding     [B, 24, 31, 31]
             GELU
    block 1  conv3×3 24→64,  BN, +b, max-pool 2, GELU, conv3×3 64→64,   BN, +b, GELU  [.., 15, 15]
    block 2  conv3×3 64→256, BN, +b, max-pool 2, GELU, conv3×3 256→256, BN, +b, GELU  [.., 7, 7]
    block 3  conv3×3 256→256, …, max-pool 2, …                                        [.., 3, 3]
    head     global max-pool, linear 256→classes (no bias), logits × 1/9

With ``norm_after_pool`` each block starts conv3×3, max-pool 2, BN, +b, GELU (airbench's order).

Sources and the choices made here:

- Shape, widths (64/256/256), GELU, the final max-pool, the bias-free linear head and its
  fixed 1/9 logit scale: airbench94 (Keller Jordan 2024).
- BatchNorm without a learned scale, a learned shift b per channel (airbench trains only the
  BN bias; McDonnell 2018 trains neither, with 1-bit weights); running-statistics momentum
  0.4 in PyTorch's convention (airbench's "0.6") for its few hundred steps.
- airbench pools before the first BatchNorm of a block; by default BN comes right after every
  convolution here, as in all of qtrain's networks, and ``norm_after_pool = True`` takes
  airbench's order. With no learned scale, BN and its shift are x ↦ (x − μ)/σ + b with
  σ > 0, increasing in x, so they commute with the max-pool: the two orders differ only in
  the batch statistics (over the pooled map, or the map four times as large before it), and
  in eval mode, with the same running statistics, they compute the same function. Pooling
  first normalises a quarter of the values of those three maps: the preset's training step
  took 4% less time in float32 and 7% less in bf16 (docs/speedrun.md, "Where the time
  goes"). The pool stays before the GELU, which is not monotonic (its minimum is near
  x = −0.75).
- airbench initialises part of each convolution as a Dirac (identity) kernel. Binary weights
  cannot hold one (the zeros of a Dirac kernel round to ±1), so speednet keeps PyTorch's
  default initialisation.

Quantization: under the paper's ``conv`` policy every convolution weight (six tensors) is
quantized; the speedrun preset's ``conv-except-first`` keeps the first of them (the stem,
``blocks.1.0``) in float too. What stays in float under either: the whitening filters (a
frozen buffer, never trained or quantized: a fixed change of basis of the input,
`qtrain.models.whitening`), the linear head (as in the paper), the BN shifts and the whitening
bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qtrain.base.errors import UserError

from .registry import register_model, scaled
from .whitening import PatchWhitening

WIDTHS = (64, 256, 256)
WHITEN_KERNEL = 2
BN_MOMENTUM = 0.4  # PyTorch's convention: running ← (1 − 0.4)·running + 0.4·batch
LOGIT_SCALE = 1 / 9


class ChannelShift(nn.Module):
    """x [B, C, H, W] ↦ x + b_c: the learned shift of a BatchNorm without a learned scale."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias.view(1, -1, 1, 1).to(x.dtype)


def conv_norm(in_channels: int, out_channels: int) -> list[nn.Module]:
    """conv3×3 (same padding, no bias), BN without affine parameters, its learned shift."""
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels, momentum=BN_MOMENTUM, affine=False),
        ChannelShift(out_channels),
    ]


def conv_block(in_channels: int, out_channels: int, norm_after_pool: bool) -> nn.Sequential:
    """conv_norm, 2×2 max-pool, GELU, conv_norm, GELU: [B, C, H, W] → [B, C', H/2, W/2]; with
    `norm_after_pool` the first conv_norm's BN and shift come after the pool."""
    conv, *norm = conv_norm(in_channels, out_channels)
    first = [conv, nn.MaxPool2d(2), *norm] if norm_after_pool else [conv, *norm, nn.MaxPool2d(2)]
    return nn.Sequential(*first, nn.GELU(), *conv_norm(out_channels, out_channels), nn.GELU())


@dataclass(frozen=True)
class SpeedNetConfig:
    """speednet's own settings (a model option, recorded in checkpoints as the GPT's sizes)."""

    norm_after_pool: bool = False


class SpeedNet(nn.Module):
    """Patch whitening, three conv blocks, global max-pool, a scaled bias-free linear head."""

    def __init__(
        self, num_classes: int, width: float, in_channels: int, config: SpeedNetConfig | None = None
    ) -> None:
        super().__init__()
        self.config = config = config or SpeedNetConfig()
        self.whiten = PatchWhitening(in_channels, WHITEN_KERNEL)
        channels = [self.whiten.out_channels] + [scaled(w, width) for w in WIDTHS]
        blocks = zip(channels, channels[1:], strict=False)
        self.blocks = nn.Sequential(
            nn.GELU(),
            *(conv_block(a, b, config.norm_after_pool) for a, b in blocks),
            nn.AdaptiveMaxPool2d(1),
        )
        self.head = nn.Linear(channels[-1], num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] (H, W ≥ 9) → logits [B, num_classes]."""
        return self.head(torch.flatten(self.blocks(self.whiten(x)), 1)) * LOGIT_SCALE


@register_model("speednet", options=("norm_after_pool",))
def speednet(num_classes: int, width: float, in_channels: int, norm_after_pool: bool = False):
    """Fast-training CIFAR net (airbench94 shape): whitening + 6 conv (64-256-256) + 1 linear."""
    if not isinstance(norm_after_pool, bool):
        raise UserError(f"norm_after_pool must be true or false, got {norm_after_pool!r}")
    return SpeedNet(num_classes, width, in_channels, SpeedNetConfig(norm_after_pool))
